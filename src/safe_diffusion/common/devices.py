"""The one device resolver: which torch device a job runs on, and whether its processes use the CPU.

:func:`default_device` is what a job uses when the user names none (CUDA, else Apple's MPS, else the
CPU); :func:`check_device` turns a user's ``--device`` into a torch device that exists on this machine
or one :class:`~safe_diffusion.common.errors.InputError` line; :func:`use_cpu` says whether a
(possibly multi-process, ``accelerate launch``) job must run on the CPU.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError


def default_device():
    """CUDA when there is one, else Apple's MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(name: str, value: Any):
    """A torch device that exists on this machine (None: :func:`default_device`); `name` is the option."""
    import torch

    if value is None:
        return default_device()
    if isinstance(value, torch.device):
        text = str(value)
    else:
        text = str(value).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"{name} {value!r} is not a device; use e.g. cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name} {value!r}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"{name} {value!r}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise InputError(f"{name} {value!r} is not supported; use cpu, cuda or mps")
    return device


def use_cpu(device: Any = None) -> bool:
    """Whether a job's processes run on the CPU: when the launcher says so (``accelerate launch --cpu`` sets
    ACCELERATE_USE_CPU), when `device` is the CPU, or when there is no CUDA."""
    import torch
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available():
        return True
    return device is not None and torch.device(str(device)).type == "cpu"


def process_state(device: Any = None):
    """This process's place in an ``accelerate launch`` / torchrun job (a single process otherwise).

    PartialState only uses gloo on CPUs when asked to; it is asked when :func:`use_cpu` says so.
    """
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(device))
