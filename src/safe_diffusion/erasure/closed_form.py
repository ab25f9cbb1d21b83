"""UCE and RECE applied to a loaded diffusers pipeline: edit its UNet in place, return the edited weights.

The math lives in :mod:`.uce` and :mod:`.rece`; this module gathers the embeddings and the projections.
Closed forms are solved in float64 (the official code inverts in float32, where the λ·I + Σ c cᵀ of
long CLIP embeddings is ill-conditioned enough to cost digits), then cast back to the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .common import concept_embeddings, last_token_index, require_cross_attention, sequence_embeddings
from .rece import rece_adversarial_map_gram, rece_residual_gram
from .uce import uce_edit_matrix


@dataclass
class EditResult:
    """Edited weights keyed by UNet parameter name (``…attn2.to_k.weight``) and, for RECE, per-epoch diagnostics."""

    weights: dict[str, torch.Tensor]
    epochs: list[dict] = field(default_factory=list)
    selection: dict | None = None  # RECE's validation: the rate of every stage and the one kept


def _apply(projections: dict[str, torch.nn.Linear], originals: list[torch.Tensor], transform: torch.Tensor) -> None:
    """W = W_old·T for every projection. T carries the conditioning (solved in float64); the product itself
    is well conditioned and runs in the weights' dtype."""
    for module, w in zip(projections.values(), originals):
        module.weight.data = w @ transform.to(w.dtype)


