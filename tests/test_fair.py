"""Fair Diffusion: exact proportions, per-seed purity, per-image directions inside one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safe_diffusion import FairGuidance, SemanticGuidance, guide
from safe_diffusion.guidance.fair import (
    assignment_order,
    check_proportions,
    direction_for_seed,
    directions_for_seeds,
    largest_remainder,
    minimal_run_length,
)


@pytest.mark.parametrize(
    "props, n, expected",
    [
        ([0.5, 0.5], 10, [5, 5]),
        ([0.5, 0.5], 3, [2, 1]),  # tie: the lower index takes the leftover image
        ([0.1, 0.3, 0.6], 10, [1, 3, 6]),  # exact in rationals, not 0.999…
        ([1 / 3, 1 / 3, 1 / 3], 4, [2, 1, 1]),
        ([0.15, 0.85], 10, [2, 8]),  # remainders .5 vs .5 → lower index
        ([0.62, 0.38], 7, [4, 3]),  # 4.34 / 2.66: the larger remainder wins the leftover
        ([1.0, 0.0], 5, [5, 0]),
    ],
)
def test_largest_remainder(props, n, expected):
    assert largest_remainder(props, n) == expected
    assert sum(largest_remainder(props, n)) == n


@pytest.mark.parametrize("props", [[0.5, 0.5], [0.25, 0.75], [0.2, 0.3, 0.5], [0.62, 0.38]])
@pytest.mark.parametrize("n", [1, 2, 7, 12, 40])
@pytest.mark.parametrize("start", [0, 5, 1001])
def test_any_run_of_consecutive_seeds_realises_the_targets_exactly(props, n, start):
    chosen = directions_for_seeds(range(start, start + n), props, n)
    assert np.bincount(chosen, minlength=len(props)).tolist() == largest_remainder(props, n)


def test_direction_is_a_pure_function_of_the_seed():
    props, n = [0.3, 0.7], 10
    batch = directions_for_seeds([12, 3, 99, 40], props, n)
    alone = [direction_for_seed(s, props, n) for s in (12, 3, 99, 40)]
    assert batch == alone  # independent of the batch and of its order
    assert directions_for_seeds([99], props, n) == [alone[2]]
    assert direction_for_seed(3, props, n) == direction_for_seed(13, props, n)  # period n
    # the layout is interleaved, not blocked: a short run is balanced too
    assert assignment_order([0.5, 0.5], 6) == [0, 1, 0, 1, 0, 1]


def test_proportions_are_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        check_proportions([0.5, 0.6], 2)
    with pytest.raises(ValueError, match="non-negative"):
        check_proportions([1.5, -0.5], 2)
    with pytest.raises(ValueError, match="2 directions"):
        check_proportions([1.0], 2)
    assert minimal_run_length([0.5, 0.5]) == 2 and minimal_run_length([0.25, 0.75]) == 4


def test_term_defaults_binding_and_per_image_signs():
    term = FairGuidance(["male person", "female person"])
    assert (term.warmup_steps, term.scale, term.threshold, term.momentum_scale, term.mom_beta) == (
        5,
        4.0,
        0.95,
        0.5,
        0.6,
    )
    assert term.proportions == [0.5, 0.5] and term.run_length == 2
    with pytest.raises(ValueError, match="for_seeds"):
        term.assignments()
    bound = term.for_seeds([0, 1, 2, 3])
    assert bound.assignments() == [0, 1, 0, 1]
    male, female = bound.signs(4)
    assert male.tolist() == [1, -1, 1, -1] and female.tolist() == [-1, 1, -1, 1]
    with pytest.raises(ValueError, match="batch has 3"):
        bound.signs(3)
    with pytest.raises(ValueError, match="sum to 1"):
        FairGuidance(["a", "b"], [0.2, 0.2])
    with pytest.raises(ValueError, match="two directions"):
        FairGuidance(["a"])


def test_fair_term_equals_sega_with_each_images_direction(tiny_checkpoint):
    """Per-image directions inside one batch: each image equals SEGA run alone with (+its direction, −the other)."""
    from diffusers import StableDiffusionPipeline
    from helpers import PARITY_TOL, load_float64

    # float64: a batch of 2 and a batch of 1 round differently in float32, and the 0.95 percentile
    # threshold can turn that into a CPU-dependent difference (see helpers.PARITY_TOL).
    pipe = load_float64(StableDiffusionPipeline, tiny_checkpoint)
    kw = dict(num_inference_steps=4, output_type="np", height=32, width=32)
    seeds = [4, 5]
    fair = FairGuidance(["male person", "female person"], warmup_steps=1).for_seeds(seeds)
    with guide(pipe, fair):
        batch = pipe(
            "a doctor", num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw
        ).images
    plain = pipe(
        "a doctor", num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw
    ).images
    for k, s in enumerate(seeds):
        chosen = fair.assignments()[k]
        sega = SemanticGuidance(
            fair.directions,
            reverse=[i != chosen for i in range(2)],
            scale=4.0,
            threshold=0.95,
            warmup_steps=1,
            momentum_scale=0.5,
            mom_beta=0.6,
        )
        with guide(pipe, sega):
            alone = pipe("a doctor", generator=torch.Generator().manual_seed(s), **kw).images
        assert np.abs(batch[k] - alone[0]).max() <= PARITY_TOL
    assert np.abs(batch - plain).max() > 1e-3
    assert fair.assignments() == [0, 1]  # the two images went different ways
