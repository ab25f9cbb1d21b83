"""The images a quality metric reads, and the resumable batch loop every metric runs in.

Every image is decoded to RGB; for FID/KID it is centre-cropped to a square and resized with PIL's
bicubic filter to ``image_size`` before the extractor's own resize (:func:`square_resize`). Long
computations are cut into fixed batches of the whole, ordered image list (:func:`run_batches`), and each
batch's per-image results are recorded (a :class:`~safe_diffusion.records.store.StageRecords`) before the
next starts, so a killed computation continues and ends with the numbers an uninterrupted one gives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...common.devices import check_device
from ...common.errors import InputError
from ...common.hashing import sha256_json
from ...records.store import StageRecords

logger = logging.getLogger(__name__)

#: Version of the quality result document and of the cache keys (reference statistics).
SCHEMA_VERSION = 1
DEFAULT_IMAGE_SIZE = 512
DEFAULT_BATCH_SIZE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ProgressFn = Callable[[str, int, int], None]


def _digest(obj: Any) -> str:
    return sha256_json(obj)


def _device(device) -> Any:
    """The device a quality model runs on: the one device resolver's (None: CUDA, else MPS, else the CPU)."""
    return check_device("device", device)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class QualityImage:
    """One image to score: a stable key (a run's ``prompt-image`` key, or a path relative to a folder),
    its file, and its prompt (needed for the CLIP score only)."""

    key: str
    path: Path
    prompt: str | None = None


def folder_images(folder: str | os.PathLike, prompts: Mapping[str, str] | None = None) -> list[QualityImage]:
    """The images under `folder` (recursively, by suffix), keyed by their POSIX path relative to it, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder {str(folder)!r} does not exist or is not a folder")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise InputError(f"{str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    prompts = prompts or {}
    images = []
    for p in files:
        key = p.relative_to(root).as_posix()
        images.append(QualityImage(key, p, prompts.get(key)))
    return images


def _fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _open_rgb(path: Path):
    from ...judges.base import decode_rgb

    return decode_rgb(path.read_bytes())


def load_chunk(chunk: Sequence[QualityImage], transform: Callable | None = None) -> tuple[list, list, dict[str, str]]:
    """Decode a batch's files (a few threads at once: :mod:`safe_diffusion.common.prefetch`), each through
    `transform` if given: ``(images, [(item, file fingerprint)], {key: reason})`` for the readable ones, in
    order, and the unreadable ones."""
    from ...common.prefetch import read_ahead
    from ...judges.base import unreadable_reason

    def load(item: QualityImage):
        try:
            fingerprint = _fingerprint(item.path)
            image = _open_rgb(item.path)
            return item, fingerprint, transform(image) if transform else image
        except (OSError, ValueError) as exc:
            return item, None, unreadable_reason(exc)

    images, keep, errors = [], [], {}
    for item, fingerprint, image in read_ahead(load, chunk, window=len(chunk), name="quality-decode"):
        if fingerprint is None:
            errors[item.key] = image
        else:
            images.append(image)
            keep.append((item, fingerprint))
    return images, keep, errors


def square_resize(image, size: int):
    """Centre-crop a PIL image to a square (the shorter side) and resize it to ``size``×``size`` with PIL's
    bicubic filter; an image of that size already is returned unchanged."""
    from PIL import Image

    w, h = image.size
    if (w, h) == (size, size):
        return image
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.BICUBIC)


def run_batches(
    items: Sequence[QualityImage],
    *,
    namespace: str,
    records: StageRecords | None,
    batch_size: int,
    compute: Callable[[list[QualityImage]], tuple[dict[str, dict], dict[str, str]]],
    is_current: Callable[[QualityImage, dict], bool],
    stage: str,
    progress: ProgressFn | None,
) -> tuple[dict[str, dict], dict[str, str]]:
    """Run `compute` over fixed batches of `items`, skipping batches whose every item has a current record.

    Batches are cut from the whole ordered list (batch b is always items[b·n:(b+1)·n]), so a resumed
    computation feeds the model exactly the batches an uninterrupted one does; a batch is recomputed
    whole when any item of it lacks a record. Each computed batch is persisted before the next starts.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    stored = records.get() if records is not None else {}
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    total = len(items)
    reused = 0
    for start in range(0, total, batch_size):
        chunk = list(items[start : start + batch_size])
        cached = [stored.get(namespace + item.key) for item in chunk]
        if all(p is not None and is_current(item, p) for item, p in zip(chunk, cached, strict=True)):
            results.update({item.key: p for item, p in zip(chunk, cached, strict=True)})
            reused += len(chunk)
        else:
            payloads, errors = compute(chunk)
            if records is not None:
                records.put({namespace + key: payload for key, payload in payloads.items()})
            results.update(payloads)
            failed.update(errors)
        if progress is not None:
            progress(stage, min(start + batch_size, total), total)
    if reused:
        logger.info("%s: %d of %d images reused from earlier records", stage, reused, total)
    if failed:
        logger.warning("%s: %d of %d images could not be read", stage, len(failed), total)
    return results, failed


def _fingerprint_or_none(path: Path) -> dict | None:
    try:
        return _fingerprint(path)
    except OSError:
        return None
