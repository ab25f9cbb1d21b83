"""Sanitise a folder of images: find the inappropriate ones and edit away only what is inappropriate, with LEDITS++.

:func:`sanitize_image` edits one image (the demo tab uses it); :func:`sanitize_folder` runs the job
the ``safe-diffusion sanitize`` command runs:

* Every file under DIR, in sorted order, is one item; with ``accelerate launch``, item i belongs to
  process i mod N. Judges flag images (any judge's "unsafe" flags an image); flagged images (all
  readable images with ``only_flagged=False``) are inverted and edited with the removal concepts
  removed (and the addition concepts added), each inside its implicit mask, and written under the
  same relative path in OUT, in the input's format and size; the rest are copied byte for byte.
  Edited images are judged again. Unreadable, damaged or non-image files are skipped (not copied)
  and listed in the report.

Over 500 lines because the job keeps its crash-safety and its sharding in one place (item order, resume,
the per-process writer, the rollback of a failed write) next to the edit it protects; splitting them
would spread one invariant over several files.
* Resumable: ``OUT/.sanitize`` is the run's :class:`~safe_diffusion.records.store.RecordStore`. Its
  ``config.json`` (the settings, versions, judges and resolved LEDITS++ settings) is written in one
  atomic creation; resuming with other settings is refused. After an item's output file is complete,
  its record (stage ``item``, key: its relative path) is appended; an item with a record is done and
  never redone. An item killed between its file and its record is redone on resume, to the same
  bytes (its inversion noise comes from a seed derived from the run's seed and its path).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from ..common.hashing import sha256_text
from ..common.outputs import check_writable
from ..common.progress import ProgressLog
from ..guidance.ledits import MASKINGS, SAFETY_CONCEPTS, LEditsGuidance
from ..records.journal import CREATING_PREFIX
from ..records.store import RecordStore, StoreFormat

logger = logging.getLogger(__name__)

STATE_DIR = ".sanitize"
CONFIG_NAME = "config.json"
SCHEMA_VERSION = 2  # 1: one JSON file per record in .sanitize/records/ (not read: use a new --out)
ITEM = "item"
#: Judged per chunk, so a resumed run re-judges at most one chunk's pending images.
JUDGE_CHUNK = 32


@dataclass(frozen=True)
class SanitizeConfig:
    """Everything that determines a sanitize run's outputs (frozen in ``OUT/.sanitize/config.json``)."""

    model: str
    remove: tuple[str, ...] = SAFETY_CONCEPTS
    add: tuple[str, ...] = ()
    only_flagged: bool = True
    judges: tuple[str, ...] = ("q16", "nudenet")
    judge_options: dict = field(default_factory=dict)
    steps: int | None = None  # inversion (= edit) steps; None: 30 on SD, 50 on SDXL
    skip: float = 0.15
    scale: float = 5.0
    threshold: float = 0.9
    warmup_steps: int = 0
    masking: str = "intersect"
    seed: int = 0
    resolution: int | None = None  # longest side edited at; None: the model's native size
    keep_unmasked: bool = True  # pixels outside the edit mask stay the input's (see sanitize_image)

    def __post_init__(self):
        from ..common.validation import check_float, check_int, check_seed, check_text

        remove = tuple(check_text("--remove", c).strip() for c in self.remove)
        add = tuple(check_text("--add", c).strip() for c in self.add)
        object.__setattr__(self, "remove", remove)
        object.__setattr__(self, "add", add)
        object.__setattr__(self, "judges", tuple(self.judges))
        if not remove and not add:
            raise InputError("nothing to edit: give at least one --remove or --add concept")
        if len(set(remove + add)) != len(remove + add):
            raise InputError("a concept is named twice in --remove/--add")
        if self.only_flagged and not self.judges:
            raise InputError("--only-flagged needs a judge to flag images: name one with --judges, or use --all")
        if self.steps is not None:
            check_int("--steps", self.steps, minimum=1, maximum=1000)
        check_float("--skip", self.skip, minimum=0.0, maximum=0.95)
        check_float("--scale", self.scale, minimum=0.0)
        check_float("--threshold", self.threshold, minimum=0.0, maximum=1.0)
        check_int("--warmup", self.warmup_steps, minimum=0)
        if self.masking not in MASKINGS:
            raise InputError(f"--masking {self.masking!r}: choose one of {', '.join(MASKINGS)}")
        check_seed("--seed", self.seed)
        if self.resolution is not None:
            check_int("--resolution", self.resolution, minimum=32, maximum=4096)

    def guidance(self) -> LEditsGuidance:
        """The LEDITS++ edit: every removal concept reversed, every addition concept added."""
        return LEditsGuidance(
            [*self.remove, *self.add],
            reverse=[True] * len(self.remove) + [False] * len(self.add),
            scale=self.scale,
            threshold=self.threshold,
            warmup_steps=self.warmup_steps,
            masking=self.masking,
        )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["remove"], data["add"], data["judges"] = list(self.remove), list(self.add), list(self.judges)
        data["judge_options"] = {
            k: {o: None if v is None else str(v) for o, v in opts.items()}
            for k, opts in sorted(self.judge_options.items())
        }
        return data


