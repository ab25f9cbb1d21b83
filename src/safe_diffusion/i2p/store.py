"""The run store: one SQLite file (``run.sqlite``) and an ``images/`` folder per run directory.

* Self-describing: the frozen generation config, library versions and the prompt file's hash
  are stored in ``meta``, and the selected prompts in ``prompts``, so scoring and export need
  nothing else. ``config.json`` is a human-readable copy.
* Crash-safe: an image is written atomically (temp file + rename) before its record commits;
  records are keyed by (prompt_index, image_index) with a primary key, inserted with
  ``INSERT OR IGNORE``. A record therefore always points at a complete image, a key is never
  duplicated, and an image without a record (killed between the two) is regenerated, to the
  same bytes, on resume.
* Shared by processes: WAL journal and a busy timeout let every process of an ``accelerate``
  launch write its own (disjoint) records into the same file — no shards to merge. WAL needs a
  local file system (not NFS).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError
from .data import Prompt

DB_NAME = "run.sqlite"
IMAGES_DIR = "images"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_index INTEGER PRIMARY KEY, prompt TEXT NOT NULL, categories TEXT NOT NULL, sd_seed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    prompt_index INTEGER NOT NULL, image_index INTEGER NOT NULL, seed INTEGER NOT NULL, image TEXT NOT NULL,
    created REAL NOT NULL, UNIQUE (prompt_index, image_index));
CREATE TABLE IF NOT EXISTS classifications (
    prompt_index INTEGER NOT NULL, image_index INTEGER NOT NULL, classifier TEXT NOT NULL, unsafe INTEGER NOT NULL,
    scores TEXT NOT NULL, UNIQUE (prompt_index, image_index, classifier));
"""


def image_name(prompt_index: int, image_index: int) -> str:
    return f"{IMAGES_DIR}/{prompt_index:05d}-{image_index:03d}.png"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse(path: Path, old: dict, new: dict):
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in diff[:3])
    raise InputError(
        f"run {str(path)!r} was started with a different config ({shown}); use a new --out or the original options"
    )


def check_resume(path: str | Path, config: dict) -> None:
    """Refuse, without writing anything, to resume `path` with a config other than its own."""
    db = Path(path) / DB_NAME
    if not db.is_file():
        return
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=120)
        row = conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        conn.close()
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{str(path)!r}: unreadable run store ({exc})") from None
    if row is not None and row[0] != json.dumps(config, sort_keys=True):
        _refuse(Path(path), json.loads(row[0]), config)


class RunStore:
    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = Path(path)
        self.conn = conn

    # -- opening ---------------------------------------------------------------------------------
    @staticmethod
    def _connect(db: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(db, timeout=120, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 120000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @classmethod
    def open(cls, path: str | Path) -> RunStore:
        """Open an existing run directory (for classify, score, export, report)."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"run directory {str(path)!r} does not exist")
        db = path / DB_NAME
        if not path.is_dir() or not db.is_file():
            raise InputError(f"{str(path)!r} is not an I2P run directory (no {DB_NAME})")
        try:
            conn = cls._connect(db)
            conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{str(path)!r}: unreadable run store ({exc})") from None
        return cls(path, conn)

    @classmethod
    def create_or_resume(cls, path: str | Path, config: dict, prompts: list[Prompt], versions: dict) -> RunStore:
        """Start a run, or reopen one started with the same config; a different config is refused."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"--out {str(path)!r} is not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / DB_NAME).is_file():
            raise InputError(f"--out {str(path)!r} is a non-empty folder that is not an I2P run")
        (path / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        conn = cls._connect(path / DB_NAME)
        store = cls(path, conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(stmt)
            row = conn.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
            frozen = json.dumps(config, sort_keys=True)
            if row is None:
                conn.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("config", frozen),
                        ("versions", json.dumps(versions, sort_keys=True)),
                        ("created", str(time.time())),
                    ],
                )
                conn.executemany(
                    "INSERT INTO prompts VALUES (?, ?, ?, ?)",
                    [(p.index, p.text, ",".join(p.categories), p.sd_seed) for p in prompts],
                )
            elif row[0] != frozen:
                _refuse(path, json.loads(row[0]), config)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            conn.close()
            raise
        from ..outputs import atomic_write_json

        if not (path / "config.json").exists():
            atomic_write_json(path / "config.json", {"schema_version": SCHEMA_VERSION, "config": config, "versions": versions})
        return store

    def close(self) -> None:
        self.conn.close()

    # -- reading ---------------------------------------------------------------------------------
    def meta(self, key: str):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    @property
    def config(self) -> dict:
        return self.meta("config")

    def prompts(self) -> list[Prompt]:
        rows = self.conn.execute("SELECT prompt_index, prompt, categories, sd_seed FROM prompts ORDER BY prompt_index")
        return [Prompt(i, t, tuple(c.split(",")), s) for i, t, c, s in rows]

    def done_keys(self) -> set[tuple[int, int]]:
        return {(p, k) for p, k in self.conn.execute("SELECT prompt_index, image_index FROM images")}

    def images(self) -> list[tuple[int, int, int, str]]:
        """(prompt_index, image_index, seed, image) of every record, in key order."""
        sql = "SELECT prompt_index, image_index, seed, image FROM images ORDER BY prompt_index, image_index"
        return list(self.conn.execute(sql))

    def classified_keys(self, classifier: str) -> set[tuple[int, int]]:
        sql = "SELECT prompt_index, image_index FROM classifications WHERE classifier = ?"
        return set(self.conn.execute(sql, (classifier,)))

    def classifiers(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT classifier FROM classifications ORDER BY classifier")]

    def records(self) -> list[dict]:
        """One dict per image: prompt, categories, seed, image path, per-classifier flag and scores, `unsafe`."""
        prompts = {p.index: p for p in self.prompts()}
        cls = {}
        for p, k, name, unsafe, scores in self.conn.execute("SELECT * FROM classifications"):
            cls.setdefault((p, k), {})[name] = (bool(unsafe), json.loads(scores))
        names = self.classifiers()
        out = []
        for p, k, seed, image in self.images():
            prompt = prompts[p]
            row = {
                "prompt_index": p,
                "prompt": prompt.text,
                "categories": ",".join(prompt.categories),
                "image_index": k,
                "seed": seed,
                "image": str(self.path / image),
            }
            flags = cls.get((p, k), {})
            for name in names:
                flag = flags.get(name)
                row[name] = None if flag is None else flag[0]
                for score_name, value in (flag[1] if flag else {}).items():
                    row[f"{name}_{score_name}"] = value
            known = [f[0] for f in flags.values()]
            # Unsafe when any classifier flags it; safe only when every classifier of the run has seen it.
            row["unsafe"] = True if any(known) else (False if known and len(known) == len(names) else None)
            out.append(row)
        return out

    # -- writing ---------------------------------------------------------------------------------
    def add_images(self, rows: Iterable[tuple[int, int, int, str]]) -> None:
        """Commit records (prompt_index, image_index, seed, image) whose images are already on disk."""
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                "INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?)", [(*r, now) for r in rows]
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def set_classifications(self, classifier: str, rows: Iterable[tuple[int, int, bool, dict]]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                "INSERT OR REPLACE INTO classifications VALUES (?, ?, ?, ?, ?)",
                [(p, k, classifier, int(bool(u)), json.dumps(s, sort_keys=True)) for p, k, u, s in rows],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))
