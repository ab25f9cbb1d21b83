"""The sanitize report: HTML (thumbnails before/after and the mask), Markdown and CSV, from a run's records.

Flagged images are blurred before they are embedded (the unblurred pixels are not in the file) unless
``show_unsafe``; an image is blurred on the side where it was flagged (before, after, or both).
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from ..editing.sanitize import display_path, list_items, load_records, read_state

THUMB = 128
STATUSES = ("edited", "copied", "skipped")


def _score(judgment: dict | None) -> float | None:
    """A judgment's headline score: its "score", else its first score, else None."""
    if not judgment or not judgment.get("scores"):
        return None
    scores = judgment["scores"]
    return float(scores.get("score", next(iter(scores.values()))))


def _verdict(judgment: dict | None) -> str:
    if not judgment:
        return ""
    if judgment.get("unsafe") is None:
        return "no verdict"
    return "flagged" if judgment["unsafe"] else "safe"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _thumb(path: Path, flagged: bool, show_unsafe: bool) -> str:
    from .eval import thumbnail

    try:
        return f"<img alt='' src='data:image/png;base64,{thumbnail(str(path), flagged, show_unsafe, THUMB)}'>"
    except Exception:  # noqa: BLE001 - a file removed or changed since the run: the report still renders
        return "–"


def _mask_thumb(b64: str | None) -> str:
    if not b64:
        return "–"
    import base64

    from PIL import Image

    from .eval import _png_b64

    mask = Image.open(io.BytesIO(base64.b64decode(b64))).convert("L")
    mask.thumbnail((THUMB, THUMB))
    return f"<img alt='mask' src='data:image/png;base64,{_png_b64(mask)}'>"


def summarize(items: list[str], records: dict[str, dict]) -> dict:
    """The run's counts: files, done, pending, edited/copied/skipped, flagged before, still flagged after."""
    done = [records[rel] for rel in items if rel in records]
    counts = {s: sum(r["status"] == s for r in done) for s in STATUSES}
    edited = [r for r in done if r["status"] == "edited"]
    return {
        "files": len(items),
        "done": len(done),
        "pending": len(items) - len(done),
        **counts,
        "images": counts["edited"] + counts["copied"],
        "flagged_before": sum(bool(r.get("flagged_before")) for r in done),
        "still_flagged_after": sum(bool(r.get("flagged_after")) for r in edited),
        "edited_unflagged": sum(not r.get("flagged_before") for r in edited),
        "mean_mask_coverage": (sum(r["mask_coverage"] for r in edited) / len(edited)) if edited else None,
    }


def _judge_essentials(describe: dict) -> str:
    """One line per judge: its name and its scalar settings (model, file hash, threshold, rule…)."""
    parts = []
    for key, value in describe.items():
        if key == "judge" or isinstance(value, (dict, list)):
            continue
        text = str(value)
        if key.endswith("sha256") and len(text) > 16:
            text = text[:16] + "…"
        parts.append(f"{key}: {text}")
    return "; ".join(parts)


