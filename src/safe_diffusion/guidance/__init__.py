"""Guidance math: pure functions over noise estimates, and the terms that bind them to hyper-parameters."""

from .safree import SafreeGuidance
from .sld import DEFAULT_SAFETY_CONCEPT, SafetyConfig
from .terms import FairGuidance, GuidanceTerm, SafetyGuidance, SemanticGuidance, describe_terms, safety_terms

__all__ = [
    "DEFAULT_SAFETY_CONCEPT",
    "FairGuidance",
    "GuidanceTerm",
    "SafetyConfig",
    "SafetyGuidance",
    "SafreeGuidance",
    "SemanticGuidance",
    "describe_terms",
    "safety_terms",
]
