"""SEGA: the math in isolation, and the drop-in pipeline against diffusers' deprecated reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PARITY_TOL, SCHEDULERS_BUILT_IN_CODE, load_float64, oracle, scheduler_built_in_code

from safe_diffusion.guidance.sega import needs_edit_estimate, sega_step, semantic_direction

# -- math ---------------------------------------------------------------------------------------


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_threshold_is_a_percentile_per_sample_and_channel():
    eps_u = torch.zeros(2, 3, 4, 4)
    eps_e = _rand(2, 3, 4, 4)
    eps_e[1, 2] *= 100.0  # one loud (sample, channel) must not change the others' masks
    gamma = semantic_direction(eps_u, eps_e, scale=2.0, threshold=0.75, sign=1.0)
    for b in range(2):
        for c in range(3):
            kept = gamma[b, c] != 0
            assert int(kept.sum()) == 4  # the top quarter of 16 values, in every sample and channel
            top = eps_e[b, c].abs().flatten().topk(4).values.min()
            assert torch.equal(kept, eps_e[b, c].abs() >= top)
            assert torch.allclose(gamma[b, c][kept], 2.0 * eps_e[b, c][kept])
    # threshold 0 keeps everything
    assert torch.count_nonzero(semantic_direction(eps_u, eps_e, scale=1.0, threshold=0.0)) == eps_e.numel()


def test_reverse_flips_the_direction_and_per_image_signs_broadcast():
    eps_u, eps_e = _rand(2, 4, 8, 8, seed=1), _rand(2, 4, 8, 8, seed=2)
    plus = semantic_direction(eps_u, eps_e, scale=3.0, threshold=0.9, sign=1.0)
    minus = semantic_direction(eps_u, eps_e, scale=3.0, threshold=0.9, sign=-1.0)
    assert torch.equal(minus, -plus)
    mixed = semantic_direction(eps_u, eps_e, scale=3.0, threshold=0.9, sign=torch.tensor([1.0, -1.0]))
    assert torch.equal(mixed[0], plus[0]) and torch.equal(mixed[1], minus[1])


def _step(eps_u, edits, step, mom, **kw):
    n = len(edits)
    args = dict(
        scales=[1.0] * n,
        thresholds=[0.0] * n,
        signs=[1.0] * n,
        weights=[1.0] * n,
        warmup_steps=[0] * n,
        cooldown_steps=[None] * n,
        momentum_scale=0.0,
        mom_beta=0.4,
    )
    args.update(kw)
    return sega_step(eps_u, edits, step, mom, **args)


def test_warmup_and_cooldown():
    eps_u, eps_e = torch.zeros(1, 4, 4, 4), _rand(1, 4, 4, 4)
    for step in range(3):
        term, _ = _step(eps_u, [eps_e], step, None, warmup_steps=[3], cooldown_steps=[5])
        assert torch.count_nonzero(term) == 0
    term, _ = _step(eps_u, [eps_e], 3, None, warmup_steps=[3], cooldown_steps=[5])
    assert torch.allclose(term, eps_e)
    term, _ = _step(eps_u, [eps_e], 5, None, warmup_steps=[3], cooldown_steps=[5])
    assert torch.count_nonzero(term) == 0
    assert not needs_edit_estimate(5, warmup_steps=3, cooldown_steps=5, momentum_scale=0.5)
    assert not needs_edit_estimate(1, warmup_steps=3, cooldown_steps=None, momentum_scale=0.0)
    assert needs_edit_estimate(1, warmup_steps=3, cooldown_steps=None, momentum_scale=0.1)  # feeds momentum


def test_partial_warmup_normalises_the_warm_concepts_weights_without_momentum():
    eps_u = torch.zeros(1, 4, 4, 4)
    g = [_rand(1, 4, 4, 4, seed=s) for s in range(3)]
    kw = dict(weights=[1.0, 3.0, 1.0], warmup_steps=[0, 0, 5], momentum_scale=0.5, mom_beta=0.6)
    mom = _rand(1, 4, 4, 4, seed=9)
    term, new_mom = _step(eps_u, g, 2, mom, **kw)
    assert torch.allclose(term, (g[0] + 3 * g[1]) / 4)  # weights of warm concepts sum to 1, no momentum
    combined = g[0] + 3 * g[1] + g[2] + 0.5 * mom  # momentum still accumulates over all concepts
    assert torch.allclose(new_mom, 0.6 * mom + 0.4 * combined)
    term, _ = _step(eps_u, g, 5, mom, **kw)
    assert torch.allclose(term, combined)  # all warm: the plain weighted sum plus momentum


def test_momentum_recurrence_over_steps():
    eps_u = torch.zeros(1, 4, 4, 4)
    edits = [[_rand(1, 4, 4, 4, seed=10 * t + i) for i in range(2)] for t in range(6)]
    kw = dict(weights=[0.5, 2.0], signs=[1.0, -1.0], warmup_steps=[3, 3], momentum_scale=0.3, mom_beta=0.4)
    mom, expected_mom = None, torch.zeros(1, 4, 4, 4)
    for t in range(6):
        combined = 0.5 * edits[t][0] - 2.0 * edits[t][1] + 0.3 * expected_mom
        term, mom = _step(eps_u, edits[t], t, mom, **kw)
        expected_term = combined if t >= 3 else torch.zeros_like(combined)
        assert torch.allclose(term, expected_term, atol=1e-6)
        expected_mom = 0.4 * expected_mom + 0.6 * combined
        assert torch.allclose(mom, expected_mom, atol=1e-6)


# -- drop-in parity with diffusers' deprecated SemanticStableDiffusionPipeline -------------------------

STEPS = 8
KW = dict(num_inference_steps=STEPS, output_type="np", height=32, width=32)


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    from safe_diffusion import SemanticStableDiffusionPipeline

    Ref = oracle("SemanticStableDiffusionPipeline")

    # float64: see helpers.PARITY_TOL for why parity is not measured in float32
    return load_float64(SemanticStableDiffusionPipeline, tiny_checkpoint), load_float64(Ref, tiny_checkpoint)


CASES = {
    "one concept": dict(prompt="a man", editing_prompt="sunglasses", edit_warmup_steps=2),
    "several concepts": dict(
        prompt="a man",
        editing_prompt=["sunglasses", "beard", "hat"],
        edit_warmup_steps=[0, 3, 5],
        edit_momentum_scale=0.3,
        edit_mom_beta=0.5,
    ),
    "per-concept lists": dict(
        prompt="a man",
        editing_prompt=["sunglasses", "beard"],
        reverse_editing_direction=[False, True],
        edit_guidance_scale=[4.0, 6.0],
        edit_warmup_steps=[1, 3],
        edit_cooldown_steps=[7, 5],
        edit_threshold=[0.9, 0.8],
        edit_weights=[1.0, 2.0],
    ),
    "batched prompts, several images each": dict(
        prompt=["a man", "a woman"],
        num_images_per_prompt=2,
        editing_prompt=["sunglasses", "smile"],
        reverse_editing_direction=[True, False],
        edit_warmup_steps=[2, 1],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_drop_in_matches_reference(pipes, case):
    ours, ref = pipes
    kw = dict(CASES[case])
    a = ours(generator=torch.Generator().manual_seed(3), **kw, **KW).images
    b = ref(generator=torch.Generator().manual_seed(3), **kw, **KW).images
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= PARITY_TOL
    plain = ours(
        generator=torch.Generator().manual_seed(3),
        prompt=kw["prompt"],
        num_images_per_prompt=kw.get("num_images_per_prompt", 1),
        **KW,
    ).images
    assert np.abs(a - plain).max() > 1e-3, "the edits had no effect: the parity test would be vacuous"


def test_editing_changes_the_image_and_no_edit_is_plain(pipes):
    ours, ref = pipes
    plain = ours("a man", generator=torch.Generator().manual_seed(3), **KW).images
    edited = ours(
        "a man", editing_prompt="sunglasses", edit_warmup_steps=0, generator=torch.Generator().manual_seed(3), **KW
    ).images
    reference_plain = ref("a man", generator=torch.Generator().manual_seed(3), **KW).images
    assert np.abs(plain - reference_plain).max() <= PARITY_TOL
    assert np.abs(edited - plain).max() > 1e-3


# -- schedulers built in code: the reference's constructor leaves them as they are -----------------------


@pytest.mark.parametrize("scheduler", list(SCHEDULERS_BUILT_IN_CODE))
def test_drop_in_matches_reference_with_a_scheduler_built_in_code(tiny_checkpoint, scheduler):
    from diffusers import SemanticStableDiffusionPipeline as Ref

    from safe_diffusion import SemanticStableDiffusionPipeline

    # each pipeline is constructed with its own scheduler, as from_pretrained(..., scheduler=...) does
    ours = load_float64(SemanticStableDiffusionPipeline, tiny_checkpoint, scheduler=scheduler_built_in_code(scheduler))
    ref = load_float64(Ref, tiny_checkpoint, scheduler=scheduler_built_in_code(scheduler))
    assert dict(ours.scheduler.config) == dict(ref.scheduler.config)
    assert ours.scheduler.config.get("steps_offset", 0) == 0  # not rewritten to 1
    call = dict(num_inference_steps=6, output_type="np", height=32, width=32)
    edits = dict(editing_prompt=["sunglasses", "beard"], reverse_editing_direction=[False, True], edit_warmup_steps=1)
    a = ours("a man", generator=torch.Generator().manual_seed(3), **edits, **call).images
    b = ref("a man", generator=torch.Generator().manual_seed(3), **edits, **call).images
    assert np.abs(a - b).max() <= PARITY_TOL
    plain = ours("a man", generator=torch.Generator().manual_seed(3), **call).images
    assert np.abs(a - plain).max() > 1e-3, "the edits had no effect: the parity test would be vacuous"
