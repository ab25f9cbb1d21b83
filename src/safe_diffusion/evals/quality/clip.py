"""CLIP score (Hessel et al., EMNLP 2021; torchmetrics' definition) of an image and its prompt.

``100 · max(cos(E_image, E_text), 0)`` with CLIP's projected embeddings, computed by torchmetrics'
CLIP-score update. CLIP ViT-L/14 (``openai/clip-vit-large-patch14``) by default; any transformers CLIP
folder or hub id. Images get OpenAI CLIP's transform (:func:`safe_diffusion.judges.q16.clip_preprocess`,
the one Q16 uses, identical with or without torchvision); prompts longer than the text tower's 77
positions are truncated keeping the end-of-text token. The mean is the mean of per-image scores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...common.hashing import sha256_text
from ...records.store import StageRecords
from .fidelity import load_torchmetrics
from .images import (
    DEFAULT_BATCH_SIZE,
    ProgressFn,
    QualityImage,
    _device,
    _digest,
    _fingerprint_or_none,
    load_chunk,
    run_batches,
)

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def _clip_score_update():
    """torchmetrics' CLIP-score update: per-pair ``100 · cos`` (unclamped) for images and texts."""
    load_torchmetrics()
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update as update

    return update


def _tensor_to_pil(tensor):
    import torch
    from PIL import Image

    array = tensor.detach().cpu()
    if array.dtype != torch.uint8:
        raise TypeError("images must be uint8 tensors (3, H, W)")
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


class _ClipProcessor:
    """The processor torchmetrics calls: OpenAI CLIP's transform for images, the model's tokenizer with
    truncation to the text tower's positions (end-of-text token kept) for text."""

    def __init__(self, tokenizer, image_size: int, max_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_tokens = max_tokens

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, **_):
        import torch

        from ...judges.q16 import clip_preprocess_all

        if images is not None:
            pixels = clip_preprocess_all([_tensor_to_pil(t) for t in images], self.image_size)
            return {"pixel_values": torch.from_numpy(pixels)}
        tokens = self.tokenizer(
            list(text), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _clip_model_adapter(model):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors (what torchmetrics
    expects; transformers 5 returns an output object from them)."""
    import torch

    class ClipForTorchmetrics(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        @property
        def config(self):
            return self.clip.config

        @staticmethod
        def _tensor(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_image_features(self, pixel_values):
            return self._tensor(self.clip.get_image_features(pixel_values=pixel_values.to(self.clip.dtype)))

        def get_text_features(self, input_ids, attention_mask=None):
            return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    return ClipForTorchmetrics(model)


class ClipScorer:
    """CLIP score of (image, prompt) pairs with one CLIP model (see the module docstring)."""

    def __init__(self, model: str | os.PathLike = DEFAULT_CLIP_MODEL, *, device=None, dtype=None):
        import torch

        from ...judges.clip import load_clip

        self.model_ref = str(model)
        self.device = _device(device)
        self.dtype = dtype or torch.float32
        loaded = load_clip(self.model_ref, device=self.device, dtype=self.dtype, tokenizer=True, option="--clip-model")
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.image_size = loaded.image_size
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self._adapter = _clip_model_adapter(self.model)
        self._processor = _ClipProcessor(self.tokenizer, self.image_size, self.max_tokens)
        self._weights = loaded.identity  # the weight files' sha256 for a folder, else the hub commit

    def describe(self) -> dict[str, Any]:
        import torch

        return {
            "model": self.model_ref,
            **self._weights,
            "projection_dim": int(self.model.config.projection_dim),
            "dtype": str(self.dtype).replace("torch.", "") if isinstance(self.dtype, torch.dtype) else str(self.dtype),
            "definition": "100 * max(cos(image, text), 0) per image (torchmetrics CLIP score); mean of per-image",
            "implementation": "torchmetrics.functional.multimodal.clip_score._clip_score_update",
            "preprocessing": {
                "implementation": "safe_diffusion.judges.q16.clip_preprocess (OpenAI CLIP's transform)",
                "resize": f"shorter side to {self.image_size}, PIL bicubic",
                "crop": f"centre {self.image_size}x{self.image_size}",
            },
            "tokenizer": type(self.tokenizer).__name__,
            "truncation": f"{self.max_tokens} tokens, end-of-text token kept",
        }

    @property
    def identity(self) -> str:
        return _digest(self.describe())

    def raw_scores(self, images: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
        """``100 · cos(image, text)`` (unclamped, float64) for PIL images and their prompts, one batch."""
        import torch

        if len(images) != len(prompts):
            raise ValueError("one prompt per image")
        if not images:
            return np.zeros(0)
        tensors = [
            torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).to(self.device)
            for im in images
        ]
        with torch.no_grad():
            score, _ = _clip_score_update()(tensors, [str(p) for p in prompts], self._adapter, self._processor)
        return score.detach().double().cpu().numpy().reshape(len(images))


def _prompt_digest(prompt: str) -> str:
    return sha256_text(prompt)


def clip_scores(
    images: Sequence[QualityImage],
    scorer: ClipScorer,
    *,
    records: StageRecords | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Per-image ``{"clip_score", "cosine"}`` for the images that have a prompt, and ``{key: reason}`` failures."""
    scored = [im for im in images if im.prompt is not None]
    namespace = f"clip/{scorer.identity[:16]}/"

    def compute(chunk: list[QualityImage]):
        decoded, keep, errors = load_chunk(chunk)
        raw = scorer.raw_scores(decoded, [item.prompt for item, _ in keep])
        payloads = {
            item.key: {
                "clip_score": float(max(value, 0.0)),
                "cosine": float(value / 100.0),
                "prompt_sha256": _prompt_digest(item.prompt),
                "file": fingerprint,
            }
            for (item, fingerprint), value in zip(keep, raw, strict=True)
        }
        return payloads, errors

    def is_current(item: QualityImage, payload: dict) -> bool:
        return payload.get("prompt_sha256") == _prompt_digest(item.prompt) and payload.get(
            "file"
        ) == _fingerprint_or_none(item.path)

    return run_batches(
        scored,
        namespace=namespace,
        records=records,
        batch_size=batch_size,
        compute=compute,
        is_current=is_current,
        stage="clip score",
        progress=progress,
    )
