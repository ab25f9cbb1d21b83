"""Checkpoints load through the same from_pretrained path a real one takes; bad references fail in one line."""

import json

import pytest
import torch

from safe_diffusion import SafeStableDiffusionPipeline, load_pipeline
from safe_diffusion.common.errors import InputError


def test_random_checkpoint_is_a_real_diffusers_folder(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_checkpoint / part).is_dir()
    assert list((tiny_checkpoint / "unet").glob("*.safetensors")), "weights are saved as safetensors"


def test_load_pipeline_round_trips_weights(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = load_pipeline(str(tiny_checkpoint), device="cpu")
    # a plain pipeline: guidance comes from guide() alone, never from a drop-in's defaults
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.safety_checker is None
    direct = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")
    for (name, a), (_, b) in zip(pipe.unet.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name


def test_byte_level_tokenizer_round_trips_text(tiny_checkpoint):
    pipe = SafeStableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "acat"


@pytest.mark.parametrize(
    "model, message",
    [
        ("/no/such/folder", "not found"),
        ("not a hub id", "not found"),
        ("nobody/no-such-model", "cannot load model"),
    ],
)
def test_bad_model_references_raise_input_error(model, message):
    with pytest.raises(InputError, match=message):
        load_pipeline(model, device="cpu")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"no model_index\.json"):
        load_pipeline(str(tmp_path), device="cpu")


@pytest.mark.parametrize("family, expected", [("pixart-sigma", "PixArtSigmaPipeline"), ("flux", "FluxPipeline")])
def test_load_pipeline_loads_the_checkpoints_own_pipeline_class(tmp_path, family, expected):
    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.testing import FAMILIES

    FAMILIES[family](tmp_path)
    pipe = load_pipeline(str(tmp_path), device="cpu")
    assert type(pipe).__name__ == expected and pipe.transformer.dtype == torch.float32
