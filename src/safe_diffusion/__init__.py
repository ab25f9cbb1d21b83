"""safe-diffusion: instruct text-to-image diffusion models at inference time, and measure what they produce.

Safe Latent Diffusion (Schramowski et al., CVPR 2023), semantic guidance (Brack et al., 2023),
Fair Diffusion (Friedrich et al., 2023) and the I2P benchmark, on top of diffusers.
"""

__version__ = "0.1.0"

from .guidance import DEFAULT_SAFETY_CONCEPT, SafetyConfig, SafetyGuidance, SemanticGuidance
from .pipelines import SafeStableDiffusionPipeline, SemanticStableDiffusionPipeline, guide

__all__ = [
    "DEFAULT_SAFETY_CONCEPT",
    "SafeStableDiffusionPipeline",
    "SafetyConfig",
    "SafetyGuidance",
    "SemanticGuidance",
    "SemanticStableDiffusionPipeline",
    "guide",
    "__version__",
]
