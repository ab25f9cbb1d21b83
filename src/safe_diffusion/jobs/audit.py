"""Audit a folder of images with image judges (Q16's dataset-documentation use): the library entry point.

``audit(folder, out, judges=["q16", "nudenet"])`` accounts for every file under the folder: each image
gets every judge's verdict, a file that is not an image or cannot be read is listed as skipped with the
reason, and a judge that gives no verdict on an image (an unparseable LlavaGuard answer, a file that
changed mid-run) shows "no verdict", never "safe". The report (HTML and its Markdown twin,
:mod:`safe_diffusion.reports.audit`), the per-file CSV and a JSON record of the judges' settings
(models, files, hashes, resolutions, thresholds, prompts, versions) are written together at the end, or
not at all; the report's folder is created if missing. ``safe-diffusion audit`` parses its options, calls
this and prints the summary.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from ..reports.kit import check_page_path, printable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_JUDGES = ("q16", "nudenet")
RULE = "unsafe when any judge flags the image; no verdict when none flags it and at least one gave no verdict"
SCHEMA = "safe-diffusion/audit"
SCHEMA_VERSION = 1


def quoted(path: Path | str) -> str:
    """A path for a message: in quotes, printable (bytes that are not UTF-8 as ``\\xNN``)."""
    return f"'{printable(path)}'"


def combine(verdicts: list[bool | None]) -> bool | None:
    """The audit's rule (:data:`RULE`) over one image's verdicts."""
    if any(v is True for v in verdicts):
        return True
    if any(v is None for v in verdicts):
        return None
    return False


def error_kind(error: str) -> str:
    """The part of a judgment's error before its first colon: what kind of failure it was."""
    return error.split(":", 1)[0].strip() or error


def scan(folder: Path, exclude: set[Path]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Every file under `folder`: (images as (path, name), skipped as (name, reason)); names are relative."""
    from ..judges import decode_rgb

    images: list[tuple[Path, str]] = []
    skipped: list[tuple[str, str]] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.resolve() in exclude:
            continue
        name = printable(path.relative_to(folder))
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((name, f"not an image file ({path.suffix or 'no suffix'})"))
            continue
        try:
            decode_rgb(path.read_bytes())
        except OSError as exc:
            skipped.append((name, f"unreadable: {exc.strerror or exc}"))
        except ValueError as exc:
            skipped.append((name, str(exc)))
        else:
            images.append((path, name))
    return images, skipped


@dataclass
class AuditResult:
    """What an audit judged and wrote."""

    html: Path
    csv: Path
    json: Path
    markdown: Path
    record: dict[str, Any]  # the JSON record: judges, versions, counts, skipped files

    @property
    def counts(self) -> dict[str, Any]:
        return self.record["counts"]


def _rows(images, skipped, names, judgments) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, (_, name) in enumerate(images):
        row: dict[str, Any] = {"image": name, "status": "judged", "skipped_reason": ""}
        row["unsafe"] = combine([judgments[n][i].unsafe for n in names])
        for n in names:
            j = judgments[n][i]
            row[n] = j.unsafe
            row[f"{n}_error"] = j.error or ""
            if j.category is not None:
                row[f"{n}_category"] = j.category
            if j.rationale is not None:
                row[f"{n}_rationale"] = j.rationale
            for k, v in j.scores.items():
                row[f"{n}_{k}"] = round(float(v), 6)
        rows.append(row)
    for name, reason in skipped:
        rows.append({"image": name, "status": "skipped", "skipped_reason": reason})
    return rows


def _csv(rows: list[dict[str, Any]], names: list[str], judgments) -> bytes:
    present = {k for r in rows for k in r}
    columns = ["image", "status", "skipped_reason", "unsafe"]
    for n in names:  # per judge: verdict, category, rationale, error, then its scores
        fixed = [n, *(c for c in (f"{n}_category", f"{n}_rationale") if c in present), f"{n}_error"]
        scores = sorted({k for j in judgments[n] for k in j.scores})
        columns += fixed + [f"{n}_{k}" for k in scores if f"{n}_{k}" not in fixed]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return buf.getvalue().encode()


def audit(
    folder: str | Path,
    out: str | Path,
    *,
    judges: list[str] | tuple[str, ...] = DEFAULT_JUDGES,
    options: dict[str, dict[str, Any]] | None = None,  # per judge, e.g. from judges.judge_options_from
    show_unsafe: bool = False,
    device: Any = None,
) -> AuditResult:
    """Judge every image under `folder` with `judges`; write `out` (.html), its .md, .csv and .json.

    Every check of the input (the folder, the report path, at least one readable image, the judges'
    models) fails with one InputError line before anything is written; the four files are written
    together at the end, or none of them.
    """
    from ..common.outputs import library_versions
    from ..judges import load_judges
    from ..reports.audit import build_page
    from ..reports.kit import write_page

    names = list(judges)
    if not names:
        raise InputError("--judges: name at least one judge")
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"folder {quoted(folder)} does not exist")
    if not folder.is_dir():
        raise InputError(f"{quoted(folder)} is not a folder")
    html_path = check_page_path(out, companions=(".md", ".csv", ".json"))
    csv_path, json_path, md_path = (html_path.with_suffix(s) for s in (".csv", ".json", ".md"))
    images, skipped = scan(folder, {p.absolute().resolve() for p in (html_path, csv_path, json_path, md_path)})
    if not images:
        why = f"; {len(skipped)} file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise InputError(f"folder {quoted(folder)} has no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}){why}")
    loaded = load_judges(names, device=device, options=options or {})

    paths = [p for p, _ in images]
    judgments = {judge.name: judge.judge(paths) for judge in loaded}
    described = {judge.name: judge.describe() for judge in loaded}
    rows = _rows(images, skipped, names, judgments)
    per_judge = {}
    for n in names:
        verdicts = [j.unsafe for j in judgments[n]]
        per_judge[n] = {
            "flagged": sum(v is True for v in verdicts),
            "not_flagged": sum(v is False for v in verdicts),
            "no_verdict": sum(v is None for v in verdicts),
            "no_verdict_reasons": dict(Counter(error_kind(j.error or "") for j in judgments[n] if j.unsafe is None)),
        }
    judged = rows[: len(images)]
    record = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "folder": printable(folder),
        "rule": RULE,
        "judges": described,
        "versions": library_versions(),
        "counts": {
            "files": len(rows),
            "judged": len(images),
            "skipped": len(skipped),
            "flagged": sum(r["unsafe"] is True for r in judged),
            "no_verdict": sum(r["unsafe"] is None for r in judged),
            "judges": per_judge,
        },
        "skipped": [{"file": name, "reason": reason} for name, reason in skipped],
    }
    page = build_page(
        record,
        images,
        judgments,
        names,
        [r["unsafe"] for r in judged],
        show_unsafe=show_unsafe,
        json_name=json_path.name,
    )
    files = {
        json_path.name: (json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n").encode(),
        csv_path.name: _csv(rows, names, judgments),
    }
    html_path, md_path = write_page(page, html_path, files=files)
    return AuditResult(html_path, csv_path, json_path, md_path, record)
