"""The guided denoiser: the engine's guided estimate outside a pipeline call, equal to the pipeline's own guided
estimate per family, and differentiable through the guidance terms' correction (issue 20's attacks need it)."""

from __future__ import annotations

import pytest
import torch
from test_families import FAMILIES, _denoiser

from safe_diffusion import SafetyGuidance, guide
from safe_diffusion.common.errors import GuidanceError
from safe_diffusion.engine import Conditioning, GuidedDenoiser

SLD = SafetyGuidance.from_preset("max")  # no warm-up: the correction acts at the first evaluation


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    import diffusers

    from safe_diffusion.testing import FAMILIES as BUILDERS

    loaded = {}

    def get(name):
        if name not in loaded:
            fam = FAMILIES[name]
            path = BUILDERS[fam.builder](tmp_path_factory.mktemp("denoiser") / name)
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float64, **fam.load)
            pipe.set_progress_bar_config(disable=True)
            loaded[name] = pipe
        return loaded[name]

    return get


def _pipeline_guided_estimates(name, pipe):
    """Run `pipe` under guide(SLD) for two steps; per evaluation: (latents, timestep, guided estimate); and the scale."""
    fam = FAMILIES[name]
    den = _denoiser(pipe)
    inputs, outputs = [], []

    def before(module, args, kwargs):
        named = dict(zip(["sample", "timestep"], args), **kwargs)
        named.setdefault("sample", named.get("hidden_states"))
        inputs.append(named)

    def after(module, args, kwargs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output.sample)

    first = den.register_forward_pre_hook(before, with_kwargs=True)  # before the engine's: the pipeline's rows
    try:
        with guide(pipe, SLD):
            last = den.register_forward_hook(after, with_kwargs=True)  # after the engine's: the combined rows
            try:
                pipe(
                    "a cat",
                    num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0),
                    output_type="latent",
                    **fam.call,
                )
            finally:
                last.remove()
    finally:
        first.remove()
    from safe_diffusion.engine.core import served_denoisers
    from safe_diffusion.engine.denoiser import direct_call_for

    key, module, adapter_cls = served_denoisers(pipe)[0]
    adapter = adapter_cls(pipe, key, module)
    call = direct_call_for(adapter)
    scale = float(fam.call.get("true_cfg_scale") or fam.call.get("guidance_scale") or pipe._guidance_scale)
    evaluations = []
    per = 2 if fam.separate_calls else 1
    for i in range(0, 2 * per, per):
        kw = inputs[i]
        if fam.separate_calls:  # prompt first (its estimate corrected in place), then the negative prompt
            text, uncond, x = outputs[i], outputs[i + 1], kw["sample"]
        else:
            uncond, text = outputs[i].chunk(2)
            x = kw["sample"][: kw["sample"].shape[0] // 2]
        t = torch.as_tensor(kw["timestep"]).flatten()[0] * 1000 / adapter.timestep_scale()
        guided = call.combine(uncond, text, scale)
        evaluations.append((adapter.to_math(x, kw), t, adapter.to_math(guided, kw)))
    return evaluations, scale


def _tolerance(name) -> float:
    """Float64 rounding; Wan keeps some modules in float32 (``_keep_in_fp32_modules``), so its output depends on
    the batch's shape at float32 rounding (~1e-7: one row alone and the same row in a batch of two differ by
    that), and the pipeline batches its rows differently (the prompt with the concepts, the negative alone).
    SLD's scale min(|ε_p − ε_S|·s_S, 1) multiplies such a difference by its slope s_S (5000 for the max preset)
    where it is not saturated: 1e-7 · 5000 = 5e-4 of |ε_S|, which the kernels of one CPU reach and another's
    not (3.6e-5 measured under ATEN_CPU_CAPABILITY=avx2). A wrong estimate differs by orders more."""
    return 1e-3 if name == "wan" else 1e-10


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "pixart-sigma", "qwen-image", "wan"])
def test_the_guided_denoiser_equals_the_pipelines_guided_estimate(pipes, name):
    pipe = pipes(name)
    fam = FAMILIES[name]
    evaluations, scale = _pipeline_guided_estimates(name, pipe)
    negative = fam.call.get("negative_prompt")
    with (
        GuidedDenoiser(pipe, SLD, guidance_scale=scale, arguments=fam.call) as den,
        GuidedDenoiser(pipe, guidance_scale=scale, arguments=fam.call) as plain,
    ):
        cond = den.encode("a cat", negative)
        for x, t, expected in evaluations:  # the second evaluation carries SLD's momentum from the first
            got = den(x, t, cond)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= _tolerance(name) * max(1.0, float(expected.abs().max()))
        assert den.step == 2 and den.states[0] is not None  # SLD's momentum after two evaluations
        unguided = plain(x, t, plain.encode("a cat", negative))
    assert (unguided - expected).abs().max() > 1e-6  # the correction acted


