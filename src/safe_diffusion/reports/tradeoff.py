"""What a mitigation buys in safety and what it costs in quality: one page across methods.

The methods and their figures come from :mod:`~safe_diffusion.reports.methods`. The page is a table —
per method its safety figure(s) with 95 % intervals, the published figure only where the run was made on
that figure's base model and protocol (:func:`~safe_diffusion.reports.comparable.published_basis`; else
"not shown" and why), CLIP score, FID and KID — and a scatter plot of safety against quality whose axes
start at zero. Whatever would mislead is said where the number stands: a random-weight model or CLIP, a
Fréchet distance on features other than InceptionV3's (not FID), runs generated with other steps, figures
over other prompts. HTML (chart inline), Markdown and the plot as a PNG next to them.
"""

from __future__ import annotations

import html
from pathlib import Path

from ..guidance.activity import run_label
from .attacks import attack_footer, attack_measured_on_rows, attack_section, rate_text
from .charts import Point, scatter
from .comparable import differences
from .kit import (
    Cell,
    ChartBlock,
    MeasuredOn,
    Note,
    Page,
    Paragraph,
    Section,
    Table,
    check_page_path,
    markup,
    write_page,
)
from .methods import Method, collect, settings_differences, steps_by_suite
from .runs import label_cell, measured_on_row, model_cell


