"""A zero-shot attribute classifier (CLIP): which of a few attribute directions an image shows.

``safe-diffusion fairness`` labels each image with the direction whose text ("a photo of a {direction}")
its CLIP image embedding matches best, as Fair Diffusion's evaluation does (Friedrich et al., 2023), and
counts the proportions per prompt. CLIP is loaded by :func:`safe_diffusion.judges.clip.load_clip`.
"""

from __future__ import annotations

from pathlib import Path

from ..common.errors import InputError
from .clip import DEFAULT_MODEL, load_clip

CLASS_TEMPLATE = "a photo of a {}"

__all__ = ["CLASS_TEMPLATE", "DEFAULT_MODEL", "ZeroShotClassifier", "check_clip_reference"]


def check_clip_reference(model: str, option: str = "--clip-model") -> None:
    """Fail fast on a CLIP model that is neither a transformers folder nor shaped like a hub id."""
    from ..common.loading import _HUB_ID

    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(
                f"{option}: cannot load CLIP model {model!r}: not a transformers model folder (no config.json)"
            )
    elif not _HUB_ID.match(model):
        raise InputError(
            f"{option}: cannot load CLIP model {model!r}: no such folder, and not a hub id like 'owner/name'"
        )


class ZeroShotClassifier:
    """Zero-shot CLIP: each image gets the direction whose text "a photo of a {direction}" it matches best."""

    def __init__(self, model: str, directions: list[str], device, template: str = CLASS_TEMPLATE):
        loaded = load_clip(model, device=device, processor=True, who="the zero-shot classifier", option="--clip-model")
        self.clip = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = device
        self.texts = [template.format(d) for d in directions]

    @property
    def random_weights(self) -> bool:
        return self.clip.random_weights

    def to(self, device) -> ZeroShotClassifier:
        self.model.to(device)
        self.device = device
        return self

    def __call__(self, images) -> list[int]:
        import torch

        inputs = self.processor(text=self.texts, images=list(images), return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits_per_image
        return logits.argmax(dim=1).tolist()