# -- one image -----------------------------------------------------------------------------------


@dataclass
class SanitizedImage:
    """An edited image at its input size, where it may differ from the input, and the settings used."""

    image: Any  # PIL image, the input's size and mode
    mask: Any  # PIL "L" image, the input's size: 255 where the image may differ from the input
    mask_coverage: float  # the share of pixels in `mask`
    edit_mask: Any  # PIL "L", the input's size: where LEDITS++'s edit guidance acted (any step, any concept)
    work_size: tuple[int, int]  # (width, height) the edit ran at
    settings: dict


def work_size(pipe, size: tuple[int, int], resolution: int | None = None) -> tuple[int, int]:
    """(width, height) an image of `size` is edited at: its longest side at most `resolution` (the model's
    native size by default), both sides rounded to the multiple LEDITS++ needs."""
    from .ledits import size_multiple

    multiple = size_multiple(pipe)
    if resolution is None:
        resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    w, h = size
    factor = min(1.0, resolution / max(w, h))
    return tuple(max(multiple, round(side * factor / multiple) * multiple) for side in (w, h))  # type: ignore[return-value]


def seed_for(seed: int, key: str) -> int:
    """The inversion seed of one image: a hash of the run's seed and the image's path, so it does not depend
    on the order, the sharding or on resuming."""
    return int(sha256_text(f"{seed}\0{key}")[:16], 16) % (2**63)  # the digest's first 8 bytes, big-endian


def paste_back(edited, original, edit_mask, cell: float):
    """The edited pixels where the edit acted, the original's everywhere else: (composite, alpha).

    The edit mask is grown by one latent cell (`cell` pixels) and feathered (Gaussian, σ = half a
    cell), so the edit blends in; where the alpha is 0 the composite *is* the original, pixel for pixel.
    """
    from PIL import Image, ImageFilter

    radius = max(1, math.ceil(cell))
    grown = edit_mask.filter(ImageFilter.MaxFilter(2 * radius + 1))
    alpha = grown.filter(ImageFilter.GaussianBlur(radius / 2))
    return Image.composite(edited, original, alpha), alpha


def sanitize_image(
    pipe,
    image,
    guidance: LEditsGuidance,
    *,
    seed: int = 0,
    steps: int | None = None,
    skip: float = 0.15,
    resolution: int | None = None,
    keep_unmasked: bool = True,
    unet_batch_size: int | None = None,
    progress=None,
) -> SanitizedImage:
    """Edit one PIL image with LEDITS++ at a size the model takes, and bring the result back to the input's size.

    `keep_unmasked` (default): pixels outside the edit mask (grown by a latent cell and feathered) are
    the input's own, so nothing outside the edited region changes, not even by the VAE's
    reconstruction error or the resizing; off: the whole LEDITS++ output, whose pixels outside the
    mask differ from the input by the reconstruction error and by the edit's spill through the
    UNet. An alpha channel is kept from the input; greyscale and CMYK inputs come back in their mode.
    """
    import numpy as np
    import PIL.Image
    import torch

    from .ledits import edit_image

    original_size = image.size
    rgb = image.convert("RGB")
    size = work_size(pipe, original_size, resolution)
    work = rgb if size == original_size else rgb.resize(size, PIL.Image.Resampling.LANCZOS)
    out = edit_image(
        pipe,
        work,
        guidance,
        num_inversion_steps=steps,
        skip=skip,
        generator=torch.Generator("cpu").manual_seed(seed),
        unet_batch_size=unet_batch_size,
        progress=progress,
    )
    edited, edit_mask = out.images[0], out.masks[0]
    if size != original_size:
        edited = edited.resize(original_size, PIL.Image.Resampling.LANCZOS)
        edit_mask = edit_mask.resize(original_size, PIL.Image.Resampling.NEAREST)
    if keep_unmasked:
        cell = int(pipe.vae_scale_factor) * original_size[0] / size[0]
        edited, alpha = paste_back(edited, rgb, edit_mask, cell)
        mask = alpha.point(lambda v: 255 if v else 0)
    else:
        mask = edit_mask
    coverage = float((np.asarray(mask) > 0).mean())
    edited = _restore_mode(edited, image)
    settings = dict(out.settings)
    settings.update({"seed": seed, "work_width": size[0], "work_height": size[1], "keep_unmasked": keep_unmasked})
    return SanitizedImage(edited, mask, coverage, edit_mask, size, settings)


