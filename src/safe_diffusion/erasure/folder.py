"""The erased model's folder: a diffusers checkpoint plus ``erasure.json`` and the edited weights alone.

Atomic as a whole: the folder is built in a hidden sibling work folder (``.NAME.erasure-partial``,
which also holds ESD's training checkpoints) and renamed onto ``NAME`` as the very last step, so a
killed run never leaves a folder that looks complete. Unchanged components (text encoders, VAE,
tokenizers, scheduler, …) are hard-linked to the base model's files where the filesystem allows,
else copied: a hard link is an ordinary directory entry, so it survives ``mv``, ``tar``, ``zip``,
``rsync`` and deletion of the base model (at worst an archiver stores the data twice); a symbolic
link would not.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from ..common.errors import InputError
from ..common.hashing import sha256_file
from ..common.outputs import atomic_write_json, current_umask

if TYPE_CHECKING:
    import torch

RECORD_NAME = "erasure.json"
WEIGHTS_NAME = "erasure_weights.safetensors"
SCHEMA = "safe-diffusion/erasure"
SCHEMA_VERSION = 1


def read_erasure_record(model_path: str | os.PathLike) -> dict | None:
    """The ``erasure.json`` of a model folder written by ``safe-diffusion erase``, or None when the folder
    has none (an unedited model) or `model_path` is not a local folder (a hub id).

    Keys: ``method`` (uce, rece, esd-x, esd-u), ``label`` (UCE, RECE, ESD-x, ESD-u, for reports),
    ``concepts`` (erase, guide, preserve), ``hyperparameters``, ``base_model`` (reference and content
    hashes), ``edited_weights`` (file and sha256), ``versions``; see docs/erasure.md.
    """
    path = Path(model_path) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable erasure record ({exc})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise InputError(f"{path}: not an erasure record written by safe-diffusion")
    return record


def check_output_folder(out: Path, *, finished_ok: bool = True) -> None:
    """Fail in one line, before anything is loaded or written, unless `out` is new or an empty folder
    whose parent can be written (the work folder and the final rename both happen there).

    With `finished_ok`, a finished erased model (one with its record) passes too: ``erase_concepts``
    decides whether it is this very erasure, whose run was killed after publishing it (done), or another."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"output {str(out)!r} exists and is not a folder")
        if any(out.iterdir()) and not (finished_ok and (out / RECORD_NAME).is_file()):
            raise InputError(f"output folder {str(out)!r} is not empty; choose a new folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder {str(out)!r} cannot be created: {str(parent)!r} is not writable")


def work_folder(out: Path) -> Path:
    """The hidden sibling in which `out` is built (and ESD's checkpoints are kept until it is complete)."""
    out = out.absolute()
    return out.parent / f".{out.name}.erasure-partial"


