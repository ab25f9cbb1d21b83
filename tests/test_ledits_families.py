"""LEDITS++ beyond diffusers' two pipelines: every family the engine serves that has an inversion (PixArt, SD3,
FLUX, Qwen-Image; SD and SDXL are tests/test_ledits.py's, against the oracle), and the one-line refusals.

Per family, in float64 on a tiny random-weight checkpoint: the inversion's noise maps reconstruct the latents
exactly (final_sigma="min"), an edit changes them inside masks it records, and the masks are what the family
has (cross-attention ∩ noise on PixArt, noise masks on the joint-attention families, recorded as a deviation).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from safe_diffusion.common.errors import InputError
from safe_diffusion.editing import LEditsGuidance, edit, invert, pipeline_family

EDIT = LEditsGuidance(["a red hat", "blood"], reverse=[False, True], threshold=[0.5, 0.7], warmup_steps=[0, 1])
LOAD = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}}


@pytest.fixture(scope="module")
def pipes(family_checkpoints):
    import diffusers

    loaded = {}

    def get(name):
        if name not in loaded:
            path = family_checkpoints(name)
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=torch.float64, **LOAD.get(name, {}))
            pipe.set_progress_bar_config(disable=True)
            loaded[name] = pipe
        return loaded[name]

    return get


def _image(side: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "name, family, masks",
    [
        ("pixart-sigma", "pixart", "intersect"),
        ("sd3", "sd3", "noise"),
        ("flux", "flux", "noise"),
        ("qwen-image", "qwen-image", "noise"),
    ],
)
def test_inversion_reconstructs_and_the_edit_acts_inside_its_masks(pipes, name, family, masks):
    from safe_diffusion.editing.latents import size_multiple

    pipe = pipes(name)
    assert pipeline_family(pipe) == family
    image = _image(2 * size_multiple(pipe))
    inv = invert(pipe, image, num_inversion_steps=3, generator=torch.Generator().manual_seed(0))
    assert inv.noise_maps.shape == (3, *inv.x0.shape) and inv.settings["schedule"] == (
        "vp" if family == "pixart" else "flow"
    )
    reconstruction = edit(pipe, inv, None, output_type="latent")
    assert (reconstruction.images - inv.x0).abs().max() <= 1e-10
    out = edit(pipe, inv, EDIT, output_type="latent")
    assert (out.images - reconstruction.images).abs().max() > 1e-4
    assert out.step_masks.shape == (3, 2, 1, *inv.x0.shape[2:])
    assert not out.step_masks[0, 1].any() and out.step_masks[1:, 1].any()  # the warm-up of the second concept
    assert 0 < out.step_masks.float().mean() < 1
    assert out.settings["guidance"]["masking"] == masks
    deviations = " ".join(out.settings["deviations_from_diffusers"])
    assert f"no reference LEDITS++ for {family}" in deviations
    assert ("noise masks (M²) only" in deviations) == (masks == "noise")
    decoded = edit(pipe, inv, EDIT, output_type="pil")
    assert decoded.images[0].size == image.size and decoded.masks[0].size == image.size


def test_cross_attention_masking_is_refused_where_attention_is_joint(pipes):
    pipe = pipes("sd3")
    inv = invert(pipe, _image(32), num_inversion_steps=2)
    with pytest.raises(InputError, match="masking='cross_attention' needs cross-attention to text") as err:
        edit(pipe, inv, LEditsGuidance(["a hat"], masking="cross_attention"))
    assert "\n" not in str(err.value)


def test_a_video_model_is_refused_in_one_line(pipes):
    with pytest.raises(InputError) as err:
        pipeline_family(pipes("wan"))
    message = str(err.value)
    assert "\n" not in message and "WanPipeline generates video" in message