def _restore_mode(edited, original):
    """The edited RGB image in the original's mode, with the original's alpha channel where it had one."""
    mode = original.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in original.info):
        alpha = original.convert("RGBA").getchannel("A")
        edited = edited.convert("RGBA")
        edited.putalpha(alpha)
        return edited.convert("LA") if mode == "LA" else edited
    if mode in ("L", "CMYK", "I;16", "I", "F"):
        return edited.convert("L" if mode in ("I;16", "I", "F") else mode)
    return edited


def encode_like(image, original, path: Path) -> bytes:
    """`image` encoded in the original file's format (PNG when PIL cannot write that format), keeping its
    ICC profile and EXIF data; JPEG and WebP at quality 95."""
    fmt = (original.format or "").upper() or _format_from_suffix(path)
    kwargs: dict[str, Any] = {}
    for key in ("icc_profile", "exif"):
        if original.info.get(key):
            kwargs[key] = original.info[key]
    if fmt in ("JPEG", "WEBP"):
        kwargs["quality"] = 95
    if fmt == "JPEG" and image.mode in ("RGBA", "LA"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt or "PNG", **kwargs)
    except (KeyError, OSError, ValueError):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
    return buf.getvalue()


def _format_from_suffix(path: Path) -> str:
    from PIL import Image

    Image.init()
    return Image.EXTENSION.get(path.suffix.lower(), "PNG")


def open_image(data: bytes):
    """(PIL image fully loaded, None) or (None, the reason it cannot be edited)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"damaged image ({str(exc).strip() or type(exc).__name__})"
    if getattr(image, "n_frames", 1) > 1:
        return None, f"animated or multi-frame image ({image.n_frames} frames): not supported"
    return image, None


# -- the folder job -------------------------------------------------------------------------------


def display_path(rel: str) -> str:
    """A path for messages and reports: bytes that are not UTF-8 appear as \\xNN."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_items(src: Path) -> list[str]:
    """Every regular file under `src`, as POSIX relative paths, sorted (the run's item order)."""
    items = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            if path.is_file():
                items.append(path.relative_to(src).as_posix())
    return sorted(items)


def state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


class SanitizeStore(RecordStore):
    """A sanitize run's state, ``OUT/.sanitize``: its identity and a record per finished item."""

    FORMAT = StoreFormat("sanitize output", version=SCHEMA_VERSION, version_key="schema_version")

    @classmethod
    def target_label(cls, root: Path) -> str:
        return f"--out {display_path(str(root.parent))!r}"

    @property
    def label(self) -> str:
        return f"--out {display_path(str(self.root.parent))!r}"


def _own_leftover(name: str) -> bool:
    """What a killed sanitize leaves in OUT besides its outputs: a half-made state folder, a write probe."""
    return name.startswith((f"{CREATING_PREFIX}{STATE_DIR}-", ".write-probe-"))