@contextmanager
def locked_work_folder(out: Path) -> Iterator[Path]:
    """Create (or reuse, to resume) the work folder of `out` and hold its lock; missing parent folders are
    created and removed again if the block fails before the model was published."""
    import fcntl

    out = out.absolute()
    created = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    for d in reversed(created):
        d.mkdir()
    work = work_folder(out)
    existed = work.exists()
    try:
        work.mkdir(exist_ok=True)
        lock = open(work / ".lock", "a")  # noqa: SIM115 (held until the block ends)
    except OSError as exc:
        _remove_created(created)
        raise InputError(f"cannot create {str(work)!r}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise InputError(f"another erase is writing {str(out)!r} (its work folder {str(work)!r} is locked)") from None
    try:
        yield work
    except BaseException:
        # keep what a rerun can resume from (ESD checkpoints); take back everything else
        if not existed and not (work / "checkpoints").is_dir():
            shutil.rmtree(work, ignore_errors=True)
            if not out.exists():
                _remove_created(created)
        raise
    finally:
        lock.close()


def _remove_created(created: list[Path]) -> None:
    for d in created:
        with suppress(OSError):
            d.rmdir()


def storage_dtype(folder: Path) -> torch.dtype:
    """The dtype a component folder stores its weights in: that of the file ``from_pretrained`` loads
    without a variant (``*.fp16.safetensors`` only when there is nothing else); float32 when it cannot tell."""
    import re

    import torch
    from safetensors import safe_open

    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    files = sorted(
        folder.glob("*.safetensors"), key=lambda f: (bool(re.search(r"\.(fp16|bf16|fp32)\.", f.name)), f.name)
    )
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                return names.get(f.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def _mode_for_new_files() -> int:
    return 0o666 & ~current_umask()


def _link_or_copy(src: Path, dst: Path, link: bool) -> str:
    src = Path(os.path.realpath(src))  # hub caches hold symlinks to blobs: link the data, not the link
    if link:
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
    shutil.copyfile(src, dst)
    os.chmod(dst, _mode_for_new_files())
    return "copy"


def _base_entries(base: Path, skip_top: set[str]) -> Iterator[tuple[str, Path]]:
    """(relative path, file) of every file of a checkpoint folder, except hidden ones and top-level `skip_top`."""
    for root, dirs, names in os.walk(base, followlinks=True):
        rel_root = Path(root).relative_to(base)
        top = rel_root == Path(".")
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in skip_top))
        for name in sorted(names):
            if not name.startswith(".") and not (top and name in skip_top):
                yield (rel_root / name).as_posix(), Path(root) / name


def hash_base(base: Path) -> dict[str, str]:
    """sha256 of every file of the base checkpoint (a previous erasure's own record and weights excepted)."""
    return {rel: sha256_file(path) for rel, path in _base_entries(base, {RECORD_NAME, WEIGHTS_NAME})}


def mirror_base(base: Path, staging: Path, *, replace: set[str], link: bool) -> dict[str, str]:
    """Link or copy every file of the base checkpoint into `staging`, except the top-level entries in
    `replace`, hidden files and a previous erasure's own files; returns how each got there."""
    how = {}
    for rel, src in _base_entries(base, {*replace, RECORD_NAME, WEIGHTS_NAME}):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        how[rel] = _link_or_copy(src, staging / rel, link)
    return how


def hash_tree(folder: Path, prefix: str) -> dict[str, str]:
    return {
        f"{prefix}/{p.relative_to(folder).as_posix()}": sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def normalise_permissions(folder: Path, keep: set[str]) -> None:
    """Files and folders this run created get the user's umask permissions (mkstemp-style writers make
    0600); hard-linked files in `keep` are the base model's own and are left alone."""
    file_mode = _mode_for_new_files()
    dir_mode = 0o777 & ~current_umask()
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir():
            os.chmod(p, dir_mode)
        elif rel not in keep:
            os.chmod(p, file_mode)
    os.chmod(folder, dir_mode)


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written canonically (keys sorted, no spaces, padded
    with spaces to a multiple of 8 as the format requires). safetensors writes the metadata from a hash map,
    so identical tensors and metadata can give other bytes (and another sha256) on every run; the tensor
    data and every offset stay as they are."""
    import struct

    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def save_edited_weights(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The edited parameters alone, keyed by UNet parameter name, float32, as the official UCE/ESD code saves
    them (``pipe.unet.load_state_dict(load_file(path), strict=False)`` applies them). Same tensors, same
    bytes: the header is written canonically (:func:`canonical_safetensors`)."""
    import torch
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    with open(path, "wb") as f:
        f.write(canonical_safetensors(save(tensors, metadata=metadata)))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, out: Path) -> None:
    """Rename the finished folder onto `out` in one step (a new path, or an empty folder, which rename replaces)."""
    out = out.absolute()
    _fsync_dir(staging)
    try:
        os.rename(staging, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise InputError(
                f"output {str(out)!r} appeared while erasing and is not an empty folder; "
                "rerun with a new --out (an ESD run resumes from its last checkpoint)"
            ) from None
        raise
    _fsync_dir(out.parent)


def write_record(staging: Path, record: dict) -> None:
    atomic_write_json(staging / RECORD_NAME, record)
