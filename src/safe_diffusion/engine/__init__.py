"""The guidance engine: one implementation that runs guidance terms inside any supported diffusers pipeline.

:func:`guide` attaches terms to a pipeline for a ``with`` block; :mod:`.adapters` holds what each
denoiser family needs; :mod:`.support` decides which pipelines are served. (diffusers guiders for
modular pipelines are not written yet; modular pipelines are refused in one line.)
"""

from .adapters import ADAPTERS, DenoiserAdapter, register_adapter
from .core import guide, guided_call, prediction_type

__all__ = ["ADAPTERS", "DenoiserAdapter", "guide", "guided_call", "prediction_type", "register_adapter"]
