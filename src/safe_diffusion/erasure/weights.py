"""Exchanging edited weights: the safetensors file of UNet parameters that the official UCE and ESD code save."""

from __future__ import annotations

from pathlib import Path

from ..common.errors import InputError


def load_erasure_weights(pipe, path: str | Path) -> list[str]:
    """Apply an edited-weights file (ours, or one saved by the official UCE/ESD code) to ``pipe.unet``;
    returns the parameter names it replaced. Every key must name a UNet parameter of the same shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path))
    except (OSError, SafetensorError) as exc:  # missing or unreadable file, not safetensors
        raise InputError(f"cannot read edited weights {str(path)!r}: {exc}") from None
    params = dict(pipe.unet.named_parameters())
    for key, value in weights.items():
        if key not in params:
            raise InputError(f"{path}: {key!r} is not a parameter of this model's UNet")
        if tuple(value.shape) != tuple(params[key].shape):
            raise InputError(
                f"{path}: {key!r} has shape {tuple(value.shape)}, the UNet's is {tuple(params[key].shape)}"
            )
    import torch

    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value.to(params[key].dtype))
    return sorted(weights)
