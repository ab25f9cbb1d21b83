"""COCO captions as prompts, for the quality (FID / CLIP score) suites, from a local file.

The usual protocol generates one image per caption of 30,000 captions of the COCO 2014 validation
set and compares them with the validation images (FID-30k). COCO cannot be bundled (licence, size)
and the hub may be unreachable, so the captions come from a file the user has:

* COCO's own annotation file, ``captions_val2014.json`` (``{"images": [...], "annotations":
  [{"image_id", "id", "caption"}, ...]}``). A subset is drawn with a documented, deterministic rule
  (:func:`sample_annotations`): one caption for each of N distinct images;
* a table of captions already chosen: CSV, Parquet, JSON (a list of objects, or of strings) or
  JSON Lines, with a ``caption`` (or ``prompt`` / ``text``) column and optionally ``image_id`` and
  ``id`` (or ``caption_id``). All rows are used unless a subset is asked for, which keeps the first N
  rows of the same seeded permutation.

**Sampling rule** (seed 0 unless given). Images are the annotation file's image ids in ascending
order; ``rng = numpy.random.default_rng(seed)``; ``order = rng.permutation(number of images)``; then
``choice = rng.integers(0, captions_per_image)`` is drawn once for every image in ``order`` (captions
of an image sorted by annotation id). The subset of size N is the first N images of ``order``, each
with its chosen caption, in that order. Smaller subsets are therefore prefixes of larger ones (the 5k
set is the first 5,000 prompts of the 10k and 30k sets), and nothing depends on N except where the
list ends. Captions are whitespace-normalised (``" ".join(caption.split())``); nothing else changes.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import InputError
from ..common.hashing import sha256_bytes
from .tables import parse_seed

#: Named subset sizes; ``"30k"`` is the usual FID-30k protocol, ``"5k"`` a quick run.
SUBSETS = {"30k": 30_000, "10k": 10_000, "5k": 5_000}
DEFAULT_SEED = 0
CAPTION_COLUMNS = ("caption", "prompt", "text")
#: A caption table's optional per-row generation seed (SAFREE's coco_30k_10k.csv: evaluation_seed) and image id.
SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed")
IMAGE_ID_COLUMNS = ("image_id", "coco_id")


def _first_column(rows: list, names: tuple[str, ...]) -> str | None:
    """The first of `names` that the table's first row has (None: none, or rows that are not objects)."""
    return next((c for c in names if rows and isinstance(rows[0], dict) and c in rows[0]), None)


RULE = (
    "images sorted by id; rng = numpy.random.default_rng(seed); order = rng.permutation(n_images); "
    "choice = rng.integers(0, captions_per_image) for every image in order (captions sorted by id); "
    "first N of order"
)


@dataclass(frozen=True)
class Caption:
    """One prompt: its position in the subset, the caption, and the COCO image and caption ids when known."""

    index: int
    text: str
    image_id: int | None = None
    caption_id: int | None = None
    seed: int | None = None  # the row's own generation seed, when the table has one (SAFREE's evaluation_seed)


@dataclass(frozen=True)
class CaptionSet:
    """The prompts and where they came from (file, sha256, format, subset, seed, rule)."""

    captions: list[Caption]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [c.text for c in self.captions]


def val2014_file_name(image_id: int) -> str:
    """The file name of a COCO 2014 validation image (``COCO_val2014_000000391895.jpg``), to build the FID
    reference folder from the images whose captions were sampled."""
    return f"COCO_val2014_{int(image_id):012d}.jpg"


def _subset_size(subset: int | str | None) -> int | None:
    if subset is None:
        return None
    if isinstance(subset, str):
        key = subset.strip().lower()
        if key in SUBSETS:
            return SUBSETS[key]
        if key.isdigit():
            subset = int(key)
        else:
            raise InputError(f"unknown COCO subset {subset!r}; use {', '.join(SUBSETS)} or a number")
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1:
        raise InputError(f"COCO subset must be a positive number of captions, not {subset!r}")
    return int(subset)


def _clean(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"{where}: caption {text!r} is not text")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise InputError(f"{where}: empty caption")
    return cleaned


def _optional_int(value: Any, what: str, where: str) -> int | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():  # ESD's coco_30k.csv: "000000203564", as in file names
        return int(value.strip())
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {what} {value!r} is not an integer") from None
    if number != value and str(number) != str(value).strip():
        raise InputError(f"{where}: {what} {value!r} is not an integer")
    return number


