"""guide(): guidance attached to pipelines users already have, SD 1.x, img2img and SDXL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PARITY_TOL, load_float64, oracle

from safe_diffusion import SafetyGuidance, SemanticGuidance, guide

STEPS = 4
KW = dict(num_inference_steps=STEPS, output_type="np", height=32, width=32)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def img2img(sd):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from safe_diffusion.testing import build_sdxl_checkpoint

    path = build_sdxl_checkpoint(tmp_path_factory.mktemp("ckpt") / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _init_image():
    return torch.rand(1, 3, 32, 32, generator=_gen(7))


def _call(kind, pipe, prompt="a cat", seed=0, **kw):
    if kind == "img2img":
        return pipe(
            prompt,
            image=_init_image(),
            strength=0.75,
            generator=_gen(seed),
            num_inference_steps=6,
            output_type="np",
            **kw,
        ).images
    return pipe(prompt, generator=_gen(seed), **KW, **kw).images


def _count_unet(pipe):
    calls = []
    handle = pipe.unet.register_forward_hook(
        lambda m, a, kw, out: calls.append(a[0].shape[0] if a else kw["sample"].shape[0]), with_kwargs=True
    )
    return calls, handle


def _snapshot(pipe):
    return (dict(vars(pipe)), dict(pipe.unet._forward_pre_hooks), dict(pipe.unet._forward_hooks))


def _same(a, b):
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


SAFETY = SafetyGuidance(scale=2000.0, warmup_steps=1, threshold=0.025, momentum_scale=0.5, mom_beta=0.7)
TWO_EDITS = SemanticGuidance(["sunglasses", "hat"], warmup_steps=1, momentum_scale=0.2)
ONE_EDIT = SemanticGuidance(["beard"], reverse=True, warmup_steps=0)


# -- SLD through guide() on a plain pipeline == the reference SLD -------------------------------------


@pytest.mark.parametrize("preset", [None, "max"])
def test_safety_through_guide_matches_reference_sld(tiny_checkpoint, preset):
    from diffusers import StableDiffusionPipeline

    # float64: see helpers.PARITY_TOL for why parity is not measured in float32
    ref = load_float64(oracle("StableDiffusionPipelineSafe"), tiny_checkpoint)
    sd = load_float64(StableDiffusionPipeline, tiny_checkpoint)
    term = SAFETY if preset is None else SafetyGuidance.from_preset(preset)
    prompts = ["a cat", "a dog"] if preset is None else "a cat"
    kw = KW  # MAX has no warm-up, so 4 steps see it act
    with guide(sd, term):
        a = sd(prompts, generator=_gen(1), num_images_per_prompt=2, **kw).images
    b = ref(
        prompts,
        generator=_gen(1),
        num_images_per_prompt=2,
        sld_guidance_scale=term.scale,
        sld_warmup_steps=term.warmup_steps,
        sld_threshold=term.threshold,
        sld_momentum_scale=term.momentum_scale,
        sld_mom_beta=term.mom_beta,
        **kw,
    ).images
    plain = sd(prompts, generator=_gen(1), num_images_per_prompt=2, **kw).images
    assert np.abs(a - b).max() <= PARITY_TOL
    assert np.abs(a - plain).max() > 1e-3  # the guidance did something


# -- properties on every supported pipeline -----------------------------------------------------------

KINDS = ["sd", "img2img", "sdxl"]


@pytest.fixture
def pipe_of(request):
    return lambda kind: request.getfixturevalue(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_no_terms_is_bit_identical_and_pipeline_is_restored(pipe_of, kind):
    pipe = pipe_of(kind)
    plain = _call(kind, pipe)
    before = _snapshot(pipe)  # after a plain call, which sets the pipeline's own per-call attributes
    with guide(pipe) as same:
        assert same is pipe
        inside = _call(kind, pipe)
    assert np.array_equal(plain, inside)
    with guide(pipe, SAFETY, TWO_EDITS):
        _call(kind, pipe)
    with pytest.raises(RuntimeError), guide(pipe, ONE_EDIT):
        raise RuntimeError("user code failed inside the block")
    assert np.array_equal(_call(kind, pipe), plain)
    after = _snapshot(pipe)
    assert after[0].keys() == before[0].keys()  # no instance attributes left behind
    assert all(_same(after[0][k], before[0][k]) for k in before[0])
    assert after[1] == before[1] and after[2] == before[2]  # no hooks left on the UNet


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_changes_output_deterministically_with_right_shapes(pipe_of, kind):
    pipe = pipe_of(kind)
    plain = _call(kind, pipe, prompt=["a cat", "a dog"])
    for terms in [(ONE_EDIT,), (SAFETY, TWO_EDITS)]:
        with guide(pipe, *terms):
            a = _call(kind, pipe, prompt=["a cat", "a dog"])
            b = _call(kind, pipe, prompt=["a cat", "a dog"]) if len(terms) > 1 else a
        assert a.shape == plain.shape == (2, 32, 32, 3)
        assert np.isfinite(a).all()
        assert np.array_equal(a, b)
        assert np.abs(a - plain).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_safety_and_two_semantic_terms_cost_one_unet_call_per_step(pipe_of, kind):
    pipe = pipe_of(kind)
    calls, handle = _count_unet(pipe)
    try:
        _call(kind, pipe, prompt=["a cat", "a dog"])
        plain_calls = list(calls)
        calls.clear()
        with guide(pipe, SAFETY, TWO_EDITS, ONE_EDIT):
            _call(kind, pipe, prompt=["a cat", "a dog"])
    finally:
        handle.remove()
    assert len(plain_calls) >= 4 and set(plain_calls) == {4}  # uncond + text rows, 2 prompts
    assert len(calls) == len(plain_calls)  # one batched evaluation per denoising step
    # after warm-up every concept's rows ride along: (2 + 1 safety + 3 edits) x 2 prompts
    assert calls[-1] == (2 + 4) * 2


def test_semantic_drop_in_and_guide_are_one_engine(sd, tiny_checkpoint):
    from safe_diffusion import SemanticStableDiffusionPipeline

    drop_in = SemanticStableDiffusionPipeline(**sd.components)
    drop_in.set_progress_bar_config(disable=True)
    a = drop_in(
        "a cat", editing_prompt=["beard"], reverse_editing_direction=True, edit_warmup_steps=0, generator=_gen(0), **KW
    ).images
    with guide(sd, ONE_EDIT):
        b = sd("a cat", generator=_gen(0), **KW).images
    assert np.array_equal(a, b)
