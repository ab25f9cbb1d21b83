"""The guidance engine: one implementation that runs guidance terms inside any supported diffusers pipeline.

:func:`guide` attaches terms to a pipeline for a ``with`` block; :mod:`.adapters` holds what each
denoiser family needs; :mod:`.support` decides which pipelines are served; :mod:`.guiders` gives
modular pipelines the same terms as diffusers guiders (``SafetyGuider``, ``SemanticGuider``);
:class:`GuidedDenoiser` (:mod:`.denoiser`) gives the guided estimate for latents outside a pipeline call
(differentiable), for samplers, inversions and attacks.
:mod:`.hooks` serves terms that act on the call itself, such as SAFREE (:mod:`.safree`).
"""

from . import safree as _safree  # noqa: F401  (registers SAFREE's call hook with guide())
from .adapters import ADAPTERS, DenoiserAdapter, register_adapter
from .core import guide, guided_call, prediction_type
from .denoiser import Conditioning, GuidedDenoiser, register_direct_call
from .hooks import CallHook, Evaluation, register_call_hook

__all__ = [
    "ADAPTERS",
    "CallHook",
    "Conditioning",
    "DenoiserAdapter",
    "Evaluation",
    "GuidedDenoiser",
    "guide",
    "guided_call",
    "prediction_type",
    "register_adapter",
    "register_call_hook",
    "register_direct_call",
]
