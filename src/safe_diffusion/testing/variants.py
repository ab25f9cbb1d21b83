"""Random-weight ControlNet and inpainting checkpoints of the Stable Diffusion families, built offline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .stable_diffusion import build_checkpoint, build_sdxl_checkpoint


def build_controlnet_checkpoint(path: str | Path, base: str = "sd", seed: int = 0) -> Path:
    """Save a ``StableDiffusionControlNetPipeline`` (``base="sd"``) or ``StableDiffusionXLControlNetPipeline``
    (``base="sdxl"``) at `path`, its ControlNet initialised from the UNet, conditioning images at pixel size."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    path = Path(path)
    if base not in ("sd", "sdxl"):
        raise ValueError(f"base must be 'sd' or 'sdxl', got {base!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if base == "sd":
            build_checkpoint(Path(tmp) / "base", "tiny", seed)
            pipe = StableDiffusionPipeline.from_pretrained(
                Path(tmp) / "base", safety_checker=None, requires_safety_checker=False
            )
            cls = StableDiffusionControlNetPipeline
        else:
            build_sdxl_checkpoint(Path(tmp) / "base", seed)
            pipe = StableDiffusionXLPipeline.from_pretrained(Path(tmp) / "base")
            cls = StableDiffusionXLControlNetPipeline
    torch.manual_seed(seed + 1)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # a ControlNet copied from the UNet has zero output convolutions: make it act
        for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.02)
    cls(**pipe.components, controlnet=controlnet).save_pretrained(path)
    return path


def build_inpaint_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save a ``StableDiffusionInpaintPipeline`` whose UNet takes 9 channels (latents, mask, masked image)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp) / "base", "tiny", seed)
        pipe = StableDiffusionPipeline.from_pretrained(
            Path(tmp) / "base", safety_checker=None, requires_safety_checker=False
        )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet}).save_pretrained(path)
    return path
