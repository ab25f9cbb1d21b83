"""Unified Concept Editing (Gandikota et al., WACV 2024), as pure functions over tensors.

Notation follows the paper: W_old is a cross-attention key or value projection (out × d), c_i the
text embedding of an erased concept, c_guide(i) the embedding it is mapped to, c_j a preserved
concept's embedding; λ, s_e and s_p are the regulariser and the erase and preserve scales. Nothing
here knows about pipelines, tokenizers or devices; every function takes tensors of any leading shape.
"""

from __future__ import annotations

import torch


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_k a_k b_kᵀ over the rows k of a (…, n, p) and b (…, n, q): a (…, p, q) matrix."""
    return a.mT @ b


def _eye_like(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.eye(d, dtype=x.dtype, device=x.device).expand(*x.shape[:-2], d, d)


def uce_closed_form(
    weight: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    preserve_keys: torch.Tensor | None = None,
    preserve_values: torch.Tensor | None = None,
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """UCE eq. (7) with explicit targets: the edited projection

    ``W = (λ·W_old + s_e·Σ_i v*_i c_iᵀ + s_p·Σ_j v_j c_jᵀ) (λ·I + s_e·Σ_i c_i c_iᵀ + s_p·Σ_j c_j c_jᵀ)⁻¹``.

    weight: W_old (…, out, d); keys: c_i as rows (…, n, d); values: v*_i as rows (…, n, out);
    preserve_keys / preserve_values: c_j (…, m, d) and v_j (…, m, out), or None.
    """
    d = weight.shape[-1]
    left = lamb * weight + erase_scale * _gram(values, keys)
    right = lamb * _eye_like(weight, d) + erase_scale * _gram(keys, keys)
    if preserve_keys is not None and preserve_keys.shape[-2]:
        left = left + preserve_scale * _gram(preserve_values, preserve_keys)
        right = right + preserve_scale * _gram(preserve_keys, preserve_keys)
    # right is symmetric, so left·right⁻¹ = (right⁻¹·leftᵀ)ᵀ: one solve, no explicit inverse.
    return torch.linalg.solve(right, left.mT).mT


def uce_edit_matrix(
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserve: torch.Tensor | None = None,
    *,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """The d × d matrix T with which UCE eq. (7) edits *every* projection: ``W = W_old · T``.

    With the paper's targets v*_i = W_old·c_guide(i) and v_j = W_old·c_j, both factors of eq. (7)
    share W_old on the left: λ·W_old + s_e·Σ W_old c_guide(i) c_iᵀ + s_p·Σ W_old c_j c_jᵀ =
    W_old·(λ·I + s_e·Σ c_guide(i) c_iᵀ + s_p·Σ c_j c_jᵀ), so

    ``T = (λ·I + s_e·Σ_i c_guide(i) c_iᵀ + s_p·Σ_j c_j c_jᵀ)(λ·I + s_e·Σ_i c_i c_iᵀ + s_p·Σ_j c_j c_jᵀ)⁻¹``

    depends on the text embeddings alone. Any number of concepts is one d × d solve; each layer is
    then one matrix product. erase: c_i (…, n, d); guide: c_guide(i) (…, n, d); preserve: c_j (…, m, d).
    """
    d = erase.shape[-1]
    eye = _eye_like(erase, d)
    shared = lamb * eye
    if preserve is not None and preserve.shape[-2]:
        shared = shared + preserve_scale * _gram(preserve, preserve)
    left = shared + erase_scale * _gram(guide, erase)
    right = shared + erase_scale * _gram(erase, erase)
    return torch.linalg.solve(right, left.mT).mT
