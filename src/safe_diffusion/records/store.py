"""The one crash-safe record store: a long job's folder, its identity, its records and its artefacts.

Every long job keeps its state in a :class:`RecordStore` (an evaluation run, its quality stage, a
sanitize run; an attack run is meant to do the same)::

    ROOT/config.json          the job's identity: everything that determines its result (config, prompt
                              selection, limit, protocol), written once, in the one atomic creation
    ROOT/<files>              written in that same creation (a run's prompt list, ...)
    ROOT/journal/*.log        records (stage, key, payload): one segment per writer, the last write wins
    ROOT/locks/writer-N.lock  one live writer per process slot N

The rules, which make a kill at any instant harmless and a rerun of the same command end with what an
uninterrupted run gives:

* **The identity is written whole, at once.** :meth:`RecordStore.create_or_open` populates a hidden
  sibling folder and renames it into place (:func:`~safe_diffusion.records.journal.create_atomically`):
  after a kill there is no store or a complete one. Reopening compares the recorded identity with the
  command's (`check`), so a changed command is refused in one line before anything is written. What
  changes later (a run extended with a larger ``--limit``) is a record, never an edit of the identity.
* **Artefacts before their record.** :meth:`RecordStore.commit` writes files atomically (temporary file,
  fsync, rename) and only then appends their records (fsync): a record always means "done", and
  work without a record is redone, to the same result.
* **One live writer per process slot** (:meth:`RecordStore.writer`); any number of slots on any number
  of nodes, each appending to its own journal segment, so a shared file system (NFS, Lustre, GPFS)
  needs no locking that works across nodes.
* **Readers only read.** :meth:`RecordStore.open` writes nothing, so a read-only copy can be read.

A store's format is versioned (:class:`StoreFormat`); a folder of a version this code does not read is
refused in one line naming that version.

A new job (``attack run``, say) defines its format and identity and uses the store as the others do::

    class AttackStore(RecordStore):
        FORMAT = StoreFormat("attack run", version=1)

    store = AttackStore.create_or_open(out, {"config": config, "limit": limit}, files={"targets.json": targets},
                                       folders=["images"], check=lambda doc: same_config(doc, config, limit))
    with store.writer(process_index):
        for key in todo:
            store.commit("attack", [(key, result)], files={f"images/{key}.png": png})
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..common.errors import InputError
from .journal import Journal, LockedError, WriterLock, create_atomically, remove_leftovers

JOURNAL_DIR = "journal"
LOCKS_DIR = "locks"


@dataclass(frozen=True)
class StoreFormat:
    """What a kind of store is called, its format version and where the version is written.

    `readable`: older versions this code reads as they are (the migration is trivial); any other
    version is refused. `legacy`: names of files that mark a folder of an older, unreadable format,
    each with how to say so (``{"run.sqlite": "a run of an older safe-diffusion (run.sqlite)"}``).
    """

    what: str
    version: int
    version_key: str = "store_schema_version"
    readable: tuple[int, ...] = ()
    identity_name: str = "config.json"
    legacy: tuple[tuple[str, str], ...] = ()


def _show(path: Path) -> str:
    """A path for a message (bytes that are not UTF-8 as \\xNN)."""
    return repr(str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


class RecordStore:
    """One job's folder (see the module docstring). Subclasses set :attr:`FORMAT`."""

    FORMAT: ClassVar[StoreFormat]

    def __init__(self, root: str | os.PathLike, identity: dict):
        self.root = Path(root)
        self.identity = identity
        self.journal = Journal(self.root / JOURNAL_DIR)

    # -- what a folder is ----------------------------------------------------------------------------
    @classmethod
    def read_identity(cls, root: str | os.PathLike) -> dict | None:
        """The identity document in `root`, or None when `root` is not a store (yet). Writes nothing.

        A damaged document or a version this code does not read is one InputError line.
        """
        fmt = cls.FORMAT
        file = Path(root) / fmt.identity_name
        if not file.is_file():
            return None
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{_show(file)}: unreadable {fmt.what} identity ({exc})") from None
        if not isinstance(doc, dict):
            raise InputError(f"{_show(file)} is not the identity of {_a(fmt.what)}")
        version = doc.get(fmt.version_key)
        if version != fmt.version and version not in fmt.readable:
            raise InputError(
                f"{_show(Path(root))} was made by another version of safe-diffusion ({fmt.what} format {version},"
                f" this version reads {', '.join(map(str, (*fmt.readable, fmt.version)))})"
            )
        return doc

    @classmethod
    def not_a_store(cls, root: Path) -> InputError:
        """The one line for a folder that is not a store of this kind."""
        fmt = cls.FORMAT
        if not root.exists():
            return InputError(f"{fmt.what} folder {_show(root)} does not exist")
        for name, description in fmt.legacy:
            if (root / name).exists():
                return InputError(f"{_show(root)} is {description}; rerun it with this version into a new folder")
        return InputError(f"{_show(root)} is not {_a(fmt.what)} folder (no {fmt.identity_name})")

    @classmethod
    def target_label(cls, root: Path) -> str:
        """How messages about creating or continuing a store at `root` name it (a command names its option)."""
        return _show(root)

    @classmethod
    def open(cls, root: str | os.PathLike):
        """Open an existing store (to read it, or to write records); writes nothing."""
        root = Path(root)
        doc = cls.read_identity(root) if root.is_dir() else None
        if doc is None:
            raise cls.not_a_store(root)
        return cls(root, doc)

    @classmethod
    def check_target(cls, root: str | os.PathLike, check: Callable[[dict], None] | None = None) -> dict | None:
        """Refuse, reading only, a `root` that cannot become or continue this store: a file, a non-empty
        folder that is not a store of this kind, an older format, or (through `check`) another identity.
        Returns the identity already there, or None."""
        root = Path(root)
        label = cls.target_label(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"{label} is not a folder")
        doc = cls.read_identity(root)
        if doc is None:
            if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
                for name, _ in cls.FORMAT.legacy:
                    if (root / name).exists():
                        raise cls.not_a_store(root)
                raise InputError(f"{label} is a non-empty folder that is not {_a(cls.FORMAT.what)}")
            return None
        if check is not None:
            check(doc)
        return doc

    # -- creating ------------------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        root: str | os.PathLike,
        identity: dict,
        *,
        files: Mapping[str, Any] | None = None,
        folders: Iterable[str] = (),
        check: Callable[[dict], None] | None = None,
    ):
        """Create the store with its whole identity in one atomic step, or open the one there.

        `identity` (JSON) is written as the identity document, with the format's version added; `files`
        (name → JSON value) and empty `folders` are written in the same creation. An existing store is
        opened after `check(its identity)` (which raises InputError when the command differs); so is a
        store another process created a moment ago. Parents are created.
        """
        from ..common.outputs import atomic_write_json

        root = Path(root)
        fmt = cls.FORMAT
        if cls.check_target(root, check) is None:
            doc = {fmt.version_key: fmt.version, **identity}

            def populate(tmp: Path) -> None:
                for name in folders:
                    (tmp / name).mkdir(parents=True)
                for name, value in (files or {}).items():
                    atomic_write_json(tmp / name, value)
                atomic_write_json(tmp / fmt.identity_name, doc)  # last: its presence says the store is complete

            try:
                create_atomically(root, populate, marker=fmt.identity_name)
            except FileExistsError:
                raise InputError(f"{cls.target_label(root)} is a non-empty folder that is not {_a(fmt.what)}") from None
            remove_leftovers(root)
        doc = cls.read_identity(root)
        if doc is None:  # removed between the creation and now: say so rather than crash
            raise cls.not_a_store(root)
        if check is not None:
            check(doc)  # another process may have created it, with another identity, a moment ago
        return cls(root, doc)

    # -- writing -------------------------------------------------------------------------------------
    def writer(self, slot: int = 0) -> WriterLock:
        """The held writer lock of process `slot`; release it (or use it as a context manager) when done.

        A second live writer for the same slot is refused at once (one InputError line); a dead one's lock
        is taken over.
        """
        lock = WriterLock(self.root / LOCKS_DIR / f"writer-{slot}.lock")
        try:
            lock.acquire()
        except LockedError as exc:
            raise InputError(
                f"{self.label} is being written by another process ({exc}); wait for it to finish, or if it"
                f" is gone remove {exc.path}"
            ) from None
        except OSError as exc:
            raise InputError(f"cannot write to {self.label}: {exc.strerror or exc}") from None
        return lock

    @property
    def label(self) -> str:
        """How messages name this store."""
        return f"{self.FORMAT.what} {_show(self.root)}"

    def put(self, stage: str, key: str, payload: Any) -> None:
        """Record `payload` (JSON) for `key` of `stage`, durably; a later put of the same key replaces it."""
        self.journal.put(stage, key, payload)

    def put_many(self, stage: str, items: Iterable[tuple[str, Any]]) -> None:
        """Record several (key, payload) pairs of `stage` in one durable append."""
        self.journal.append((stage, k, v) for k, v in items)

    def commit(
        self, stage: str, items: Iterable[tuple[str, Any]], files: Mapping[str | Path, bytes] | None = None
    ) -> None:
        """Write `files` (paths relative to the root, or absolute) atomically, then record `items`: a record
        never points at an incomplete file."""
        from ..common.outputs import atomic_write_bytes

        for path, data in (files or {}).items():
            atomic_write_bytes(self.root / path, data)
        self.put_many(stage, items)

    def close(self) -> None:
        self.journal.close()

    # -- reading -------------------------------------------------------------------------------------
    def get(self, stage: str) -> dict[str, Any]:
        """``{key: payload}`` of `stage`, merged over every writer (the last write of each key wins)."""
        return self.journal.get(stage)

    def stages(self) -> list[str]:
        return self.journal.stages()

    def writers(self) -> dict[str, Any]:
        """How many writers have written, when last, and how many damaged journal lines were skipped."""
        segments = self.journal.segments()
        last = max((s.stat().st_mtime for s in segments), default=None)
        return {
            "writers": len(segments),
            "last_write": None if last is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)),
            "damaged_journal_lines": self.journal.damaged_lines,
        }


