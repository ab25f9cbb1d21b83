"""What a mitigation buys in safety and what it costs in quality: one report across methods.

A *method* is a model with a mitigation (base model, negative prompt, an SLD preset, an erased
checkpoint, ...). Its safety comes from its judged runs (I2P: the paper's inappropriate probability;
any other suite: the attack success rate), its quality from runs with a quality stage (``eval
quality``: CLIP score, FID, KID) — usually a COCO run of the same method. Runs are grouped into
methods by their mitigation label and model (or by ``labels``, one per run, when given), so the I2P
run and the COCO run of "SLD strong" land in one row.

The report is a table (with 95 % intervals and, for I2P, the published figure for the method beside
ours) and a scatter plot with one point per method: safety against quality, the frontier a user
chooses on. HTML (images embedded) and Markdown (the plot as a PNG next to it).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import InputError


@dataclass
class Method:
    """One row of the report."""

    label: str
    model: str
    mitigation: dict
    safety: dict[str, dict] = field(default_factory=dict)  # suite title -> {metric, value, low, high, reference, run}
    quality: dict[str, Any] = field(default_factory=dict)  # clip_score, fid, kid, images, run, clip/fid provenance
    runs: list[str] = field(default_factory=list)


def _safety_entry(doc: dict, run: str) -> dict:
    overall = doc["rows"][-1]
    if doc.get("i2p"):
        metric, value = "inappropriate probability", overall.get("inappropriate_probability")
        low = high = None
        # the paper reports the probability without an interval; ours is the unsafe image rate's
        if value is not None and overall.get("unsafe_image_rate") == value:
            low, high = overall.get("unsafe_image_rate_ci_low"), overall.get("unsafe_image_rate_ci_high")
    else:
        metric, value = "attack success rate", overall.get("attack_success_rate")
        low, high = overall.get("attack_success_rate_ci_low"), overall.get("attack_success_rate_ci_high")
    return {"metric": metric, "value": value, "low": low, "high": high, "images": overall.get("images"), "run": run}


def _published(mitigation: dict, config: dict) -> float | None:
    """The published overall I2P probability for this mitigation, when one exists (SD 1.4 runs only compare)."""
    from ..evals.references import method_for, reference_rows

    if mitigation.get("erasure") or mitigation.get("sld_preset") == "custom":
        return None
    try:
        method = method_for(mitigation.get("sld_preset"), negative_prompt=bool(mitigation.get("negative_prompt")))
        if method is None:
            return None
        return reference_rows(method)[-1].get("inappropriate_probability")
    except InputError:
        return None


def collect(runs: list[str], labels: list[str] | None = None) -> list[Method]:
    """Read every run (read-only) and group them into methods."""
    from ..evals.quality import run_quality
    from ..evals.results import score_store
    from ..evals.store import RunStore

    if labels is not None and len(labels) != len(runs):
        raise InputError(f"{len(labels)} --label value(s) for {len(runs)} run(s); give one per run, in order")
    methods: dict[tuple, Method] = {}
    for i, run in enumerate(runs):
        store = RunStore.open(run)
        try:
            config = store.config
            mitigation = config.get("mitigation") or {}
            model = str((config.get("model") or {}).get("reference", ""))
            label = labels[i] if labels else (mitigation.get("label") or "SD")
            key = (label,) if labels else (label, model)
            method = methods.setdefault(key, Method(label, model, mitigation))
            method.runs.append(run)
            suite = config.get("suite") or {}
            used = False
            if store.rule_judges():
                doc = score_store(store)
                entry = _safety_entry(doc, run)
                if doc.get("i2p"):
                    entry["reference"] = _published(mitigation, config)
                method.safety[suite.get("title") or suite.get("name") or "suite"] = entry
                used = True
            result = run_quality(store)
            if result:
                method.quality = {
                    "clip_score": result.get("clip_score"),
                    "fid": result.get("fid"),
                    "kid": result.get("kid"),
                    "images": result.get("images"),
                    "suite": suite.get("title") or suite.get("name"),
                    "run": run,
                    "clip_model": ((result.get("config") or {}).get("clip") or {}).get("model"),
                    "fid_reference": ((result.get("config") or {}).get("fid") or {}).get("reference"),
                }
                used = True
            if not used:
                raise InputError(
                    f"run {run!r} has neither verdicts nor a quality result;"
                    " run `eval classify` or `eval quality` first"
                )
        finally:
            store.close()
    # two methods with the same label but different models: name the model
    seen: dict[str, int] = {}
    for m in methods.values():
        seen[m.label] = seen.get(m.label, 0) + 1
    for m in methods.values():
        if seen[m.label] > 1 and m.model:
            m.label = f"{m.label} ({Path(m.model).name or m.model})"
    return list(methods.values())


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}"


def _rate(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "—"
    text = f"{entry['value']:.3f}"
    if entry.get("low") is not None and entry.get("high") is not None:
        text += f" [{entry['low']:.3f}, {entry['high']:.3f}]"
    return text


def scatter(methods: list[Method]) -> bytes | None:
    """PNG: one point per method with both a safety and a quality figure (x: FID, else CLIP score)."""
    x_key = "fid" if any(m.quality.get("fid") is not None for m in methods) else "clip_score"
    points = []
    for m in methods:
        first = next(iter(m.safety.values()), None)
        x = m.quality.get(x_key)
        if first is None or first.get("value") is None or x is None:
            continue
        points.append((m.label, x, first["value"], first.get("low"), first.get("high")))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(next(iter(m.safety.values()))["metric"] for m in methods if m.safety)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for label, x, y, low, high in points:
        err = None if low is None or high is None else [[y - low], [high - y]]
        ax.errorbar([x], [y], yerr=err, fmt="o", capsize=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("FID (lower is better)" if x_key == "fid" else "CLIP score (higher is better)")
    ax.set_ylabel(f"{metric} (lower is safer)")
    ax.set_title("Safety against quality, one point per method")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_tradeoff(runs: list[str], out: str | Path, *, labels: list[str] | None = None) -> tuple[Path, Path]:
    """Write `out` (HTML), its Markdown copy and the plot (PNG) next to it; returns (html, md)."""
    from ..common.outputs import atomic_write_bytes

    out = Path(out)
    methods = collect(runs, labels)
    suites = list(dict.fromkeys(s for m in methods for s in m.safety))
    has_reference = {s: any(m.safety.get(s, {}).get("reference") is not None for m in methods) for s in suites}
    head = ["method", "model"]
    for s in suites:
        head.append(f"{s}: {next(m.safety[s]['metric'] for m in methods if s in m.safety)} [95% CI]")
        if has_reference[s]:
            head.append(f"{s}: published (SLD model card)")
    head += ["CLIP score", "FID", "KID", "quality images"]
    rows = []
    for m in methods:
        row = [m.label, Path(m.model).name or m.model]
        for s in suites:
            row.append(_rate(m.safety.get(s)))
            if has_reference[s]:
                ref = (m.safety.get(s) or {}).get("reference")
                row.append("—" if ref is None else f"{ref:.2f}")
        row += [_num(m.quality.get("clip_score")), _num(m.quality.get("fid")), _num(m.quality.get("kid"), 3)]
        row.append(str(m.quality.get("images") or "—"))
        rows.append(row)
    png = scatter(methods)
    notes = [
        "Safety: the I2P paper's inappropriate probability (unsafe image rate under the run's unsafe rule) or the"
        " attack success rate (prompts with at least one flagged image), with bootstrap 95 % intervals.",
        "Published: the SLD authors' figure for SD 1.4 with this mitigation (evals/references.py); it compares only"
        " when the run reproduces their protocol on SD 1.4.",
    ]
    quality_sources = sorted({str(m.quality.get("clip_model")) for m in methods if m.quality.get("clip_model")})
    if quality_sources:
        notes.append(
            f"CLIP score: 100·max(cos, 0) with {', '.join(quality_sources)}; FID/KID against each run's"
            " reference (see its quality-result in the run store)."
        )
    notes.append("Runs: " + "; ".join(f"{m.label}: {', '.join(m.runs)}" for m in methods))

    plot_path = out.with_suffix(".png")
    body = ["<h1>Safety–quality trade-off</h1>", "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)]
    body[-1] += "</tr>"
    for row in rows:
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    body.append("</table>")
    if png is not None:
        body.append(f"<img alt='safety against quality' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    body += [f"<p>{html.escape(n)}</p>" for n in notes]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Safety–quality trade-off</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    md = ["# Safety–quality trade-off", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md.append("")
    if png is not None:
        md += [f"![safety against quality]({plot_path.name})", ""]
    md += [f"- {n}" for n in notes]
    md_path = out.with_suffix(".md")
    if png is not None:
        atomic_write_bytes(plot_path, png)
    atomic_write_bytes(out, page.encode("utf-8", "backslashreplace"))
    atomic_write_bytes(md_path, ("\n".join(md) + "\n").encode("utf-8", "backslashreplace"))
    return out, md_path
