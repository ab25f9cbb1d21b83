"""SAFREE's math (guidance/safree.py) against a port of the official code (tests/safree_official.py), in
float64, and its settings: official defaults, describe, the config round trip, one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import safree_official as official
import torch

from safe_diffusion.guidance import safree as sf
from safe_diffusion.guidance.safree import SafreeGuidance


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_projection_matrix_projects_onto_the_span_of_the_rows():
    vectors = _random(5, 12)
    p = sf.projection_matrix(vectors)
    inside = _random(5, seed=1) @ vectors
    outside = _random(12, seed=2)
    outside = outside - p @ outside
    assert torch.allclose(p @ p, p, atol=1e-12)
    assert torch.allclose(p @ inside, inside, atol=1e-12)
    assert torch.allclose(p @ outside, torch.zeros(12, dtype=torch.float64), atol=1e-12)
    assert torch.equal(p, official.projection_matrix(vectors.T))


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("tokens", [2, 7, 20])
def test_trigger_tokens_and_filtered_embedding_match_the_official_projection(alpha, tokens):
    dim, length = 16, 30
    concepts = _random(4, dim, seed=3)
    masked = _random(tokens, dim, seed=4) + 0.5 * _random(tokens, 1, seed=5) * concepts[0]
    embeds = _random(2, length, dim, seed=6)
    p_c, p_i = sf.projection_matrix(concepts), sf.projection_matrix(masked)
    ref, ref_keep = official.safree_projection(embeds, masked, p_i, p_c, alpha, length)

    triggers = sf.trigger_tokens(masked, p_c, alpha)
    keep = sf.keep_mask(triggers, length)
    ours = sf.filter_tokens(embeds[1], sf.filter_matrix(p_c, p_i), keep)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(ours, ref[1], rtol=0, atol=1e-12)
    assert torch.equal(ours[keep], embeds[1][keep])  # kept tokens untouched
    if (~keep).any():  # projected tokens are orthogonal to the toxic subspace
        assert (ours[~keep] @ p_c).abs().max() < 1e-10


def test_a_larger_margin_flags_fewer_tokens_and_a_lone_token_is_a_trigger():
    concepts = _random(3, 8, seed=7)
    masked = _random(12, 8, seed=8)
    p_c = sf.projection_matrix(concepts)
    counts = [int(sf.trigger_tokens(masked, p_c, a).sum()) for a in (0.0, 0.05, 0.2, 10.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 0 and counts[-1] == 0
    assert sf.trigger_tokens(masked[:1], p_c, 0.01).tolist() == [True]  # as the official mean over no tokens (NaN)


def test_keep_mask_places_token_i_after_the_start_token_and_clips_to_the_sequence():
    triggers = torch.tensor([False, True, True])
    assert sf.keep_mask(triggers, 6).tolist() == [True, True, False, False, True, True]
    assert sf.keep_mask(triggers, 3).tolist() == [True, True, False]


@pytest.mark.parametrize("category,preset", [("nudity", "nudity"), ("artists-VanGogh", "artist")])
def test_self_validation_last_step_matches_official_f_beta(category, preset):
    midpoint, steepness = sf.SVF_CURVES[preset]
    for beta in [i / 200 for i in range(201)]:
        for upper in (0, 3, 10, 50):
            expected = official.f_beta(beta, upperbound_timestep=upper, concept_type=category)
            assert sf.self_validation_last_step(beta, upper, midpoint, steepness) == expected, (beta, upper)


def test_self_validation_strength_is_one_minus_the_mean_cosine_over_real_tokens():
    embeds = _random(10, 8, seed=9)
    projected = _random(10, 8, seed=10)
    active = torch.tensor([True] * 4 + [False] * 6)
    cos = torch.nn.functional.cosine_similarity(projected[:4], embeds[:4])
    assert sf.self_validation_strength(embeds, projected, active) == pytest.approx(1 - cos.mean().item(), abs=1e-15)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (4, 4), (8, 6), (9, 9)])
@pytest.mark.parametrize("threshold,scale", [(1, 0.9), (2, 0.2)])
def test_reattend_low_frequencies_matches_the_official_low_filter(size, threshold, scale):
    x = _random(3, 5, *size, seed=11)  # [uncond, filtered, original], as the official batch
    ref = official.low_fourier_filter(x.clone(), threshold, scale)
    ours = sf.reattend_low_frequencies(x[1:2], x[2:3], scale, threshold)
    assert torch.allclose(ours, ref[1:2], rtol=0, atol=1e-12)
    assert not torch.allclose(ours, x[1:2], atol=1e-6)  # the filter acted


def test_reattend_keeps_the_input_dtype_and_scale_backbone_scales_the_first_half():
    x = _random(2, 4, 4, 4).float()
    assert sf.reattend_low_frequencies(x, x, 0.5).dtype == torch.float32
    h = _random(2, 6, 3, 3)
    scaled = sf.scale_backbone(h, 1.5)
    assert torch.equal(scaled[:, :3], h[:, :3] * 1.5) and torch.equal(scaled[:, 3:], h[:, 3:])
    assert sf.scale_backbone(h, 1.0) is h


# -- settings -------------------------------------------------------------------------------------------


def test_defaults_are_the_official_ones():
    term = SafreeGuidance()
    assert list(term.concepts) == official.NUDITY
    assert (term.alpha, term.upper_step, term.svf_midpoint, term.svf_steepness) == (0.01, 10, 5.333, 2.5)
    assert (term.freeu_b1, term.freeu_b2, term.freeu_s1, term.freeu_s2, term.re_attention_threshold) == (
        1.0, 1.0, 0.9, 0.2, 1,
    )  # fmt: skip
    assert term.filter_steps is None and term.concepts_as_negative_prompt and not term.re_attention
    assert [term.resolved_self_validation(f) for f in ("sd", "sdxl", "sd3")] == [True, False, False]
    artist = SafreeGuidance.from_preset("artist", concepts=["Van Gogh"])
    assert (artist.svf_midpoint, artist.svf_steepness, artist.concepts) == (5.5, 3.5, ("Van Gogh",))


def test_describe_names_every_setting_and_the_config_round_trips():
    term = SafreeGuidance(
        concepts=["a", "b"], alpha=0.05, self_validation=False, filter_steps=[0, 3], re_attention=True
    )
    described = term.describe("epsilon")
    assert set(described) == {"type"} | {f.name for f in dataclasses.fields(SafreeGuidance)}
    import json

    config = json.loads(json.dumps(term.to_config()))
    assert SafreeGuidance.from_config(config) == term
    assert SafreeGuidance.from_config({"alpha": 0.02}) == SafreeGuidance(alpha=0.02)
    from safe_diffusion import SafreeGuidance as exported

    assert exported is SafreeGuidance


@pytest.mark.parametrize(
    "config,message",
    [
        ({"alpha": -1}, "alpha"),
        ({"alpha": "x"}, "alpha"),
        ({"concepts": []}, "concept"),
        ({"concepts": ["ok", " "]}, "concept"),
        ({"upper_step": 1.5}, "upper_step"),
        ({"filter_steps": [3, 1]}, "filter_steps"),
        ({"self_validation": "yes"}, "self_validation"),
        ({"re_attention": 1}, "re_attention"),
        ({"re_attention_threshold": 0}, "re_attention_threshold"),
        ({"freeu_s1": float("nan")}, "freeu_s1"),
        ({"bogus": 1}, "bogus"),
        ({"type": "SafetyGuidance"}, "SafetyGuidance"),
    ],
)
def test_bad_settings_are_one_line_value_errors(config, message):
    with pytest.raises(ValueError) as info:
        SafreeGuidance.from_config(config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset_and_artist_without_concepts_are_refused():
    with pytest.raises(ValueError, match="unknown SAFREE preset"):
        SafreeGuidance.from_preset("violence")
    with pytest.raises(ValueError, match="needs concepts"):
        SafreeGuidance.from_preset("artist")