def test_gradients_flow_through_the_sld_correction(pipes):
    """d(estimate)/d(prompt embeddings) includes the SLD correction's own derivative: it differs from the
    unguided estimate's gradient (which it would equal were the correction detached) and matches finite
    differences in float64."""
    pipe = pipes("sd")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    weights = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    # SLD with a scale at which the safety scale μ = clamp(s_S·|ε_p − ε_S|, max 1) is not saturated (the presets'
    # 200 … 5000 saturate it on this random model, where μ is then locally constant in ε_p)
    sld = SafetyGuidance(scale=5.0, warmup_steps=0, threshold=0.5, momentum_scale=0.3)
    guided, plain = GuidedDenoiser(pipe, sld, guidance_scale=7.5), GuidedDenoiser(pipe, guidance_scale=7.5)
    base = guided.encode("a cat")
    embeds = base.prompt["encoder_hidden_states"]

    def loss(den, e):
        den.reset()
        return (den(x, 500, Conditioning(base.uncond, {"encoder_hidden_states": e})) * weights).sum()

    grads = {}
    for label, den in (("guided", guided), ("plain", plain)):
        e = embeds.clone().requires_grad_(True)
        loss(den, e).backward()
        grads[label] = e.grad
    correction_grad = grads["guided"] - grads["plain"]
    assert correction_grad.abs().max() > 1e-3 * grads["plain"].abs().max()

    direction = torch.randn(embeds.shape, generator=g, dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        numeric = (loss(guided, embeds + eps * direction) - loss(guided, embeds - eps * direction)) / (2 * eps)
    analytic = (grads["guided"] * direction).sum()
    assert abs(float(numeric - analytic)) <= 1e-6 * max(1.0, abs(float(analytic)))


def test_without_a_prompt_the_estimate_is_the_unconditional_one_plus_the_correction(pipes):
    pipe = pipes("sd")
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with GuidedDenoiser(pipe) as plain:
        uncond = plain(x, 400, plain.encode())
    unet = pipe.unet(
        x, 400, encoder_hidden_states=plain.encode().uncond["encoder_hidden_states"].expand(2, -1, -1)
    ).sample
    assert (uncond - unet).abs().max() <= 1e-12
    with GuidedDenoiser(pipe, SafetyGuidance.from_preset("max", concept="a dog")) as den:
        assert (den(x, 400, den.encode()) - uncond).abs().max() > 1e-6
    # rows evaluated a few at a time give the same estimate
    with (
        GuidedDenoiser(pipe, SafetyGuidance.from_preset("max", concept="a dog"), rows_per_call=1) as den1,
        GuidedDenoiser(pipe, SafetyGuidance.from_preset("max", concept="a dog")) as den2,
    ):
        assert (den1(x, 400, den1.encode()) - den2(x, 400, den2.encode())).abs().max() <= 1e-12


def test_an_inpainting_unet_is_refused_in_one_line(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from safe_diffusion.testing import build_inpaint_checkpoint

    pipe = StableDiffusionInpaintPipeline.from_pretrained(build_inpaint_checkpoint(tmp_path / "inpaint"))
    with pytest.raises(GuidanceError) as err:
        GuidedDenoiser(pipe, SLD)
    assert "\n" not in str(err.value) and "inpainting UNet" in str(err.value)
