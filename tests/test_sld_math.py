"""SLD's guidance math in isolation: eq. (3)-(8) on hand-made tensors."""

import pytest
import torch

from safe_diffusion import SafetyConfig
from safe_diffusion.guidance.sld import needs_safety_estimate, safety_guidance, safety_scale, sld_step


def t(*values):
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


def test_scale_is_zero_where_prompt_minus_safety_reaches_threshold():
    eps_text = t(0.0, 0.0, 0.0, 0.0)
    eps_safety = t(0.5, -0.005, -0.01, -0.02)  # ε_p − ε_S = -0.5, 0.005, 0.01, 0.02
    mu = safety_scale(eps_text, eps_safety, scale=10.0, threshold=0.01)
    assert mu.flatten().tolist() == pytest.approx([1.0, 0.05, 0.0, 0.0])


def test_scale_is_clamped_to_one():
    mu = safety_scale(t(0.0, 0.0), t(3.0, 0.001), scale=1000.0, threshold=0.0)
    assert mu.flatten().tolist() == pytest.approx([1.0, 1.0])
    assert mu.max().item() <= 1.0


def test_guidance_points_from_unconditional_to_safety_concept():
    gamma, _ = safety_guidance(
        t(1.0), t(0.0), t(3.0), torch.zeros(1, 1, 1, 1), scale=0.1, threshold=0.0, momentum_scale=0.0, mom_beta=0.0
    )
    # μ = clamp(0.1·|0 − 3|, 1) = 0.3 ; γ = μ·(ε_S − ε_∅) = 0.3·2
    assert gamma.item() == pytest.approx(0.6)


def test_momentum_accumulates_and_is_added():
    momentum = t(2.0)
    gamma, new = safety_guidance(
        t(0.0), t(0.0), t(1.0), momentum, scale=1.0, threshold=5.0, momentum_scale=0.5, mom_beta=0.25
    )
    # raw γ = 1·(1 − 0) = 1 ; with momentum 1 + 0.5·2 = 2 ; ν' = 0.25·2 + 0.75·2 = 2
    assert gamma.item() == pytest.approx(2.0)
    assert new.item() == pytest.approx(2.0)


def test_warmup_zeroes_the_term_but_builds_momentum():
    kw = dict(scale=1.0, warmup_steps=2, threshold=5.0, momentum_scale=0.5, mom_beta=0.5)
    momentum = None
    terms = []
    for step in range(3):
        term, momentum = sld_step(t(0.0), t(0.0), t(1.0), step, momentum, **kw)
        terms.append(term.item())
    assert terms[:2] == [0.0, 0.0]
    # ν after two warm-up steps: 0.5, then 1.0 (γ₁ = 1 + 0.5·0.5 = 1.25, ν₂ = 0.25 + 0.625 = 0.875)
    assert momentum is not None
    assert terms[2] == pytest.approx(1.0 + 0.5 * 0.875)


def test_skipped_estimate_leaves_state_and_adds_nothing():
    m = t(0.3)
    term, new = sld_step(t(1.0), t(2.0), None, 0, m, scale=1, warmup_steps=5, threshold=0, momentum_scale=0, mom_beta=0)
    assert term.item() == 0.0 and new is m


def test_estimate_is_needed_during_warmup_only_with_momentum():
    assert not needs_safety_estimate(3, warmup_steps=15, momentum_scale=0.0)
    assert needs_safety_estimate(15, warmup_steps=15, momentum_scale=0.0)
    assert needs_safety_estimate(0, warmup_steps=10, momentum_scale=0.3)


def test_presets_have_the_papers_numbers_and_unpack_as_kwargs():
    expected = {
        "WEAK": (15, 20, 0.0, 0.0, 0.0),
        "MEDIUM": (10, 1000, 0.01, 0.3, 0.4),
        "STRONG": (7, 2000, 0.025, 0.5, 0.7),
        "MAX": (0, 5000, 1.0, 0.5, 0.7),
    }
    for name, (warmup, scale, threshold, mom, beta) in expected.items():
        kwargs = dict(**getattr(SafetyConfig, name))
        assert kwargs == {
            "sld_warmup_steps": warmup,
            "sld_guidance_scale": scale,
            "sld_threshold": threshold,
            "sld_momentum_scale": mom,
            "sld_mom_beta": beta,
        }
    with pytest.raises(ValueError, match="weak, medium, strong, max"):
        SafetyConfig.get("extreme")
