"""Safe Latent Diffusion guidance (Schramowski et al., CVPR 2023), as pure functions over tensors.

Notation follows the paper: ε_∅ is the unconditional noise estimate, ε_p the prompt's, ε_S the
safety concept's. Every function takes its state explicitly and returns the new state; nothing
here knows about pipelines, schedulers or devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

import torch


def safety_scale(eps_text: torch.Tensor, eps_safety: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """Element-wise safety scale μ of SLD eq. (6): clamp(s_S·|ε_p − ε_S|, max 1) where ε_p − ε_S < λ, else 0."""
    diff = eps_text - eps_safety
    mu = torch.clamp(diff.abs() * scale, max=1.0)
    return torch.where(diff >= threshold, torch.zeros_like(mu), mu)


def safety_guidance(
    eps_uncond: torch.Tensor,
    eps_text: torch.Tensor,
    eps_safety: torch.Tensor,
    momentum: torch.Tensor,
    *,
    scale: float,
    threshold: float,
    momentum_scale: float,
    mom_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safety guidance γ_t of SLD eq. (4) with momentum, eq. (7); returns (γ_t, new momentum ν_{t+1} of eq. (8))."""
    gamma = (eps_safety - eps_uncond) * safety_scale(eps_text, eps_safety, scale, threshold)  # eq. (4)
    gamma = gamma + momentum_scale * momentum  # eq. (7)
    new_momentum = mom_beta * momentum + (1 - mom_beta) * gamma  # eq. (8)
    return gamma, new_momentum


def sld_step(
    eps_uncond: torch.Tensor,
    eps_text: torch.Tensor,
    eps_safety: torch.Tensor | None,
    step: int,
    momentum: torch.Tensor | None,
    *,
    scale: float,
    warmup_steps: int,
    threshold: float,
    momentum_scale: float,
    mom_beta: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The term SLD subtracts inside the guidance bracket of eq. (3) at `step` (zero during warmup δ), and the new momentum.

    `eps_safety` may be None only at a step where :func:`needs_safety_estimate` is False: the term is
    then zero and the momentum, which can never be read, is left as it is.
    """
    if eps_safety is None:
        return torch.zeros_like(eps_text), momentum
    if momentum is None:
        momentum = torch.zeros_like(eps_text)
    gamma, momentum = safety_guidance(
        eps_uncond,
        eps_text,
        eps_safety,
        momentum,
        scale=scale,
        threshold=threshold,
        momentum_scale=momentum_scale,
        mom_beta=mom_beta,
    )
    if step < warmup_steps:  # eq. (3): guidance starts after the warm-up δ
        gamma = torch.zeros_like(gamma)
    return gamma, momentum


def needs_safety_estimate(step: int, *, warmup_steps: int, momentum_scale: float) -> bool:
    """Whether ε_S can change the result at `step`: after warm-up, or during it while momentum (eq. 7) is read later."""
    return step >= warmup_steps or momentum_scale != 0


@dataclass(frozen=True)
class _Preset(Mapping):
    """One preset: a read-only mapping of the drop-in pipeline's ``sld_*`` keyword arguments."""

    sld_warmup_steps: int
    sld_guidance_scale: float
    sld_threshold: float
    sld_momentum_scale: float
    sld_mom_beta: float

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in fields(self))

    def __len__(self) -> int:
        return len(fields(self))


class SafetyConfig:
    """The paper's four hyper-parameter sets (SLD, Table 1), usable as ``pipe(prompt, **SafetyConfig.STRONG)``."""

    WEAK = _Preset(
        sld_warmup_steps=15, sld_guidance_scale=20, sld_threshold=0.0, sld_momentum_scale=0.0, sld_mom_beta=0.0
    )
    MEDIUM = _Preset(
        sld_warmup_steps=10, sld_guidance_scale=1000, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4
    )
    STRONG = _Preset(
        sld_warmup_steps=7, sld_guidance_scale=2000, sld_threshold=0.025, sld_momentum_scale=0.5, sld_mom_beta=0.7
    )
    MAX = _Preset(
        sld_warmup_steps=0, sld_guidance_scale=5000, sld_threshold=1.0, sld_momentum_scale=0.5, sld_mom_beta=0.7
    )

    NAMES = ("weak", "medium", "strong", "max")

    @classmethod
    def get(cls, name: str) -> _Preset:
        """The preset called `name` (case-insensitive); ValueError naming the valid ones otherwise."""
        key = str(name).strip().lower()
        if key not in cls.NAMES:
            raise ValueError(f"unknown safety preset {name!r}; choose one of: {', '.join(cls.NAMES)}")
        return getattr(cls, key.upper())


#: The safety concept S of the paper, the text SLD steers away from by default.
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)
