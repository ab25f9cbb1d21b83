"""Checks of user-given values, shared by the CLI, the app and the library: each failure is one InputError line.

Every check names the option (or field) it was given, says what is wrong and what is allowed, and
returns the normalised value, so callers write ``steps = check_int("--steps", steps, minimum=1)``.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InputError

#: Seeds go to ``torch.Generator.manual_seed``, which takes 64-bit values; image k uses seed + k.
MAX_SEED = 2**63 - 1
#: Larger images than this are almost certainly a typo (SDXL's native size is 1024).
MAX_IMAGE_SIDE = 4096


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer within [minimum, maximum]."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not isinstance(value, int):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a whole number, got {value!r}") from None
        if not math.isfinite(number) or not number.is_integer():
            raise InputError(f"{name} must be a whole number, got {value!r}")
        value = int(number)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    """A finite number within [minimum, maximum] (and > `above` when given); NaN and ±inf are refused."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise InputError(f"{name} must be at least {minimum:g}, got {number:g}")
    if maximum is not None and number > maximum:
        raise InputError(f"{name} must be at most {maximum:g}, got {number:g}")
    if above is not None and number <= above:
        raise InputError(f"{name} must be above {above:g}, got {number:g}")
    return number


def check_seed(name: str, value: Any, count: int = 1) -> int:
    """A seed such that seed, seed + 1, …, seed + count − 1 are all valid generator seeds."""
    return check_int(name, value, minimum=0, maximum=MAX_SEED - max(count - 1, 0))


def check_image_side(name: str, value: Any | None) -> int | None:
    """None (the model's own size) or a positive multiple of 8 up to MAX_IMAGE_SIDE."""
    if value is None:
        return None
    side = check_int(name, value, minimum=8, maximum=MAX_IMAGE_SIDE)
    if side % 8:
        raise InputError(f"{name} must be a multiple of 8, got {side}")
    return side


def check_text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    """Text that is valid Unicode (a non-UTF-8 command-line argument arrives as lone surrogates)."""
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None
    if not allow_empty and not text.strip():
        raise InputError(f"{name} is empty")
    return text


def check_device(name: str, value: str | None):
    """A torch device that exists on this machine (None: the default device)."""
    import torch

    from .loading import default_device

    if value is None:
        return default_device()
    try:
        device = torch.device(str(value).strip())
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