def sample_annotations(
    doc: dict, size: int | None, seed: int = DEFAULT_SEED, where: str = "annotations"
) -> list[Caption]:
    """One caption for each of the first `size` images of the seeded order (all images when None); see the
    module docstring for the rule."""
    annotations = doc.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise InputError(f"{where}: no 'annotations' list (expected COCO's captions_*.json)")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise InputError(f"{where}: annotation {i} has no image_id or caption")
        image_id = _optional_int(ann["image_id"], "image_id", f"{where}: annotation {i}")
        if image_id is None:
            raise InputError(f"{where}: annotation {i} has an empty image_id")
        caption_id = _optional_int(ann.get("id", i), "id", f"{where}: annotation {i}")
        by_image.setdefault(image_id, []).append((caption_id, _clean(ann["caption"], f"{where}: annotation {i}")))
    image_ids = sorted(by_image)
    if size is not None and size > len(image_ids):
        raise InputError(f"{where}: a subset of {size} captions needs {size} images; the file has {len(image_ids)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(image_ids))
    counts = np.array([len(by_image[image_ids[j]]) for j in order])
    choices = rng.integers(0, counts)
    chosen = order if size is None else order[:size]
    out = []
    for index, (j, k) in enumerate(zip(chosen, choices[: len(chosen)], strict=True)):
        image_id = image_ids[int(j)]
        caption_id, text = sorted(by_image[image_id], key=lambda c: c[0])[int(k)]
        out.append(Caption(index, text, image_id, caption_id))
    return out


def _read_table(path: Path, data: bytes) -> list[dict]:
    suffix = path.suffix.lower()
    name = str(path)
    if suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise InputError("reading Parquet needs pandas and pyarrow: pip install 'safe-diffusion[i2p]'") from None
        try:
            return pd.read_parquet(io.BytesIO(data)).to_dict("records")
        except (ValueError, OSError, NotImplementedError) as exc:  # pyarrow's errors derive from these
            raise InputError(f"{name}: not a readable Parquet file ({type(exc).__name__})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not UTF-8 text (byte {exc.start})") from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise InputError(f"{name}: line {n} is not JSON ({exc.msg})") from None
        return rows
    import csv

    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise InputError(f"{name}: not a readable CSV ({exc})") from None


def _rows_to_captions(rows: list, where: str) -> list[Caption]:
    if not rows:
        raise InputError(f"{where} has no captions")
    captions = []
    column = None
    seed_column = _first_column(rows, SEED_COLUMNS)
    id_column = _first_column(rows, IMAGE_ID_COLUMNS) or "image_id"
    for i, row in enumerate(rows):
        at = f"{where}: row {i + 1}"
        if isinstance(row, str):
            captions.append(Caption(i, _clean(row, at)))
            continue
        if not isinstance(row, dict):
            raise InputError(f"{at} is neither a caption nor an object with a caption")
        if column is None:
            column = next((c for c in CAPTION_COLUMNS if c in row), None)
            if column is None:
                raise InputError(f"{where}: no caption column (expected one of {', '.join(CAPTION_COLUMNS)})")
        if column not in row:
            raise InputError(f"{at} has no {column!r}")
        seed = None
        if seed_column is not None:
            seed = parse_seed(row.get(seed_column), at, seed_column)
        captions.append(
            Caption(
                i,
                _clean(row[column], at),
                _optional_int(row.get(id_column), id_column, at),
                _optional_int(row.get("id", row.get("caption_id")), "caption id", at),
                seed,
            )
        )
    return captions


def load_coco_captions(
    path: str | os.PathLike, subset: int | str | None = None, seed: int = DEFAULT_SEED
) -> CaptionSet:
    """Prompts from COCO's ``captions_*.json`` (default subset ``"30k"``) or a caption table (default: all rows).

    `subset` is ``"30k"``, ``"10k"``, ``"5k"`` or a number; `seed` chooses the sample (see the module
    docstring). Bad input is a one-line :class:`InputError`.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise InputError(f"COCO captions file {name!r} does not exist (see docs/quality.md for how to get it)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, not {seed!r}")
    size = _subset_size(subset)
    data = path.read_bytes()
    source: dict[str, Any] = {"path": name, "sha256": sha256_bytes(data), "seed": int(seed)}
    doc = None
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(data.decode("utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{name}: not a readable JSON file ({_reason(exc)})") from None
    if isinstance(doc, dict) and "annotations" in doc:
        size = SUBSETS["30k"] if size is None else size
        captions = sample_annotations(doc, size, seed, name)
        source.update(format="coco-annotations", subset=size, rule=RULE)
        return CaptionSet(captions, source)
    if doc is not None:
        rows = doc.get("captions", doc.get("prompts")) if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise InputError(f"{name}: expected COCO annotations, a list of captions or {{'captions': [...]}}")
        fmt = "json"
    else:
        rows = _read_table(path, data)
        fmt = path.suffix.lower().lstrip(".") or "csv"
    captions = _rows_to_captions(rows, name)
    seeded = _first_column(rows, SEED_COLUMNS)
    if seeded is not None:
        source["seed_column"] = seeded
    if size is not None:
        if size > len(captions):
            raise InputError(f"{name}: a subset of {size} captions was asked for; the file has {len(captions)}")
        order = np.random.default_rng(seed).permutation(len(captions))[:size]
        captions = [
            Caption(i, captions[j].text, captions[j].image_id, captions[j].caption_id, captions[j].seed)
            for i, j in enumerate(order)
        ]
        source.update(rule="rows in file order; first N of numpy.random.default_rng(seed).permutation(rows)")
    source.update(format=fmt, subset=size if size is not None else len(captions))
    return CaptionSet(captions, source)


def _reason(exc: Exception) -> str:
    return getattr(exc, "msg", None) or type(exc).__name__
