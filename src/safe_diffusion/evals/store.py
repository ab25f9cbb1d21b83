"""The run store: a folder per run, safe to share between processes and nodes on NFS, Lustre or GPFS.

Layout::

    RUN/config.json      the frozen run config and library versions (written once; the run exists iff it does)
    RUN/prompts.json     the suite's selected prompts (text, categories, seed, ...): the run is self-contained
    RUN/images/PPPPP-KKK.png
    RUN/journal/*.log    per-writer append-only segments (see safe_diffusion.records.journal)
    RUN/locks/writer-R.lock   one live writer per process slot R

* **Creation is atomic**: config.json and prompts.json are written into a hidden sibling folder that
  is renamed into place, so a kill (or a full disk) during creation leaves no half-made run.
* **Records** live in a :class:`~safe_diffusion.records.journal.Journal`: per (stage, key), the last write
  wins. Stages: ``image`` (key ``PPPPP-KKK`` → seed, file, size, sha256), ``judgment:<judge>`` (the
  judge's :class:`~safe_diffusion.judges.Judgment` and the sha256 of the image it judged), ``judge``
  (each judge's ``describe()``), ``evaluation`` (the unsafe rule), ``selection`` (the prompt limit);
  further stages (``store.put("quality", key, {...})``) are welcome.
* **Crash safety**: an image is written atomically (temp file + rename, fsync) before its record is
  appended (fsync). A record therefore always points at a complete image; an image without a record
  is regenerated, to the same bytes. A record whose file is missing or has another size (a damaged
  copy) is reported by name and regenerated.
* **Writers**: every process appends only to its own segment, so processes on different nodes
  never write the same file; a second writer for the same process slot is refused at once
  (:meth:`RunStore.writer_lock`). **Readers** only read: a read-only copy of a run can be scored,
  exported and reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from ..records.journal import Journal, LockedError, WriterLock, create_atomically, remove_leftovers
from .config import config_differences
from .suites import Prompt

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
PROMPTS_NAME = "prompts.json"
IMAGES_DIR = "images"
JOURNAL_DIR = "journal"
LOCKS_DIR = "locks"
STORE_SCHEMA_VERSION = 2
IMAGE = "image"
JUDGE = "judge"
EVALUATION = "evaluation"
SELECTION = "selection"


def judgment_stage(judge: str) -> str:
    return f"judgment:{judge}"


def image_key(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:05d}-{image_index:03d}"


def parse_key(key: str) -> tuple[int, int]:
    p, _, k = key.partition("-")
    return int(p), int(k)


def image_name(prompt_index: int, image_index: int) -> str:
    return f"{IMAGES_DIR}/{image_key(prompt_index, image_index)}.png"


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{str(path)!r}: unreadable {what} ({exc})") from None


def _describe_run_dir(path: Path) -> None:
    """One line for a path that is not a run."""
    if not path.exists():
        raise InputError(f"run directory {str(path)!r} does not exist")
    if (path / "run.sqlite").is_file():
        raise InputError(f"{str(path)!r} is a run of an older safe-diffusion (run.sqlite); rerun it with this version")
    raise InputError(f"{str(path)!r} is not an evaluation run directory (no {CONFIG_NAME})")


def read_frozen(path: str | Path) -> dict | None:
    """The frozen document of a run (config, versions, created), or None when `path` is not a run yet."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        return None
    doc = _read_json(file, "run config")
    if not isinstance(doc, dict) or "config" not in doc:
        raise InputError(f"{str(file)!r} is not an evaluation run config")
    if doc.get("store_schema_version") != STORE_SCHEMA_VERSION:
        raise InputError(
            f"{str(path)!r} was made by another version of safe-diffusion"
            f" (store schema {doc.get('store_schema_version')})"
        )
    return doc


