"""Random-weight models built fully offline, for tests, demos and benchmarks.

They are saved with ``save_pretrained`` and load back through the same ``from_pretrained`` path a
real checkpoint takes, so tests, the demo and the benchmarks exercise the real loading code. Their
outputs are noise: they test plumbing and numerics, not quality. One module per model family;
everything public is re-exported here.
"""

from .flux import build_flux_checkpoint
from .llava import build_llava_onevision, byte_level_bpe_tokenizer
from .pixart import build_pixart_checkpoint
from .quality import RandomFeatureExtractor, build_inception_weights
from .qwenimage import build_qwenimage_checkpoint
from .realsize import REAL_SIZES, build_real_pipeline
from .sd3 import build_sd3_checkpoint
from .stable_diffusion import SIZES, build_checkpoint, build_clip, build_sdxl_checkpoint, byte_level_tokenizer
from .variants import build_controlnet_checkpoint, build_inpaint_checkpoint
from .wan import build_wan_checkpoint

#: Builders by family name: ``FAMILIES["flux"](path)`` saves a tiny checkpoint of that family at `path`.
FAMILIES = {
    "sd": lambda path, seed=0: build_checkpoint(path, "tiny", seed),
    "sdxl": build_sdxl_checkpoint,
    "sd3": build_sd3_checkpoint,
    "flux": build_flux_checkpoint,
    "pixart-sigma": build_pixart_checkpoint,
    "qwen-image": build_qwenimage_checkpoint,
    "wan": build_wan_checkpoint,
    "sd-controlnet": lambda path, seed=0: build_controlnet_checkpoint(path, "sd", seed),
    "sdxl-controlnet": lambda path, seed=0: build_controlnet_checkpoint(path, "sdxl", seed),
    "sd-inpaint": build_inpaint_checkpoint,
}

__all__ = [
    "FAMILIES",
    "REAL_SIZES",
    "SIZES",
    "RandomFeatureExtractor",
    "build_checkpoint",
    "build_clip",
    "build_controlnet_checkpoint",
    "build_flux_checkpoint",
    "build_inception_weights",
    "build_inpaint_checkpoint",
    "build_llava_onevision",
    "build_pixart_checkpoint",
    "build_qwenimage_checkpoint",
    "build_real_pipeline",
    "build_sd3_checkpoint",
    "build_sdxl_checkpoint",
    "build_wan_checkpoint",
    "byte_level_bpe_tokenizer",
    "byte_level_tokenizer",
]
