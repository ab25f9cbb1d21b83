"""safe-diffusion: instruct text-to-image diffusion models at inference time, and measure what they produce.

Safe Latent Diffusion (Schramowski et al., CVPR 2023), semantic guidance (Brack et al., 2023),
Fair Diffusion (Friedrich et al., 2023) and the I2P benchmark, on top of diffusers.
"""

from importlib import import_module

__version__ = "0.1.0"

# Exports load on first use: importing the package (or starting the CLI) does not import diffusers.
_EXPORTS = {
    "DEFAULT_SAFETY_CONCEPT": "safe_diffusion.guidance",
    "SafetyConfig": "safe_diffusion.guidance",
    "SafetyGuidance": "safe_diffusion.guidance",
    "FairGuidance": "safe_diffusion.guidance",
    "SemanticGuidance": "safe_diffusion.guidance",
    "SafreeGuidance": "safe_diffusion.guidance",
    "SafeStableDiffusionPipeline": "safe_diffusion.pipelines",
    "SemanticStableDiffusionPipeline": "safe_diffusion.pipelines",
    "guide": "safe_diffusion.engine",
    "SafetyGuider": "safe_diffusion.engine.guiders",
    "SemanticGuider": "safe_diffusion.engine.guiders",
    "with_guidance_concepts": "safe_diffusion.engine.guiders",
    "load_pipeline": "safe_diffusion.common.loading",
    "InputError": "safe_diffusion.common.errors",
    "GuidanceError": "safe_diffusion.common.errors",
    "GuidanceOffError": "safe_diffusion.common.errors",
    "UnsupportedPipelineError": "safe_diffusion.common.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safe_diffusion' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