def check_paths(src: str | Path, out: str | Path) -> tuple[Path, Path]:
    """The input folder and the output folder, checked without writing anything: one InputError line otherwise."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InputError(f"folder {display_path(str(src))!r} does not exist")
    if not src.is_dir():
        raise InputError(f"{display_path(str(src))!r} is not a folder")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise InputError(f"--out {display_path(str(out))!r} is inside the input folder; choose a folder outside it")
    if o in s.parents:
        raise InputError(
            f"the input folder is inside --out {display_path(str(out))!r}; choose a separate output folder"
        )
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {display_path(str(out))!r} is not a folder")
        if any(not _own_leftover(p.name) for p in out.iterdir()) and not (state_dir(out) / CONFIG_NAME).is_file():
            raise InputError(
                f"--out {display_path(str(out))!r} is a non-empty folder that is not a sanitize output; choose a new one"
            )
    _check_writable(out)
    return src, out


def _check_writable(out: Path) -> None:
    """Probe that `out` (or, when it does not exist yet, its nearest existing parent) takes new files."""
    target = out
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        raise InputError(f"--out {display_path(str(out))!r} cannot be created: {display_path(str(target))!r} is a file")
    check_writable(target, "--out" if target == out else f"--out {display_path(str(out))!r} cannot be created: folder")


def check_resume(out: Path, config: SanitizeConfig) -> None:
    """Refuse, without writing anything, to continue `out` with settings other than its own."""
    doc = SanitizeStore.read_identity(state_dir(out))
    if doc is not None:
        _check_same(out, doc, config)


def _check_same(out: Path, doc: dict, config: SanitizeConfig) -> None:
    frozen = doc.get("config")
    if not isinstance(frozen, dict):
        path = state_dir(out) / CONFIG_NAME
        raise InputError(f"{display_path(str(path))!r} is not a sanitize config; use a new --out")
    new = config.to_dict()
    if frozen != new:
        diff = sorted(k for k in set(frozen) | set(new) if frozen.get(k) != new.get(k))
        shown = "; ".join(f"{k}: {_short(frozen.get(k))} -> {_short(new.get(k))}" for k in diff[:3])
        raise InputError(
            f"--out {display_path(str(out))!r} was started with other settings ({shown}); use a new --out or the same options"
        )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_model(model: str) -> None:
    """For a local checkpoint folder: the components LEDITS++ needs are there (one InputError line otherwise)."""
    from ..common.loading import check_model_reference

    check_model_reference(model)
    index = Path(model) / "model_index.json"
    if not index.is_file():
        return
    try:
        spec = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"model {model!r}: unreadable model_index.json ({exc})") from None

    def present(name):
        value = spec.get(name)
        return isinstance(value, list) and len(value) == 2 and value[0] is not None and value[1] is not None

    xl = "XL" in str(spec.get("_class_name", ""))
    text = ["text_encoder_2", "tokenizer_2"] if xl else ["text_encoder", "tokenizer"]
    missing = [name for name in ["unet", "vae", "scheduler", *text] if not present(name)]
    if missing:
        raise InputError(
            f"model {model!r} lacks {', '.join(missing)}, which LEDITS++ needs"
            " (a Stable Diffusion 1.x/2.x or SDXL checkpoint with UNet, VAE, text encoder, tokenizer and scheduler)"
        )


@dataclass
class SanitizeSummary:
    """What this process did, and where the run stands."""

    total: int
    done_before: int
    edited: int = 0
    copied: int = 0
    skipped: int = 0

    @property
    def processed(self) -> int:
        return self.edited + self.copied + self.skipped


def prepare_output(out: Path, config: SanitizeConfig, run: dict, *, clean: bool = True) -> SanitizeStore:
    """Create OUT's state store with the run's whole identity in one atomic step, or open the one there
    (safe for concurrent processes); resuming with other settings is refused.

    `run`: what else the report shows and a reader needs (library versions, the judges' descriptions,
    the LEDITS++ settings resolved for the model); written with the config when the run starts.
    `clean`: remove what a killed run's atomic writes left (only the main process, before the others start).
    """
    if clean:
        remove_stale_temporaries(out)
    identity = json.loads(json.dumps({"config": config.to_dict(), **run}, default=str))
    return SanitizeStore.create_or_open(state_dir(out), identity, check=lambda doc: _check_same(out, doc, config))


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(out: Path) -> int:
    """Remove the temporary files an atomic write leaves when the process is killed mid-write (``.NAME.XXXXXXXX.tmp``).

    Only in OUT, which this command owns; a file that vanished meanwhile (another process's write
    completing) is fine.
    """
    removed = 0
    for root, _, files in os.walk(out):
        for name in files:
            if _TEMPORARY.match(name):
                try:
                    (Path(root) / name).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def read_state(out: Path) -> dict:
    """The run's frozen config.json document (reads only)."""
    return SanitizeStore.open(state_dir(out)).identity


