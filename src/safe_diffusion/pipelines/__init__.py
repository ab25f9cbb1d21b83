"""diffusers integration: drop-in pipelines and guidance attached to any pipeline."""

from ..engine import guide
from .safe import SafeStableDiffusionPipeline, SafeStableDiffusionPipelineOutput
from .semantic import SemanticStableDiffusionPipeline, SemanticStableDiffusionPipelineOutput

__all__ = [
    "SafeStableDiffusionPipeline",
    "SafeStableDiffusionPipelineOutput",
    "SemanticStableDiffusionPipeline",
    "SemanticStableDiffusionPipelineOutput",
    "guide",
]
