"""guide() refuses, in one line naming the pipeline, every pipeline it cannot guide correctly, before
touching it: pipelines whose guidance batch has three blocks
(PAG, InstructPix2Pix) or whose UNet runs outside it (SAG, Panorama). Transformer families are served
(tests/test_families.py). Each refused pipeline is left exactly as it was."""

from __future__ import annotations

import pytest
import torch

from safe_diffusion import SafetyGuidance, guide
from safe_diffusion.common.errors import UnsupportedPipelineError


@pytest.fixture(scope="module")
def sd(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None, requires_safety_checker=False)


def _hooks(module: torch.nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


@pytest.mark.parametrize(
    "cls, why",
    [
        ("StableDiffusionPAGPipeline", "third block"),
        ("StableDiffusionInstructPix2PixPipeline", "three blocks"),
        ("StableDiffusionSAGPipeline", "attention maps of the guidance batch"),
        ("StableDiffusionPanoramaPipeline", "batches of views"),
    ],
)
def test_unet_pipelines_with_other_guidance_batches_are_refused(sd, cls, why):
    import diffusers

    pipe = getattr(diffusers, cls).from_pipe(sd)
    with (
        pytest.raises(UnsupportedPipelineError, match=f"guide\\(\\) cannot serve {cls}: .*{why}"),
        guide(pipe, SafetyGuidance.from_preset("max")),
    ):
        pass
    assert _hooks(pipe.unet) == 0 and type(pipe) is getattr(diffusers, cls)


def test_a_failing_attach_leaves_no_hooks(sd, monkeypatch):
    from safe_diffusion.engine import core

    cls = type(sd)

    def broken(self, *args, **kwargs):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", broken)
    with pytest.raises(RuntimeError, match="hook registration failed"), guide(sd, SafetyGuidance.from_preset("max")):
        pass
    monkeypatch.undo()
    assert _hooks(sd.unet) == 0 and type(sd) is cls and sd not in core._ENGINES


def test_strict_mode_raises_when_guidance_is_off(sd):
    from safe_diffusion.common.errors import GuidanceOffError

    call = dict(num_inference_steps=2, height=32, width=32, guidance_scale=1.0)
    with guide(sd, SafetyGuidance.from_preset("max")):  # default: a warning, and the plain image
        sd("a cat", generator=torch.Generator().manual_seed(0), **call)
    with (
        pytest.raises(
            GuidanceOffError,
            match="need classifier-free guidance, which this StableDiffusionPipeline call runs without",
        ),
        guide(sd, SafetyGuidance.from_preset("max"), strict=True),
    ):
        sd("a cat", generator=torch.Generator().manual_seed(0), **call)
    assert _hooks(sd.unet) == 0

    def cfg_off(pipe, step, timestep, kwargs):  # a callback that turns guidance off mid-run
        pipe._guidance_scale = 1.0
        return kwargs

    with pytest.raises(GuidanceOffError), guide(sd, SafetyGuidance.from_preset("max"), strict=True):
        sd(
            "a cat",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=cfg_off,
            **{**call, "guidance_scale": 7.5, "num_inference_steps": 3},
        )


@pytest.mark.parametrize("cls", ["FluxFillPipeline", "FluxControlPipeline", "VisualClozePipeline"])
def test_flux_pipelines_without_true_cfg_are_refused_on_entry_with_advice_they_can_follow(tmp_path, cls):
    """FluxFill/FluxControl have no true_cfg_scale: guidance could never act. They were accepted and then told
    to "enable true_cfg_scale > 1", which they do not have."""
    import diffusers

    from safe_diffusion.testing import FAMILIES

    flux = diffusers.FluxPipeline.from_pretrained(FAMILIES["flux"](tmp_path / "flux"))
    pipe = getattr(diffusers, cls)(
        **{k: v for k, v in flux.components.items() if k not in ("image_encoder", "feature_extractor")}
    )
    before = _hooks(pipe.transformer)
    with pytest.raises(UnsupportedPipelineError) as err, guide(pipe, SafetyGuidance()):
        pass
    message = str(err.value)
    assert "\n" not in message and f"guide() cannot serve {cls}" in message and "no true_cfg_scale argument" in message
    assert "FluxPipeline" in message and "safe-diffusion erase" in message and "enable true_cfg_scale" not in message
    assert _hooks(pipe.transformer) == before
