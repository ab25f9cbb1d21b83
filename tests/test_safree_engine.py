"""``guide(pipe, SafreeGuidance())`` on tiny random-weight SD 1.x, SDXL and SD 3 checkpoints, in float64, against
the port of the official SAFREE pipelines (tests/safree_official.py): the embeddings the denoiser receives at
every step, the steps that use the filtered embedding, and the final latents. Also: latent re-attention,
batches, composition with SLD and SEGA, refusals, and the pipeline restored."""

from __future__ import annotations

import pytest
import safree_official as official
import torch
from helpers import PARITY_TOL

from safe_diffusion import SafetyGuidance, SafreeGuidance, SemanticGuidance, guide
from safe_diffusion.common.errors import GuidanceError, UnsupportedPipelineError

PROMPT = "a photo of a cat"
SD_CALL = dict(guidance_scale=7.5, height=16, width=16)  # 8x8 latents: fast enough to run often
SDXL_CALL = dict(guidance_scale=5.0, height=32, width=32)
SD3_CALL = dict(guidance_scale=7.0, height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    import diffusers

    from safe_diffusion.testing import FAMILIES, build_sd3_checkpoint

    builders = {
        **{name: FAMILIES[name] for name in FAMILIES.names()},
        "sd3": lambda path: build_sd3_checkpoint(path, t5=True),
    }
    loaded = {}

    def get(name):
        if name not in loaded:
            path = builders[name](tmp_path_factory.mktemp("safree") / name)
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float64)
            pipe.set_progress_bar_config(disable=True)
            loaded[name] = pipe
        return loaded[name]

    return get


