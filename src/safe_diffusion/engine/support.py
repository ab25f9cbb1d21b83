"""Which pipelines the engine serves: found by their components, refused in one line when it cannot serve them.

A pipeline is served when one of its components is a denoiser an adapter knows and the pipeline
encodes text with ``encode_prompt``. Pipelines whose denoising step has a layout guidance rows
cannot join are refused on entering ``guide()`` (never a silent no-op, never a crash mid-call):

* three-block CFG batches: perturbed-attention guidance (PAG: its attention processors split the
  batch in three) and InstructPix2Pix (text, image and unconditional blocks);
* self-attention guidance (SAG), which reads the CFG batch's attention maps split in two;
* MultiDiffusion panoramas, which denoise view batches with interleaved CFG rows;
* pipelines that apply semantic guidance of their own (LEDITS++, diffusers' SEGA pipeline);
* modular pipelines, which take guidance through their guider: :mod:`.guiders` has SLD and SEGA
  as ``BaseGuidance`` guiders for them.
"""

from __future__ import annotations

import inspect

import torch

from ..common.errors import UnsupportedPipelineError
from .adapters import DenoiserAdapter, adapter_for, known_denoisers

#: Call arguments that give a pipeline's batch layout away, and why guidance rows cannot join it.
REFUSED_ARGUMENTS = {
    "image_guidance_scale": (
        "it batches three blocks per step (text, image, unconditional: InstructPix2Pix-style guidance)"
    ),
    "pag_scale": (
        "its perturbed-attention guidance batches a third block that its attention processors split off by "
        "position; use the pipeline without PAG"
    ),
    "sag_scale": "self-attention guidance reads the attention maps of the guidance batch split in two",
    "view_batch_size": "it denoises a panorama in batches of views with interleaved guidance rows",
    "editing_prompt": "it applies its own semantic guidance; use guide() on the plain pipeline instead",
}


def call_parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(pipe).__call__).parameters)


def served_denoisers(pipe) -> list[tuple[str, torch.nn.Module, type[DenoiserAdapter]]]:
    """The pipeline's denoisers and their adapters, or a :class:`UnsupportedPipelineError` saying why it is not served."""
    name = type(pipe).__name__
    try:
        from diffusers.modular_pipelines import ModularPipeline
    except ImportError:  # pragma: no cover - older diffusers
        ModularPipeline = ()
    if ModularPipeline and isinstance(pipe, ModularPipeline):
        raise UnsupportedPipelineError(
            f"guide() cannot serve {name}: modular pipelines take guidance through their guider; use "
            "safe_diffusion.engine.guiders.SafetyGuider or SemanticGuider (docs/guidance.md)"
        )
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise UnsupportedPipelineError(f"guide() needs a diffusers pipeline, got {name}")
    if not getattr(type(pipe), "_safe_diffusion_native", False):
        params = call_parameters(pipe)
        for arg, reason in REFUSED_ARGUMENTS.items():
            if arg in params:
                raise UnsupportedPipelineError(f"guide() cannot serve {name}: {reason}")
        try:
            from diffusers.pipelines.pag.pag_utils import PAGMixin

            if isinstance(pipe, PAGMixin):
                raise UnsupportedPipelineError(f"guide() cannot serve {name}: {REFUSED_ARGUMENTS['pag_scale']}")
        except ImportError:  # pragma: no cover
            pass
    found = []
    for key, module in components.items():
        if isinstance(module, torch.nn.Module):
            adapter = adapter_for(module)
            if adapter is not None:
                found.append((key, module, adapter))
    if not found:
        raise UnsupportedPipelineError(
            f"guide() cannot serve {name}: none of its components is a denoiser it knows "
            f"({', '.join(known_denoisers())})"
        )
    params = call_parameters(pipe)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # a wrapper's **kwargs
    if not getattr(type(pipe), "_safe_diffusion_native", False) and not open_ended:
        for _, _, adapter in found:
            if adapter.scale_arg not in params:
                raise UnsupportedPipelineError(
                    f"guide() cannot serve {name}: it has no classifier-free guidance for guidance to join (no "
                    f"{adapter.scale_arg} argument), so SLD and SEGA could never act; {adapter.without_cfg_advice}"
                )
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise UnsupportedPipelineError(
            f"guide() cannot serve {name}: it has no encode_prompt to encode guidance concepts with"
        )
    return found


def cfg_off_reason(pipe, call: dict) -> str | None:
    """Why a call of `pipe` with the arguments `call` would run without classifier-free guidance (so that
    guidance terms could not act), or None when it runs with it: the check :func:`~safe_diffusion.guide`
    makes at each call, made before a job writes anything. FLUX's and Qwen-Image's true CFG, say, needs
    ``true_cfg_scale > 1`` and a negative prompt in the call."""
    name, module, adapter = served_denoisers(pipe)[0]
    on, reason = adapter(pipe, name, module).cfg_in_call(call)
    return None if on else reason
