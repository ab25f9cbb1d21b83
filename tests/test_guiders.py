"""SLD and SEGA as diffusers guiders on the modular SDXL pipeline (engine/guiders.py).

The oracle is guide() on the classic StableDiffusionXLPipeline with the same term, in float64: the
modular pipeline evaluates the prompt, the negative prompt and each concept in separate denoiser
calls instead of one batch, so the two agree to rounding (≈1e-15), far below what guidance changes.
"""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import PARITY_TOL

from safe_diffusion import SafetyGuidance, SemanticGuidance, guide
from safe_diffusion.common.errors import GuidanceError, GuidanceOffError

pytestmark = pytest.mark.filterwarnings("ignore")
KW = dict(num_inference_steps=4, height=32, width=32)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from safe_diffusion.testing import build_sdxl_checkpoint

    return build_sdxl_checkpoint(tmp_path_factory.mktemp("ckpt") / "sdxl")


@pytest.fixture(scope="module")
def classic(checkpoint):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(checkpoint, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modular(checkpoint, concepts_step=True):
    """The modular SDXL pipeline loaded as docs/guidance.md shows (from the classic checkpoint's folder)."""
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from safe_diffusion import with_guidance_concepts

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    blocks = StableDiffusionXLAutoBlocks()
    if concepts_step:
        blocks = with_guidance_concepts(blocks)
    pipe = blocks.init_pipeline(str(checkpoint))
    pipe.load_components(torch_dtype=torch.float64)
    return pipe


@pytest.fixture(scope="module")
def modular(checkpoint):
    return _modular(checkpoint)


def _classic_image(pipe, *terms, **kw):
    with guide(pipe, *terms):
        return pipe("a cat", generator=_gen(), output_type="pt", guidance_scale=7.5, **KW, **kw).images


def _modular_image(pipe, guider, **kw):
    pipe.update_components(guider=guider)
    return pipe(prompt="a cat", generator=_gen(), output_type="pt", output="images", **KW, **kw)


def _cases():
    from safe_diffusion.engine.guiders import SafetyGuider, SemanticGuider

    return {
        "sld": (SafetyGuidance.from_preset("max", warmup_steps=1), SafetyGuider.from_preset("max", warmup_steps=1)),
        "sega": (
            SemanticGuidance(["sunglasses", "hat"], reverse=[False, True], warmup_steps=1),
            SemanticGuider(concepts=["sunglasses", "hat"], reverse=[False, True], warmup_steps=1),
        ),
    }


@pytest.mark.parametrize("name", ["sld", "sega"])
def test_guider_matches_guide_on_the_classic_pipeline(classic, modular, name):
    term, guider = _cases()[name]
    plain = _classic_image(classic)
    expected = _classic_image(classic, term)
    got = _modular_image(modular, guider)
    assert (expected - plain).abs().max() > 1e-3  # the guidance acts …
    assert (got - expected).abs().max() < 1e-10  # … and the guider's is the engine's
    again = _modular_image(modular, guider)  # a second call starts from step 0 with fresh momentum
    assert torch.equal(again, got)


def test_guider_counts_denoiser_calls_per_step(modular):
    from safe_diffusion.engine.guiders import SemanticGuider

    calls = []
    handle = modular.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        _modular_image(modular, SemanticGuider(concepts=["sunglasses", "hat"], warmup_steps=2))
    finally:
        handle.remove()
    # SEGA's momentum starts at step 0, so both concepts are evaluated at every step: (2 + 2) per step
    assert len(calls) == 4 * KW["num_inference_steps"]


def test_guider_saves_and_loads_its_settings(tmp_path):
    from safe_diffusion.engine.guiders import SafetyGuider

    guider = SafetyGuider.from_preset("strong", guidance_scale=6.0, concept="violence")
    guider.save_pretrained(tmp_path)
    loaded = SafetyGuider.from_pretrained(tmp_path)
    assert loaded.describe() == guider.describe()
    assert loaded.describe()["terms"][0]["concept"] == "violence"


def test_guider_without_the_concepts_step_says_how_to_add_it(checkpoint):
    from safe_diffusion.engine.guiders import SafetyGuider

    pipe = _modular(checkpoint, concepts_step=False)
    with pytest.raises(GuidanceError, match="with_guidance_concepts"):
        _modular_image(pipe, SafetyGuider())


def test_guider_refuses_guidance_that_cannot_act():
    from safe_diffusion.engine.guiders import SafetyGuider, SemanticGuider

    with pytest.raises(GuidanceOffError, match=r"guidance_scale=1\.0"):
        SafetyGuider(guidance_scale=1.0)
    with pytest.raises(ValueError, match="at least one edit concept"):
        SemanticGuider()


def test_guide_on_a_modular_pipeline_points_to_the_guiders(modular):
    with pytest.raises(GuidanceError, match="SafetyGuider"), guide(modular, SafetyGuidance()):
        pass


def test_guider_on_img2img_matches_guide(classic, modular):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from safe_diffusion.engine.guiders import SafetyGuider

    pixels = (torch.rand(32, 32, 3, generator=_gen(7)) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    img2img = StableDiffusionXLImg2ImgPipeline(**classic.components)
    img2img.set_progress_bar_config(disable=True)
    args = dict(image=image, strength=0.8, num_inference_steps=5, output_type="pt")
    with guide(img2img, SafetyGuidance.from_preset("max", warmup_steps=0)):
        expected = img2img("a cat", guidance_scale=7.5, generator=_gen(), **args).images
    modular.update_components(guider=SafetyGuider.from_preset("max", warmup_steps=0))
    got = modular(prompt="a cat", output="images", generator=_gen(), **args)
    assert (got - expected).abs().max() < 1e-10


# -- modular SD 3 (flow matching: the terms act in ε space through c = 1 − σ, as guide() does) --------------

SD3_KW = dict(num_inference_steps=4, height=32, width=32, max_sequence_length=16)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks

    from safe_diffusion import with_guidance_concepts
    from safe_diffusion.testing import build_sd3_checkpoint

    path = build_sd3_checkpoint(tmp_path_factory.mktemp("ckpt") / "sd3", t5=True)
    classic = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.float64)
    classic.set_progress_bar_config(disable=True)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    modular = with_guidance_concepts(StableDiffusion3AutoBlocks()).init_pipeline(str(path))
    modular.load_components(torch_dtype=torch.float64)
    return classic, modular


def _sd3_cases():
    from safe_diffusion.engine.guiders import SafetyGuider, SemanticGuider

    return {
        "sld": (
            SafetyGuidance.from_preset("max", warmup_steps=1),
            SafetyGuider.from_preset("max", 7.0, warmup_steps=1),
        ),
        "sega": (
            SemanticGuidance(["sunglasses", "hat"], reverse=[False, True], warmup_steps=1),
            SemanticGuider(7.0, concepts=["sunglasses", "hat"], reverse=[False, True], warmup_steps=1),
        ),
    }


def _sd3_classic(pipe, *terms):
    with guide(pipe, *terms):
        return pipe("a cat", generator=_gen(), output_type="pt", guidance_scale=7.0, **SD3_KW).images


def _sd3_modular(pipe, guider, **kw):
    pipe.update_components(guider=guider)
    return pipe(prompt="a cat", generator=_gen(), output_type="pt", output="images", **SD3_KW, **kw)


@pytest.mark.parametrize("name", ["sld", "sega"])
def test_sd3_guider_matches_guide_on_the_classic_pipeline(sd3, name):
    classic, modular = sd3
    term, guider = _sd3_cases()[name]
    plain = _sd3_classic(classic)
    expected = _sd3_classic(classic, term)
    got = _sd3_modular(modular, guider, negative_prompt="")  # modular SD 3 runs CFG only with a negative prompt
    assert (expected - plain).abs().max() > 1e-3  # the guidance acts …
    assert (got - expected).abs().max() <= PARITY_TOL  # … and in the same (ε) space as the engine


def test_sd3_guider_without_a_negative_prompt_refuses_in_one_line(sd3):
    from safe_diffusion.engine.guiders import SafetyGuider

    with pytest.raises(GuidanceOffError) as err:
        _sd3_modular(sd3[1], SafetyGuider.from_preset("max", 7.0))
    message = str(err.value)
    assert "\n" not in message and "negative_prompt=''" in message


def _modular_block_classes():
    import diffusers.modular_pipelines as modular

    generic = {"AutoPipelineBlocks", "ConditionalPipelineBlocks", "LoopSequentialPipelineBlocks"}
    generic |= {"ModularPipelineBlocks", "SequentialPipelineBlocks"}
    return sorted(n for n in dir(modular) if n.endswith("Blocks") and n not in generic)


@pytest.mark.parametrize("name", _modular_block_classes())
def test_every_modular_family_is_served_or_refused_in_one_line(name):
    """diffusers' modular families: SDXL and SD 3 take the guiders (parity above); every other is refused in
    one line naming its family, never silently unguided."""
    import diffusers.modular_pipelines as modular

    from safe_diffusion import with_guidance_concepts
    from safe_diffusion.engine.guiders import ENCODERS

    blocks = getattr(modular, name)()
    family = blocks.model_name
    if family in ENCODERS:
        assert "guidance_concepts" in with_guidance_concepts(blocks).sub_blocks
        return
    with pytest.raises(GuidanceError) as err:
        with_guidance_concepts(blocks)
    message = str(err.value)
    assert "\n" not in message and f"not {family}" in message


def test_modular_controlnet_takes_the_guider(tmp_path):
    """Modular SDXL with a ControlNet: with plain CFG it equals the classic ControlNet pipeline; SLD acts.
    The modular loop runs the ControlNet per guider batch (each concept conditions it), guide() gives the
    concept rows the prompt's residuals: the two differ by less than what the guidance changes."""
    from diffusers import DiffusionPipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from PIL import Image

    from safe_diffusion import with_guidance_concepts
    from safe_diffusion.engine.guiders import SafetyGuider
    from safe_diffusion.testing import FAMILIES

    path = FAMILIES["sdxl-controlnet"](tmp_path / "sdxl-controlnet")
    classic = DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float64)
    classic.set_progress_bar_config(disable=True)
    modular = with_guidance_concepts(StableDiffusionXLAutoBlocks()).init_pipeline(str(path))
    modular.load_components(torch_dtype=torch.float64)
    control = Image.fromarray((torch.rand(32, 32, 3, generator=_gen(5)) * 255).to(torch.uint8).numpy())

    def run_classic(*terms):
        with guide(classic, *terms):
            return classic("a cat", image=control, generator=_gen(), output_type="pt", guidance_scale=7.5, **KW).images

    def run_modular(guider):
        modular.update_components(guider=guider)
        return modular(prompt="a cat", control_image=control, generator=_gen(), output_type="pt", output="images", **KW)

    plain = run_classic()
    assert (run_modular(ClassifierFreeGuidance(guidance_scale=7.5)) - plain).abs().max() < 1e-10
    sld = SafetyGuidance.from_preset("max", warmup_steps=1)
    expected, got = run_classic(sld), run_modular(SafetyGuider.from_preset("max", warmup_steps=1))
    effect = (expected - plain).abs().max()
    assert effect > 1e-3 and (got - plain).abs().max() > 1e-3  # the guidance acts in both …
    assert (got - expected).abs().max() < effect / 2  # … and they differ only by the concepts' ControlNet residuals
