"""The evaluation report: runs side by side per suite — metrics with intervals, per category, charts, samples.

Each run is labelled by its mitigation (SD, negative prompt, SLD strong, UCE, ...), with "inactive: …"
when its guidance never acted (:mod:`safe_diffusion.guidance.activity`); labels are made unique with the
model or the run folder when two runs would share one. The page opens with what every figure is measured
on (model and identity, random weights, steps, sampler, judges with their models and thresholds, prompts
and images), then per suite: a "Not comparable" note where two runs differ in what their figures are
measured on (other prompts, other steps, other judges — :mod:`~safe_diffusion.reports.comparable`), the
metrics table (the runs' columns marked where not comparable), bar charts with one colour and pattern per
run, the judges' agreement, each run's full header and sample images. Categories without images say "no
images" (never a zero-height bar that reads as a measured 0). Samples are spread evenly over each
category's images (deterministic), and flagged ones are blurred before they are embedded (the unblurred
pixels are not in the file) unless ``show_unsafe``. Prompts are not printed; images are labelled by key.
"""

from __future__ import annotations

from pathlib import Path

from ..common.errors import InputError
from .charts import Bar, grouped_bars
from .comparable import differences
from .images import blur_note, thumbnail
from .kit import (
    Cell,
    ChartBlock,
    Figure,
    Gallery,
    KeyValues,
    MeasuredOn,
    Note,
    Page,
    Paragraph,
    Section,
    Table,
    check_page_path,
    write_page,
)
from .runs import RunInfo, measured_on_row, read_run, size_text

NO_IMAGES = "no images"
DEFINITIONS = (
    "Unsafe image rate: flagged images / images with a verdict. Attack success rate (ASR): prompts with at least"
    " one flagged image / prompts. Intervals: 95 % bootstrap over prompts. Images without a verdict are never"
    " counted as safe. I2P adds the paper's expected maximum inappropriateness (mean ± std over 10,000 draws of"
    " 25 prompts). Rates are fractions of 1."
)


def unique_labels(labels: list[str], models: list[str], paths: list[str]) -> list[str]:
    """Labels made unique: add the model's name, then as much of the run's path as it takes, then #n."""
    out = list(labels)

    def groups():
        seen: dict[str, list[int]] = {}
        for i, label in enumerate(out):
            seen.setdefault(label, []).append(i)
        return [g for g in seen.values() if len(g) > 1]

    for same in groups():
        if len({models[j] for j in same}) > 1:
            for j in same:
                out[j] = f"{out[j]} · {Path(models[j]).name or models[j]}"
    for same in groups():
        parts = {j: Path(paths[j]).resolve().parts for j in same}
        if len({parts[j] for j in same}) == len(same):
            depth = 1
            while len({parts[j][-depth:] for j in same}) < len(same):
                depth += 1
            for j in same:
                out[j] = f"{out[j]} ({'/'.join(parts[j][-depth:])})"
    for same in groups():
        for n, j in enumerate(same, 1):
            out[j] = f"{out[j]} #{n}"
    return out


def sample_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (deterministic)."""
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_ci(row: dict, name: str) -> str:
    if row["images"] == 0:
        return NO_IMAGES
    v = row.get(name)
    lo, hi = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def _exp_max(row: dict) -> str:
    if row["images"] == 0:
        return NO_IMAGES
    m, s = row.get("expected_max_inappropriateness"), row.get("expected_max_inappropriateness_std")
    return "–" if m is None else f"{m:.2f} ± {s:.2f}"


def _judge_summary(name: str, info: dict) -> str:
    """One line naming what determines a judge's verdicts."""
    keys = ("nudenet", "model", "model_file", "resolution", "threshold", "projection_dim", "version", "policy")
    parts = [f"{k}={info[k]}" for k in keys if k in info and not isinstance(info[k], (dict, list))]
    if "labels" in info:
        parts.append(f"labels={len(info['labels'])}")
    if "model_sha256" in info:
        parts.append(f"sha256={str(info['model_sha256'])[:12]}")
    pre = info.get("preprocessing")
    if isinstance(pre, dict) and "resize" in pre:
        parts.append(f"preprocessing={pre['resize']}, {pre.get('crop', '')}".rstrip(", "))
    return f"{name}: " + ", ".join(parts)


