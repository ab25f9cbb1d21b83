"""The audit report (``safe-diffusion audit``): per-image verdicts of every judge, a summary, the judges' settings.

Built by :func:`safe_diffusion.jobs.audit.audit` from its record and judgments. Images that a judge
flagged, or that have no verdict, are blurred in the previews unless ``show_unsafe``; "no verdict" is
shown as such, never as safe; every judge's full ``describe()`` is one click away under its headline.
"""

from __future__ import annotations

import html
from typing import Any

from .images import thumbnail
from .kit import Cell, Details, MeasuredOn, Page, Paragraph, Section, Table, markup

#: describe() keys a report's one-line summary of a judge shows, in this order, where the judge has them.
HEADLINE_KEYS = (
    "model",
    "commit",
    "prompts_sha256",
    "model_file",
    "model_sha256",
    "resolution",
    "labels",
    "threshold",
    "policy.name",
    "policy.sha256",
    "generation.max_new_tokens",
    "dtype",
    "nudenet",
    "transformers",
)
PREVIEW = 96


def verdict_word(unsafe: bool | None) -> str:
    return "no verdict" if unsafe is None else "flagged" if unsafe else "not flagged"


def essentials(info: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A judge's describe() flattened to (key, value) lines; long texts (a custom policy) shortened."""
    if isinstance(info, dict):
        return [
            line for k, v in info.items() for line in essentials(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
        ]
    if isinstance(info, (list, tuple)):
        value = ", ".join(str(v) for v in info)
    else:
        value = "–" if info is None else str(info)
    if len(value) > 240:
        value = f"{value[:120]}… ({len(value)} characters; recorded in full in the JSON)"
    return [(prefix, value)]


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


def _verdict_cell(j) -> Cell:
    word = verdict_word(j.unsafe)
    parts = [f"<b>{word}</b>"]
    plain = [word]
    if "score" in j.scores:
        parts.append(f"{j.scores['score']:.3f}")
        plain.append(f"{j.scores['score']:.3f}")
    if j.category:
        parts.append(html.escape(j.category))
        plain.append(j.category)
    body = " ".join(parts)
    if j.rationale:
        body += f"<div class='why'>{html.escape(j.rationale)}</div>"
    if j.error:
        text = j.error if len(j.error) <= 300 else j.error[:300] + "…"
        body += f"<div class='why'>{html.escape(text)}</div>"
    return Cell(markup(body, " ".join(plain)), classes=word.replace(" ", "-"))


def build_page(
    record: dict,
    images: list,
    judgments: dict,
    names: list[str],
    unsafe: list[bool | None],
    *,
    show_unsafe: bool = False,
    json_name: str = "report.json",
) -> Page:
    """The audit's :class:`~.kit.Page` from its record, the judged images ((path, name) pairs), the judgments
    and each image's verdict under the audit's rule (`unsafe`)."""
    from ..common.provenance import random_weights
    from .runs import judges_text

    counts, described = record["counts"], record["judges"]
    random = tuple(n for n, info in described.items() if random_weights(info.get("model")))
    measured = MeasuredOn(
        [
            {
                "judges": judges_text(described, random),
                "images": f"{counts['judged']} judged of {counts['files']} file(s)",
            }
        ]
    )
    summary = (
        f"{counts['files']} file(s): {counts['judged']} image(s) judged, {counts['skipped']} skipped."
        f" {counts['flagged']} flagged, {counts['no_verdict']} without a verdict ({record['rule']})."
        + ("" if show_unsafe else " Flagged images and images without a verdict are blurred.")
    )
    per_judge = []
    for n, c in counts["judges"].items():
        reasons = c["no_verdict_reasons"]
        no_verdict = str(c["no_verdict"]) + (
            " (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""
        )
        per_judge.append([n, c["flagged"], c["not_flagged"], no_verdict])
    judges = Section(
        "Judges",
        [
            Details(
                f"{n}: {headline(info)}", [Table([["setting", "value"]], essentials(info), classes="kv", numeric=False)]
            )
            for n, info in described.items()
        ],
    )
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    judges.blocks.append(Paragraph(f"{versions}. Full settings: {json_name}."))
    sections = [judges]
    if record["skipped"]:
        sections.append(
            Section(
                f"Skipped files ({len(record['skipped'])})",
                [Table([["file", "reason"]], [[s["file"], s["reason"]] for s in record["skipped"]], numeric=False)],
            )
        )
    rows = []
    for i, (path, name) in enumerate(images):
        verdicts = [judgments[n][i] for n in names]
        preview = thumbnail(path, unsafe[i] is not False and not show_unsafe, PREVIEW)
        img = markup(f"<img alt='' src='data:image/png;base64,{preview}'>", "") if preview else "–"
        rows.append([name, *(_verdict_cell(j) for j in verdicts), img])
    sections.append(
        Section("Images", [Table([["image", *names, "preview"]], rows, id="images", classes="images", numeric=False)])
    )
    return Page(
        f"Image audit of {record['folder']}",
        measured,
        intro=[
            Paragraph(summary, id="summary"),
            Table([["judge", "flagged", "not flagged", "no verdict"]], per_judge, id="judge-summary"),
        ],
        sections=sections,
    )