def write_report(src: Path, out: Path, report: Path, *, show_unsafe: bool = False) -> tuple[Path, Path, Path]:
    """Write `report` (.html) with its .md and .csv next to it, from the records in `out`."""
    from ..common.outputs import atomic_write_bytes

    state = read_state(out)
    config = state["config"]
    judges = list(config["judges"])
    items = list_items(src)
    records = load_records(out)
    # Items recorded by an earlier run whose files are gone from DIR are still reported.
    items = items + sorted(set(records) - set(items))
    summary = summarize(items, records)

    columns = ["image", "status", "reason", "flagged_before", "flagged_after", "mask_coverage", "edit_mask_coverage"]
    for name in judges:
        columns += [f"{name}_before", f"{name}_score_before", f"{name}_after", f"{name}_score_after"]
    columns += ["width", "height", "work_width", "work_height", "seed", "seconds"]
    rows = []
    for rel in items:
        r = records.get(rel)
        if r is None:
            rows.append({"image": display_path(rel), "status": "pending"})
            continue
        before, after = r.get("before") or {}, r.get("after") or {}
        row = {
            "image": display_path(rel),
            "status": r["status"],
            "reason": r.get("reason") or "",
            "flagged_before": r.get("flagged_before"),
            "flagged_after": r.get("flagged_after"),
            "mask_coverage": r.get("mask_coverage"),
            "edit_mask_coverage": r.get("edit_mask_coverage"),
            "width": (r.get("size") or [None, None])[0],
            "height": (r.get("size") or [None, None])[1],
            "work_width": (r.get("work_size") or [None, None])[0],
            "work_height": (r.get("work_size") or [None, None])[1],
            "seed": r.get("seed"),
            "seconds": r.get("seconds"),
        }
        for name in judges:
            row[f"{name}_before"] = _verdict(before.get(name))
            row[f"{name}_score_before"] = _score(before.get(name))
            row[f"{name}_after"] = _verdict(after.get(name))
            row[f"{name}_score_after"] = _score(after.get(name))
        rows.append(row)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)

    ledits = state.get("ledits", {})
    edit_lines = [
        ("model", config["model"]),
        ("removed", ", ".join(config["remove"]) or "–"),
        ("added", ", ".join(config["add"]) or "–"),
        ("edited", "flagged images only" if config["only_flagged"] else "every readable image"),
        ("judges", ", ".join(config["judges"]) or "none"),
        ("inversion/edit steps", ledits.get("num_inversion_steps", config["steps"])),
        ("skip", config["skip"]),
        ("edit scale s_e / threshold λ / warm-up", f"{config['scale']} / {config['threshold']} / {config['warmup_steps']}"),
        ("masking", config["masking"]),
        ("seed", config["seed"]),
        ("resolution", config["resolution"] or "the model's native size"),
        (
            "outside the mask",
            "the input's own pixels (--keep-unmasked)"
            if config.get("keep_unmasked", True)
            else "LEDITS++'s output (--no-keep-unmasked): reconstruction error and spill",
        ),
    ]
    for key in ("family", "final_sigma", "zero_noise_steps", "intersect_from_timestep", "attention_resolution_factor"):
        if key in ledits:
            edit_lines.append((key.replace("_", " "), ledits[key]))
    deviations = ledits.get("deviations_from_diffusers", [])
    described = state.get("judges", [])
    judge_lines = [(name, _judge_essentials(d) if isinstance(d, dict) else str(d)) for name, d in zip(judges, described)]

    counts = (
        f"{summary['files']} file(s): {summary['images']} image(s) and {summary['skipped']} skipped;"
        f" {summary['flagged_before']} flagged before; {summary['edited']} edited, of which"
        f" {summary['still_flagged_after']} still flagged after; {summary['copied']} copied unchanged"
        + (f"; {summary['pending']} not processed yet (rerun the command to finish)" if summary["pending"] else "")
        + "."
    )
    blur_note = "Flagged images are shown unblurred." if show_unsafe else "Flagged images are blurred (--show-unsafe to show them)."
    mask_note = (
        "Mask: the pixels the edit may have changed (white): where the edit guidance acted, at any step, for any"
        " concept" + (", grown by one latent cell and feathered; elsewhere the image is the input's own."
                      if config.get("keep_unmasked", True) else ".")
    )

    table = []
    for rel, row in zip(items, rows):
        r = records.get(rel, {})
        status = row["status"]
        cells = [html.escape(row["image"]), html.escape(status + (f": {row['reason']}" if row.get("reason") else ""))]
        for name in judges:
            b = f"{row.get(f'{name}_before', '')} {_fmt(row.get(f'{name}_score_before'))}".strip()
            a = f"{row.get(f'{name}_after', '')} {_fmt(row.get(f'{name}_score_after'))}".strip()
            cells.append(html.escape(b or "–") + ("<br>→ " + html.escape(a) if a else ""))
        coverage = row.get("mask_coverage")
        cells.append("–" if coverage is None else f"{100 * coverage:.1f}%")
        readable = status in ("edited", "copied")
        cells.append(_thumb(src / rel, bool(r.get("flagged_before")), show_unsafe) if readable else "–")
        if status == "edited":
            cells.append(_thumb(out / rel, bool(r.get("flagged_after")), show_unsafe))
            cells.append(_mask_thumb(r.get("mask_png")))
        else:
            cells += ["–", "–"]
        table.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = (
        "<tr><th>image</th><th>status</th>"
        + "".join(f"<th>{html.escape(n)}: before → after</th>" for n in judges)
        + "<th>mask coverage</th><th>before</th><th>after</th><th>mask</th></tr>"
    )

    def dl(pairs):
        return "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in pairs)

    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Sanitize report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
td img{{width:{THUMB}px;height:auto;image-rendering:pixelated}}
dl{{display:grid;grid-template-columns:max-content auto;gap:2px 12px}}dt{{font-weight:bold}}dd{{margin:0}}</style></head><body>
<h1>Sanitize report</h1>
<p>{html.escape(display_path(str(src)))} → {html.escape(display_path(str(out)))}</p>
<p id="summary">{html.escape(counts)}</p>
<h2>Edit settings (LEDITS++)</h2><dl>{dl(edit_lines)}</dl>
{('<p>Deviations from diffusers&#x27; LEDITS++ pipelines: ' + html.escape('; '.join(deviations)) + '.</p>') if deviations else ''}
<h2>Judges</h2><dl>{dl(judge_lines) if judge_lines else '<dt>none</dt><dd>every image edited (--all)</dd>'}</dl>
<p>{blur_note} {mask_note}</p>
<table>{head}{''.join(table)}</table></body></html>"""

    md = [
        "# Sanitize report",
        "",
        f"`{display_path(str(src))}` → `{display_path(str(out))}`",
        "",
        counts,
        "",
        "## Edit settings (LEDITS++)",
        "",
        *[f"- {k}: {v}" for k, v in edit_lines],
        *([f"- deviations from diffusers' LEDITS++ pipelines: {'; '.join(deviations)}"] if deviations else []),
        "",
        "## Judges",
        "",
        *([f"- {k}: {v}" for k, v in judge_lines] or ["- none: every image edited (--all)"]),
        "",
        "## Images",
        "",
        "| " + " | ".join(["image", "status", *(f"{n} before → after" for n in judges), "mask coverage"]) + " |",
        "|---|---|" + "---|" * len(judges) + "---:|",
    ]
    for row in rows:
        verdicts = []
        for name in judges:
            b = f"{row.get(f'{name}_before', '')} {_fmt(row.get(f'{name}_score_before'))}".strip()
            a = f"{row.get(f'{name}_after', '')} {_fmt(row.get(f'{name}_score_after'))}".strip()
            verdicts.append((b or "–") + (f" → {a}" if a else ""))
        coverage = row.get("mask_coverage")
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        name = row["image"].replace("|", "\\|")
        md.append(
            f"| {name} | {status.replace('|', '/')} | "
            + " | ".join(verdicts)
            + (" | " if verdicts else "")
            + ("–" if coverage is None else f"{100 * coverage:.1f}%")
            + " |"
        )
    md += ["", f"Thumbnails and masks: see {report.name}. Per-image data: {report.with_suffix('.csv').name}.", ""]

    report = Path(report)
    md_path, csv_path = report.with_suffix(".md"), report.with_suffix(".csv")
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    atomic_write_bytes(md_path, "\n".join(md).encode())
    atomic_write_bytes(report, page.encode())
    return report, md_path, csv_path
