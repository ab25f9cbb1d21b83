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

#: The attacks that search the text encoder alone (model-agnostic): they run against any pipeline whose
#: ``text_encoder`` is one of :data:`CLIP_TEXT_ENCODERS`, and the target is used only to generate and judge.
TEXT_ATTACKS = ("ring-a-bell", "mma")
#: The CLIP text towers the text attacks search: SD 1.x's and SDXL's first encoder, SD 3's and FLUX's CLIP-L
#: (OpenAI's ViT-L/14, the encoder both official codes search), SD 2.x's OpenCLIP-H.
CLIP_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")


def clip_text_model(text_encoder):
    """`text_encoder` as the text attacks read it: a ``CLIPTextModel`` (hidden states first, ``pooler_output``).
    SD 3's ``CLIPTextModelWithProjection``, whose first output is the projected embedding instead, is wrapped
    around its own text tower, sharing its weights; anything else is refused in one line."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if isinstance(text_encoder, CLIPTextModel):
        return text_encoder
    if isinstance(text_encoder, CLIPTextModelWithProjection):
        with torch.device("meta"):
            plain = CLIPTextModel(text_encoder.config)
        # every weight and buffer of the plain model is the projection model's own tensor (shared, not copied),
        # found by name whether or not this transformers nests the tower under ``text_model``
        have = {**dict(text_encoder.named_parameters()), **dict(text_encoder.named_buffers())}
        for name, _ in [*plain.named_parameters(), *plain.named_buffers()]:
            bare = name.removeprefix("text_model.")
            found = next((have[k] for k in (name, bare, f"text_model.{bare}") if k in have), None)
            if found is None:
                raise InputError(f"cannot read SD 3's CLIP text encoder as a CLIPTextModel: no {name!r} in it")
            owner, _, attr = name.rpartition(".")
            module = plain.get_submodule(owner)
            (module._parameters if attr in module._parameters else module._buffers)[attr] = found
        return plain.eval()
    raise InputError(
        f"the text attacks search a CLIP text encoder ({', '.join(CLIP_TEXT_ENCODERS)});"
        f" this pipeline's text_encoder is {type(text_encoder).__name__}"
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
