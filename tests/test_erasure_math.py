"""The erasure math as pure functions, against independent float64 computations of the papers' formulas."""

import torch

from safe_diffusion.erasure.esd import classifier_free_guidance, esd_loss, esd_target
from safe_diffusion.erasure.rece import (
    rece_adversarial_map,
    rece_adversarial_map_gram,
    rece_residual,
    rece_residual_gram,
)
from safe_diffusion.erasure.uce import uce_closed_form, uce_edit_matrix


def _eq7_loop(w, erase, targets, preserve, preserve_targets, lamb, se, sp):
    """UCE eq. 7 term by term, one concept at a time, with an explicit inverse (the paper's form)."""
    d = w.shape[1]
    left = lamb * w.clone()
    right = lamb * torch.eye(d, dtype=w.dtype)
    for c, v in zip(erase, targets):
        left += se * torch.outer(v, c)
        right += se * torch.outer(c, c)
    for c, v in zip(preserve, preserve_targets):
        left += sp * torch.outer(v, c)
        right += sp * torch.outer(c, c)
    return left @ torch.inverse(right)


def _random(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_uce_closed_form_is_eq7():
    w, erase, targets = _random(0, 12, 8), _random(1, 3, 8), _random(2, 3, 12)
    preserve, ptargets = _random(3, 2, 8), _random(4, 2, 12)
    ours = uce_closed_form(w, erase, targets, preserve, ptargets, lamb=0.3, erase_scale=2.0, preserve_scale=0.7)
    ref = _eq7_loop(w, erase, targets, preserve, ptargets, 0.3, 2.0, 0.7)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10 * ref.abs().max())


def test_edit_matrix_is_eq7_with_the_papers_targets_for_every_layer():
    """v*_i = W_old c_guide(i), v_j = W_old c_j: one d×d matrix serves every projection, batched over layers."""
    erase, guide, preserve = _random(5, 4, 8), _random(6, 4, 8), _random(7, 3, 8)
    t = uce_edit_matrix(erase, guide, preserve, lamb=0.5, erase_scale=1.0, preserve_scale=1.5)
    for seed, out in ((8, 16), (9, 5)):
        w = _random(seed, out, 8)
        ref = _eq7_loop(w, erase, guide @ w.T, preserve, preserve @ w.T, 0.5, 1.0, 1.5)
        assert torch.allclose(w @ t, ref, rtol=0, atol=1e-10 * ref.abs().max())
    # any leading shape: a batch of concept sets gives a batch of matrices
    batch = uce_edit_matrix(torch.stack([erase, erase * 2]), torch.stack([guide, guide]), lamb=0.5)
    assert batch.shape == (2, 8, 8)
    assert torch.allclose(batch[0], uce_edit_matrix(erase, guide, lamb=0.5))


def test_edit_maps_erased_concept_towards_guide_and_keeps_preserved():
    erase, guide, preserve = _random(10, 1, 16), _random(11, 1, 16), _random(12, 2, 16)
    w = _random(13, 20, 16)
    t = uce_edit_matrix(erase, guide, preserve, lamb=1e-3, erase_scale=1.0, preserve_scale=1.0)
    new = w @ t
    assert torch.allclose(erase @ new.T, guide @ w.T, atol=1e-2)  # small λ: c_i now reads as c_guide(i)
    assert torch.allclose(preserve @ new.T, preserve @ w.T, atol=1e-2)


def test_rece_map_is_the_regularised_least_squares_embedding():
    """c' = argmin Σ_l ‖W'_l c' − W_l c‖² + λ‖c'‖², checked with an independent least-squares solve."""
    d = 6
    old = [_random(20 + i, n, d) for i, n in enumerate((9, 4, 7))]
    new = [w + 0.3 * _random(30 + i, *w.shape) for i, w in enumerate(old)]
    concept = _random(40, 5, d)  # a token sequence
    k = rece_adversarial_map(new, old, regularization=0.1)
    adversarial = concept @ k.mT
    lam = 0.1
    a = torch.cat([*new, lam**0.5 * torch.eye(d, dtype=torch.float64)])
    for c, c_adv in zip(concept, adversarial):
        b = torch.cat([*(w @ c for w in old), torch.zeros(d, dtype=torch.float64)])
        ref = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(c_adv, ref, atol=1e-10)
    # an unedited model: the embedding regenerates the concept up to the regulariser's shrinkage
    assert rece_residual(old, old, concept @ rece_adversarial_map(old, old, regularization=1e-9).mT, concept) < 1e-12
    assert rece_residual(old, old, torch.zeros_like(concept), concept) == 1.0


def test_rece_gram_form_equals_the_layerwise_form_for_edits_by_a_common_matrix():
    d = 6
    old = [_random(50 + i, n, d) for i, n in enumerate((9, 4, 7))]
    t = torch.eye(d, dtype=torch.float64) + 0.2 * _random(60, d, d)
    new = [w @ t for w in old]
    gram = sum(w.T @ w for w in old)
    k = rece_adversarial_map_gram(gram, t, regularization=0.3)
    assert torch.allclose(k, rece_adversarial_map(new, old, regularization=0.3), atol=1e-12)
    concept = _random(61, 5, d)
    adversarial = concept @ k.mT
    assert torch.allclose(
        rece_residual_gram(gram, t, adversarial, concept), rece_residual(new, old, adversarial, concept), atol=1e-12
    )


def test_esd_target_and_loss():
    uncond, concept = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(esd_target(uncond, concept, 1.0), torch.tensor([-1.0, 3.0]))  # ε_∅ − η(ε_c − ε_∅)
    assert torch.equal(esd_target(uncond, concept, 0.0), uncond)
    assert torch.equal(classifier_free_guidance(uncond, concept, 3.0), torch.tensor([7.0, -1.0]))
    half = torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    loss = esd_loss(half, torch.tensor([1.0, 3.0]))
    assert loss.dtype == torch.float32 and loss.item() == 5.0
