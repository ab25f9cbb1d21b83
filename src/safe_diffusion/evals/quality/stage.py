"""The whole quality computation, and the harness stage: quality of a run's images, resumable in its store.

:func:`evaluate_quality` computes the CLIP score and FID/KID of any images; :func:`evaluate_run` does it
for a run's generated images with its per-image records in the run's store (stage ``quality``) and the
result recorded there (stage ``quality-result``, read by ``eval status`` and the trade-off report).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...common.errors import InputError
from ...records.store import StageRecords
from .clip import DEFAULT_CLIP_MODEL, ClipScorer, clip_scores
from .distances import KID_DEGREE, KID_SUBSET_SIZE, KID_SUBSETS, frechet_distance, kernel_distance
from .features import FeatureExtractor, image_features, make_feature_extractor
from .fidelity import quality_versions
from .images import DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE, SCHEMA_VERSION, ProgressFn, QualityImage
from .reference import ReferenceStatistics, reference_statistics


@dataclass
class QualityResult:
    """Summary numbers, per-image CLIP scores, failures and the full provenance of one quality computation."""

    summary: dict[str, Any]
    per_image: dict[str, dict[str, float]]
    failed: dict[str, str]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            **self.summary,
            "failed": dict(sorted(self.failed.items())),
            "config": self.config,
            "per_image": self.per_image,
        }


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def evaluate_quality(
    images: Sequence[QualityImage],
    *,
    clip_model: str | os.PathLike | ClipScorer | None = DEFAULT_CLIP_MODEL,
    reference: str | os.PathLike | ReferenceStatistics | None = None,
    feature_extractor: str | FeatureExtractor = "inception",
    inception_weights: str | os.PathLike | None = None,
    records: StageRecords | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: int = DEFAULT_IMAGE_SIZE,
    device=None,
    clip_dtype=None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> QualityResult:
    """CLIP score of every image with a prompt (unless `clip_model` is None) and FID/KID against `reference`
    (unless it is None). Resumable through `records`; see the module docstring for the definitions."""
    images = list(images)
    if not images:
        raise InputError("no images to evaluate")
    if len({im.key for im in images}) != len(images):
        raise InputError("image keys must be unique")
    summary: dict[str, Any] = {"images": len(images)}
    per_image: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    config: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "batch_size": batch_size,
        "versions": quality_versions(),
    }

    if clip_model is not None:
        scorer = (
            clip_model
            if isinstance(clip_model, ClipScorer)
            else ClipScorer(clip_model, device=device, dtype=clip_dtype)
        )
        scored, errors = clip_scores(images, scorer, records=records, batch_size=batch_size, progress=progress)
        failed.update(errors)
        values = np.array([scored[im.key]["clip_score"] for im in images if im.key in scored], dtype=np.float64)
        for im in images:
            if im.key in scored:
                per_image[im.key] = {"clip_score": scored[im.key]["clip_score"]}
        summary["clip_score"] = _finite_or_none(float(values.mean())) if len(values) else None
        summary["clip_score_std"] = _finite_or_none(float(values.std())) if len(values) else None
        summary["clip_scored"] = len(values)
        summary["without_prompt"] = sum(1 for im in images if im.prompt is None)
        config["clip"] = scorer.describe()

    if reference is not None:
        if isinstance(feature_extractor, FeatureExtractor):
            extractor = feature_extractor
        elif feature_extractor == "inception":
            extractor = make_feature_extractor("inception", weights=inception_weights, device=device)
        else:
            extractor = make_feature_extractor(feature_extractor, device=device)
        stats = reference_statistics(
            reference, extractor, cache_dir=cache_dir, image_size=image_size, batch_size=batch_size, progress=progress
        )
        feats = image_features(
            images, extractor, records=records, batch_size=batch_size, image_size=image_size, progress=progress
        )
        failed.update(feats.failed)
        summary["fid"] = _finite_or_none(frechet_distance(feats.features, stats))
        kid = kernel_distance(feats.features, stats, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        summary["kid"] = _finite_or_none(kid["kid"]) if kid else None
        summary["kid_std"] = _finite_or_none(kid["kid_std"]) if kid else None
        summary["fid_images"] = len(feats.keys)
        config["fid"] = {
            "implementation": "torchmetrics.image.fid.FrechetInceptionDistance (float64)",
            "extractor": extractor.describe(),
            "extractor_identity": extractor.identity,
            "image_size": image_size,
            "resize": f"centre crop to a square, PIL bicubic to {image_size}x{image_size}",
            "reference": stats.describe(),
        }
        config["kid"] = {
            "implementation": "torchmetrics.image.kid.KernelInceptionDistance (float64)",
            "kernel": f"(x.y / d + 1)^{KID_DEGREE}",
            **(
                {k: kid[k] for k in ("subsets", "subset_size", "seed")}
                if kid
                else {"skipped": "the reference has no features" if stats.features is None else "fewer than 2 images"}
            ),
        }
    return QualityResult(summary, per_image, failed, config)


# -- the harness stage -------------------------------------------------------------------------------

#: Run-store stages: per-image records (CLIP scores, features; keys namespaced as above) and the result.
RECORDS_STAGE = "quality"
RESULT_STAGE = "quality-result"


def run_images(store) -> list[QualityImage]:
    """A run's generated images (of its current selection), keyed ``PPPPP-KKK``, each with its prompt."""
    from ..store import image_key

    prompts = {p.index: p for p in store.selected_prompts()}
    n = store.images_per_prompt()
    images = []
    for (p, k), rec in sorted(store.images().items()):
        if p in prompts and k < n and store.image_problem(rec) is None:
            images.append(QualityImage(image_key(p, k), store.path / rec["image"], prompts[p].text))
    if not images:
        raise InputError(f"run {str(store.path)!r} has no generated images yet; run `eval run` first")
    return images


def store_records(store) -> StageRecords:
    """The per-image records kept in the run store's ``quality`` stage (durable per batch, shared by processes)."""
    return StageRecords.of(store, RECORDS_STAGE)


def evaluate_run(store, **options: Any) -> QualityResult:
    """:func:`evaluate_quality` of a run's images, resumable in its store; the result is recorded in the run
    (stage ``quality-result``: summary and provenance, read by the trade-off report)."""
    from ...common.outputs import strict_json

    images = run_images(store)
    result = evaluate_quality(images, records=store_records(store), **options)
    store.put(
        RESULT_STAGE, "latest", strict_json({**result.summary, "failed": len(result.failed), "config": result.config})
    )
    return result


def run_quality(store) -> dict | None:
    """The quality result recorded in a run, or None."""
    return store.get(RESULT_STAGE).get("latest")