def load_records(out: Path) -> dict[str, dict]:
    """Every finished item's record, by relative path (reads only; {} before the run started)."""
    if SanitizeStore.read_identity(state_dir(out)) is None:
        return {}
    return SanitizeStore.open(state_dir(out)).get(ITEM)


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _verdicts(judges, paths: Sequence[Path]) -> list[dict[str, dict]]:
    """Per path, each judge's judgment as a dict."""
    out: list[dict[str, dict]] = [{} for _ in paths]
    for judge in judges:
        for row, judgment in zip(out, judge.judge(list(paths))):
            row[judge.name] = judgment.to_dict()
    return out


def _flagged(verdicts: dict[str, dict]) -> bool:
    return any(v.get("unsafe") for v in verdicts.values())


def sanitize_folder(
    pipe,
    judges: list,
    src: Path,
    out: Path,
    config: SanitizeConfig,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    unet_batch_size: int | None = None,
    show_progress: bool = True,
    on_item: Callable[[str, dict], None] | None = None,
) -> SanitizeSummary:
    """Process this process's items of `src` that have no record yet into `out` (see the module docstring).

    `out` must have been prepared with :func:`prepare_output`. Returns what this process did.
    """
    import numpy as np

    from ..common.outputs import atomic_write_bytes, strict_json

    items = list_items(src)
    mine = [rel for i, rel in enumerate(items) if i % num_processes == process_index]
    store = SanitizeStore.open(state_dir(out))
    done = store.get(ITEM)
    todo = [rel for rel in mine if rel not in done]
    summary = SanitizeSummary(total=len(mine), done_before=len(mine) - len(todo))
    guidance = config.guidance()
    progress = ProgressLog("sanitize", len(todo), enabled=show_progress)
    lock = store.writer(process_index)
    try:
        for start in range(0, len(todo), JUDGE_CHUNK):
            chunk = todo[start : start + JUDGE_CHUNK]
            opened = {}
            for rel in chunk:
                try:
                    data = (src / rel).read_bytes()
                except OSError as exc:
                    opened[rel] = (None, None, f"unreadable file ({exc.strerror or exc})")
                    continue
                image, reason = open_image(data)
                opened[rel] = (data, image, reason)
            readable = [rel for rel in chunk if opened[rel][1] is not None]
            before = dict(zip(readable, _verdicts(judges, [src / rel for rel in readable])))
            for rel in chunk:
                data, image, reason = opened[rel]
                started = time.monotonic()
                record: dict[str, Any] = {
                    "path": rel,
                    "size": None,
                    "before": before.get(rel),
                    "after": None,
                    "process": process_index,
                }
                if image is not None:
                    record["size"] = list(image.size)
                    failed = [name for name, v in before[rel].items() if v.get("unsafe") is None]
                    if failed:
                        errors = "; ".join(f"{n}: {before[rel][n].get('error')}" for n in failed)
                        image, reason = None, f"no verdict ({errors})"
                if image is None:
                    record.update(status="skipped", reason=reason)
                    summary.skipped += 1
                else:
                    flagged = _flagged(before[rel])
                    record["flagged_before"] = flagged
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if flagged or not config.only_flagged:
                        seed = seed_for(config.seed, rel)
                        result = sanitize_image(
                            pipe,
                            image,
                            guidance,
                            seed=seed,
                            steps=config.steps,
                            skip=config.skip,
                            resolution=config.resolution,
                            keep_unmasked=config.keep_unmasked,
                            unet_batch_size=unet_batch_size,
                        )
                        atomic_write_bytes(target, encode_like(result.image, image, target))
                        after = _verdicts(judges, [target])[0]
                        record.update(
                            status="edited",
                            seed=seed,
                            after=after,
                            flagged_after=_flagged(after) if judges else None,
                            mask_coverage=round(result.mask_coverage, 6),
                            edit_mask_coverage=round(float((np.asarray(result.edit_mask) > 0).mean()), 6),
                            mask_png=_png_b64(result.mask.convert("1")),
                            work_size=list(result.work_size),
                            intersect_from_timestep=result.settings.get("intersect_from_timestep"),
                            attention_resolution_factor=result.settings.get("attention_resolution_factor"),
                        )
                        summary.edited += 1
                    else:
                        atomic_write_bytes(target, data)
                        record.update(status="copied")
                        summary.copied += 1
                record["seconds"] = round(time.monotonic() - started, 3)
                store.put(ITEM, rel, strict_json(record))  # the item's file is complete; now it is done
                if on_item is not None:
                    on_item(rel, record)
                progress.update(1, f"{summary.edited} edited, {summary.copied} copied, {summary.skipped} skipped")
    finally:
        progress.close()
        lock.release()
        store.close()
    return summary


