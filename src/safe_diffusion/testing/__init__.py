"""Random-weight models built fully offline, for tests, demos and benchmarks.

They are saved with ``save_pretrained`` and load back through the same ``from_pretrained`` path a
real checkpoint takes, so tests, the demo and the benchmarks exercise the real loading code. Their
outputs are noise: they test plumbing and numerics, not quality. One module per model family;
everything public is re-exported here.
"""

from ..common.registry import Registry
from .flux import build_flux_checkpoint
from .llava import build_llava_onevision, byte_level_bpe_tokenizer
from .nudenet import build_nudenet_v2_classifier, build_nudenet_v2_detector
from .pixart import build_pixart_checkpoint
from .quality import (
    RandomFeatureExtractor,
    build_artist_classifier,
    build_imagenet_classifier,
    build_inception_weights,
)
from .qwenimage import build_qwenimage_checkpoint
from .realsize import REAL_SIZES, build_real_pipeline
from .sd3 import build_sd3_checkpoint
from .stable_diffusion import SIZES, build_checkpoint, build_clip, build_sdxl_checkpoint, byte_level_tokenizer
from .variants import build_controlnet_checkpoint, build_inpaint_checkpoint
from .wan import build_wan_checkpoint

#: Builders by family name: ``FAMILIES["flux"](path)`` saves a tiny checkpoint of that family at `path`.
FAMILIES: Registry = Registry("test_families", what="model family")
FAMILIES.register("sd", lambda path, seed=0: build_checkpoint(path, "tiny", seed), summary="SD 1.x, tiny")
FAMILIES.register("sdxl", build_sdxl_checkpoint, summary="SDXL")
FAMILIES.register("sd3", build_sd3_checkpoint, summary="SD 3")
FAMILIES.register("flux", build_flux_checkpoint, summary="FLUX.1")
FAMILIES.register("pixart-sigma", build_pixart_checkpoint, summary="PixArt-Σ")
FAMILIES.register("qwen-image", build_qwenimage_checkpoint, summary="Qwen-Image")
FAMILIES.register("wan", build_wan_checkpoint, summary="Wan 2.x (text-to-video)")
FAMILIES.register(
    "sd-controlnet", lambda path, seed=0: build_controlnet_checkpoint(path, "sd", seed), summary="SD 1.x + ControlNet"
)
FAMILIES.register(
    "sdxl-controlnet", lambda path, seed=0: build_controlnet_checkpoint(path, "sdxl", seed), summary="SDXL + ControlNet"
)
FAMILIES.register("sd-inpaint", build_inpaint_checkpoint, summary="SD 1.x inpainting")

__all__ = [
    "FAMILIES",
    "REAL_SIZES",
    "SIZES",
    "RandomFeatureExtractor",
    "build_artist_classifier",
    "build_checkpoint",
    "build_clip",
    "build_controlnet_checkpoint",
    "build_flux_checkpoint",
    "build_imagenet_classifier",
    "build_inception_weights",
    "build_inpaint_checkpoint",
    "build_llava_onevision",
    "build_nudenet_v2_classifier",
    "build_nudenet_v2_detector",
    "build_pixart_checkpoint",
    "build_qwenimage_checkpoint",
    "build_real_pipeline",
    "build_sd3_checkpoint",
    "build_sdxl_checkpoint",
    "build_wan_checkpoint",
    "byte_level_bpe_tokenizer",
    "byte_level_tokenizer",
]
