"""Erasing Concepts from Diffusion Models (ESD; Gandikota et al., ICCV 2023), as pure functions.

ESD fine-tunes a copy θ of the model so that, conditioned on the erased concept c, it predicts the
frozen model θ*'s noise *negatively guided* away from c. Nothing here knows about pipelines.
"""

from __future__ import annotations

import torch


def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """ESD's training target (the paper's negative-guidance objective):

    ``ε_θ*(x_t, t) − η·(ε_θ*(x_t, c, t) − ε_θ*(x_t, t))``

    from the frozen model's unconditional and concept noise estimates and the negative guidance η.
    """
    return eps_uncond - negative_guidance * (eps_concept - eps_uncond)


def esd_loss(eps_trained: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ESD's loss: the mean squared error between ε_θ(x_t, c, t) and :func:`esd_target` (in float32 at least)."""
    dtype = torch.promote_types(eps_trained.dtype, torch.float32)
    return torch.nn.functional.mse_loss(eps_trained.to(dtype), target.to(dtype))


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): ε_∅ + s·(ε_c − ε_∅); ESD samples x_t with it."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
