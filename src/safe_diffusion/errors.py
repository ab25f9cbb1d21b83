"""Deprecated location of the error types: use ``safe_diffusion.GuidanceOffError`` (etc.) or
:mod:`safe_diffusion.common.errors`. Kept so that code written against 0.1 keeps working."""

import warnings

from .common.errors import GuidanceError, GuidanceOffError, InputError, UnsupportedPipelineError

warnings.warn(
    "safe_diffusion.errors moved to safe_diffusion.common.errors (the types are also exported by safe_diffusion itself)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["GuidanceError", "GuidanceOffError", "InputError", "UnsupportedPipelineError"]
