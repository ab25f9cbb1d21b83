"""Attacks that red-team a mitigation by optimising against the defended model itself (issue 20).

The optimisations of UnlearnDiffAtk (:mod:`.unlearndiffatk`), P4D-N/K (:mod:`.p4d`) and Ring-A-Bell
(:mod:`.ring_a_bell`) and MMA-Diffusion's text attack (:mod:`.mma`), as functions of tensors and pipelines; the
``attack run`` job that stores, generates and judges around them is :mod:`safe_diffusion.jobs.attack`.
"""

from __future__ import annotations

from typing import Any

from ..common.errors import InputError
from ..common.registry import Registry

#: Attacks by name (lazy: listing them imports no torch). Each entry is the attack's ``Settings`` class.
ATTACKS: Registry = Registry("attacks")
ATTACKS.register(
    "unlearndiffatk",
    "safe_diffusion.attacks.unlearndiffatk:Settings",
    summary="UnlearnDiffAtk (Zhang et al., ECCV 2024): adversarial prefix tokens against the victim's denoiser",
)
ATTACKS.register(
    "p4d-n",
    "safe_diffusion.attacks.p4d:Settings",
    summary="P4D-N (Chin et al., ICML 2024): 16 learned tokens matching the unconstrained model's noise estimate",
)
ATTACKS.register(
    "p4d-k",
    "safe_diffusion.attacks.p4d:Settings",
    summary="P4D-K (Chin et al., ICML 2024): a learned token after every 3 of the prompt's, same objective",
)
ATTACKS.register(
    "ring-a-bell",
    "safe_diffusion.attacks.ring_a_bell:Settings",
    summary="Ring-A-Bell (Tsai et al., ICLR 2024): genetic search toward the prompt plus a concept vector",
)
ATTACKS.register(
    "mma",
    "safe_diffusion.attacks.mma:Settings",
    summary="MMA-Diffusion, text (Yang et al., CVPR 2024): coordinate-gradient token search, sensitive words banned",
)

#: The command-line options each attack reads, and its settings' field for each.
OPTIONS: dict[str, dict[str, str]] = {
    "unlearndiffatk": {"iterations": "iterations", "timesteps": "timesteps", "tokens": "tokens"},
    "p4d-n": {"iterations": "iterations", "tokens": "tokens", "eval_every": "eval_every", "victim": "victim"},
    "p4d-k": {"iterations": "iterations", "every_k": "every_k", "eval_every": "eval_every", "victim": "victim"},
    "ring-a-bell": {
        "iterations": "generations",
        "tokens": "length",
        "concept": "concept",
        "coefficient": "coefficient",
        "population": "population",
    },
    "mma": {"iterations": "iterations", "tokens": "tokens", "candidates": "candidates"},
}


def settings_for(method: str, **given: Any):
    """The `method`'s settings: its official defaults, changed by the options `given` (None: not given). An
    option the method does not read is refused in one line."""
    cls = ATTACKS.get(method)  # an unknown attack is one line listing the known ones
    fields = OPTIONS.get(method, {})
    extra = {"variant": method[-1]} if method.startswith("p4d-") else {}
    for name, value in given.items():
        if value is not None and name not in fields:
            raise InputError(f"--{name.replace('_', '-')} does not apply to attack {method}")
    return cls(**extra, **{fields[k]: v for k, v in given.items() if v is not None})
