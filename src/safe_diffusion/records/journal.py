"""Crash-safe records for long jobs, on a local disk or a cluster's shared file system.

Long jobs (evaluation runs, quality metrics, sanitising) must survive a SIGKILL of any process at
any moment and, rerun, end with exactly what an uninterrupted run gives; and they must run as many
processes on many nodes writing into one folder on NFS, Lustre or GPFS, where SQLite's and
``flock``'s locking cannot be trusted. This module gives them three things built only on operations
those file systems do get right (creating a file exclusively, appending to a file one process owns,
renaming):

* :class:`Journal`, an append-only, multi-writer record log. Every writer appends only to a
  **segment** of its own, a new one each time it starts (``journal/<host>-<pid>-<ns>-<rand>.log``),
  so no two processes ever write the same file and no lock is needed. A record is one line
  ``crc32<TAB>json`` holding (stage, key, payload, time); a line cut short by a kill, or damaged,
  fails its checksum or has no newline and is ignored. Readers merge all segments: per
  (stage, key), the record written last wins (by its time, then segment and position), so writing
  the same record twice is harmless and a redo replaces what it redoes. Readers only read, so a
  read-only copy of a folder can be read.
* :func:`create_atomically`, which makes a folder appear complete or not at all: it is populated
  in a hidden sibling and renamed into place, so a kill during creation never leaves a half-made
  folder that every rerun refuses.
* :class:`WriterLock`, a lock file created exclusively, naming its holder (host, pid, start) and
  refreshed by a heartbeat, so a second writer is refused at once. A lock whose holder is dead (same
  host: the pid is gone; another host: no heartbeat for ``stale_after`` seconds) is taken over.

Durability: :meth:`Journal.append` flushes and ``fsync``s before returning, so a record that was
appended survives a kill. Whatever a record points at (an image file, say) must be complete on disk
before the record is appended; then a record always means "done", and work without a record is
redone (to the same result, for deterministic jobs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

logger = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".log"


def _encode(stage: str, key: str, payload: Any, stamp: int) -> bytes:
    record = [stage, key, payload, stamp]
    try:
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:  # text that is not valid Unicode (a file name from another system): escaped
        data = json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")
    return b"%08x\t" % zlib.crc32(data) + data + b"\n"


def _decode(line: bytes) -> tuple[str, str, Any, int] | None:
    """One complete line (without its newline) → (stage, key, payload, time), or None when damaged."""
    crc, sep, data = line.partition(b"\t")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(data):
            return None
        stage, key, payload, stamp = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return stage, key, payload, stamp


@dataclass
class _Segment:
    offset: int = 0  # bytes consumed (always at a line boundary)
    lines: int = 0  # complete lines consumed


class Journal:
    """An append-only record log in `folder` (see the module docstring).

    ``journal.append([(stage, key, payload), ...])`` writes; ``journal.get(stage)`` →
    ``{key: payload}`` merged over every segment (reading only what was appended since the last
    call). Payloads are JSON values (no NaN or infinity). `writer` names this process in its segment
    names (default: host and pid).
    """

    def __init__(self, folder: str | os.PathLike, *, writer: str | None = None):
        self.folder = Path(folder)
        self._writer_name = writer
        self._fd: int | None = None
        self._segment: Path | None = None
        self._seen: dict[str, _Segment] = {}
        # stage -> key -> (order, payload); order = (time, segment name, line) decides the last write
        self._records: dict[str, dict[str, tuple[tuple, Any]]] = {}
        self._damaged = 0
        self._mutex = threading.Lock()

    # -- writing ---------------------------------------------------------------------------------
    def _open_segment(self) -> int:
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            who = self._writer_name or f"{_host()}-{os.getpid()}"
            name = f"{who}-{time.time_ns()}-{secrets.token_hex(3)}{SEGMENT_SUFFIX}"
            from ..common.outputs import current_umask

            self._segment = self.folder / name
            # O_EXCL: a segment is never shared; O_APPEND: a write never lands inside an earlier one.
            self._fd = os.open(
                self._segment, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o666 & ~current_umask()
            )
        return self._fd

    def append(self, records: Iterable[tuple[str, str, Any]]) -> None:
        """Append (stage, key, payload) records durably (one write, then fsync)."""
        stamp = time.time_ns()
        data = b"".join(_encode(str(s), str(k), p, stamp) for s, k, p in records)
        if not data:
            return
        with self._mutex:
            fd = self._open_segment()
            view = memoryview(data)
            try:
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError:
                # A full disk may have left part of a line: that tail is ignored by readers, and the next
                # append goes to a new segment, so it is never glued onto the torn line.
                self._close_segment()
                raise

    def put(self, stage: str, key: str, payload: Any) -> None:
        self.append([(stage, key, payload)])

    def close(self) -> None:
        with self._mutex:
            self._close_segment()

    def _close_segment(self) -> None:
        """Close this writer's segment (the caller holds the mutex); a later append starts a new one."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def segment(self) -> Path | None:
        """This writer's segment (None until its first append)."""
        return self._segment

    # -- reading ---------------------------------------------------------------------------------
    def segments(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(
            p for p in self.folder.iterdir() if p.name.endswith(SEGMENT_SUFFIX) and not p.name.startswith(".")
        )

    def refresh(self) -> None:
        """Read what every segment gained since the last call (complete lines only)."""
        with self._mutex:
            for path in self.segments():
                seen = self._seen.setdefault(path.name, _Segment())
                try:
                    with open(path, "rb") as f:
                        f.seek(seen.offset)
                        data = f.read()
                except FileNotFoundError:
                    continue
                end = data.rfind(b"\n")
                if end < 0:
                    continue  # nothing complete yet (or a torn first line)
                for line in data[: end + 1].split(b"\n")[:-1]:
                    seen.lines += 1
                    record = _decode(line)
                    if record is None:
                        self._damaged += 1
                        continue
                    stage, key, payload, stamp = record
                    order = (stamp, path.name, seen.lines)
                    table = self._records.setdefault(stage, {})
                    old = table.get(key)
                    if old is None or old[0] < order:
                        table[key] = (order, payload)
                seen.offset += end + 1

    def get(self, stage: str) -> dict[str, Any]:
        """``{key: payload}`` of `stage`, the last write of each key winning."""
        self.refresh()
        return {k: v for k, (_, v) in self._records.get(stage, {}).items()}

    def stages(self) -> list[str]:
        self.refresh()
        return sorted(self._records)

    @property
    def damaged_lines(self) -> int:
        """Complete lines that failed their checksum (a torn, unterminated tail is not counted)."""
        return self._damaged


# -- creating a folder atomically ----------------------------------------------------------------

CREATING_PREFIX = ".creating-"


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())[:40]


