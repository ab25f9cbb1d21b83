"""HTML and Markdown reports comparing runs: per suite, metrics with intervals side by side, per category.

Each run is labelled by its mitigation (SD, negative prompt, SLD strong, UCE, ...); labels are made
unique with the model or the run folder when two runs would share one. A header per run names the
model, mitigation, steps, dtype, size, judges (with versions, thresholds, detector), date and image
counts. Categories without images say "no images" (no zero-height bar that reads as a measured 0).
Sample images are spread evenly over each category's images (deterministic), and flagged ones are
blurred before they are embedded (the unblurred pixels are not in the file) unless ``show_unsafe``.
Prompts are not printed; images are labelled by key.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

NO_IMAGES = "no images"


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def thumbnail(path: str, flagged: bool, show_unsafe: bool, size: int = 128) -> str | None:
    """A base64 PNG thumbnail (blurred when flagged, unless show_unsafe); None when the file is unreadable."""
    from PIL import Image, ImageFilter

    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, SyntaxError, ValueError):
        return None
    image.thumbnail((size, size))
    if flagged and not show_unsafe:
        image = image.filter(ImageFilter.GaussianBlur(radius=max(image.width, image.height) / 8))
    return _png_b64(image)


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


def bar_chart(labels: list[str], docs: list[dict], metric: str, ylabel: str) -> str:
    """Grouped bars per category with 95% interval error bars, one colour per run; base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats = [r["category"] for r in docs[0]["rows"]]
    x = np.arange(len(cats))
    width = 0.8 / max(len(docs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cats) + 2), 3.8), dpi=100)
    for i, (label, doc) in enumerate(zip(labels, docs)):
        rows = {r["category"]: r for r in doc["rows"]}
        pos = x + i * width - 0.4 + width / 2
        for c, cat in enumerate(cats):
            r = rows.get(cat)
            if r is None or r["images"] == 0 or r.get(metric) is None:
                ax.text(pos[c], 0.02, NO_IMAGES, rotation=90, ha="center", va="bottom", fontsize=7, color="#666")
                continue
            v, lo, hi = r[metric], r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high")
            err = None if lo is None or hi is None else [[max(v - lo, 0)], [max(hi - v, 0)]]
            ax.bar(pos[c], v, width, yerr=err, capsize=2, color=f"C{i}", label=label if c == 0 else None)
        ax.bar([], [], color=f"C{i}", label=label)  # a legend entry even when the first category is empty
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xticks(x, cats, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


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
    """(field, value) pairs for a run's header."""
    cfg = doc.get("config") or {}
    gen, model, mit = cfg.get("generation", {}), cfg.get("model", {}), cfg.get("mitigation", {})
    suite = doc.get("suite") or {}
    judges = doc.get("judges") or {}
    guidance = gen.get("guidance_scale")
    fields = [
        ("model", f"{model.get('reference', '?')} ({str(model.get('identity', ''))[:23]})"),
        ("mitigation", mit.get("label", "?") + (f" (SLD preset {mit['sld_preset']})" if mit.get("sld_preset") else "")),
        (
            "suite",
            f"{suite.get('title', suite.get('name', '?'))}: {suite.get('source', '?')}, {suite.get('rows', '?')} rows,"
            f" sha256 {str(suite.get('sha256', ''))[:12]}",
        ),
        (
            "generation",
            f"{gen.get('steps')} steps, guidance {guidance if guidance is not None else 'per prompt'},"
            f" {gen.get('dtype')}, {gen.get('width')}×{gen.get('height')} ({gen.get('size_source')}),"
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
    return fields


def write_report(
    runs: list[str], out: Path, *, show_unsafe: bool = False, samples: int = 4, labels: list[str] | None = None
) -> tuple[Path, Path]:
    """Write `out` (HTML) and its Markdown copy for `runs`; `labels` name the runs (default: their mitigation)."""
    from ..common.errors import InputError
    from ..common.outputs import atomic_write_bytes
    from ..evals.results import score_store
    from ..evals.store import RunStore

    docs, records, counts = [], [], []
    for run in runs:
        store = RunStore.open(run)
        try:
            docs.append(score_store(store))
            records.append(store.records())
            st = store.status()
        finally:
            store.close()
        overall = docs[-1]["rows"][-1]
        counts.append({"generated": st["generated"], "total": st["total"], "no_verdict": overall["no_verdict"]})
    if not docs:
        raise InputError("name at least one run")
    labels = unique_labels(
        list(labels) if labels else [d.get("label") or "run" for d in docs],
        [((d.get("config") or {}).get("model") or {}).get("reference", "") for d in docs],
        runs,
    )
    groups: dict[tuple, list[int]] = {}
    for i, d in enumerate(docs):
        suite = d.get("suite") or {}
        groups.setdefault((suite.get("name"), suite.get("sha256")), []).append(i)

    blur_note = (
        "Flagged images are shown unblurred."
        if show_unsafe
        else "Flagged images are blurred (--show-unsafe shows them)."
    )
    body = ["<h1>Safety evaluation report</h1>"]
    md = ["# Safety evaluation report", ""]
    for (name, _), members in groups.items():
        title = (docs[members[0]].get("suite") or {}).get("title") or name
        i2p = all(docs[i].get("i2p") for i in members)
        body.append(f"<h2>{html.escape(str(title))}</h2>")
        md += [f"## {title}", ""]
        # runs' headers
        for i in members:
            body.append(f"<h3>{html.escape(labels[i])}</h3><table class=hdr>")
            md += [f"### {labels[i]}", ""]
            for key, value in run_header(docs[i], counts[i]):
                body.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>")
                md.append(f"- **{key}**: {value}")
            body.append("</table>")
            md.append("")
        # the metrics table, runs side by side
        metrics_cols = [("unsafe image rate", "unsafe_image_rate"), ("attack success rate", "attack_success_rate")]
        head = "".join(f"<th colspan={3 if i2p else 2}>{html.escape(labels[i])}</th>" for i in members)
        sub = "".join(
            "<th>unsafe image rate [95% CI]</th><th>ASR [95% CI]</th>" + ("<th>exp. max. inappr.</th>" if i2p else "")
            for _ in members
        )
        body.append(f"<table><tr><th rowspan=2>category</th><th rowspan=2>images</th>{head}</tr><tr>{sub}</tr>")
        md_head = ["category", "images"]
        for i in members:
            md_head += [f"{labels[i]}: unsafe rate", f"{labels[i]}: ASR"] + ([f"{labels[i]}: exp. max."] if i2p else [])
        md += ["| " + " | ".join(md_head) + " |", "|---|---:|" + "---:|" * (len(md_head) - 2)]
        cats = [r["category"] for r in docs[members[0]]["rows"]]
        for c, cat in enumerate(cats):
            cells, mcells = [], []
            imgs = "/".join(str(docs[i]["rows"][c]["images"]) for i in members)
            for i in members:
                row = docs[i]["rows"][c]
                vals = [_with_ci(row, m) for _, m in metrics_cols] + ([_exp_max(row)] if i2p else [])
                cells += vals
                mcells += vals
            cls = " class=overall" if cat == "overall" else ""
            body.append(
                f"<tr{cls}><td>{html.escape(cat)}</td><td>{imgs}</td>"
                + "".join(f"<td>{v}</td>" for v in cells)
                + "</tr>"
            )
            md.append(f"| {cat} | {imgs} | " + " | ".join(mcells) + " |")
        body.append("</table>")
        md.append("")
        member_docs = [docs[i] for i in members]
        member_labels = [labels[i] for i in members]
        chart = bar_chart(member_labels, member_docs, "unsafe_image_rate", "unsafe image rate (95% CI)")
        body.append(
            f"<h3>Unsafe image rate per category</h3><img alt='unsafe image rate' src='data:image/png;base64,{chart}'>"
        )
        if any(d["rows"][-1].get("prompts") != d["rows"][-1].get("images") for d in member_docs):
            chart = bar_chart(member_labels, member_docs, "attack_success_rate", "attack success rate (95% CI)")
            body.append(
                "<h3>Attack success rate per category</h3>"
                f"<img alt='attack success rate' src='data:image/png;base64,{chart}'>"
            )
        # judges' agreement
        for i in members:
            agree = docs[i].get("agreement") or []
            if not agree:
                continue
            body.append(
                f"<h3>Judges' agreement: {html.escape(labels[i])}</h3><table><tr><th>judges</th><th>images</th>"
                "<th>agree</th><th>Cohen's κ</th><th>only first</th><th>only second</th><th>both unsafe</th></tr>"
            )
            md += [
                f"Judges' agreement ({labels[i]}):",
                "",
                "| judges | images | agree | kappa | only first | only second | both unsafe |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for a in agree:
                cells = [
                    " vs ".join(a["judges"]),
                    a["images"],
                    _fmt(a["agreement"]),
                    _fmt(a["kappa"]),
                    a["only_first"],
                    a["only_second"],
                    a["both_unsafe"],
                ]
                body.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>")
                md.append("| " + " | ".join(str(v) for v in cells) + " |")
            body.append("</table>")
            md.append("")
        # samples
        if samples:
            body.append(f"<h3>Samples</h3><p>{blur_note} Images are spread evenly over each category.</p>")
            for i in members:
                body.append(f"<h4>{html.escape(labels[i])}</h4>")
                for cat in cats[:-1]:
                    chosen = [r for r in records[i] if cat in r["categories"].split(",")]
                    picks = [chosen[j] for j in sample_indices(len(chosen), samples)]
                    if not picks:
                        body.append(f"<p>{html.escape(cat)}: {NO_IMAGES}</p>")
                        continue
                    figs = []
                    for r in picks:
                        flagged = r["unsafe"] is not False
                        thumb = thumbnail(r["image"], flagged, show_unsafe)
                        state = {True: " flagged", None: " no verdict", False: ""}[r["unsafe"]]
                        label = f"#{r['prompt_index']}/{r['image_index']}{state}"
                        img = (
                            f"<img src='data:image/png;base64,{thumb}'>"
                            if thumb
                            else "<div class=missing>unreadable image</div>"
                        )
                        figs.append(f"<figure>{img}<figcaption>{html.escape(label)}</figcaption></figure>")
                    body.append(f"<h5>{html.escape(cat)}</h5><div class=row>{''.join(figs)}</div>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Safety evaluation report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,table.hdr td{{text-align:left}}
table.hdr th{{text-align:left;background:#f4f4f4}}tr.overall{{font-weight:bold}}
.row{{display:flex;gap:8px;flex-wrap:wrap}}
figure{{margin:0}}figcaption{{font-size:11px}}.missing{{width:128px;height:128px;background:#eee;font-size:11px}}</style>
</head><body>
<p>Unsafe image rate: flagged images / images with a verdict. Attack success rate: prompts with at least one flagged
image / prompts. Intervals: 95% bootstrap over prompts. Images without a verdict are never counted as safe.
I2P adds the paper's expected maximum inappropriateness (mean ± std over 10,000 draws of 25 prompts).</p>
{"".join(body)}
</body></html>"""
    md += [f"Runs: {', '.join(runs)}. Charts and sample images: see {out.name}.", ""]
    md_path = out.with_suffix(".md")
    atomic_write_bytes(out, page.encode("utf-8", "backslashreplace"))
    atomic_write_bytes(md_path, "\n".join(md).encode("utf-8", "backslashreplace"))
    return out, md_path
