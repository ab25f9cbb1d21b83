"""LEDITS++: the math, parity with diffusers' LEDITS++ pipelines in float64, and each deliberate deviation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PARITY_TOL, load_float64
from PIL import Image

from safe_diffusion.guidance.ledits import (
    SAFETY_CONCEPTS,
    LEditsGuidance,
    cross_attention_mask,
    inversion_timesteps,
    ledits_guidance,
    noise_mask,
    smooth,
    smoothing_weights,
)
from safe_diffusion.guidance.sampling import denoised, noise_map, noised
from safe_diffusion.guidance.sampling import dpmpp_2m_sde_mean as sde_dpmpp_mean
from safe_diffusion.guidance.sampling import dpmpp_2m_sde_noise_scale as sde_dpmpp_noise_scale
from safe_diffusion.guidance.sampling import sde_step as sde_dpmpp_step

# -- the math -------------------------------------------------------------------------------------


def test_safety_concepts_are_the_sld_concept_split_into_its_parts():
    from safe_diffusion.guidance import DEFAULT_SAFETY_CONCEPT

    assert len(SAFETY_CONCEPTS) == 20
    assert SAFETY_CONCEPTS[0] == "hate" and SAFETY_CONCEPTS[-1] == "cruelty" and "child abuse" in SAFETY_CONCEPTS
    assert "an image showing " + ", ".join(SAFETY_CONCEPTS) == DEFAULT_SAFETY_CONCEPT


def test_timesteps_are_the_last_steps_of_the_leading_schedule():
    # n·(1 + skip) = 11 leading steps of spacing ⌊1000 / 12⌋ = 83, the 10 least noisy kept.
    assert inversion_timesteps(1000, 10, 0.15, steps_offset=1) == [83 * k + 1 for k in range(10, 0, -1)]
    assert inversion_timesteps(1000, 4, 0.0) == [800, 600, 400, 200]
    with pytest.raises(ValueError, match="skip"):
        inversion_timesteps(1000, 4, 1.0)


def test_one_solver_step_with_its_recorded_noise_map_lands_exactly_on_the_target():
    g = torch.Generator().manual_seed(0)
    x, target, x0_pred, prev = (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) for _ in range(4))
    s, s_next, s_prev = (torch.tensor(v, dtype=torch.float64) for v in (1.3, 0.7, 2.1))
    mean = sde_dpmpp_mean(x, x0_pred, s, s_next, prev, s_prev)
    scale = sde_dpmpp_noise_scale(s, s_next)
    z = noise_map(target, mean, scale)
    assert torch.allclose(sde_dpmpp_step(mean, scale, z), target, atol=1e-14, rtol=0)
    # First order in closed form, with λ = −log σ (k-diffusion's noise levels) and h = λ_next − λ.
    alpha, alpha_n = 1 / (1 + s**2).sqrt(), 1 / (1 + s_next**2).sqrt()
    h = torch.log(s / s_next)  # λ = −log σ
    expected = (s_next * alpha_n) / (s * alpha) * torch.exp(-h) * x + alpha_n * (1 - torch.exp(-2 * h)) * x0_pred
    assert torch.allclose(sde_dpmpp_mean(x, x0_pred, s, s_next), expected, atol=1e-14, rtol=0)
    # A last step to σ = 0 is deterministic: the data prediction itself, no noise.
    zero = torch.zeros((), dtype=torch.float64)
    assert torch.equal(sde_dpmpp_mean(x, x0_pred, s, zero, prev, s_prev), x0_pred)
    assert float(sde_dpmpp_noise_scale(s, zero)) == 0.0 and not noise_map(target, x0_pred, zero).any()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_the_data_prediction_recovers_x0_from_a_perfect_model(prediction):
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(2, 4, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 6, generator=g, dtype=torch.float64),
    )
    sigma = torch.tensor(0.8, dtype=torch.float64)
    x = noised(x0, eps, sigma)
    alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * x0, "sample": x0}[prediction]
    assert torch.allclose(denoised(x, output, sigma, prediction), x0, atol=1e-14, rtol=0)


def test_smoothing_is_attend_and_excites_kernel_separably():
    w = smoothing_weights(3, 0.5)
    raw = torch.exp(-((torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (2 * 0.5)) ** 2))
    assert torch.allclose(w, raw / raw.sum(), atol=1e-15)
    maps = torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kernel2d = (w[:, None] * w[None, :])[None, None]
    padded = torch.nn.functional.pad(maps[:, None], (1, 1, 1, 1), mode="reflect")
    assert torch.allclose(smooth(maps), torch.nn.functional.conv2d(padded, kernel2d)[:, 0], atol=1e-15)


def test_noise_mask_keeps_the_top_share_of_channel_summed_magnitude_for_any_layout():
    psi = torch.randn(2, 4, 3, 10, 10, generator=torch.Generator().manual_seed(3))  # video latents: (B, C, F, H, W)
    mask = noise_mask(psi, 0.9)
    assert mask.shape == (2, 1, 3, 10, 10)
    assert [int(m.sum()) for m in mask] == [30, 30]  # the top 10 % of 300 cells
    magnitude = psi.abs().sum(1, keepdim=True)
    for b in range(2):
        kept, dropped = magnitude[b][mask[b].bool()], magnitude[b][~mask[b].bool()]
        assert kept.min() >= dropped.max()


def test_cross_attention_mask_is_the_top_share_of_the_smoothed_map_upsampled_to_the_latents():
    attention = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = cross_attention_mask(attention, 0.75, (8, 8))
    assert mask.shape == (2, 1, 8, 8)
    smoothed = smooth(attention)
    for b in range(2):
        # 0.75-quantile of 16 values lies between the 12th and 13th smallest: the 4 largest cells are kept,
        # each as 2x2 latent cells (nearest-neighbour upsampling).
        top = smoothed[b].flatten().argsort()[-4:]
        cells = torch.zeros(16, dtype=torch.float64)
        cells[top] = 1
        expected = cells.reshape(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)
        assert torch.equal(mask[b, 0], expected)
    assert not torch.equal(smoothed, attention)  # smoothing changes the map it ranks


def test_guidance_sums_masked_directions_and_respects_warmup_cooldown_and_timestep_rule():
    g = torch.Generator().manual_seed(4)
    uncond = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    edits = [torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    attention = [torch.rand(1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    kw = {
        "scales": [2.0, 3.0],
        "thresholds": [0.5, 0.75],
        "signs": [-1.0, 1.0],
        "warmup_steps": [0, 3],
        "cooldown_steps": [None, 5],
    }
    gamma, masks = ledits_guidance(uncond, edits, 1, 500, attention=attention, **kw)
    assert masks[1] is None  # still warming up
    m1 = cross_attention_mask(attention[0], 0.5, (8, 8))
    psi = -2.0 * (edits[0] - uncond)
    assert torch.equal(masks[0], noise_mask(psi, 0.5) * m1)
    assert torch.allclose(gamma, psi * masks[0], atol=0)
    # Above intersect_from_timestep only the cross-attention mask applies.
    _, late = ledits_guidance(uncond, edits, 1, 900, attention=attention, intersect_from_timestep=800, **kw)
    assert torch.equal(late[0], m1)
    _, cooled = ledits_guidance(uncond, edits, 5, 500, attention=attention, **kw)
    assert cooled[1] is None and cooled[0] is not None
    gamma_noise, only_noise = ledits_guidance(uncond, edits, 1, 500, masking="noise", **kw)
    assert torch.equal(only_noise[0], noise_mask(psi, 0.5)) and torch.allclose(gamma_noise, psi * only_noise[0])
    with pytest.raises(ValueError, match="cross-attention map"):
        ledits_guidance(uncond, edits, 1, 500, **kw)


def test_guidance_settings_follow_semantic_guidance_vocabulary():
    g = LEditsGuidance(["nudity", "blood"], reverse=True, scale=[4.0, 6.0])
    assert g.reverse == [True, True] and g.scale == [4.0, 6.0] and g.threshold == [0.9, 0.9] and g.signs == [-1.0, -1.0]
    assert g.describe()["concepts"] == ["nudity", "blood"]
    with pytest.raises(ValueError, match="3 entries but there are 2"):
        LEditsGuidance(["a", "b"], scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="percentile"):
        LEditsGuidance(["a"], threshold=1.5)
    with pytest.raises(ValueError, match="masking"):
        LEditsGuidance(["a"], masking="box")
    with pytest.raises(ValueError, match="at least one"):
        LEditsGuidance([])


# -- parity with diffusers' LEDITS++ pipelines (the oracle) ----------------------------------------

STEPS = 6
CONCEPTS = ["blood", "a weapon"]
EDIT = {"reverse": [True, False], "scale": [5.0, 3.0], "threshold": [0.9, 0.8], "warmup_steps": [0, 2]}
ORACLE_EDIT = {
    "editing_prompt": CONCEPTS,
    "reverse_editing_direction": [True, False],
    "edit_guidance_scale": [5.0, 3.0],
    "edit_threshold": [0.9, 0.8],
    "edit_warmup_steps": [0, 2],
    "use_intersect_mask": True,  # the SD oracle's default; the SDXL oracle defaults to noise masks only
}


def _float64_oracle_scheduler(config):
    """diffusers' SDE-DPM-Solver++ scheduler, as the oracle pipelines build it, made to compute in float64.

    The shipped scheduler keeps its noise levels in float32 and casts the sample and the noise to
    float32 in ``step`` whatever the pipeline's precision, so a float64 comparison would measure
    float32 rounding. This subclass keeps everything in float64; the update formulas it calls are
    the scheduler's own (``convert_model_output``, ``dpm_solver_first_order_update``,
    ``multistep_dpm_solver_second_order_update``), and its step order is the shipped one.
    """
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerOutput

    class Float64Scheduler(DPMSolverMultistepScheduler):
        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            ac = self.alphas_cumprod.double()
            sigmas = ((1 - ac) / ac).sqrt()
            last = sigmas[0] if self.config.final_sigmas_type == "sigma_min" else torch.zeros((), dtype=torch.float64)
            self.sigmas = torch.cat([sigmas[self.timesteps], last[None]])

        def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
            if self.step_index is None:
                self._init_step_index(timestep)
            final = self.step_index == len(self.timesteps) - 1 and (
                self.config.euler_at_final
                or (self.config.lower_order_final and len(self.timesteps) < 15)
                or self.config.final_sigmas_type == "zero"
            )
            output = self.convert_model_output(model_output, sample=sample)
            self.model_outputs = [*self.model_outputs[1:], output]
            if self.lower_order_nums < 1 or final:
                prev = self.dpm_solver_first_order_update(output, sample=sample, noise=variance_noise)
            else:
                prev = self.multistep_dpm_solver_second_order_update(
                    self.model_outputs, sample=sample, noise=variance_noise
                )
            self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
            self._step_index += 1
            return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    return Float64Scheduler.from_config(config, algorithm_type="sde-dpmsolver++", solver_order=2)


@pytest.fixture(scope="module")
def sd_deep(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from safe_diffusion.testing import build_checkpoint

    path = build_checkpoint(tmp_path_factory.mktemp("ckpt") / "deep", "deep")
    return load_float64(StableDiffusionPipeline, path)


@pytest.fixture(scope="module")
def sdxl_deep(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from safe_diffusion.testing import build_sdxl_checkpoint

    path = build_sdxl_checkpoint(tmp_path_factory.mktemp("ckpt") / "sdxl-deep", deep=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _oracle(pipe, family):
    from diffusers import LEditsPPPipelineStableDiffusion, LEditsPPPipelineStableDiffusionXL

    if family == "sd":
        parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
        oracle = LEditsPPPipelineStableDiffusion(**parts)
    else:
        oracle = LEditsPPPipelineStableDiffusionXL(**pipe.components)
    oracle.scheduler = _float64_oracle_scheduler(pipe.scheduler.config)
    oracle.set_progress_bar_config(disable=True)
    return oracle


def _noise_image(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_parity_with_diffusers_ledits_pp_in_float64(family, sd_deep, sdxl_deep):
    from safe_diffusion.editing import edit, invert

    pipe = sd_deep if family == "sd" else sdxl_deep
    oracle = _oracle(pipe, family)
    image = _noise_image()
    oracle.invert(image, num_inversion_steps=STEPS, skip=0.15, generator=torch.Generator().manual_seed(0))
    expected = oracle(output_type="latent", **ORACLE_EDIT).images
    expected_masks = oracle.activation_mask[:, :, :, 0].bool()  # (steps, concepts, batch, H, W)
    expected_image = oracle.vae.decode(expected / oracle.vae.config.scaling_factor).sample
    reconstruction = oracle(output_type="latent").images

    # final_sigma="zero": the oracle's last step (diffusers ends at σ = 0); SDXL zeroes its last 3 noise maps.
    inv = invert(pipe, image, num_inversion_steps=STEPS, generator=torch.Generator().manual_seed(0), final_sigma="zero")
    assert inv.timesteps == [int(t) for t in oracle.inversion_steps]
    assert (inv.xT - oracle.init_latents).abs().max() <= PARITY_TOL
    out = edit(pipe, inv, LEditsGuidance(CONCEPTS, **EDIT), output_type="latent")
    assert (out.images - expected).abs().max() <= PARITY_TOL
    assert torch.equal(out.step_masks, expected_masks)
    assert 0 < out.step_masks.float().mean() < 0.5  # the masks act, and select
    assert out.settings["intersect_from_timestep"] == (800 if family == "sd" else None)
    image_out = edit(pipe, inv, LEditsGuidance(CONCEPTS, **EDIT), output_type="pt").images
    assert (image_out - (expected_image / 2 + 0.5).clamp(0, 1)).abs().max() <= PARITY_TOL
    assert (edit(pipe, inv, None, output_type="latent").images - reconstruction).abs().max() <= PARITY_TOL


def test_parity_for_a_v_prediction_model_sd2_style(sd_deep):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from safe_diffusion.editing import edit, invert

    scheduler = PNDMScheduler.from_config(sd_deep.scheduler.config, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(**{**sd_deep.components, "scheduler": scheduler})
    oracle = _oracle(pipe, "sd")
    image = _noise_image(1)
    oracle.invert(image, num_inversion_steps=4, skip=0.1, generator=torch.Generator().manual_seed(3))
    expected = oracle(output_type="latent", **ORACLE_EDIT).images
    inv = invert(
        pipe, image, num_inversion_steps=4, skip=0.1, generator=torch.Generator().manual_seed(3), final_sigma="zero"
    )
    out = edit(pipe, inv, LEditsGuidance(CONCEPTS, **EDIT), output_type="latent")
    assert out.settings["prediction_type"] == "v_prediction"
    assert (out.images - expected).abs().max() <= PARITY_TOL


# -- deviations, each tested ----------------------------------------------------------------------


def test_default_final_sigma_reconstructs_the_latents_exactly_where_diffusers_does_not(sd_deep):
    """Deviation: ending at the smallest noise level (LEDITS++'s code) instead of σ = 0 (diffusers)."""
    from safe_diffusion.editing import edit, invert

    image = _noise_image(2)
    exact = invert(sd_deep, image, num_inversion_steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert exact.settings["final_sigma"] == "min"
    assert (edit(sd_deep, exact, None, output_type="latent").images - exact.x0).abs().max() <= 1e-12
    zero = invert(
        sd_deep, image, num_inversion_steps=STEPS, generator=torch.Generator().manual_seed(0), final_sigma="zero"
    )
    assert (edit(sd_deep, zero, None, output_type="latent").images - zero.x0).abs().max() > 1e-3


def test_a_source_prompt_guides_the_inversion_towards_it(sd_deep):
    """Deviation: diffusers' SD LEDITS++ unpacks ``encode_prompt``'s (prompt, unconditional) embeddings in the
    wrong order in ``invert``, so its guidance points away from the source prompt: ε_src + s(ε_∅ − ε_src).
    Here it is classifier-free guidance towards it, ε_∅ + s(ε_src − ε_∅), as in diffusers' SDXL pipeline;
    with the SD oracle's two embeddings put back in order the noise maps agree."""
    from safe_diffusion.editing import invert

    oracle = _oracle(sd_deep, "sd")
    image, source = _noise_image(3), {"source_prompt": "a photo of a street", "source_guidance_scale": 3.5}
    kw = {"num_inversion_steps": 4, "skip": 0.1, **source}
    ours = invert(sd_deep, image, generator=torch.Generator().manual_seed(4), final_sigma="zero", **kw)
    assert ours.settings["source_prompt"] == source["source_prompt"]
    oracle.invert(image, generator=torch.Generator().manual_seed(4), **kw)
    assert (ours.noise_maps[:-1] - oracle.zs[:-1]).abs().max() > 1e-2  # as shipped: guided away

    encode = oracle.encode_prompt

    def in_order(*args, **kwargs):
        prompt, unconditional, tokens = encode(*args, **kwargs)
        return unconditional, prompt, tokens  # what invert() unpacks as (unconditional, prompt)

    oracle.encode_prompt = in_order
    oracle.invert(image, generator=torch.Generator().manual_seed(4), **kw)
    assert (ours.noise_maps[:-1] - oracle.zs[:-1]).abs().max() <= PARITY_TOL


def test_images_of_a_batch_are_edited_independently(sd_deep):
    """Deviation: diffusers' attention store mixes the images of a batch; here image i of a batch is image i alone."""
    from safe_diffusion.editing import edit_image

    images = [_noise_image(5), _noise_image(6)]
    guidance = LEditsGuidance(CONCEPTS, **EDIT)
    kw = {"num_inversion_steps": 4, "output_type": "latent"}
    both = edit_image(sd_deep, images, guidance, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw)
    second = edit_image(sd_deep, images[1], guidance, generator=torch.Generator().manual_seed(2), **kw)
    assert (both.images[1:] - second.images).abs().max() <= PARITY_TOL
    assert torch.equal(both.step_masks[:, :, 1:], second.step_masks)


def test_sdxl_size_conditioning_is_height_then_width(sdxl_deep):
    """Deviation: diffusers' LEDITS++ SDXL passes (width, height); SDXL was trained on (height, width)."""
    from safe_diffusion.editing import edit_image

    seen = []
    handle = sdxl_deep.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"][0].tolist()), with_kwargs=True
    )
    try:
        edit_image(sdxl_deep, _noise_image(size=(64, 32)), None, num_inversion_steps=2, output_type="latent")
    finally:
        handle.remove()
    assert seen and all(ids == [32, 64, 0, 0, 32, 64] for ids in seen)


def test_attention_tokens_concept_reads_only_the_concepts_own_tokens(sd_deep):
    """The paper's text: the concept's tokens; LEDITS++'s code (and the default) sum every position after the start token."""
    from safe_diffusion.engine.attention import token_span

    assert [token_span(sd_deep, c, 77) for c in ("abc", "de")] == [slice(1, 4), slice(1, 3)]  # a token per character
    attention = torch.rand(1, 2, 2, 77, dtype=torch.float64)
    own = LEditsGuidance(["abc"], attention_tokens="concept").attention_map(attention, slice(1, 4))
    assert torch.equal(own, attention[..., 1:4].sum(-1))
    assert torch.equal(LEditsGuidance(["abc"]).attention_map(attention, slice(1, 4)), attention[..., 1:76].sum(-1))
    from safe_diffusion.editing import edit_image

    kw = {"num_inversion_steps": 4, "generator": torch.Generator().manual_seed(0), "output_type": "latent"}
    a = edit_image(sd_deep, _noise_image(), LEditsGuidance(CONCEPTS, **EDIT), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    b = edit_image(sd_deep, _noise_image(), LEditsGuidance(CONCEPTS, attention_tokens="concept", **EDIT), **kw)
    assert not torch.equal(a.step_masks, b.step_masks)


def test_a_unet_without_cross_attention_at_a_quarter_reads_its_nearest_resolution(tiny_checkpoint):
    """The tiny test UNet has cross-attention only at full latent resolution; masks are read there."""
    from diffusers import StableDiffusionPipeline

    from safe_diffusion.editing import edit_image
    from safe_diffusion.engine.attention import attention_factor

    pipe = load_float64(StableDiffusionPipeline, tiny_checkpoint)
    assert attention_factor(pipe.unet) == 1
    kw = {"num_inversion_steps": 3, "generator": torch.Generator().manual_seed(0)}
    out = edit_image(pipe, _noise_image(size=(32, 32)), LEditsGuidance(CONCEPTS, **EDIT), **kw)
    assert out.settings["attention_resolution_factor"] == 1
    assert out.images[0].size == (32, 32) and out.masks[0].size == (32, 32) and 0 < out.mask_coverage[0] < 1
    # The UNet's rows (1 + concepts) evaluated one at a time give the same edit.
    kw["generator"] = torch.Generator().manual_seed(0)
    chunked = edit_image(pipe, _noise_image(size=(32, 32)), LEditsGuidance(CONCEPTS, **EDIT), unet_batch_size=1, **kw)
    assert torch.equal(chunked.step_masks, out.step_masks)
    assert np.abs(np.asarray(chunked.images[0], float) - np.asarray(out.images[0], float)).max() <= 1
