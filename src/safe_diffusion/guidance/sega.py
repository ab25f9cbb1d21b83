"""Semantic guidance, SEGA (Brack et al., NeurIPS 2023), as pure functions over tensors.

ε_∅ is the unconditional estimate, ε_{e_i} the estimate for edit concept i. Equation numbers follow
the NeurIPS paper (§3): ψ, the semantic direction (eq. 4); μ, the percentile threshold (eq. 5);
γ = μ·ψ (eq. 3); momentum (eq. 6–7); several concepts as a weighted sum (eq. 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def semantic_direction(
    eps_uncond: torch.Tensor,
    eps_edit: torch.Tensor,
    *,
    scale: float,
    threshold: float,
    sign: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """γ_i = μ(ψ_i; s_e, λ)·ψ_i of SEGA eq. (3)–(5): ±s_e(ε_e − ε_∅), kept where |·| reaches its λ-quantile per sample and channel.

    Estimates are laid out (batch, channels, *spatial): any number of spatial dimensions, e.g. (H, W)
    for images or (frames, H, W) for video; the quantile is taken over all of them.
    """
    diff = eps_edit - eps_uncond
    if diff.ndim < 3:
        raise ValueError(f"estimates must be laid out (batch, channels, *spatial), got shape {tuple(diff.shape)}")
    if isinstance(sign, torch.Tensor):  # per image: shape (batch,) → broadcast over channels and spatial dims
        # non_blocking: a blocking host-to-device copy would wait for the denoiser's queued work every step
        sign = sign.to(device=diff.device, dtype=diff.dtype, non_blocking=True).reshape(-1, *([1] * (diff.ndim - 1)))
    psi = diff * sign * scale
    magnitude = psi.abs()
    # The percentile is taken in float32 whatever the dtype, as the reference does (half precision needs it).
    q = torch.quantile(magnitude.flatten(start_dim=2).float(), threshold, dim=2).to(psi.dtype)
    q = q.reshape(*q.shape, *([1] * (psi.ndim - 2)))  # (batch, channels, 1, …): one threshold per sample and channel
    return torch.where(magnitude >= q, psi, torch.zeros_like(psi))


def sega_step(
    eps_uncond: torch.Tensor,
    eps_edits: Sequence[torch.Tensor | None],
    step: int,
    momentum: torch.Tensor | None,
    *,
    scales: Sequence[float],
    thresholds: Sequence[float],
    signs: Sequence[float | torch.Tensor],
    weights: Sequence[float],
    warmup_steps: Sequence[int],
    cooldown_steps: Sequence[int | None],
    momentum_scale: float,
    mom_beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantic term SEGA adds to the guided estimate at `step` (eq. 2, 6, 8), and the new momentum ν (eq. 7).

    Concept i contributes from its warm-up step to its cool-down step. While only some concepts are
    past warm-up, their non-negative weights are normalised to sum to one and momentum is not
    applied; once all are, the weighted sum plus momentum is applied. The momentum accumulates
    from the first step, over every concept not yet cooled down. A concept's estimate may be None
    where :func:`needs_edit_estimate` is False.
    """
    zeros = torch.zeros_like(eps_uncond)
    if momentum is None:
        momentum = zeros
    n = len(eps_edits)
    gammas, concept_weights, warm = [], [], []
    for i, eps_edit in enumerate(eps_edits):
        cooldown = cooldown_steps[i]
        cooled = cooldown is not None and step >= cooldown
        warm.append(step >= warmup_steps[i])
        if cooled or eps_edit is None:
            gammas.append(None)  # γ_i = 0
            concept_weights.append(0.0 if cooled else max(weights[i], 0.0))
            continue
        gammas.append(semantic_direction(eps_uncond, eps_edit, scale=scales[i], threshold=thresholds[i], sign=signs[i]))
        concept_weights.append(max(weights[i], 0.0))

    def weighted(indices: Sequence[int], w: Sequence[float]) -> torch.Tensor:
        # Σ w_i γ_i with the weights as Python numbers: no per-step host-to-device copy (and sync) of a weight tensor
        total = zeros
        for i, wi in zip(indices, w):
            if gammas[i] is not None and wi != 0.0:
                total = total + wi * gammas[i]
        return total

    n_warm = sum(warm)
    term = zeros
    if 0 < n_warm < n:
        idx = [i for i in range(n) if warm[i]]
        norm = sum(concept_weights[i] for i in idx)
        # A warm set whose weights are all zero (all cooled down) would divide 0 by 0; it adds nothing instead.
        if norm > 0:
            term = weighted(idx, [concept_weights[i] / norm for i in idx])

    combined = weighted(range(n), concept_weights) + momentum_scale * momentum  # eq. (8), (6)
    new_momentum = mom_beta * momentum + (1 - mom_beta) * combined  # eq. (7)
    if n_warm == n:
        term = combined
    return term, new_momentum


def needs_edit_estimate(step: int, *, warmup_steps: int, cooldown_steps: int | None, momentum_scale: float) -> bool:
    """Whether ε_{e_i} can change the result at `step`: not cooled down, and past warm-up or feeding a momentum that is read."""
    if cooldown_steps is not None and step >= cooldown_steps:
        return False
    return step >= warmup_steps or momentum_scale != 0