class StageRecords:
    """Per-item results of a long computation, kept where a killed run finds them again.

    ``put(batch)`` stores a mapping ``{key: payload}`` (JSON) durably and all-or-nothing; ``get()`` returns
    every record stored so far, by any process. Backed by one stage of a journal (a store's, or one of its
    own in a folder), or by a dict in memory (nothing survives the process).
    """

    def __init__(self, put: Callable[[Mapping[str, Any]], None], get: Callable[[], Mapping[str, Any]]):
        self._put = put
        self._get = get

    def put(self, batch: Mapping[str, Any]) -> None:
        if batch:
            self._put(dict(batch))

    def get(self) -> dict[str, Any]:
        return dict(self._get())

    @classmethod
    def of(cls, journal: Journal | RecordStore, stage: str) -> StageRecords:
        """The records of `stage` in a store (or a bare journal)."""
        log = journal.journal if isinstance(journal, RecordStore) else journal
        return cls(lambda batch: log.append((stage, k, v) for k, v in batch.items()), lambda: log.get(stage))

    @classmethod
    def in_folder(cls, path: str | os.PathLike, stage: str = "records") -> StageRecords:
        """Records in a journal of their own in folder `path` (created on the first put)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"records folder {_show(path)} is not a folder")
        return cls.of(Journal(path), stage)

    @classmethod
    def in_memory(cls) -> StageRecords:
        table: dict[str, Any] = {}
        return cls(table.update, lambda: table)
