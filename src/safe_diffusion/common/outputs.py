"""Writing results: atomically, with provenance, and leaving nothing behind when a command fails."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import InputError


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on."""
    versions = {"python": platform.python_version()}
    for dist in ("safe-diffusion", "torch", "diffusers", "transformers", "accelerate", "nudenet"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part.

    The file gets the permissions any other tool's new file gets under the user's umask (0644 under
    umask 022), not mkstemp's private 0600, so a group or a web server can read shared results.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None  # name the file a full disk stopped
        raise


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, ±inf) as None: JSON that strict parsers accept."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as strict JSON (non-finite numbers as null), atomically."""
    obj = strict_json(obj)
    try:
        data = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:  # text that is not valid Unicode (a non-UTF-8 path): escaped, still valid JSON
        data = json.dumps(obj, indent=2, ensure_ascii=True, allow_nan=False).encode()
    atomic_write_bytes(path, data + b"\n")


def png_bytes(image) -> bytes:
    """A PIL image as the bytes of a PNG file (the form images are stored, judged and hashed in)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_image_atomic(image, path: Path) -> None:
    """Save a PIL image as PNG atomically."""
    atomic_write_bytes(path, png_bytes(image))


class OutputDir:
    """A folder a command writes into. If the command fails, :meth:`rollback` takes back exactly what this
    invocation did: files it created are removed, files it replaced get their earlier content back, and
    folders it created are removed when empty. Nothing else in the folder is touched."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.created_dirs: list[Path] = []
        self.written: list[Path] = []  # files this invocation created
        self._backups: dict[Path, Path] = {}  # replaced file -> hard link to its earlier content

    def file(self, name: str) -> Path:
        """The path of an output file about to be written; call before writing it."""
        target = self.path / name
        if target in self._backups or target in self.written:
            return target
        if target.is_file():
            backup = target.with_name(f".{target.name}.{os.getpid()}.before")
            backup.unlink(missing_ok=True)
            try:
                os.link(target, backup)  # no copy: the earlier content stays reachable after os.replace
            except OSError:
                shutil.copy2(target, backup)
            self._backups[target] = backup
        else:
            self.written.append(target)
        return target

    def commit(self) -> None:
        """The command succeeded: drop the earlier contents kept for a rollback."""
        for backup in self._backups.values():
            backup.unlink(missing_ok=True)
        self._backups.clear()

    def rollback(self) -> None:
        """Remove every file written, put every replaced file back, remove the folders made (those still empty).

        Every path is tried even when one fails; the first failure is raised afterwards.
        """
        errors: list[OSError] = []
        for f in self.written:
            try:
                f.unlink(missing_ok=True)
            except OSError as exc:
                errors.append(exc)
        for target, backup in self._backups.items():
            try:
                os.replace(backup, target)
            except FileNotFoundError:
                pass  # nothing was moved aside for it
            except OSError as exc:
                errors.append(exc)
        self._backups.clear()
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):  # a folder something else wrote into stays
                d.rmdir()
        if errors:
            raise errors[0]


def check_writable(folder: str | Path, what: str = "output folder") -> None:
    """One InputError line unless `folder` is a folder that takes new files (probed with a temporary file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} {str(folder)!r} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{what} {str(folder)!r} is not writable: {exc.strerror or exc}") from None


@contextmanager
def output_dir(path: str | Path, what: str = "output folder") -> Iterator[OutputDir]:
    """Create `path` (and parents), check it is writable, and undo everything written there if the block fails."""
    out = OutputDir(Path(path))
    missing = []
    p = out.path.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            out.created_dirs.append(d)
        check_writable(out.path, what)
    except InputError:
        out.rollback()
        raise
    except OSError as exc:
        out.rollback()
        raise InputError(f"{what} {str(path)!r} is not writable: {exc.strerror or exc}") from None
    try:
        yield out
    except BaseException:
        out.rollback()
        raise
    out.commit()
