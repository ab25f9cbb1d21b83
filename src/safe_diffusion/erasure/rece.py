"""Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024), as pure functions over tensors.

RECE alternates two closed forms on a model whose cross-attention projections were edited by UCE:
it derives the embedding c' that makes the *edited* projections W'_l reproduce what the *original*
ones W_l output for the erased concept, then erases c' with UCE's eq. (7) (see
:func:`safe_diffusion.erasure.uce.uce_edit_matrix`). Nothing here knows about pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rece_adversarial_map(
    edited: Sequence[torch.Tensor], original: Sequence[torch.Tensor], *, regularization: float = 0.1
) -> torch.Tensor:
    """The d × d matrix K of RECE's closed-form new embedding, c' = K·c, regularised towards zero:

    ``c' = argmin_c' Σ_l ‖W'_l c' − W_l c‖² + λ‖c'‖² = (λ·I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W_l) c``

    summed over every edited cross-attention key and value projection l (W'_l, W_l: out_l × d;
    the paper's regulariser λ, the official code's ``close_regzero`` variant). Apply it to each
    token of the concept's embedding sequence: ``c_adv = c @ K.mT``.
    """
    if len(edited) != len(original) or not edited:
        raise ValueError("edited and original must be equally long, non-empty lists of projections")
    d = edited[0].shape[-1]
    gram = regularization * torch.eye(d, dtype=edited[0].dtype, device=edited[0].device)
    cross = torch.zeros_like(gram)
    for w_new, w_old in zip(edited, original):
        gram = gram + w_new.mT @ w_new
        cross = cross + w_new.mT @ w_old.to(w_new.dtype)
    return torch.linalg.solve(gram, cross)


def rece_adversarial_map_gram(
    gram: torch.Tensor, transform: torch.Tensor, *, regularization: float = 0.1
) -> torch.Tensor:
    """:func:`rece_adversarial_map` for projections edited as W'_l = W_l·T (every UCE and RECE edit is one):

    ``K = (λ·I + Tᵀ G T)⁻¹ Tᵀ G`` with the original projections' Gram matrix G = Σ_l W_lᵀ W_l, since
    Σ_l W'_lᵀ W'_l = Tᵀ G T and Σ_l W'_lᵀ W_l = Tᵀ G. Each epoch then costs O(d³), whatever the layers.
    """
    d = gram.shape[-1]
    tg = transform.mT @ gram
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(regularization * eye + tg @ transform, tg)


def rece_residual_gram(
    gram: torch.Tensor, transform: torch.Tensor, adversarial: torch.Tensor, concept: torch.Tensor
) -> torch.Tensor:
    """:func:`rece_residual` for W'_l = W_l·T: Σ_l ‖W_l(T c' − c)‖² / Σ_l ‖W_l c‖², through G = Σ_l W_lᵀ W_l."""
    diff = adversarial @ transform.mT - concept
    return ((diff @ gram) * diff).sum() / ((concept @ gram) * concept).sum()


def rece_residual(
    edited: Sequence[torch.Tensor], original: Sequence[torch.Tensor], adversarial: torch.Tensor, concept: torch.Tensor
) -> torch.Tensor:
    """How well the adversarial embeddings regenerate the concept: Σ_l ‖W'_l c' − W_l c‖² / Σ_l ‖W_l c‖².

    0 means the edited model maps c' exactly to what the original mapped c to (the erasure is fully
    circumvented); 1 means c' recovers nothing. adversarial, concept: (…, d) rows.
    """
    num = adversarial.new_zeros(())
    den = adversarial.new_zeros(())
    for w_new, w_old in zip(edited, original):
        target = concept @ w_old.to(concept.dtype).mT
        num = num + (adversarial @ w_new.to(adversarial.dtype).mT - target).square().sum()
        den = den + target.square().sum()
    return num / den
