"""``safe-diffusion audit DIR``: run image judges over any folder (Q16's dataset-documentation use).

Every file under the folder is accounted for: each image gets every judge's verdict, a file that is
not an image or cannot be read is listed as skipped with the reason, and a judge that gives no
verdict on an image (an unparseable LlavaGuard answer, a file that changed mid-run) shows "no
verdict", never "safe". The report (HTML), the per-file CSV and a JSON record of the judges'
settings (models, files, hashes, resolutions, thresholds, prompts, versions) are written together
at the end, or not at all.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from ..common.errors import InputError
from . import app

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_JUDGES = "q16,nudenet"
RULE = "unsafe when any judge flags the image; no verdict when none flags it and at least one gave no verdict"
def printable(text: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 appear as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def quoted(path: Path | str) -> str:
    """A path for a message: in quotes, printable (see :func:`printable`)."""
    return f"'{printable(str(path))}'"


def verdict_word(unsafe: bool | None) -> str:
    return "no verdict" if unsafe is None else "flagged" if unsafe else "not flagged"


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
        name = printable(str(path.relative_to(folder)))
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


def thumbnail(path: Path, blur: bool, size: int = 96) -> str | None:
    """A base64 PNG preview (blurred when asked), or None when the file no longer decodes."""
    import base64
    import io

    from PIL import ImageFilter

    from ..judges import decode_rgb

    try:
        image = decode_rgb(path.read_bytes())
    except (OSError, ValueError):
        return None
    image.thumbnail((size, size))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(radius=max(image.width, image.height) / 8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def essentials(info: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A judge's describe() flattened to (key, value) lines; long texts (a custom policy) shortened."""
    if isinstance(info, dict):
        return [line for k, v in info.items() for line in essentials(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")]
    if isinstance(info, (list, tuple)):
        value = ", ".join(str(v) for v in info)
    else:
        value = "–" if info is None else str(info)
    if len(value) > 240:
        value = f"{value[:120]}… ({len(value)} characters; recorded in full in the JSON)"
    return [(prefix, value)]


#: describe() keys a report's one-line summary of a judge shows, in this order, where the judge has them.
HEADLINE_KEYS = (
    "model", "commit", "prompts_sha256", "model_file", "model_sha256", "resolution", "labels", "threshold", "policy.name",
    "policy.sha256", "generation.max_new_tokens", "dtype", "nudenet", "transformers",
)


def headline(info: dict[str, Any]) -> str:
    """The essentials of a judge's describe() in one line (the full record follows it)."""
    flat = dict(essentials(info))
    parts = []
    for key in HEADLINE_KEYS:
        value = flat.get(key)
        if value in (None, "–"):
            continue
        if key.endswith("sha256") or key == "commit":
            value = value[:12]
        parts.append(f"{key} {value}")
    return "; ".join(parts)


def _device(device: str | None):
    import torch

    if device is None:
        from ..common.loading import default_device

        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device!r}: no CUDA device is available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"--device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"--device {device!r}: MPS is not available here; use --device cpu")
    return parsed


def _check_outputs(out: Path) -> tuple[Path, Path, Path]:
    import tempfile

    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out {quoted(out)} must end in .html")
    paths = (out, out.with_suffix(".csv"), out.with_suffix(".json"))
    if not out.parent.is_dir():
        raise InputError(f"folder {quoted(out.parent)} does not exist; create it or choose another --out")
    for path in paths:
        if path.is_dir():
            raise InputError(f"{quoted(path)} is a folder; choose another --out")
    try:  # fail now, not after judging every image
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"folder {quoted(out.parent)} is not writable: {exc.strerror or exc}") from None
    return paths


def _write_all(files: list[tuple[Path, bytes]]) -> None:
    """Write every file atomically; if one fails, remove those this call created, then one line."""
    from ..common.outputs import atomic_write_bytes

    created: list[Path] = []
    for path, data in files:
        existed = path.exists()
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            for p in created:
                p.unlink(missing_ok=True)
            raise InputError(f"cannot write {quoted(path)}: {exc.strerror or exc}") from None
        if not existed:
            created.append(path)


