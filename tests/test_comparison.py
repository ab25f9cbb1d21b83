"""comparison.generate_guided_images: the one implementation behind generate --compare, the demo and fairness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safe_diffusion import FairGuidance, SafetyGuidance, guide
from safe_diffusion.common.errors import GuidanceOffError
from safe_diffusion.jobs.compare import generate_guided_images

CALL = dict(num_inference_steps=3, height=32, width=32, output_type="np")
MAX = SafetyGuidance.from_preset("max", warmup_steps=0)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    # float64: batching changes float32 rounding, which can flip elements across SLD's threshold
    p = StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float64
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_each_image_depends_on_its_seed_alone(pipe):
    one = generate_guided_images(pipe, "a cat", [4], [MAX], kinds=("unguided", "guided"), **CALL)
    with guide(pipe, MAX):
        expected = pipe("a cat", generator=torch.Generator().manual_seed(4), **CALL).images[0]
    plain = pipe("a cat", generator=torch.Generator().manual_seed(4), **CALL).images[0]
    assert np.array_equal(one.guided[0], expected) and np.array_equal(one.unguided[0], plain)
    assert np.abs(plain - expected).max() > 1e-3
    # in a batch with another seed: the same image up to the rounding of the batched matmuls
    two = generate_guided_images(pipe, "a cat", [3, 4], [MAX], kinds=("guided",), **CALL)
    assert two.unguided is None
    assert np.abs(two.guided[1] - expected).max() < 1e-10


def test_records_say_what_each_image_was_given(pipe):
    fair = FairGuidance(["male person", "female person"], warmup_steps=0)
    made = generate_guided_images(pipe, "a doctor", [0, 1], [fair], kinds=("unguided", "guided"), **CALL)
    directions = [made.record(i, "guided")["fair_direction"] for i in range(2)]
    assert sorted(directions) == ["female person", "male person"]  # a run of two realises 50/50 exactly
    assert made.record(0, "unguided") == {"seed": 0, "guidance": []}
    assert made.record(1, "guided")["guidance"][0]["assigned_directions"] == directions


def test_guidance_that_cannot_act_raises(pipe):
    with pytest.raises(GuidanceOffError):
        generate_guided_images(pipe, "a cat", [0], [MAX], guidance_scale=1.0, **CALL)