def run_header(doc: dict, counts: dict) -> list[tuple[str, str]]:
    """(field, value) pairs for a run's full header."""
    cfg = doc.get("config") or {}
    gen, model, mit = cfg.get("generation", {}), cfg.get("model", {}), cfg.get("mitigation", {})
    suite = doc.get("suite") or {}
    judges = doc.get("judges") or {}
    guidance = gen.get("guidance_scale")
    return [
        ("model", f"{model.get('reference', '?')} ({str(model.get('identity', ''))[:23]})"),
        (
            "mitigation",
            (doc.get("label") or mit.get("label", "?"))
            + (f" (SLD preset {mit['sld_preset']})" if mit.get("sld_preset") else ""),
        ),
        (
            "suite",
            f"{suite.get('title', suite.get('name', '?'))}: {suite.get('source', '?')}, {suite.get('rows', '?')} rows,"
            f" sha256 {str(suite.get('sha256', ''))[:12]}",
        ),
        (
            "generation",
            f"{gen.get('steps')} steps, guidance {guidance if guidance is not None else 'per prompt'},"
            f" {gen.get('dtype')}, {size_text(gen)},"
            f" {gen.get('images_per_prompt')} image(s)/prompt, batch {gen.get('batch_size')}",
        ),
        (
            "images",
            f"{counts.get('generated', '?')} of {counts.get('total', '?')} generated;"
            f" {counts.get('no_verdict', 0)} without a verdict",
        ),
        ("judges", "; ".join(_judge_summary(n, judges[n]) for n in sorted(judges)) or "none"),
        ("unsafe rule", (doc.get("rule") or {}).get("text", "any judge flags it")),
        ("created", doc.get("created") or "?"),
        ("versions", ", ".join(f"{k} {v}" for k, v in (doc.get("versions") or {}).items())),
    ]


def comparability(members: list[int], infos: list[RunInfo], labels: list[str]) -> dict[int, list[str]]:
    """Per run of a group (but the first), why its figures are not comparable with the first run's; runs that
    are comparable are left out."""
    first = members[0]
    out = {}
    for i in members[1:]:
        reasons = differences(infos[first].basis, infos[i].basis)
        if reasons:
            out[i] = reasons
    return out


def _metrics_table(members, infos, labels, i2p, incomparable) -> Table:
    per_run = 3 if i2p else 2
    head = [[Cell("category", rowspan=2), Cell("images", rowspan=2)]]
    for i in members:
        why = incomparable.get(i)
        head[0].append(
            Cell(
                labels[i],
                colspan=per_run,
                classes="not-comparable" if why else "",
                title=f"not comparable with {labels[members[0]]}: {'; '.join(why)}" if why else None,
            )
        )
    sub = []
    for _ in members:
        sub += ["unsafe image rate [95% CI]", "ASR [95% CI]"] + (["exp. max. inappr."] if i2p else [])
    head.append(sub)
    cats = categories(members, infos)
    rows, classes = [], []
    for cat in cats:
        imgs = "/".join(str(_row(infos[i], cat)["images"]) for i in members)
        row: list = [cat, imgs]
        for i in members:
            r = _row(infos[i], cat)
            row += [_with_ci(r, "unsafe_image_rate"), _with_ci(r, "attack_success_rate")]
            if i2p:
                row.append(_exp_max(r))
        rows.append(row)
        classes.append("overall" if cat == "overall" else "")
    return Table(head, rows, id=None, classes="metrics", row_classes=classes)


def categories(members: list[int], infos: list[RunInfo]) -> list[str]:
    """Every category of a group's runs (the first run's order, then the others'), "overall" last."""
    seen = dict.fromkeys(r["category"] for i in members for r in infos[i].doc["rows"] if r["category"] != "overall")
    return [*seen, "overall"]


def _row(info: RunInfo, category: str) -> dict:
    """A run's score row of `category` (a row without images when the run has none in it)."""
    return next((r for r in info.doc["rows"] if r["category"] == category), {"category": category, "images": 0})


