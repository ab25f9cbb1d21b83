"""Reference statistics for FID/KID: from a folder of images (cached on disk) or a statistics ``.npz``.

The cache key is the digest of the reference images' content, the extractor's identity and the image
size, so a second run does not recompute them and a changed extractor never reuses them. Files follow
pytorch-fid's and clean-fid's ``mu``/``sigma`` convention; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...common.errors import InputError
from ...common.hashing import sha256_file, sha256_text
from ...records.store import StageRecords
from .features import FeatureExtractor, image_features
from .images import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_IMAGE_SIZE,
    SCHEMA_VERSION,
    ProgressFn,
    QualityImage,
    _digest,
    _first_line,
    folder_images,
)

logger = logging.getLogger(__name__)


@dataclass
class ReferenceStatistics:
    """Mean and covariance (float64) of a reference set's features, its size, and its features when known
    (KID needs them). ``extractor`` is the identity of the extractor that made them (None: unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    features: np.ndarray | None
    extractor: str | None
    source: dict[str, Any]
    cache_hit: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            **self.source,
            "count": self.count,
            "has_features": self.features is not None,
            "extractor": self.extractor,
            "cache_hit": self.cache_hit,
        }


def statistics_from_features(features: np.ndarray, *, extractor: str | None, source: dict) -> ReferenceStatistics:
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise InputError(f"reference statistics need at least 2 images with features (found {len(feats)})")
    return ReferenceStatistics(
        mu=feats.mean(axis=0),
        sigma=np.cov(feats, rowvar=False, ddof=1),
        count=len(feats),
        features=np.asarray(features, dtype=np.float32),
        extractor=extractor,
        source=source,
    )


def save_statistics(stats: ReferenceStatistics, path: str | os.PathLike) -> None:
    """Write `stats` as ``.npz`` (``mu``, ``sigma``, ``count``, ``features``, ``extractor``, ``source``), atomically.

    ``mu``/``sigma`` follow pytorch-fid's and clean-fid's convention, so other tools read the file too.
    """
    from ...common.outputs import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {"mu": stats.mu, "sigma": stats.sigma, "source": np.array(json.dumps(stats.source))}
    if stats.count is not None:
        arrays["count"] = np.array(stats.count, dtype=np.int64)
    if stats.features is not None:
        arrays["features"] = stats.features
    if stats.extractor is not None:
        arrays["extractor"] = np.array(stats.extractor)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_statistics(path: str | os.PathLike, extractor: FeatureExtractor | None = None) -> ReferenceStatistics:
    """Statistics from an ``.npz`` with ``mu`` and ``sigma`` (ours, pytorch-fid's or clean-fid's); never unpickles."""
    path = Path(path)
    name = str(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"reference statistics {name!r} do not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{name}: not a readable .npz of statistics ({_first_line(exc)})") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise InputError(f"{name}: missing array(s) {', '.join(missing)} (needs mu and sigma)")
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InputError(f"{name}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InputError(f"{name}: mu or sigma has non-finite values")
    recorded = str(arrays["extractor"]) if "extractor" in arrays else None
    if extractor is not None:
        if len(mu) != extractor.num_features:
            raise InputError(
                f"{name}: statistics are {len(mu)}-dimensional but the {extractor.name} extractor gives "
                f"{extractor.num_features}"
            )
        if recorded is not None and recorded != extractor.identity:
            raise InputError(
                f"{name}: statistics were computed with another feature extractor ({recorded[:12]}…, "
                f"this one is {extractor.identity[:12]}…); recompute them from the reference images"
            )
        if recorded is None:
            logger.warning("%s does not record its feature extractor; assuming it matches %s", name, extractor.name)
    features = np.asarray(arrays["features"], np.float32) if "features" in arrays else None
    if features is not None and features.shape[1:] != mu.shape:
        raise InputError(f"{name}: features have shape {features.shape}, not (n, {len(mu)})")
    count = int(arrays["count"]) if "count" in arrays else (len(features) if features is not None else None)
    source = {"kind": "statistics", "path": str(path), "sha256": sha256_file(path)}
    if "source" in arrays:
        with contextlib.suppress(ValueError):
            source["computed_from"] = json.loads(str(arrays["source"]))
    return ReferenceStatistics(mu, sigma, count, features, recorded, source)


def default_cache_dir() -> Path:
    """``$SAFE_DIFFUSION_CACHE/quality``, else ``$XDG_CACHE_HOME/safe-diffusion/quality`` (``~/.cache`` by default)."""
    if os.environ.get("SAFE_DIFFUSION_CACHE"):
        return Path(os.environ["SAFE_DIFFUSION_CACHE"]) / "quality"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safe-diffusion" / "quality"


def folder_content_digest(images: Sequence[QualityImage]) -> str:
    """sha256 over each image's key and the sha256 of its bytes (the reference's content, not its path)."""
    return sha256_text("".join(f"{item.key}\t{sha256_file(item.path)}\n" for item in images))


def reference_statistics(
    reference: str | os.PathLike | ReferenceStatistics,
    extractor: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
) -> ReferenceStatistics:
    """Statistics of a reference folder of images (cached) or from a statistics ``.npz``.

    For a folder, the cache key is the digest of the images' content, the extractor's identity and
    `image_size`; a hit loads ``<cache>/fid-reference-<key>.npz`` without touching the extractor.
    A miss computes the features resumably (records in ``<cache>/fid-reference-<key>.records/``,
    removed once the statistics are written).
    """
    if isinstance(reference, ReferenceStatistics):
        return reference
    path = Path(reference)
    if path.is_file():
        return load_statistics(path, extractor)
    if not path.is_dir():
        raise InputError(f"FID reference {str(reference)!r} is neither a folder of images nor a statistics .npz file")
    images = folder_images(path)
    content = folder_content_digest(images)
    key = _digest(
        {
            "schema_version": SCHEMA_VERSION,
            "content": content,
            "extractor": extractor.identity,
            "image_size": image_size,
        }
    )[:40]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"fid-reference-{key}.npz"
    records_dir = cache / f"fid-reference-{key}.records"
    if cached.is_file():
        shutil.rmtree(records_dir, ignore_errors=True)  # left by a run killed after writing the statistics
        stats = load_statistics(cached, extractor)
        stats.cache_hit = True
        computed = stats.source.get("computed_from") or {}
        stats.source = {**computed, "path": str(path), "cache": str(cached), "cache_sha256": stats.source["sha256"]}
        logger.info("FID reference statistics from cache %s", cached)
        return stats
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cache folder {str(cache)!r} is not writable: {exc.strerror or exc}") from None
    feats = image_features(
        images,
        extractor,
        records=StageRecords.in_folder(records_dir),
        batch_size=batch_size,
        image_size=image_size,
        progress=progress,
        stage="reference features",
    )
    source = {
        "kind": "folder",
        "path": str(path),
        "content_sha256": content,
        "images": len(images),
        "failed": len(feats.failed),
        "image_size": image_size,
    }
    stats = statistics_from_features(feats.features, extractor=extractor.identity, source=source)
    save_statistics(stats, cached)
    shutil.rmtree(records_dir, ignore_errors=True)
    stats.source = {**source, "cache": str(cached)}
    return stats