def _num(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _badged(text: str, badge: str | None, title: str | None = None) -> object:
    if not badge:
        return text
    tip = f' title="{html.escape(title)}"' if title else ""
    return markup(
        f'{html.escape(text)} <span class="badge random"{tip}>{html.escape(badge)}</span>', f"{text} ({badge})"
    )


def _marked(text, reasons: list[str] | None, against: str) -> Cell:
    if not reasons:
        return Cell(text)
    return Cell(text, classes="not-comparable", title=f"not comparable with {against}: {'; '.join(reasons)}")


def _incomparable(entries: list[tuple[Method, object]]) -> dict[str, list[str]]:
    """Per method label, why its figure is not comparable with the first method's (which has the same kind)."""
    if not entries:
        return {}
    first_basis = entries[0][1]
    return {m.label: why for m, basis in entries[1:] if (why := differences(first_basis, basis))}


def build_page(methods: list[Method], *, chart_file: str | None = None) -> Page:
    attacked, everyone = attack_section(methods), methods
    methods = [m for m in methods if m.runs]  # a method seen only under attack has no row in the main table
    suites = list(dict.fromkeys(s for m in methods for s in m.safety))
    names = {m.label: m.name for m in methods}
    has_published = {s: any(m.safety.get(s) and m.safety[s].published_shown for m in methods) for s in suites}
    safety_marks = {s: _incomparable([(m, m.safety[s].run.basis) for m in methods if s in m.safety]) for s in suites}
    quality_marks = _incomparable([(m, m.quality.basis) for m in methods if m.quality])
    first_safety = {s: next(m.label for m in methods if s in m.safety) for s in suites}
    first_quality = next((m.label for m in methods if m.quality), "")
    standard = all(m.quality is None or m.quality.features_caveat is None for m in methods)
    fid_name, kid_name = (
        ("FID", "KID")
        if standard
        else ("Fréchet distance (FID only on InceptionV3)", "kernel distance (KID only on InceptionV3)")
    )
    head = ["method", "model"]
    for s in suites:
        metric = next(m.safety[s].metric for m in methods if s in m.safety)
        head.append(f"{s}: {metric} [95% CI]")
        if has_published[s]:
            head.append(f"{s}: published (SLD model card, SD 1.4)")
    head += ["CLIP score", fid_name, kid_name, "quality images"]
    rows = []
    for m in methods:
        row: list = [label_cell(m.label), model_cell(m.runs[0])]
        for s in suites:
            entry = m.safety.get(s)
            if entry is None:
                row.append("—")
            else:
                text = rate_text(entry.value, entry.low, entry.high)
                if entry.run.basis.random_judges:
                    text = _badged(text, f"{', '.join(entry.run.basis.random_judges)} on random weights")
                row.append(_marked(text, safety_marks[s].get(m.label), first_safety[s]))
            if has_published[s]:
                if entry is None or entry.published is None:
                    row.append("—")
                elif entry.published_shown:
                    row.append(f"{entry.published:.2f}")
                else:
                    row.append(
                        Cell(
                            "not shown",
                            classes="not-comparable",
                            title="not comparable: " + "; ".join(entry.published_differences),
                        )
                    )
        q = m.quality
        if q is None:
            row += ["—", "—", "—", "—"]
        else:
            reasons = quality_marks.get(m.label)
            row.append(
                _marked(
                    _badged(_num(q.clip_score), "random CLIP" if q.clip_caveat else None, q.clip_caveat),
                    reasons,
                    first_quality,
                )
            )
            badge = "not FID" if q.features_caveat else None
            row.append(_marked(_badged(_num(q.fid), badge, q.features_caveat), reasons, first_quality))
            row.append(
                _marked(
                    _badged(_num(q.kid, 3), "not KID" if badge else None, q.features_caveat), reasons, first_quality
                )
            )
            row.append(str(q.images or "—"))
        rows.append(row)
    table = Table([head], rows, id="tradeoff-table")

    notes: list = [
        Paragraph(
            "Safety: the I2P paper's inappropriate probability (unsafe image rate under the run's unsafe rule) or the"
            " attack success rate (prompts with at least one flagged image), fractions of 1 with bootstrap 95 %"
            " intervals. Quality: CLIP score (100·max(cos, 0)), FID and KID against each run's reference."
        )
    ]
    random_models = [m.name for m in everyone if m.random_weights or any(a.random_weights for a in m.attacks)]
    if random_models:
        notes.append(
            Note(
                f"{', '.join(random_models)}: random-weight checkpoints. Their safety and quality figures"
                " measure noise, not a model.",
                "warning",
                id="random-weights-note",
            )
        )
    caveats = sorted({m.quality.features_caveat for m in methods if m.quality and m.quality.features_caveat})
    for caveat in caveats:
        who = [m.name for m in methods if m.quality and m.quality.features_caveat == caveat]
        notes.append(
            Note(
                f"{', '.join(who)}: the Fréchet and kernel distances come from {caveat}.", "warning", id="features-note"
            )
        )
    clip_caveats = [m.name for m in methods if m.quality and m.quality.clip_caveat]
    if clip_caveats:
        notes.append(
            Note(
                f"{', '.join(clip_caveats)}: the CLIP score comes from a CLIP with random weights, not a"
                " CLIP score of any real model.",
                "warning",
                id="clip-note",
            )
        )
    for s in suites:
        hidden = [
            (m.name, m.safety[s].published_differences)
            for m in methods
            if s in m.safety and m.safety[s].published is not None and not m.safety[s].published_shown
        ]
        if hidden:
            notes.append(
                Note(
                    f"the published {s} figure (SLD model card: SD 1.4, all 4,703 prompts, 10 images per prompt) is not"
                    " shown beside " + "; ".join(f"{label} ({', '.join(why)})" for label, why in hidden) + ".",
                    "not-comparable",
                    id="published-not-shown",
                )
            )
        for label, why in safety_marks[s].items():
            notes.append(
                Note(f"{s}: {names[label]} (†) and {names[first_safety[s]]}: {'; '.join(why)}.", "not-comparable")
            )
    for label, why in quality_marks.items():
        notes.append(
            Note(f"quality: {names[label]} (†) and {names[first_quality]}: {'; '.join(why)}.", "not-comparable")
        )
    steps = steps_by_suite(methods)
    if len({s for values in steps.values() for s in values}) > 1:
        notes.append(
            Note(
                "runs used different steps: "
                + "; ".join(f"{suite} {', '.join(map(str, values))}" for suite, values in steps.items())
                + ". A method's safety and quality figures may come from differently generated images.",
                "warning",
                id="steps-note",
            )
        )
    for m in methods:
        own = settings_differences(m)
        if own:
            notes.append(Note(f"{m.name}: its runs were generated differently ({'; '.join(own)}).", "warning"))
    clips = sorted({str(m.quality.clip_model) for m in methods if m.quality and m.quality.clip_model})
    if clips:
        notes.append(
            Paragraph(
                f"CLIP score with {', '.join(clips)}; FID/KID against each run's reference (see its"
                " quality-result in the run store)."
            )
        )

    blocks: list = [table]
    chart = _scatter(methods, quality_marks, standard)
    if chart is not None:
        chart.file = chart_file
        blocks.append(ChartBlock(chart))
    rows = []
    for m in methods:
        for r in m.runs:
            row = measured_on_row(r, label=run_label(r.config, f"{m.name} · {r.suite_title}"))
            if m.quality is not None and m.quality.run is r:  # what its quality figures are measured with
                q = m.quality
                clip = f"CLIP {Path(str(q.clip_model)).name}{' (random weights)' if q.clip_caveat else ''}"
                features = f"FID features {q.features}{' (not FID)' if q.features_caveat else ''}"
                judged = "" if row["judges"] == "none" else f"{row['judges']}; "
                row["judges"] = judged + "; ".join(p for p, ok in ((clip, q.clip_model), (features, q.features)) if ok)
            rows.append(row)
    rows += attack_measured_on_rows(everyone)
    measured = MeasuredOn(rows)
    footer = [Paragraph("Runs: " + "; ".join(f"{m.label}: {', '.join(r.path for r in m.runs)}" for m in methods))]
    footer = footer if methods else []
    if attacked is not None:
        footer.append(attack_footer(everyone))
    sections = [Section("Methods", blocks + notes)] if methods else []
    if attacked is not None:
        sections.append(attacked)
    return Page("Safety–quality trade-off", measured, sections=sections, footer=footer)


def _scatter(methods: list[Method], quality_marks: dict, standard: bool):
    x_key = "fid" if any(m.quality and m.quality.fid is not None for m in methods) else "clip_score"
    points = []
    for m in methods:
        first = next(iter(m.safety.values()), None)
        x = getattr(m.quality, x_key) if m.quality else None
        if first is None or first.value is None or x is None:
            continue
        mark = " †" if m.label in quality_marks else ""
        points.append(Point(m.label + mark, x, first.value, first.low, first.high))
    if not points:
        return None
    metric = next(next(iter(m.safety.values())).metric for m in methods if m.safety)
    if x_key == "fid":
        xlabel = "FID (lower is better)" if standard else "Fréchet distance on non-Inception features (not FID)"
    else:
        xlabel = "CLIP score, 100·cos (higher is better)"
    return scatter(
        "tradeoff-chart",
        points,
        xlabel=xlabel,
        ylabel=f"{metric} (fraction, lower is safer)",
        title="Safety against quality, one point per method (95 % intervals)",
        png=True,
    )


def write_tradeoff(runs: list[str], out: str | Path, *, labels: list[str] | None = None) -> tuple[Path, Path]:
    """Write `out` (HTML), its Markdown twin and the plot (PNG) next to it, creating the folder if missing;
    returns (html, md)."""
    out = check_page_path(out, companions=(".md", ".png"))
    methods = collect(runs, labels)
    plot = out.with_suffix(".png")
    page = build_page(methods, chart_file=plot.name)
    files = {}
    chart = next((b.chart for s in page.sections for b in s.blocks if isinstance(b, ChartBlock)), None)
    if chart is not None and chart.png:
        files[plot.name] = chart.png
    return write_page(page, out, files=files)