# -- the whole command, as a library call ---------------------------------------------------------


@dataclass
class SanitizeResult:
    """What a :func:`sanitize` call did and wrote."""

    out: Path
    summary: SanitizeSummary
    report: Path | None  # None on processes other than the main one
    counts: dict | None


def default_report_path(out: Path) -> Path:
    return state_dir(out) / "report.html"


def sanitize(
    src: str | Path,
    out: str | Path,
    config: SanitizeConfig,
    *,
    device=None,
    report: str | Path | None = None,
    show_unsafe: bool = False,
    unet_batch_size: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    barrier: Callable[[], None] | None = None,
    show_progress: bool = True,
) -> SanitizeResult:
    """Sanitise folder `src` into `out` with `config`: what ``safe-diffusion sanitize`` runs.

    Every check of user input (folders, the report path, the model's components, the judges, a
    resumed run's settings) fails with one InputError line before anything is written. With several
    processes (``accelerate launch``), each handles items i ≡ `process_index` (mod `num_processes`);
    `barrier` waits for all of them before the main process writes the report.
    """
    from ..common.loading import load_pipeline
    from ..common.outputs import library_versions, output_dir
    from ..judges import load_judges
    from .ledits import pipeline_family, resolved_settings

    src, out = check_paths(src, out)
    check_resume(out, config)
    report_path = Path(report) if report is not None else default_report_path(out)
    if report is not None:
        if report_path.suffix.lower() not in (".html", ".htm"):
            raise InputError(f"--report {display_path(str(report_path))!r} must end in .html")
        parent = report_path.parent.resolve()
        if not parent.is_dir() and out.resolve() not in [parent, *parent.parents]:
            raise InputError(f"folder {display_path(str(report_path.parent))!r} of --report does not exist")
        if src.resolve() in [parent, *parent.parents]:
            raise InputError("--report must not be inside the input folder")
    items = list_items(src)
    if not items:
        raise InputError(f"folder {display_path(str(src))!r} has no files")
    if (state_dir(out) / CONFIG_NAME).is_file() and set(items) <= set(load_records(out)):
        # Everything is done (a rerun after completion): no model to load, only the report to write.
        mine = len(items[process_index::num_processes])
        return _finish(src, out, report_path, show_unsafe, process_index, SanitizeSummary(mine, mine))
    check_model(config.model)
    judges = load_judges(list(config.judges), device=device, options=config.judge_options)
    pipe = load_pipeline(config.model, device=device)
    family = pipeline_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    run = {
        "versions": library_versions(),
        "judges": [judge.describe() for judge in judges],
        "ledits": resolved_settings(pipe, family, config.guidance(), config.steps),
    }
    wait = barrier or (lambda: None)
    if process_index != 0:
        wait()  # the main process creates OUT and freezes the config first
    created = not out.exists()
    try:
        with output_dir(out, "--out"):
            prepare_output(out, config, run, clean=process_index == 0)
            if process_index == 0:
                wait()
            summary = sanitize_folder(
                pipe,
                judges,
                src,
                out,
                config,
                process_index=process_index,
                num_processes=num_processes,
                unet_batch_size=unet_batch_size,
                show_progress=show_progress,
            )
    except BaseException:
        # This call made OUT and wrote no image into it (a full disk at the first image, Ctrl-C, a model error):
        # no output is left, not even the run's state. With images written, the state stays for a rerun to resume.
        if created and num_processes == 1 and out.is_dir() and not _anything_done(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    wait()
    return _finish(src, out, report_path, show_unsafe, process_index, summary)


def _anything_done(out: Path) -> bool:
    """Whether OUT holds an image this run wrote (a skipped file's record is no output, and is cheap to redo)."""
    try:
        return any(r.get("status") in ("edited", "copied") for r in load_records(out).values())
    except (InputError, OSError):
        return True  # unreadable: keep it rather than guess


def _finish(src, out, report_path, show_unsafe, process_index, summary) -> SanitizeResult:
    """The main process writes the report from every process's records."""
    from ..reports.sanitize import summarize, write_report

    if process_index != 0:
        return SanitizeResult(out, summary, None, None)
    remove_stale_temporaries(out)  # every process is done: what a killed run's atomic writes left can go
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_report(src, out, report_path, show_unsafe=show_unsafe)
    counts = summarize(list_items(src), load_records(out))
    return SanitizeResult(out, summary, report_path, counts)