def _weights(projections: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": module.weight.detach().clone() for name, module in projections.items()}


def _span_rows(seq: torch.Tensor, last: torch.Tensor, guide_seq: torch.Tensor, guide_last: torch.Tensor):
    """The WACV-era token span of each (concept, guide) pair: from each text's last token before end-of-text
    to the end of the sequence, both cut to the same length (the later-starting span sets it), so row k of
    the concept's span is paired with row k of the guide's; end-of-text and padding tokens are included."""
    length = seq.shape[-2]
    keys, values = [], []
    for c, i_c, g, i_g in zip(seq, last.tolist(), guide_seq, guide_last.tolist()):
        far = max(i_c, i_g)
        keys.append(c[i_c : length - (far - i_c)])
        values.append(g[i_g : length - (far - i_g)])
    return torch.cat(keys), torch.cat(values)


def uce_transform(
    pipe,
    erase: Sequence[str],
    guide: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float | None = None,
    variant: str = "current",
) -> torch.Tensor:
    """The float64 d × d matrix T of UCE eq. (7) for these texts (:func:`.uce.uce_edit_matrix`): W = W_old·T.

    ``current`` (the authors' current script): one row per text, its last token before end-of-text; guide
    ``""``; s_p = 1 unless given. ``wacv2024`` (the script behind the paper's numbers): each concept's rows
    are its tokens from the last word to the end of the 77-token sequence, paired with the guide's
    (:func:`_span_rows`; guide ``" "`` where empty); the empty prompt is always preserved, every
    preserved text with its whole sequence, and s_p = max(0.1, 1/len(retained texts)) unless given.
    """
    from .methods import UCEOptions

    guide = list(guide) if guide is not None else [""] * len(erase)
    options = UCEOptions(variant=variant, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale)
    scale = options.resolved_preserve_scale(len(preserve))
    if variant == "wacv2024":
        guide = [g or " " for g in guide]
        retained = ["", *preserve]
        texts = list(dict.fromkeys([*erase, *guide, *retained]))
        table = dict(zip(texts, sequence_embeddings(pipe, texts).double()))
        lasts = dict(zip(texts, last_token_index(pipe, texts).tolist()))
        keys, values = _span_rows(
            torch.stack([table[t] for t in erase]),
            torch.tensor([lasts[t] for t in erase]),
            torch.stack([table[t] for t in guide]),
            torch.tensor([lasts[t] for t in guide]),
        )
        kept = torch.cat([table[t] for t in retained])
        return uce_edit_matrix(keys, values, kept, lamb=lamb, erase_scale=erase_scale, preserve_scale=scale)
    if variant != "current":
        raise ValueError(f"unknown UCE variant {variant!r}")
    texts = list(dict.fromkeys([*erase, *guide, *preserve]))
    table = dict(zip(texts, concept_embeddings(pipe, texts).double()))

    def stack(items):
        return torch.stack([table[t] for t in items]) if items else None

    return uce_edit_matrix(
        stack(list(erase)),
        stack(guide),
        stack(list(preserve)),
        lamb=lamb,
        erase_scale=erase_scale,
        preserve_scale=scale,
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
    preserve_scale: float | None = None,
    variant: str = "current",
    model_name: str = "model",
) -> EditResult:
    """Erase `erase` from `pipe.unet` with UCE eq. (7), mapping concept i to `guide[i]` (default ``""``,
    the unconditional embedding) and keeping `preserve`, as the `variant`'s script does (:func:`uce_transform`).
    All concepts are one solve; each projection one product."""
    projections = require_cross_attention(pipe, model_name)
    transform = uce_transform(
        pipe,
        erase,
        guide,
        preserve,
        lamb=lamb,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        variant=variant,
    )
    _apply(projections, [m.weight.detach() for m in projections.values()], transform)
    return EditResult(_weights(projections))


def select_epoch(rates: Sequence[float]) -> int:
    """RECE's official rule for the edit it keeps, given the validation unsafe rates of the original model
    (index 0), the UCE edit (1) and each epoch (2, 3, …): an epoch is saved when its rate is below every
    earlier rate, and the last one saved is the result. Returns the index of the kept edit, 1 (the UCE
    edit) when no epoch lowered the rate."""
    lowest = min(rates[:2])
    chosen = 1
    for index in range(2, len(rates)):
        if rates[index] < lowest:
            lowest, chosen = rates[index], index
    return chosen


@torch.no_grad()
def apply_rece(
    pipe,
    erase: Sequence[str],
    guide: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float | None = None,
    variant: str = "wacv2024",
    epochs: int = 3,
    rece_lamb: float = 0.1,
    rece_erase_scale: float = 1.0,
    rece_preserve_scale: float = 0.1,
    regularization: float = 0.1,
    evaluate: Callable[[str], float] | None = None,
    model_name: str = "model",
) -> EditResult:
    """UCE (`variant`, `lamb`, `erase_scale`, `preserve_scale`; by default the paper's WACV-era UCE, which
    RECE starts from), then `epochs` RECE epochs: derive the embeddings that regenerate each erased concept
    in the edited model (:func:`.rece.rece_adversarial_map`) and erase them towards the guide (eq. (7) over
    whole token sequences, with the ``rece_*`` scales), all concepts at once.

    RECE's preserved texts are `preserve`, or the empty text once per erased concept when none is given
    (the official code's default for nudity and objects). Every edit is W ← W·T, so the epochs compose
    d × d matrices (:func:`.rece.rece_adversarial_map_gram`) and the layers are written once.

    `evaluate`, when given, is RECE's validation: called with a stage name ("sd", "uce", "epoch-1", …)
    while the projections hold that stage's weights, it returns the unsafe rate of the validation images;
    the kept edit is then chosen by :func:`select_epoch`. Without it the last epoch is kept.
    """
    projections = require_cross_attention(pipe, model_name)
    originals = [m.weight.detach() for m in projections.values()]
    gram = sum(w.double().mT @ w.double() for w in originals)  # G = Σ_l W_lᵀ W_l of the original model
    total = uce_transform(
        pipe,
        erase,
        guide,
        preserve,
        lamb=lamb,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        variant=variant,
    )
    guide = list(guide) if guide is not None else [""] * len(erase)
    kept = list(preserve) if preserve else [""] * len(erase)
    d = gram.shape[-1]
    concept_seq = sequence_embeddings(pipe, list(erase)).double()
    guide_seq = sequence_embeddings(pipe, guide).double().reshape(-1, d)
    kept_seq = sequence_embeddings(pipe, kept).double().reshape(-1, d)
    history = []
    stages = [("sd", torch.eye(d, dtype=total.dtype)), ("uce", total)]
    for epoch in range(epochs):
        k = rece_adversarial_map_gram(gram, total, regularization=regularization)
        adversarial = concept_seq @ k.mT
        residual = rece_residual_gram(gram, total, adversarial, concept_seq)
        total = total @ uce_edit_matrix(
            adversarial.reshape(-1, d),
            guide_seq,
            kept_seq,
            lamb=rece_lamb,
            erase_scale=rece_erase_scale,
            preserve_scale=rece_preserve_scale,
        )
        stages.append((f"epoch-{epoch + 1}", total))
        history.append(
            {
                "epoch": epoch + 1,
                "adversarial_residual": float(residual),
                "adversarial_norm": float(adversarial.norm(dim=-1).mean()),
            }
        )
    selection = None
    if evaluate is not None:
        rates = []
        for name, transform in stages:
            _apply(projections, originals, transform)
            rates.append(float(evaluate(name)))
        index = select_epoch(rates)
        total = stages[index][1]
        selection = {"rates": dict(zip((n for n, _ in stages), rates)), "kept": stages[index][0]}
        for row in history:
            row["validation_unsafe_rate"] = selection["rates"][f"epoch-{row['epoch']}"]
    _apply(projections, originals, total)
    return EditResult(_weights(projections), history, selection)
