"""Random-weight models built fully offline, for tests, demos and benchmarks.

They are saved with ``save_pretrained`` and load back through the same ``from_pretrained`` path a
real checkpoint takes, so tests, the demo and the benchmarks exercise the real loading code. Their
outputs are noise: they test plumbing and numerics, not quality. One module per model family;
everything public is re-exported here.
"""

from .llava import build_llava_onevision, byte_level_bpe_tokenizer
from .quality import RandomFeatureExtractor, build_inception_weights
from .stable_diffusion import SIZES, build_checkpoint, build_clip, build_sdxl_checkpoint, byte_level_tokenizer

__all__ = [
    "SIZES",
    "RandomFeatureExtractor",
    "build_checkpoint",
    "build_clip",
    "build_inception_weights",
    "build_llava_onevision",
    "build_sdxl_checkpoint",
    "byte_level_bpe_tokenizer",
    "byte_level_tokenizer",
]
