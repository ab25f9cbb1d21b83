"""UCE and RECE applied to a loaded diffusers pipeline: edit its UNet in place, return the edited weights.

The math lives in :mod:`.uce` and :mod:`.rece`; this module gathers the embeddings and the projections.
Closed forms are solved in float64 (the official code inverts in float32, where the λ·I + Σ c cᵀ of
long CLIP embeddings is ill-conditioned enough to cost digits), then cast back to the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .common import concept_embeddings, require_cross_attention, sequence_embeddings
from .rece import rece_adversarial_map_gram, rece_residual_gram
from .uce import uce_edit_matrix


@dataclass
class EditResult:
    """Edited weights keyed by UNet parameter name (``…attn2.to_k.weight``) and, for RECE, per-epoch diagnostics."""

    weights: dict[str, torch.Tensor]
    epochs: list[dict] = field(default_factory=list)


def _apply(projections: dict[str, torch.nn.Linear], originals: list[torch.Tensor], transform: torch.Tensor) -> None:
    """W = W_old·T for every projection. T carries the conditioning (solved in float64); the product itself
    is well conditioned and runs in the weights' dtype."""
    for module, w in zip(projections.values(), originals):
        module.weight.data = w @ transform.to(w.dtype)


def _weights(projections: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": module.weight.detach().clone() for name, module in projections.items()}


def uce_transform(
    pipe,
    erase: Sequence[str],
    guide: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """The float64 d × d matrix T of UCE eq. (7) for these texts (:func:`.uce.uce_edit_matrix`): W = W_old·T."""
    guide = list(guide) if guide is not None else [""] * len(erase)
    texts = list(dict.fromkeys([*erase, *guide, *preserve]))
    table = dict(zip(texts, concept_embeddings(pipe, texts).double()))

    def stack(items):
        return torch.stack([table[t] for t in items]) if items else None

    return uce_edit_matrix(
        stack(list(erase)), stack(guide), stack(list(preserve)),
        lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale,
    )


@torch.no_grad()
def apply_uce(
    pipe,
    erase: Sequence[str],
    guide: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    model_name: str = "model",
) -> EditResult:
    """Erase `erase` from `pipe.unet` with UCE eq. (7), mapping concept i to `guide[i]` (default ``""``,
    the unconditional embedding) and keeping `preserve`. All concepts are one solve; each projection one product."""
    projections = require_cross_attention(pipe, model_name)
    transform = uce_transform(
        pipe, erase, guide, preserve, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale
    )
    _apply(projections, [m.weight.detach() for m in projections.values()], transform)
    return EditResult(_weights(projections))


@torch.no_grad()
def apply_rece(
    pipe,
    erase: Sequence[str],
    guide: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    epochs: int = 3,
    rece_lamb: float = 0.1,
    rece_erase_scale: float = 1.0,
    rece_preserve_scale: float = 0.1,
    regularization: float = 0.1,
    model_name: str = "model",
) -> EditResult:
    """UCE (with `lamb`, `erase_scale`, `preserve_scale`), then `epochs` RECE epochs: derive the embeddings
    that regenerate each erased concept in the edited model (:func:`.rece.rece_adversarial_map`) and erase
    them towards the guide (eq. (7) over whole token sequences, with the ``rece_*`` scales), all concepts at once.

    RECE's preserved texts are `preserve`, or the empty text once per erased concept when none is
    given (the official code's default for nudity and objects). Every edit is W ← W·T, so the epochs
    compose d × d matrices (:func:`.rece.rece_adversarial_map_gram`) and the layers are written once.
    """
    projections = require_cross_attention(pipe, model_name)
    originals = [m.weight.detach() for m in projections.values()]
    gram = sum(w.double().mT @ w.double() for w in originals)  # G = Σ_l W_lᵀ W_l of the original model
    total = uce_transform(
        pipe, erase, guide, preserve, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale
    )
    guide = list(guide) if guide is not None else [""] * len(erase)
    kept = list(preserve) if preserve else [""] * len(erase)
    d = gram.shape[-1]
    concept_seq = sequence_embeddings(pipe, list(erase)).double()
    guide_seq = sequence_embeddings(pipe, guide).double().reshape(-1, d)
    kept_seq = sequence_embeddings(pipe, kept).double().reshape(-1, d)
    history = []
    for epoch in range(epochs):
        k = rece_adversarial_map_gram(gram, total, regularization=regularization)
        adversarial = concept_seq @ k.mT
        residual = rece_residual_gram(gram, total, adversarial, concept_seq)
        total = total @ uce_edit_matrix(
            adversarial.reshape(-1, d), guide_seq, kept_seq,
            lamb=rece_lamb, erase_scale=rece_erase_scale, preserve_scale=rece_preserve_scale,
        )
        history.append({
            "epoch": epoch + 1,
            "adversarial_residual": float(residual),
            "adversarial_norm": float(adversarial.norm(dim=-1).mean()),
        })
    _apply(projections, originals, total)
    return EditResult(_weights(projections), history)
