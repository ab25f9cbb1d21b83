"""Pipelines that append a reference image's tokens after the latent's (FLUX Kontext, Kontext inpainting,
Qwen-Image-Edit and Edit Plus): guide() corrects the latent tokens only and lets the image tokens ride unchanged (the
pipeline drops their estimates). Before, the engine unpacked every token as latent and crashed mid-call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from safe_diffusion import SafetyGuidance, SemanticGuidance, guide
from safe_diffusion.engine.adapters import FluxAdapter, QwenImageAdapter, pack_tokens, unpack_tokens

SLD = SafetyGuidance.from_preset("max", warmup_steps=0)
SEGA = SemanticGuidance(["sunglasses"], warmup_steps=0)


def _image(seed=5, side=32):
    pixels = (torch.rand(side, side, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    import diffusers

    from safe_diffusion.testing import FAMILIES

    path = FAMILIES["flux"](tmp_path_factory.mktemp("flux") / "flux")
    return diffusers.FluxPipeline.from_pretrained(path, torch_dtype=torch.float64)


def _kontext_call(cls):
    call = dict(image=_image(), height=32, width=32, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt="")
    call.update(_auto_resize=False, max_area=32 * 32)  # the reference image at the call's size, not 1024²
    if "Inpaint" in cls:
        mask = Image.fromarray(
            ((torch.rand(32, 32, generator=torch.Generator().manual_seed(2)) > 0.5) * 255).byte().numpy()
        )
        call["mask_image"] = mask
    return call


def _run(pipe, call, *terms):
    with guide(pipe, *terms):
        out = pipe(
            prompt="a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **call
        )
    return np.asarray(out.images)


@pytest.mark.parametrize("cls", ["FluxKontextPipeline", "FluxKontextInpaintPipeline"])
def test_flux_kontext_is_guided_on_its_latent_tokens(flux, cls):
    import diffusers

    pipe = getattr(diffusers, cls)(**flux.components)
    pipe.set_progress_bar_config(disable=True)
    call = _kontext_call(cls)
    plain = _run(pipe, call)
    assert np.array_equal(_run(pipe, call), plain)  # no terms: untouched (same execution repeated)
    for term in (SLD, SEGA):
        guided = _run(pipe, call, term)
        assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-3


@pytest.mark.parametrize(
    "cls, module, dims",
    [
        ("QwenImageEditPipeline", "pipeline_qwenimage_edit", (32, 32, None)),
        ("QwenImageEditPlusPipeline", "pipeline_qwenimage_edit_plus", (32, 32)),  # two reference images
    ],
)
def test_qwen_image_edit_is_guided_on_its_latent_tokens(tmp_path, monkeypatch, cls, module, dims):
    """Qwen-Image-Edit (one reference image) and Edit Plus (several) with the tiny checkpoint. Their text encoding
    runs the prompt and the images through Qwen2.5-VL's processor, which the tiny byte-level vocabulary (no vision
    tokens) cannot build: the prompt and concepts are encoded by the same text encoder without the images
    (QwenImagePipeline's encoding). What is under test is the engine's handling of the image tokens in the
    transformer's batch."""
    import diffusers

    from safe_diffusion.testing import FAMILIES

    path = FAMILIES["qwen-image"](tmp_path / "qwen-image")
    base = diffusers.QwenImagePipeline.from_pretrained(path, torch_dtype=torch.float64)
    pipe = getattr(diffusers, cls)(**base.components, processor=None)
    pipe.set_progress_bar_config(disable=True)

    def text_only(prompt, image=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                  prompt_embeds_mask=None, max_sequence_length=1024):  # fmt: skip
        return base.encode_prompt(prompt, device, num_images_per_prompt, prompt_embeds, prompt_embeds_mask, 512)

    monkeypatch.setattr(pipe, "encode_prompt", text_only)
    image = _image() if "Plus" not in cls else [_image(5), _image(6)]
    call = dict(image=image, height=32, width=32, true_cfg_scale=4.0, negative_prompt=" ")
    monkeypatch.setattr(  # the reference images at the call's size, not 1024²
        f"diffusers.pipelines.qwenimage.{module}.calculate_dimensions", lambda area, ratio: dims
    )
    plain = _run(pipe, call)
    guided = _run(pipe, call, SLD)
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-3


def test_the_adapters_unpack_the_latent_tokens_and_leave_image_tokens_uncorrected():
    latent = torch.randn(2, 4, 4, 6, dtype=torch.float64)  # (batch, channels, 2h, 2w): h, w = 2, 3
    packed = pack_tokens(latent)
    image_tokens = torch.randn(2, 5, packed.shape[2], dtype=torch.float64)
    full = torch.cat([packed, image_tokens], dim=1)
    latent_ids = torch.tensor([[0, i, j] for i in range(2) for j in range(3)], dtype=torch.float64)
    image_ids = torch.tensor([[1, 0, j] for j in range(5)], dtype=torch.float64)  # Kontext: first id 1
    flux = FluxAdapter.__new__(FluxAdapter)
    qwen = QwenImageAdapter.__new__(QwenImageAdapter)
    for adapter, kwargs in (
        (flux, {"img_ids": torch.cat([latent_ids, image_ids])}),
        (qwen, {"img_shapes": [[(1, 2, 3), (1, 1, 5)]] * 2}),
    ):
        assert torch.equal(adapter.to_math(full, kwargs), latent)
        back = adapter.from_math(latent, kwargs, like=full)
        assert back.shape == full.shape and torch.equal(back[:, :6], packed)
        assert not back[:, 6:].any()  # no correction for the image tokens
    assert torch.equal(unpack_tokens(packed, 2, 3), latent)