def _latents(seed=0, batch=1, side=16):
    return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sd_latents(batch=1):
    return _latents(batch=batch, side=8)


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _guided(pipe, terms, prompt=PROMPT, **call):
    """Run `pipe` inside guide(pipe, *terms), recording the denoiser's conditioning at every evaluation (hook
    registered after the engine's: it sees what the denoiser evaluates)."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].clone())

    with guide(pipe, *terms):
        handle = _denoiser(pipe).register_forward_pre_hook(record, with_kwargs=True)
        try:
            out = pipe(prompt, output_type="latent", **call).images
        finally:
            handle.remove()
    return out, seen


def _filtered_steps(seen, reference_embeddings):
    """The steps whose prompt rows are not the original prompt's (rows 1 of the reference's unfiltered step)."""
    return [i for i, e in enumerate(seen) if not torch.equal(e[1], reference_embeddings[1])]


def _assert_parity(out, seen, ref):
    assert len(seen) == len(ref["embeddings"])
    for step, (ours, theirs) in enumerate(zip(seen, ref["embeddings"])):
        assert (ours[: theirs.shape[0]] - theirs).abs().max() <= PARITY_TOL, f"embeddings at step {step}"
    assert (out - ref["latents"]).abs().max() <= PARITY_TOL
    assert not ref["keep"].all() and ref["keep"][1 : len(PROMPT)].any(), (
        "the test prompt must have trigger and safe tokens"
    )


@pytest.mark.parametrize("svf", [True, False], ids=["self-validating", "every-step"])
def test_sd_equals_the_official_pipeline(pipes, svf):
    pipe = pipes("sd")
    # upper_step 1: the self-validating filter keeps the filtered embedding for steps 0..1 of 4 evaluations (PLMS)
    term = SafreeGuidance(upper_step=1) if svf else SafreeGuidance(self_validation=False)
    ref = official.sd(pipe, PROMPT, latents=_sd_latents(), steps=3, svf=svf, up_t=1, lra=True)
    out, seen = _guided(pipe, [term], latents=_sd_latents(), num_inference_steps=3, **SD_CALL)
    _assert_parity(out, seen, ref)
    with torch.no_grad():
        unfiltered = official._sd_encode(pipe, PROMPT, ", ".join(official.NUDITY))[0]
    assert _filtered_steps(seen, unfiltered) == ([0, 1] if svf else [0, 1, 2, 3])
    assert ref["last_step"] == (1 if svf else None)


def test_sd2_style_v_prediction_equals_the_official_pipeline(pipes):
    """SD 2.x: the same pipeline class with a v-prediction scheduler (DDIM here)."""
    import diffusers

    base = pipes("sd")
    scheduler = diffusers.DDIMScheduler.from_config(base.scheduler.config, prediction_type="v_prediction")
    pipe = diffusers.StableDiffusionPipeline(**{**base.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    ref = official.sd(pipe, PROMPT, latents=_sd_latents(), steps=2, up_t=0, lra=True)
    out, seen = _guided(pipe, [SafreeGuidance(upper_step=0)], latents=_sd_latents(), num_inference_steps=2, **SD_CALL)
    _assert_parity(out, seen, ref)


def test_sdxl_equals_the_official_pipeline(pipes):
    pipe = pipes("sdxl")
    ref = official.sdxl(pipe, PROMPT, latents=_latents(), steps=2)
    out, seen = _guided(pipe, [SafreeGuidance()], latents=_latents(), num_inference_steps=2, **SDXL_CALL)
    _assert_parity(out, seen, ref)
    first = pipe.text_encoder.config.hidden_size
    prompt = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0]
    assert torch.equal(seen[0][1, :, :first], prompt[0, :, :first])  # the first encoder's part is not filtered
    assert not torch.equal(seen[0][1, :, first:], prompt[0, :, first:])


def test_sd3_equals_the_official_pipeline(pipes):
    pipe = pipes("sd3")
    ref = official.sd3(pipe, PROMPT, latents=_latents(), steps=2, max_sequence_length=16)
    out, seen = _guided(pipe, [SafreeGuidance()], latents=_latents(), num_inference_steps=2, **SD3_CALL)
    _assert_parity(out, seen, ref)


def test_latent_re_attention_equals_the_official_low_filter_while_the_filter_is_active(pipes):
    pipe = pipes("sd")
    term = SafreeGuidance(re_attention=True, upper_step=0)
    ref = official.sd(pipe, PROMPT, latents=_sd_latents(), steps=2, up_t=0, lra=True, lra_filter=True)
    without = official.sd(pipe, PROMPT, latents=_sd_latents(), steps=2, up_t=0, lra=True)
    out, seen = _guided(pipe, [term], latents=_sd_latents(), num_inference_steps=2, **SD_CALL)
    assert [e.shape[0] for e in seen] == [3, 2, 2]  # the original prompt's rows ride along at step 0 only
    _assert_parity(out, seen, ref)
    assert (ref["latents"] - without["latents"]).abs().max() > 1e-3  # the filter acted on the tiny UNet's widths
    up_hooks = [h for b in pipe.unet.up_blocks for m in (b, *b.resnets) for h in m._forward_pre_hooks.values()]
    assert not up_hooks  # removed when the call ended


def test_prompts_in_a_batch_are_filtered_each_as_if_alone(pipes):
    pipe = pipes("sd")
    prompts = [PROMPT, "a red car at noon"]
    term = SafreeGuidance(upper_step=1, re_attention=True)
    latents = _sd_latents(batch=4)
    batched, _ = _guided(pipe, [term], prompt=prompts, num_images_per_prompt=2, latents=latents.clone(),
                         num_inference_steps=2, **SD_CALL)  # fmt: skip
    for i, prompt in enumerate(prompts):
        alone, _ = _guided(pipe, [term], prompt=prompt, num_images_per_prompt=2, latents=latents[2 * i : 2 * i + 2].clone(),
                           num_inference_steps=2, **SD_CALL)  # fmt: skip
        assert (batched[2 * i : 2 * i + 2] - alone).abs().max() <= PARITY_TOL


def test_composes_with_sld_and_sega_in_one_call(pipes):
    """SAFREE (filter at every step) + SLD + SEGA = SLD + SEGA on the official filtered embedding and the concepts as
    negative prompt, in one UNet call per step carrying (2 + 1 + 2) rows."""
    pipe = pipes("sd")
    terms = [SafetyGuidance.from_preset("max"), SemanticGuidance(["sunglasses", "a red hat"], warmup_steps=0)]
    filtered = official.sd(pipe, PROMPT, latents=_sd_latents(), steps=2, svf=False)["embeddings"][0]
    with guide(pipe, *terms):
        expected = pipe(prompt_embeds=filtered[1:], negative_prompt_embeds=filtered[:1], latents=_sd_latents(),
                        num_inference_steps=2, output_type="latent", **SD_CALL).images  # fmt: skip
    out, seen = _guided(pipe, [SafreeGuidance(self_validation=False), *terms], latents=_sd_latents(),
                        num_inference_steps=2, **SD_CALL)  # fmt: skip
    assert (out - expected).abs().max() <= PARITY_TOL
    assert [e.shape[0] for e in seen] == [5] * len(seen)


def test_sdxl_composes_with_sld(pipes):
    pipe = pipes("sdxl")
    out, seen = _guided(pipe, [SafreeGuidance(), SafetyGuidance.from_preset("max")], latents=_latents(),
                        num_inference_steps=2, **SDXL_CALL)  # fmt: skip
    assert torch.isfinite(out).all() and [e.shape[0] for e in seen] == [3, 3]


def test_families_outside_the_official_code_are_refused_in_one_line(pipes):
    flux = pipes("flux")
    before = type(flux)
    with pytest.raises(UnsupportedPipelineError) as info, guide(flux, SafreeGuidance()):
        pass
    message = str(info.value)
    assert "FluxPipeline" in message and "SD 1.x/2.x, SDXL and SD 3" in message and "\n" not in message
    assert type(flux) is before


def test_sd3_without_t5_and_re_attention_on_sd3_are_refused(pipes, tmp_path):
    import diffusers

    sd3 = pipes("sd3")
    with pytest.raises(UnsupportedPipelineError, match="up blocks"), guide(sd3, SafreeGuidance(re_attention=True)):
        pass
    no_t5 = diffusers.StableDiffusion3Pipeline(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    with pytest.raises(UnsupportedPipelineError, match="T5"), guide(no_t5, SafreeGuidance()):
        pass


@pytest.mark.parametrize(
    "call,message",
    [
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32, dtype=torch.float64)), "prompt as text"),
        (dict(prompt=PROMPT, negative_prompt="blurry"), "negative prompt"),
    ],
)
def test_calls_safree_cannot_serve_raise_one_line_and_leave_no_hooks(pipes, call, message):
    pipe = pipes("sd")
    with guide(pipe, SafreeGuidance(re_attention=True)), pytest.raises(GuidanceError) as info:
        pipe(num_inference_steps=2, output_type="latent", **SD_CALL, **call)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not any(m._forward_pre_hooks for b in pipe.unet.up_blocks for m in (b, *b.resnets))


def test_an_error_mid_call_removes_the_re_attention_hooks_and_restores_the_pipeline(pipes):
    pipe = pipes("sd")
    cls = type(pipe)

    def fail(pipeline, step, t, kwargs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), guide(pipe, SafreeGuidance(re_attention=True)):
        pipe(PROMPT, num_inference_steps=2, callback_on_step_end=fail, output_type="latent", **SD_CALL)
    assert type(pipe) is cls and not pipe.unet._forward_pre_hooks
    assert not any(m._forward_pre_hooks for b in pipe.unet.up_blocks for m in (b, *b.resnets))
    # with the negative prompt the user chose, and SAFREE told not to replace it, the call runs
    with guide(pipe, SafreeGuidance(concepts_as_negative_prompt=False)):
        out = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=2, output_type="latent", **SD_CALL).images
    assert torch.isfinite(out).all()


def test_an_empty_prompt_has_no_token_to_filter(pipes):
    pipe = pipes("sd")
    out, seen = _guided(pipe, [SafreeGuidance(re_attention=True)], prompt=["", PROMPT], latents=_sd_latents(batch=2),
                        num_inference_steps=1, **SD_CALL)  # fmt: skip
    with torch.no_grad():
        empty = official._sd_encode(pipe, "", ", ".join(official.NUDITY))[0][1]
    # rows: 2 negative, then "" and PROMPT. The empty prompt's row is its plain encoding, unfiltered: equal up to
    # float64 rounding (encoded in a batch of two here, alone there; kernels may sum in another order).
    assert torch.isfinite(out).all()
    assert float((seen[0][2] - empty).abs().max()) <= PARITY_TOL * float(empty.abs().max())
    assert seen[0].shape[0] == 6  # the other prompt is filtered, so the original rows of both prompts ride along
