"""SLD and SEGA as diffusers guiders on the modular SDXL pipeline (engine/guiders.py).

The oracle is guide() on the classic StableDiffusionXLPipeline with the same term, in float64: the
modular pipeline evaluates the prompt, the negative prompt and each concept in separate denoiser
calls instead of one batch, so the two agree to rounding (≈1e-15), far below what guidance changes.
"""

from __future__ import annotations

import logging

import pytest
import torch

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
