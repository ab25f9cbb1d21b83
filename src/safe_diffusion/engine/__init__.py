"""The guidance engine: one implementation that runs guidance terms inside any supported diffusers pipeline.

:func:`guide` attaches terms to a pipeline for a ``with`` block; :mod:`.adapters` holds what each
denoiser family needs; :mod:`.support` decides which pipelines are served; :mod:`.guiders` gives
modular pipelines the same terms as diffusers guiders (``SafetyGuider``, ``SemanticGuider``);
:mod:`.hooks` serves terms that act on the call itself, such as SAFREE (:mod:`.safree`).
"""

from . import safree as _safree  # noqa: F401  (registers SAFREE's call hook with guide())
from .adapters import ADAPTERS, DenoiserAdapter, register_adapter
from .core import guide, guided_call, prediction_type

__all__ = ["ADAPTERS", "DenoiserAdapter", "guide", "guided_call", "prediction_type", "register_adapter"]