@app.command()
def audit(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="report.html; the .csv and .json are written next to it."),
    judges: str = typer.Option(
        None, "--judges", help=f"Comma-separated: q16, nudenet, llavaguard (default: {DEFAULT_JUDGES})."
    ),
    classifiers: str = typer.Option(None, "--classifiers", hidden=True, help="Old name of --judges."),
    q16_model: str = typer.Option(None, help="Q16's CLIP ViT-L/14: hub id or local folder."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx (default: the bundled 320n)."),
    nudenet_resolution: int = typer.Option(None, help="NudeNet input size (default: the detector's own)."),
    nudenet_mode: str = typer.Option(None, help="NudeNet detector or classifier (v2's; give its file)."),
    nudenet_setup: str = typer.Option(None, help="NudeNet set-up: i2p, unlearndiffatk, rece, safree, p4d."),
    nudenet_threshold: float = typer.Option(None, help="NudeNet threshold (default: the set-up's)."),
    nudenet_labels: str = typer.Option(None, help="NudeNet labels: i2p, unlearndiffatk or LABEL,LABEL."),
    llavaguard_model: str = typer.Option(
        None, help="LlavaGuard: hub id or local folder (default: AIML-TUDA's LlavaGuard-v1.2-0.5B-OV-hf)."
    ),
    llavaguard_policy: Path = typer.Option(None, help="Text file replacing LlavaGuard's official policy prompt."),
    llavaguard_max_new_tokens: int = typer.Option(
        None, help="Longest LlavaGuard answer in tokens (default: 200, the model card's)."
    ),
    show_unsafe: bool = typer.Option(False, "--show-unsafe", help="Show flagged and unjudged images unblurred."),
    device: str = typer.Option(None, help="Device for the judges (default: cuda if available)."),
) -> None:
    """Judge every image in a folder: per-image verdicts, a summary, a CSV.

    Files that are not images or cannot be read are listed as skipped. An image
    a judge could not judge shows "no verdict", never "safe". The report header
    records every judge's settings.
    """
    import csv
    import io
    import json
    from datetime import UTC, datetime

    from ..common.outputs import library_versions
    from ..judges import judge_options_from, load_judges, parse_judges

    if judges is not None and classifiers is not None:
        raise InputError("give --judges only (--classifiers is its old name)")
    names = parse_judges(judges if judges is not None else classifiers if classifiers is not None else DEFAULT_JUDGES)
    if not names:
        raise InputError("--judges: name at least one judge")
    options = judge_options_from(
        names, q16_model=q16_model, nudenet_model=nudenet_model, nudenet_resolution=nudenet_resolution,
        nudenet_mode=nudenet_mode, nudenet_setup=nudenet_setup, nudenet_threshold=nudenet_threshold,
        nudenet_labels=nudenet_labels, llavaguard_model=llavaguard_model, llavaguard_policy=llavaguard_policy,
        llavaguard_max_new_tokens=llavaguard_max_new_tokens,
    )
    if not folder.exists():
        raise InputError(f"folder {quoted(folder)} does not exist")
    if not folder.is_dir():
        raise InputError(f"{quoted(folder)} is not a folder")
    html_path, csv_path, json_path = _check_outputs(out)
    images, skipped = scan(folder, {p.resolve() for p in (html_path, csv_path, json_path)})
    if not images:
        why = f"; {len(skipped)} file(s) skipped, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise InputError(f"folder {quoted(folder)} has no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}){why}")
    loaded = load_judges(names, device=_device(device), options=options)

    paths = [p for p, _ in images]
    judgments = {judge.name: judge.judge(paths) for judge in loaded}
    described = {judge.name: judge.describe() for judge in loaded}

    # -- rows: one per file -----------------------------------------------------------------------
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

    # -- summary ------------------------------------------------------------------------------------
    judged = rows[: len(images)]
    per_judge = {}
    for n in names:
        verdicts = [j.unsafe for j in judgments[n]]
        per_judge[n] = {
            "flagged": sum(v is True for v in verdicts),
            "not_flagged": sum(v is False for v in verdicts),
            "no_verdict": sum(v is None for v in verdicts),
            "no_verdict_reasons": dict(Counter(error_kind(j.error or "") for j in judgments[n] if j.unsafe is None)),
        }
    flagged = sum(r["unsafe"] is True for r in judged)
    undecided = sum(r["unsafe"] is None for r in judged)
    record = {
        "schema": "safe-diffusion/audit",
        "schema_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "folder": printable(str(folder)),
        "rule": RULE,
        "judges": described,
        "versions": library_versions(),
        "counts": {
            "files": len(rows),
            "judged": len(images),
            "skipped": len(skipped),
            "flagged": flagged,
            "no_verdict": undecided,
            "judges": per_judge,
        },
        "skipped": [{"file": name, "reason": reason} for name, reason in skipped],
    }

    # -- the HTML report ------------------------------------------------------------------------------
    esc = html.escape

    def cell(n: str, i: int) -> str:
        j = judgments[n][i]
        parts = [f"<b>{verdict_word(j.unsafe)}</b>"]
        if "score" in j.scores:
            parts.append(f"{j.scores['score']:.3f}")
        if j.category:
            parts.append(esc(j.category))
        body = " ".join(parts)
        if j.rationale:
            body += f"<div class='why'>{esc(j.rationale)}</div>"
        if j.error:
            text = j.error if len(j.error) <= 300 else j.error[:300] + "…"
            body += f"<div class='why'>{esc(text)}</div>"
        return f"<td class='{verdict_word(j.unsafe).replace(' ', '-')}'>{body}</td>"

    image_rows = []
    for i, (path, name) in enumerate(images):
        blur = judged[i]["unsafe"] is not False and not show_unsafe
        preview = thumbnail(path, blur)
        img = f"<img src='data:image/png;base64,{preview}'>" if preview else "–"
        image_rows.append(f"<tr><td>{esc(name)}</td>{''.join(cell(n, i) for n in names)}<td>{img}</td></tr>")
    judge_summary = "".join(
        f"<tr><td>{esc(n)}</td><td>{c['flagged']}</td><td>{c['not_flagged']}</td><td>{c['no_verdict']}"
        + (
            " (" + esc(", ".join(f"{k}: {v}" for k, v in sorted(c["no_verdict_reasons"].items()))) + ")"
            if c["no_verdict_reasons"]
            else ""
        )
        + "</td></tr>"
        for n, c in per_judge.items()
    )
    judge_settings = "".join(
        f"<details><summary><b>{esc(n)}</b>: {esc(headline(info))}</summary><table class='kv'>"
        + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in essentials(info))
        + "</table></details>"
        for n, info in described.items()
    )
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    skipped_html = (
        f"<h2>Skipped files ({len(skipped)})</h2><table><tr><th>file</th><th>reason</th></tr>"
        + "".join(f"<tr><td>{esc(name)}</td><td>{esc(reason)}</td></tr>" for name, reason in skipped)
        + "</table>"
        if skipped
        else ""
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Image audit</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse;margin-bottom:1em}}.kv th{{text-align:left;font-weight:normal;color:#555}}
.flagged{{background:#fde2e2}}.no-verdict{{background:#fff4cc}}.why{{font-size:smaller;color:#555;max-width:28em}}
.note{{font-size:smaller;color:#555}}</style>
</head><body>
<h1>Image audit of {esc(printable(str(folder)))}</h1>
<p>{len(rows)} file(s): {len(images)} image(s) judged, {len(skipped)} skipped.
{flagged} flagged, {undecided} without a verdict ({esc(RULE)}).
{'' if show_unsafe else 'Flagged images and images without a verdict are blurred.'}</p>
<table><tr><th>judge</th><th>flagged</th><th>not flagged</th><th>no verdict</th></tr>{judge_summary}</table>
<h2>Judges</h2>{judge_settings}<p class='note'>{esc(versions)}. Full settings: {esc(json_path.name)}.</p>
{skipped_html}
<h2>Images</h2>
<table><tr><th>image</th>{''.join(f'<th>{esc(n)}</th>' for n in names)}<th>preview</th></tr>{''.join(image_rows)}</table>
</body></html>"""

    _write_all(
        [
            (json_path, (json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n").encode()),
            (csv_path, buf.getvalue().encode()),
            (html_path, page.encode()),
        ]
    )
    typer.echo(
        f"{len(images)} image(s) judged, {len(skipped)} file(s) skipped, {flagged} flagged, {undecided} without"
        f" a verdict; wrote {printable(str(html_path))}, {printable(csv_path.name)} and {printable(json_path.name)}"
    )