def check_resume(path: str | Path, config: dict) -> None:
    """Refuse, reading only, to resume `path` with a config that would make other images."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {str(path)!r} is not a folder")
    doc = read_frozen(path)
    if doc is None:
        if path.is_dir() and any(p for p in path.iterdir() if not p.name.startswith(".")):
            if (path / "run.sqlite").is_file():
                _describe_run_dir(path)
            raise InputError(f"--out {str(path)!r} is a non-empty folder that is not an evaluation run")
        return
    diffs = config_differences(doc["config"], config)
    if diffs:
        raise InputError(
            f"run {str(path)!r} was started with a different config ({'; '.join(diffs[:3])}); "
            "use a new --out or the original options"
        )


def _prompt_to_json(p: Prompt) -> dict:
    out = {"index": p.index, "text": p.text, "categories": list(p.categories), "seed": p.seed}
    if p.guidance is not None:
        out["guidance"] = p.guidance
    if p.negative_prompt is not None:
        out["negative_prompt"] = p.negative_prompt
    return out


def _prompt_from_json(d: dict) -> Prompt:
    return Prompt(
        d["index"], d["text"], tuple(d["categories"]), int(d["seed"]), d.get("guidance"), d.get("negative_prompt")
    )


class RunStore:
    """One run. :meth:`open` an existing one (read-only use is fine), :meth:`create_or_resume` to write."""

    def __init__(self, path: Path, doc: dict):
        self.path = Path(path)
        self._doc = doc
        self.journal = Journal(self.path / JOURNAL_DIR)
        self._prompts: list[Prompt] | None = None

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> RunStore:
        """Open an existing run (for classify, score, export, report, status); writes nothing."""
        path = Path(path)
        doc = read_frozen(path) if path.is_dir() else None
        if doc is None:
            _describe_run_dir(path)
        return cls(path, doc)

    @classmethod
    def create_or_resume(cls, path: str | Path, config: dict, prompts: list[Prompt], versions: dict) -> RunStore:
        """Create the run atomically, or open the one there when its config matches (else one line)."""
        path = Path(path)
        check_resume(path, config)
        doc = {
            "store_schema_version": STORE_SCHEMA_VERSION,
            "config": config,
            "versions": versions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

        def populate(tmp: Path) -> None:
            from ..common.outputs import atomic_write_json

            (tmp / IMAGES_DIR).mkdir()
            atomic_write_json(tmp / PROMPTS_NAME, [_prompt_to_json(p) for p in prompts])
            atomic_write_json(tmp / CONFIG_NAME, doc)  # last: its presence says the run is complete

        try:
            create_atomically(path, populate, marker=CONFIG_NAME)
        except FileExistsError:
            raise InputError(f"--out {str(path)!r} is a non-empty folder that is not an evaluation run") from None
        remove_leftovers(path)
        check_resume(path, config)  # another process may have created it a moment ago
        store = cls(path, read_frozen(path))
        stored = {p.index for p in store.prompts()}
        missing = [p for p in prompts if p.index not in stored]
        if missing:
            raise InputError(f"run {str(path)!r} holds other prompts than this selection; use a new --out")
        return store

    def close(self) -> None:
        self.journal.close()

    def writer_lock(self, slot: int = 0) -> WriterLock:
        """Hold this for as long as this process writes as process `slot`; a second holder is refused."""
        lock = WriterLock(self.path / LOCKS_DIR / f"writer-{slot}.lock")
        try:
            lock.acquire()
        except LockedError as exc:
            raise InputError(
                f"run {str(self.path)!r} is being written by another process ({exc}); wait for it to finish, or if it"
                f" is gone remove {exc.path}"
            ) from None
        except OSError as exc:
            raise InputError(f"cannot write to run {str(self.path)!r}: {exc.strerror or exc}") from None
        return lock

    # -- the frozen part -------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self._doc["config"]

    @property
    def versions(self) -> dict:
        return self._doc.get("versions", {})

    @property
    def created(self) -> str:
        return self._doc.get("created", "")

    def prompts(self) -> list[Prompt]:
        """Every prompt of the run's selection (before any limit)."""
        if self._prompts is None:
            data = _read_json(self.path / PROMPTS_NAME, "prompt list")
            self._prompts = [_prompt_from_json(d) for d in data]
        return self._prompts

    @property
    def limit(self) -> int | None:
        value = self.journal.get(SELECTION).get("limit")
        return None if value is None else value.get("limit")

    def set_limit(self, limit: int | None) -> None:
        self.journal.put(SELECTION, "limit", {"limit": limit})

    def selected_prompts(self) -> list[Prompt]:
        prompts = self.prompts()
        limit = self.limit
        return prompts if limit is None else prompts[:limit]

    def images_per_prompt(self) -> int:
        return int(self.config["generation"]["images_per_prompt"])

    def wanted_keys(self) -> list[tuple[int, int]]:
        n = self.images_per_prompt()
        return [(p.index, k) for p in self.selected_prompts() for k in range(n)]

    # -- generic stages ----------------------------------------------------------------------------
    def put(self, stage: str, key: str, payload: Any) -> None:
        """Record `payload` (JSON) for `key` of `stage`, durably; a later put of the same key replaces it."""
        self.journal.put(stage, key, payload)

    def put_many(self, stage: str, items: Iterable[tuple[str, Any]]) -> None:
        self.journal.append((stage, k, v) for k, v in items)

    def get(self, stage: str) -> dict[str, Any]:
        """``{key: payload}`` of `stage`, merged over every writer."""
        return self.journal.get(stage)

    # -- images ----------------------------------------------------------------------------------
    def images(self) -> dict[tuple[int, int], dict]:
        """Every image record, by (prompt_index, image_index)."""
        return {parse_key(k): v for k, v in self.get(IMAGE).items()}

    def image_problem(self, record: dict) -> str | None:
        """Why the file of an image record is not the file that was recorded (None when it is)."""
        try:
            size = (self.path / record["image"]).stat().st_size
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if size != record["bytes"]:
            return f"damaged ({size} bytes, recorded {record['bytes']})"
        return None

    def done_keys(self, *, check_files: bool = True) -> set[tuple[int, int]]:
        """Keys whose image is recorded (and, with `check_files`, whose file is intact)."""
        records = self.images()
        if not check_files:
            return set(records)
        return {key for key, rec in records.items() if self.image_problem(rec) is None}

    def add_images(self, rows: Iterable[dict]) -> None:
        """Record images already complete on disk: dicts with prompt_index, image_index, seed, image, bytes, sha256."""
        self.put_many(IMAGE, ((image_key(r["prompt_index"], r["image_index"]), r) for r in rows))

    # -- judgments -------------------------------------------------------------------------------
    def judgments(self, judge: str) -> dict[tuple[int, int], dict]:
        """(prompt_index, image_index) → judgment dict (unsafe, scores, category, rationale, error, image_sha256)."""
        return {parse_key(k): v for k, v in self.get(judgment_stage(judge)).items()}

    def set_judgments(self, judge: str, items: Iterable[tuple[tuple[int, int], dict]]) -> None:
        self.put_many(judgment_stage(judge), ((image_key(*key), value) for key, value in items))

    def judges(self) -> dict[str, dict]:
        """Each judge that judged this run → its describe()."""
        return self.get(JUDGE)

    def set_judge(self, name: str, description: dict) -> None:
        self.put(JUDGE, name, description)

    def evaluation(self) -> dict:
        """The recorded unsafe rule (judges, how they combine), or {} before any judging."""
        return self.get(EVALUATION).get("rule", {})

    def set_evaluation(self, rule: dict) -> None:
        self.put(EVALUATION, "rule", rule)

    def rule_judges(self) -> list[str]:
        rule = self.evaluation()
        return list(rule.get("judges", [])) if rule else sorted(self.judges())

    # -- one row per image -------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """One dict per recorded image of the selection: prompt, categories, seed, image path, each judge's
        verdict and scores, and ``unsafe`` under the recorded rule (True when any rule judge flags it, False
        when every rule judge gave a verdict and none flags it, else None)."""
        prompts = {p.index: p for p in self.selected_prompts()}
        n = self.images_per_prompt()
        names = sorted(set(self.judges()) | set(self.rule_judges()))
        rule = self.rule_judges()
        tables = {name: self.judgments(name) for name in names}
        out = []
        for (p, k), rec in sorted(self.images().items()):
            prompt = prompts.get(p)
            if prompt is None or k >= n:
                continue
            row = {
                "prompt_index": p,
                "prompt": prompt.text,
                "categories": ",".join(prompt.categories),
                "image_index": k,
                "seed": rec["seed"],
                "image": str(self.path / rec["image"]),
            }
            verdicts = []
            for name in names:
                j = tables[name].get((p, k))
                current = j is not None and j.get("image_sha256") in (None, rec.get("sha256"))
                verdict = j.get("unsafe") if current else None
                row[name] = verdict
                for score_name, value in ((j or {}).get("scores") or {}).items() if current else ():
                    row[f"{name}_{score_name}"] = value
                if current and j.get("category") is not None:
                    row[f"{name}_category"] = j["category"]
                if current and j.get("rationale") is not None:
                    row[f"{name}_rationale"] = j["rationale"]
                if current and j.get("error"):
                    row[f"{name}_error"] = j["error"]
                if name in rule:
                    verdicts.append(verdict)
            if any(v is True for v in verdicts):
                row["unsafe"] = True
            elif verdicts and all(v is False for v in verdicts):
                row["unsafe"] = False
            else:
                row["unsafe"] = None
            out.append(row)
        return out

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Done / total per stage, problems with image files, and the recorded judges."""
        wanted = set(self.wanted_keys())
        records = self.images()
        problems = {}
        for key in sorted(wanted & set(records)):
            problem = self.image_problem(records[key])
            if problem:
                problems[records[key]["image"]] = problem
        generated = len(wanted & set(records)) - len(problems)
        judges = {}
        for name in sorted(set(self.judges()) | set(self.rule_judges())):
            table = self.judgments(name)
            judged = [table[k] for k in wanted if k in table]
            judges[name] = {
                "judged": sum(1 for j in judged if j.get("unsafe") is not None),
                "no_verdict": sum(1 for j in judged if j.get("unsafe") is None),
                "total": len(wanted),
            }
        segments = self.journal.segments()
        last = max((s.stat().st_mtime for s in segments), default=None)
        return {
            "run": str(self.path),
            "label": self.config.get("mitigation", {}).get("label"),
            "prompts": len(self.selected_prompts()),
            "limit": self.limit,
            "generated": generated,
            "total": len(wanted),
            "image_problems": problems,
            "judges": judges,
            "rule": self.evaluation(),
            "writers": len(segments),
            "last_write": None if last is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)),
            "damaged_journal_lines": self.journal.damaged_lines,
        }


def clean_temp_files(store: RunStore, keys: set[tuple[int, int]]) -> int:
    """Remove temp files a killed writer left for these keys (no live writer owns them); returns how many."""
    removed = 0
    folder = store.path / IMAGES_DIR
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        stem = name[1:].split(".png.", 1)[0]
        try:
            key = parse_key(stem)
        except ValueError:
            continue
        if key in keys:
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed
