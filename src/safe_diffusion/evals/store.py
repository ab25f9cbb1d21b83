"""The run store: a folder per run, safe to share between processes and nodes on NFS, Lustre or GPFS.

A run is a :class:`~safe_diffusion.records.store.RecordStore` (the one crash-safe store; its rules are
there). Layout::

    RUN/config.json      the run's whole identity: frozen config, prompt limit, library versions
    RUN/prompts.json     the suite's selected prompts (text, categories, seed, ...): the run is self-contained
    RUN/images/PPPPP-KKK.png
    RUN/journal/*.log    per-writer append-only segments (see safe_diffusion.records.journal)
    RUN/locks/writer-R.lock   one live writer per process slot R

* **Creation is atomic and whole**: config.json (with the initial ``--limit``) and prompts.json are
  written into a hidden sibling folder that is renamed into place, so a kill (or a full disk) at any
  instant leaves no run or a complete one, which the same command resumes.
* **Records**: per (stage, key), the last write wins. Stages: ``image`` (key ``PPPPP-KKK`` → seed, file,
  size, sha256), ``judgment:<judge>`` (the judge's :class:`~safe_diffusion.judges.Judgment` and the
  sha256 of the image it judged), ``judge`` (each judge's ``describe()``), ``evaluation`` (the unsafe
  rule), ``selection`` (a later, larger limit); further stages (``store.put("quality", key, {...})``)
  are welcome.
* **Crash safety**: an image is written atomically (temp file + rename, fsync) before its record is
  appended (fsync). A record therefore always points at a complete image; an image without a record
  is regenerated, to the same bytes. A record whose file is missing or has another size (a damaged
  copy) is reported by name and regenerated.
* **Writers**: every process appends only to its own segment, so processes on different nodes
  never write the same file; a second writer for the same process slot is refused at once
  (:meth:`RunStore.writer_lock`). **Readers** only read: a read-only copy of a run can be scored,
  exported and reported.

Format 3 (this version) records the initial limit in config.json; format 2 runs (no limit there) are
read as they are (their limit is a record, or none).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from ..common.errors import InputError
from ..records.journal import WriterLock
from ..records.store import RecordStore, StoreFormat
from .config import config_differences
from .suites import Prompt

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
PROMPTS_NAME = "prompts.json"
IMAGES_DIR = "images"
STORE_SCHEMA_VERSION = 3
IMAGE = "image"
JUDGE = "judge"
EVALUATION = "evaluation"
SELECTION = "selection"

RUN_FORMAT = StoreFormat(
    "evaluation run",
    version=STORE_SCHEMA_VERSION,
    readable=(2,),
    identity_name=CONFIG_NAME,
    legacy=(("run.sqlite", "a run of an older safe-diffusion (run.sqlite)"),),
)


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


def read_frozen(path: str | Path) -> dict | None:
    """The frozen document of a run (config, limit, versions, created), or None when `path` is not a run yet."""
    doc = RunStore.read_identity(path)
    if doc is not None and "config" not in doc:
        raise InputError(f"{str(Path(path) / CONFIG_NAME)!r} is not an evaluation run config")
    return doc


def _same_run(path: Path, config: dict, limit: int | None):
    """A check of a recorded identity against this command's config and --limit (None: all prompts)."""

    def check(doc: dict) -> None:
        if "config" not in doc:
            raise InputError(f"{str(path / CONFIG_NAME)!r} is not an evaluation run config")
        diffs = config_differences(doc["config"], config)
        if diffs:
            raise InputError(
                f"run {str(path)!r} was started with a different config ({'; '.join(diffs[:3])}); "
                "use a new --out or the original options"
            )
        old = RunStore(path, doc).limit
        if limit is not None and limit != old and (old is None or limit < old):
            had = "all prompts" if old is None else f"--limit {old}"
            raise InputError(f"run {str(path)!r} has {had}; a smaller --limit is not supported (use a new --out)")

    return check


def check_resume(path: str | Path, config: dict, limit: int | None = None) -> None:
    """Refuse, reading only, to create or resume a run at `path` with `config` and `limit` that would make
    other images than the run there (a smaller limit than the run's included)."""
    path = Path(path)
    RunStore.check_target(path, _same_run(path, config, limit))


def _prompt_to_json(p: Prompt) -> dict:
    out = {"index": p.index, "text": p.text, "categories": list(p.categories), "seed": p.seed}
    if p.guidance is not None:
        out["guidance"] = p.guidance
    if p.negative_prompt is not None:
        out["negative_prompt"] = p.negative_prompt
    if p.height is not None:
        out["height"], out["width"] = p.height, p.width
    return out


def _prompt_from_json(d: dict) -> Prompt:
    return Prompt(
        d["index"],
        d["text"],
        tuple(d["categories"]),
        int(d["seed"]),
        d.get("guidance"),
        d.get("negative_prompt"),
        d.get("height"),
        d.get("width"),
    )


class RunStore(RecordStore):
    """One run. :meth:`open` an existing one (read-only use is fine), :meth:`create_or_resume` to write."""

    FORMAT = RUN_FORMAT

    def __init__(self, path: str | Path, doc: dict):
        super().__init__(path, doc)
        self._prompts: list[Prompt] | None = None

    @property
    def path(self) -> Path:
        return self.root

    @property
    def label(self) -> str:
        return f"run {str(self.root)!r}"

    @classmethod
    def target_label(cls, root: Path) -> str:
        return f"--out {str(root)!r}"

    @classmethod
    def not_a_store(cls, root: Path) -> InputError:
        if not root.exists():
            return InputError(f"run directory {str(root)!r} does not exist")
        if (root / "run.sqlite").is_file():
            return InputError(
                f"{str(root)!r} is a run of an older safe-diffusion (run.sqlite); rerun it with this version"
            )
        return InputError(f"{str(root)!r} is not an evaluation run directory (no {CONFIG_NAME})")

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create_or_resume(
        cls, path: str | Path, config: dict, prompts: list[Prompt], versions: dict, *, limit: int | None
    ) -> RunStore:
        """Create the run atomically with its whole identity (config, prompts, `limit`), or resume the one
        there when its config matches (else one line). Resuming with a larger `limit` (None: all prompts)
        records the extension; a smaller one is refused. `limit` has no default: it is part of the run's
        identity, and recording it later (as callers once did with :meth:`set_limit`) reopens the window
        in which a kill leaves a run the same command refuses."""
        path = Path(path)
        identity = {
            "config": config,
            "selection": {"limit": limit},
            "versions": versions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        store = super().create_or_open(
            path,
            identity,
            files={PROMPTS_NAME: [_prompt_to_json(p) for p in prompts]},
            folders=(IMAGES_DIR,),
            check=_same_run(path, config, limit),
        )
        stored = {p.index for p in store.prompts()}
        if any(p.index not in stored for p in prompts):
            raise InputError(f"run {str(path)!r} holds other prompts than this selection; use a new --out")
        if store.limit != limit:
            store.set_limit(limit)  # a larger limit than the run had: extending is a record
        return store

    def writer_lock(self, slot: int = 0) -> WriterLock:
        """Hold this for as long as this process writes as process `slot`; a second holder is refused."""
        return self.writer(slot)

    # -- the frozen part -------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.identity["config"]

    @property
    def versions(self) -> dict:
        return self.identity.get("versions", {})

    @property
    def created(self) -> str:
        return self.identity.get("created", "")

    def prompts(self) -> list[Prompt]:
        """Every prompt of the run's selection (before any limit)."""
        if self._prompts is None:
            data = _read_json(self.path / PROMPTS_NAME, "prompt list")
            self._prompts = [_prompt_from_json(d) for d in data]
        return self._prompts

    @property
    def limit(self) -> int | None:
        """The prompt limit: the last extension recorded, else the one the run was created with."""
        value = self.journal.get(SELECTION).get("limit")
        if value is None:
            value = self.identity.get("selection") or {}
        return value.get("limit")

    def set_limit(self, limit: int | None) -> None:
        """Record a new limit (extending a run; the command refuses a smaller one)."""
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
            **self.writers(),
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
