"""The sanitize report: HTML (thumbnails before/after and the mask), Markdown and CSV, from a run's records.

Flagged images are blurred before they are embedded (the unblurred pixels are not in the file) unless
``show_unsafe``; an image is blurred on the side where it was flagged (before, after, or both). Masks are
drawn with :func:`~safe_diffusion.reports.images.mask_preview`: the edited share in colour over a grey
checkerboard, framed, so a mask that covers everything cannot pass for a missing image or for the page.

This module reads a sanitize output folder through :mod:`safe_diffusion.editing.sanitize`'s readers; the
mechanics never import it (the job that runs them writes the report).
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path

from ..editing.sanitize import display_path, list_items, load_records, read_state
from .images import mask_preview, png_b64, thumbnail
from .kit import KeyValues, MeasuredOn, Note, Page, Paragraph, Section, Table, markup, write_page

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


def _thumb(path: Path, flagged: bool, show_unsafe: bool):
    b64 = thumbnail(path, flagged and not show_unsafe, THUMB)  # None: removed or changed since the run
    return "–" if b64 is None else markup(f"<img alt='' src='data:image/png;base64,{b64}'>", "")


def mask_image(b64: str):
    """A recorded mask (base64 PNG) as the picture reports and the demo show (:func:`mask_preview`)."""
    import base64

    from PIL import Image

    return mask_preview(Image.open(io.BytesIO(base64.b64decode(b64))), THUMB)


def _mask_thumb(b64: str | None, coverage: float | None):
    if not b64:
        return "–"
    what = "mask" if coverage is None else f"mask, {100 * coverage:.1f}% of the image"
    return markup(
        f"<img class='mask' alt='{what}' title='{what}' src='data:image/png;base64,{png_b64(mask_image(b64))}'>", ""
    )


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


def _rows(items, records, judges) -> list[dict]:
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
    return rows


def _csv(rows: list[dict], judges: list[str]) -> bytes:
    columns = ["image", "status", "reason", "flagged_before", "flagged_after", "mask_coverage", "edit_mask_coverage"]
    for name in judges:
        columns += [f"{name}_before", f"{name}_score_before", f"{name}_after", f"{name}_score_after"]
    columns += ["width", "height", "work_width", "work_height", "seed", "seconds"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _edit_settings(config: dict, ledits: dict) -> list[tuple[str, object]]:
    lines = [
        ("model", config["model"]),
        ("removed", ", ".join(config["remove"]) or "–"),
        ("added", ", ".join(config["add"]) or "–"),
        ("edited", "flagged images only" if config["only_flagged"] else "every readable image"),
        ("judges", ", ".join(config["judges"]) or "none"),
        ("inversion/edit steps", ledits.get("num_inversion_steps", config["steps"])),
        ("skip", config["skip"]),
        (
            "edit scale s_e / threshold λ / warm-up",
            f"{config['scale']} / {config['threshold']} / {config['warmup_steps']}",
        ),
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
            lines.append((key.replace("_", " "), ledits[key]))
    return lines


def build_page(
    src: Path,
    out: Path,
    state: dict,
    items: list[str],
    records: dict[str, dict],
    rows: list[dict],
    summary: dict,
    *,
    show_unsafe: bool = False,
    csv_name: str = "report.csv",
) -> Page:
    """The report's :class:`~.kit.Page` from a run's state and records."""
    from ..common.provenance import random_weights

    config = state["config"]
    judges = list(config["judges"])
    ledits = state.get("ledits", {})
    counts = (
        f"{summary['files']} file(s): {summary['images']} image(s) and {summary['skipped']} skipped;"
        f" {summary['flagged_before']} flagged before; {summary['edited']} edited, of which"
        f" {summary['still_flagged_after']} still flagged after; {summary['copied']} copied unchanged"
        + (f"; {summary['pending']} not processed yet (rerun the command to finish)" if summary["pending"] else "")
        + "."
    )
    described = state.get("judges", [])
    judge_lines = [
        (name, _judge_essentials(d) if isinstance(d, dict) else str(d)) for name, d in zip(judges, described)
    ]
    random = random_weights(config["model"])
    measured = MeasuredOn(
        [
            {
                "label": "sanitize",
                "mitigation": f"LEDITS++: remove {', '.join(config['remove']) or '–'}"
                + (f"; add {', '.join(config['add'])}" if config["add"] else ""),
                "model": markup(
                    f"{html.escape(Path(config['model']).name or config['model'])}"
                    + (' <span class="badge random">random weights</span>' if random else ""),
                    config["model"] + (" [random weights]" if random else ""),
                ),
                "steps": ledits.get("num_inversion_steps", config["steps"]),
                "sampler": "DPM-Solver++(2M) SDE (LEDITS++ inversion)",
                "judges": "; ".join(
                    f"{n} ({_judge_essentials(d) if isinstance(d, dict) else d})" for n, d in zip(judges, described)
                )
                or "none (--all)",
                "prompts": None,
                "images": f"{summary['images']} of {summary['files']} file(s)",
            }
        ]
    )
    if random:
        measured.notes.append(
            Note("the model has random weights: its edits are noise.", "warning", id="random-weights-note")
        )
    blur_note = (
        "Flagged images are shown unblurred."
        if show_unsafe
        else "Flagged images are blurred (--show-unsafe to show them)."
    )
    mask_note = (
        "Mask: the pixels the edit may have changed, in orange over a grey checkerboard (a full mask is a solid"
        " orange square; an empty one the bare checkerboard): where the edit guidance acted, at any step, for any"
        " concept"
        + (
            ", grown by one latent cell and feathered; elsewhere the image is the input's own."
            if config.get("keep_unmasked", True)
            else "."
        )
    )
    head = ["image", "status", *(f"{n}: before → after" for n in judges), "mask coverage", "before", "after", "mask"]
    body = []
    for rel, row in zip(items, rows):
        r = records.get(rel, {})
        status = row["status"]
        cells: list = [row["image"], status + (f": {row['reason']}" if row.get("reason") else "")]
        for name in judges:
            b = f"{row.get(f'{name}_before', '')} {_fmt(row.get(f'{name}_score_before'))}".strip()
            a = f"{row.get(f'{name}_after', '')} {_fmt(row.get(f'{name}_score_after'))}".strip()
            text = (b or "–") + (f" → {a}" if a else "")
            cells.append(markup(html.escape(b or "–") + ("<br>→ " + html.escape(a) if a else ""), text))
        coverage = row.get("mask_coverage")
        cells.append("–" if coverage is None else f"{100 * coverage:.1f}%")
        readable = status in ("edited", "copied")
        cells.append(_thumb(src / rel, bool(r.get("flagged_before")), show_unsafe) if readable else "–")
        if status == "edited":
            cells.append(_thumb(out / rel, bool(r.get("flagged_after")), show_unsafe))
            cells.append(_mask_thumb(r.get("mask_png"), coverage))
        else:
            cells += ["–", "–"]
        body.append(cells)
    deviations = ledits.get("deviations_from_diffusers", [])
    settings = Section("Edit settings (LEDITS++)", [KeyValues(_edit_settings(config, ledits), id="edit-settings")])
    if deviations:
        settings.blocks.append(Paragraph(f"Deviations from diffusers' LEDITS++ pipelines: {'; '.join(deviations)}."))
    judges_section = Section("Judges", [KeyValues(judge_lines or [("none", "every image edited (--all)")])])
    images = Section(
        "Images",
        [
            Paragraph(f"{blur_note} {mask_note} Per-image data: {csv_name}."),
            Table([head], body, id="images", classes="images left", numeric=False),
        ],
    )
    return Page(
        "Sanitize report",
        measured,
        intro=[Paragraph(f"{display_path(str(src))} → {display_path(str(out))}"), Paragraph(counts, id="summary")],
        sections=[settings, judges_section, images],
    )


def write_report(src: Path, out: Path, report: Path, *, show_unsafe: bool = False) -> tuple[Path, Path, Path]:
    """Write `report` (.html) with its .md and .csv next to it, from the records in `out`."""
    src, out, report = Path(src), Path(out), Path(report)
    state = read_state(out)
    judges = list(state["config"]["judges"])
    items = list_items(src)
    records = load_records(out)
    # Items recorded by an earlier run whose files are gone from DIR are still reported.
    items = items + sorted(set(records) - set(items))
    summary = summarize(items, records)
    rows = _rows(items, records, judges)
    csv_path = report.with_suffix(".csv")
    page = build_page(src, out, state, items, records, rows, summary, show_unsafe=show_unsafe, csv_name=csv_path.name)
    html_path, md_path = write_page(page, report, files={csv_path.name: _csv(rows, judges)})
    return html_path, md_path, csv_path