def _chart(chart_id, members, infos, labels, incomparable, metric, ylabel, title):
    cats = categories(members, infos)
    series = []
    for i in members:
        rows = {r["category"]: r for r in infos[i].doc["rows"]}
        bars = {}
        for cat in cats:
            r = rows.get(cat)
            if r is None or r["images"] == 0 or r.get(metric) is None:
                continue
            bars[cat] = Bar(r[metric], r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high"))
        series.append((labels[i] + (" †" if i in incomparable else ""), bars))
    return grouped_bars(chart_id, cats, series, ylabel=ylabel, title=title)


def _agreement(i: int, info: RunInfo, label: str) -> list:
    agree = info.doc.get("agreement") or []
    if not agree:
        return []
    rows = [
        [
            " vs ".join(a["judges"]),
            a["images"],
            _fmt(a["agreement"]),
            _fmt(a["kappa"]),
            a["only_first"],
            a["only_second"],
            a["both_unsafe"],
        ]
        for a in agree
    ]
    head = [["judges", "images", "agree", "Cohen's κ", "only first", "only second", "both unsafe"]]
    return [Paragraph(f"Judges' agreement ({label}):"), Table(head, rows)]


def _label_counts(info: RunInfo, label: str) -> list:
    """The erasure papers' NudeNet class counts (ESD, UCE, RECE): images in which each class is found."""
    counted = info.doc.get("nudenet_label_counts")
    if not counted:
        return []
    head = [["NudeNet class", "images"]]
    rows = [[name, n] for name, n in counted["counts"].items()]
    note = (
        f"NudeNet classes found ({label}; set-up {counted.get('setup')}, score {counted.get('comparison')} "
        f"{counted.get('threshold')}, {counted['images']} images judged"
        + (f", {counted['no_verdict']} without a verdict" if counted.get("no_verdict") else "")
        + "):"
    )
    return [Paragraph(note), Table(head, rows)]


def _samples(info: RunInfo, label: str, cats: list[str], samples: int, show_unsafe: bool) -> Section:
    section = Section(label, level=4)
    for cat in cats:
        chosen = [r for r in info.records if cat in r["categories"].split(",")]
        picks = [chosen[j] for j in sample_indices(len(chosen), samples)]
        if not picks:
            section.blocks.append(Paragraph(f"{cat}: {NO_IMAGES}"))
            continue
        figures = []
        for r in picks:
            flagged = r["unsafe"] is not False
            state = {True: " flagged", None: " no verdict", False: ""}[r["unsafe"]]
            figures.append(
                Figure(
                    thumbnail(r["image"], flagged and not show_unsafe),
                    f"#{r['prompt_index']}/{r['image_index']}{state}",
                    alt=f"{cat} sample",
                )
            )
        section.blocks.append(Gallery(figures, title=cat))
    return section


def build_page(
    infos: list[RunInfo], labels: list[str], *, show_unsafe: bool = False, samples: int = 4, attacked=()
) -> Page:
    """The report's :class:`~.kit.Page` for read runs with their (unique) labels; `attacked`: methods (from
    :func:`~.methods.collect`) whose attack runs get an "Under attack" section."""
    from .attacks import attack_footer, attack_measured_on_rows, attack_section

    groups: dict[tuple, list[int]] = {}
    for i, info in enumerate(infos):
        groups.setdefault((info.suite.get("name"), info.suite.get("sha256")), []).append(i)
    blur = blur_note(show_unsafe)
    measured = MeasuredOn(
        [measured_on_row(info, label=labels[i]) for i, info in enumerate(infos)]
        + attack_measured_on_rows(list(attacked))
    )
    for label, problems in zip(labels, (image_problems(info) for info in infos)):
        if problems:
            listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            measured.notes.append(
                Note(
                    f"{label}: {len(problems)} recorded image(s) are missing or damaged and are left out of its"
                    f" samples ({listed}); its figures were scored before. Rerun its `eval run` to regenerate them.",
                    "warning",
                )
            )
    if any(info.basis.random_weights for info in infos):
        measured.notes.append(
            Note(
                "runs on a random-weight checkpoint measure noise, not a model: their figures"
                " say nothing about any real model.",
                "warning",
                id="random-weights-note",
            )
        )
    sections = []
    for g, ((name, _), members) in enumerate(groups.items()):
        first = infos[members[0]]
        section = Section(str(first.suite.get("title") or name), id=f"suite-{g}")
        i2p = all(infos[i].doc.get("i2p") for i in members)
        incomparable = comparability(members, infos, labels)
        for i, reasons in incomparable.items():
            section.blocks.append(
                Note(
                    f"{labels[i]} (†) and {labels[members[0]]}: {'; '.join(reasons)}. Their"
                    " figures are not read side by side.",
                    "not-comparable",
                    id=f"not-comparable-{g}-{i}",
                )
            )
        metrics = Section("Metrics", [_metrics_table(members, infos, labels, i2p, incomparable)], level=3)
        metrics.blocks.append(
            ChartBlock(
                _chart(
                    f"chart-{g}-rate",
                    members,
                    infos,
                    labels,
                    incomparable,
                    "unsafe_image_rate",
                    "unsafe image rate (fraction of images, 95 % CI)",
                    "Unsafe image rate per category",
                )
            )
        )
        if any(infos[i].doc["rows"][-1].get("prompts") != infos[i].doc["rows"][-1].get("images") for i in members):
            metrics.blocks.append(
                ChartBlock(
                    _chart(
                        f"chart-{g}-asr",
                        members,
                        infos,
                        labels,
                        incomparable,
                        "attack_success_rate",
                        "attack success rate (fraction of prompts, 95 % CI)",
                        "Attack success rate per category",
                    )
                )
            )
        for i in members:
            metrics.blocks += _agreement(i, infos[i], labels[i])
            metrics.blocks += _label_counts(infos[i], labels[i])
        section.sections.append(metrics)
        for i in members:
            counts = {**infos[i].status, "no_verdict": infos[i].doc["rows"][-1]["no_verdict"]}
            section.sections.append(Section(labels[i], [KeyValues(run_header(infos[i].doc, counts))], level=3))
        if samples:
            cats = categories(members, infos)[:-1]
            gallery = Section("Samples", [Paragraph(f"{blur} Images are spread evenly over each category.")], level=3)
            gallery.sections = [_samples(infos[i], labels[i], cats, samples, show_unsafe) for i in members]
            section.sections.append(gallery)
        sections.append(section)
    footer = [Paragraph("Runs: " + "; ".join(f"{labels[i]}: {info.path}" for i, info in enumerate(infos)))]
    footer = footer if infos else []
    attack = attack_section(list(attacked), samples=samples, show_unsafe=show_unsafe)
    if attack is not None:
        sections.append(attack)
        footer.append(attack_footer(list(attacked)))
    return Page("Safety evaluation report", measured, intro=[Paragraph(DEFINITIONS)], sections=sections, footer=footer)


def image_problems(info: RunInfo) -> list[str]:
    """'RUN/images/x.png missing' for each recorded image of the run whose file is not the recorded one."""
    found = (info.status or {}).get("image_problems") or {}
    return [f"{Path(info.path) / name} {why}" for name, why in sorted(found.items())]


class Written(tuple):
    """(html, md) of a written report; ``problems``: the runs' missing or damaged images, by name."""

    problems: list[str]


def write_report(
    runs: list[str], out: Path, *, show_unsafe: bool = False, samples: int = 4, labels: list[str] | None = None
) -> Written:
    """Write `out` (HTML) and its Markdown twin for `runs` (the folder is created if missing); `labels` name
    the runs (default: their mitigation), and say "inactive" where a run's guidance never acted."""
    from ..guidance.activity import run_label

    out = check_page_path(out)
    if not runs:
        raise InputError("name at least one run")
    if labels is not None and len(labels) != len(runs):
        raise InputError(f"{len(labels)} --label value(s) for {len(runs)} run(s); give one per run, in order")
    from ..jobs.attack import is_attack_run
    from .methods import collect

    attack_runs = [i for i, run in enumerate(runs) if is_attack_run(run)]
    attacked = collect(
        [runs[i] for i in attack_runs], [labels[i] for i in attack_runs] if labels else None
    )  # attack runs: their pre- and post-attack ASR in a section of their own
    kept = [i for i in range(len(runs)) if i not in attack_runs]
    runs, labels = [runs[i] for i in kept], [labels[i] for i in kept] if labels else None
    infos = [read_run(run, scores=True) for run in runs]
    base = list(labels) if labels else [info.mitigation.get("label") or "SD" for info in infos]
    base = unique_labels(base, [info.model for info in infos], list(runs))
    names = [run_label(info.config, name) for info, name in zip(infos, base)]
    page = build_page(infos, names, show_unsafe=show_unsafe, samples=samples, attacked=attacked)
    written = Written(write_page(page, out))
    written.problems = [p for info in infos for p in image_problems(info)]
    return written
