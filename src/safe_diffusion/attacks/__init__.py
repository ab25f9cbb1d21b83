"""Attacks that red-team a mitigation by optimising against the defended model itself (issue 20).

So far the optimisation of UnlearnDiffAtk (:mod:`.unlearndiffatk`); the ``attack run`` job that stores,
generates and judges around it, P4D, Ring-A-Bell and MMA-Diffusion are still to come (docs/attacks.md).
"""

from __future__ import annotations

from ..common.registry import Registry

#: Attacks by name (lazy: listing them imports no torch).
ATTACKS: Registry = Registry("attacks")
ATTACKS.register(
    "unlearndiffatk",
    "safe_diffusion.attacks.unlearndiffatk:UnlearnDiffAtk",
    summary="UnlearnDiffAtk (Zhang et al., ECCV 2024): adversarial prefix tokens against the victim's denoiser",
)