def _creating_siblings(path: Path) -> list[Path]:
    prefix = f"{CREATING_PREFIX}{path.name}-"
    try:
        return [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def _creator_gone(leftover: Path, prefix: str, max_age: float) -> bool:
    """Whether the creator of `leftover` (``<prefix><host>-<pid>-<rand>``) is gone: on this host its pid is dead;
    on another host (which we cannot ask) the folder is older than `max_age` seconds."""
    parts = leftover.name[len(prefix) :].rsplit("-", 2)
    if len(parts) == 3 and parts[0] == _host() and parts[1].isdigit():
        return int(parts[1]) != os.getpid() and not _pid_alive(int(parts[1]))
    try:
        return time.time() - leftover.stat().st_mtime > max_age
    except OSError:
        return False


def remove_leftovers(path: Path, *, max_age: float = 24 * 3600) -> None:
    """Remove half-made creation folders of `path` whose creator was killed (never one still being populated)."""
    path = Path(path).absolute()
    prefix = f"{CREATING_PREFIX}{path.name}-"
    for leftover in _creating_siblings(path):
        if _creator_gone(leftover, prefix, max_age):
            shutil.rmtree(leftover, ignore_errors=True)


def create_atomically(path: str | os.PathLike, populate: Callable[[Path], None], *, marker: str) -> bool:
    """Make folder `path` appear with what `populate(tmp)` writes into it, or not at all.

    `marker` is a file `populate` writes that says the folder is complete. Returns True when this
    call created it, False when it already existed complete (made by another process, perhaps at
    the same moment). An existing empty folder is replaced; a non-empty one without `marker` is an
    error (FileExistsError). Parents are created.
    """
    path = Path(path).absolute()
    if (path / marker).is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{CREATING_PREFIX}{path.name}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        from ..common.outputs import current_umask

        os.chmod(tmp, 0o777 & ~current_umask())
        populate(tmp)
        if not (tmp / marker).is_file():
            raise RuntimeError(f"populate() did not write {marker}")
        try:
            os.rename(tmp, path)  # atomic; replaces `path` only when it is an empty folder
        except OSError:
            if (path / marker).is_file():
                return False  # another process won the race
            if path.is_dir() and any(path.iterdir()):
                raise FileExistsError(str(path)) from None
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- one writer per slot ---------------------------------------------------------------------------


class LockedError(RuntimeError):
    """Another live process holds the lock; ``holder`` describes it."""

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder
        age = time.time() - holder.get("heartbeat", holder.get("started", 0))
        super().__init__(f"held by pid {holder.get('pid')} on {holder.get('host')} (last seen {max(age, 0):.0f} s ago)")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """An exclusive lock file (see the module docstring). Use as a context manager or acquire/release.

    ``stale_after``: seconds without a heartbeat after which a lock held on another host is taken
    over; the holder refreshes it every ``stale_after / 6`` seconds from a daemon thread.
    """

    def __init__(self, path: str | os.PathLike, *, stale_after: float = 120.0):
        self.path = Path(path)
        self.stale_after = stale_after
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _info(self) -> dict:
        return {
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "token": self.token,
            "started": time.time(),
            "heartbeat": time.time(),
        }

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written this very moment, or damaged: judged by its age below

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and holder.get("boot_id", "") == _boot_id() and "pid" in holder:
            return not _pid_alive(int(holder["pid"]))
        try:
            beat = self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return time.time() - beat > self.stale_after

    def acquire(self) -> None:
        """Take the lock, or raise :class:`LockedError` at once if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The lock appears whole or not at all: written to a private file, then hard-linked into place (which
        # fails, as O_EXCL would, when a lock exists). Created empty and then filled, a kill in between left an
        # empty lock that only its age could break: the next run was refused for `stale_after` seconds.
        draft = self.path.with_name(f".{self.path.name}.{self.token}.draft")
        with open(draft, "w") as f:
            json.dump(self._info(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            self._acquire(draft)
        finally:
            draft.unlink(missing_ok=True)
        for old in self.path.parent.glob(f".{self.path.name}.*.draft"):  # a killed acquirer's drafts
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime > self.stale_after:
                    old.unlink()

    def _acquire(self, draft: Path) -> None:
        for _ in range(5):
            try:
                os.link(draft, self.path)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                if not self._is_stale(holder):
                    raise LockedError(self.path, holder) from None
                # Break a dead holder's lock by renaming it away (only one breaker's rename succeeds).
                graveyard = self.path.with_name(f".{self.path.name}.stale-{self.token}")
                try:
                    os.rename(self.path, graveyard)
                except FileNotFoundError:
                    continue
                broken = json.loads(graveyard.read_text() or "{}") if graveyard.stat().st_size else {}
                if broken.get("token") != holder.get("token"):
                    # We renamed a lock someone took just now: give it back (never overwrite a newer one).
                    with contextlib.suppress(FileExistsError):
                        os.link(graveyard, self.path)
                graveyard.unlink(missing_ok=True)
                continue
            self.held = True
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name="writer-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise LockedError(self.path, self._read() or {})

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.stale_after / 6, 0.05)):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> Self:
        if not self.held:  # a lock handed out already held (RecordStore.writer) is entered as it is
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
