"""Editing real images: LEDITS++ inversion and edit on diffusers pipelines, and sanitising folders of images."""

from ..guidance.ledits import SAFETY_CONCEPTS, LEditsGuidance
from .ledits import LEditsPPInversion, LEditsPPOutput, edit, edit_image, invert, pipeline_family

__all__ = [
    "SAFETY_CONCEPTS",
    "LEditsGuidance",
    "LEditsPPInversion",
    "LEditsPPOutput",
    "edit",
    "edit_image",
    "invert",
    "pipeline_family",
]
