"""The drop-in SafeStableDiffusionPipeline against diffusers' deprecated StableDiffusionPipelineSafe."""

import numpy as np
import pytest
import torch
from helpers import PARITY_TOL, SCHEDULERS_BUILT_IN_CODE, load_float64, oracle, scheduler_built_in_code

from safe_diffusion import SafeStableDiffusionPipeline, SafetyConfig

TOL = PARITY_TOL  # both pipelines run in float64: see helpers.PARITY_TOL for why not float32
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    return load_float64(SafeStableDiffusionPipeline, tiny_checkpoint), load_float64(
        oracle("StableDiffusionPipelineSafe"), tiny_checkpoint
    )


def both(pipes, scheduler=None, **kwargs):
    ours, ref = pipes
    if scheduler is not None:
        for p in pipes:
            p.scheduler = scheduler.from_config(p.scheduler.config)
    out = []
    for p in (ours, ref):
        g = torch.Generator().manual_seed(0)
        out.append(p(generator=g, output_type="np", **SIZE, **kwargs).images)
    return out


@pytest.fixture(scope="module")
def unguided_cat(pipes):
    # One unguided image serves every preset's "did the guidance act" check: the same call each time.
    g = torch.Generator().manual_seed(0)
    return pipes[0](
        prompt="a photo of a cat", num_inference_steps=30, sld_guidance_scale=0, generator=g, output_type="np", **SIZE
    ).images


@pytest.mark.parametrize("preset", ["WEAK", "MEDIUM", "STRONG", "MAX"])
def test_presets_match_reference(pipes, unguided_cat, preset):
    ours, ref = both(pipes, prompt="a photo of a cat", num_inference_steps=30, **getattr(SafetyConfig, preset))
    unguided = unguided_cat
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(ours - unguided).max() > 1e-3, "safety guidance had no effect: the parity test would be vacuous"


@pytest.mark.parametrize(
    "scheduler_name",
    ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler"],
)
def test_schedulers_match_reference(pipes, scheduler_name):
    import diffusers

    scheduler = getattr(diffusers, scheduler_name)
    original = [p.scheduler for p in pipes]
    try:
        ours, ref = both(pipes, scheduler, prompt="a red car", num_inference_steps=12, **SafetyConfig.STRONG)
    finally:
        for p, s in zip(pipes, original):
            p.scheduler = s
    assert np.abs(ours - ref).max() <= TOL


def test_batched_prompts_images_negative_prompt_and_custom_concept(pipes):
    _ours_pipe, _ref_pipe = pipes
    for p in pipes:
        p.safety_concept = "a blurry picture of a dog"
    try:
        ours, ref = both(
            pipes,
            prompt=["a cat", "a house at night"],
            negative_prompt=["low quality", "people"],
            num_images_per_prompt=2,
            num_inference_steps=10,
            sld_guidance_scale=500,
            sld_warmup_steps=2,
            sld_threshold=0.02,
            sld_momentum_scale=0.2,
            sld_mom_beta=0.5,
        )
    finally:
        for p in pipes:
            p.safety_concept = SafeStableDiffusionPipeline._safety_concept
    assert ours.shape == (4, 32, 32, 3)
    assert np.abs(ours - ref).max() <= TOL


def test_output_carries_applied_concept_and_none_when_disabled(pipes):
    ours, _ = pipes
    g = torch.Generator().manual_seed(0)
    on = ours("a cat", num_inference_steps=2, generator=g, **SIZE)
    assert on.applied_safety_concept == ours.safety_concept
    assert len(on.images) == 1 and on.images[0].size == (32, 32)
    off = ours("a cat", num_inference_steps=2, sld_guidance_scale=1.0, **SIZE)
    assert off.applied_safety_concept is None
    no_cfg = ours("a cat", num_inference_steps=2, guidance_scale=1.0, **SIZE)
    assert no_cfg.applied_safety_concept is None


def test_safety_concept_setter_validates():
    with pytest.raises(ValueError):
        SafeStableDiffusionPipeline.safety_concept.fset(object.__new__(SafeStableDiffusionPipeline), "  ")


def _count_unet_batches(pipe, **kwargs):
    batches = []
    # conv_in sees the batch the UNet really evaluates, after the guidance engine expanded it.
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        pipe("a cat", num_inference_steps=6, **SIZE, **kwargs)
    finally:
        handle.remove()
    return batches


def test_one_unet_evaluation_per_step_with_three_row_blocks(pipes):
    ours, _ = pipes
    batches = _count_unet_batches(ours, **SafetyConfig.MEDIUM)
    # PNDM (the checkpoint's scheduler) takes steps + 1 model evaluations; each is one call of 3 row blocks
    assert len(batches) == ours.scheduler.timesteps.shape[0]
    assert set(batches) == {3}


def test_weak_preset_skips_the_safety_rows_during_warmup(pipes):
    ours, _ = pipes
    batches = _count_unet_batches(ours, **SafetyConfig.WEAK)
    # WEAK has no momentum, so ε_S is unused before its 15-step warm-up: only 2 row blocks then.
    assert set(batches) == {2}
    batches = _count_unet_batches(ours, **{**SafetyConfig.WEAK, "sld_warmup_steps": 3})
    assert batches[:3] == [2, 2, 2] and set(batches[3:]) == {3}


def test_pipeline_is_left_exactly_as_it_was(pipes):
    ours, _ = pipes
    before = set(vars(ours))
    ours("a cat", num_inference_steps=2, **SIZE)
    assert set(vars(ours)) - before <= {"_flagged"}
    assert not ours.unet._forward_pre_hooks and not ours.unet._forward_hooks
    assert "progress_bar" not in vars(ours)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS_BUILT_IN_CODE))
def test_schedulers_built_in_code_match_reference(tiny_checkpoint, scheduler):
    # each pipeline is constructed with its own scheduler, as from_pretrained(..., scheduler=...) does; both
    # constructors rewrite steps_offset to 1 and clip_sample to False
    ours = load_float64(SafeStableDiffusionPipeline, tiny_checkpoint, scheduler=scheduler_built_in_code(scheduler))
    ref = load_float64(
        oracle("StableDiffusionPipelineSafe"), tiny_checkpoint, scheduler=scheduler_built_in_code(scheduler)
    )
    assert dict(ours.scheduler.config) == dict(ref.scheduler.config)
    call = dict(prompt="a red car", num_inference_steps=6, output_type="np", **SIZE)
    sld = {**SafetyConfig.STRONG, "sld_warmup_steps": 2}  # past its warm-up for 4 of the 6 steps
    a = ours(generator=torch.Generator().manual_seed(0), **call, **sld).images
    b = ref(generator=torch.Generator().manual_seed(0), **call, **sld).images
    assert np.abs(a - b).max() <= TOL
    unguided = ours(generator=torch.Generator().manual_seed(0), **call, sld_guidance_scale=0).images
    assert np.abs(a - unguided).max() > 1e-3, "safety guidance had no effect: the parity test would be vacuous"
