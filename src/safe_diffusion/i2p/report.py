"""HTML and Markdown reports comparing I2P runs: the paper's table, a bar chart, sample images per category.

Flagged sample images are blurred before they are embedded (the unblurred pixels are not in the
file) unless ``show_unsafe``. Prompts are not printed in the report; images are labelled by key.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .data import CATEGORIES


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bar_chart(names: list[str], docs: list[dict]) -> str:
    """Grouped bars of the inappropriate probability per category, one colour per run; base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats = [r["category"] for r in docs[0]["rows"]]
    x = np.arange(len(cats))
    width = 0.8 / max(len(docs), 1)
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    for i, (name, doc) in enumerate(zip(names, docs)):
        values = [r["inappropriate_probability"] or 0.0 for r in doc["rows"]]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, cats, rotation=20)
    ax.set_ylabel("inappropriate probability")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(row: dict) -> tuple[str, str]:
    p, m, s = row["inappropriate_probability"], row["expected_max_inappropriateness"], row["expected_max_inappropriateness_std"]
    return ("–" if p is None else f"{p:.2f}"), ("–" if m is None else f"{m:.2f} ± {s:.2f}")


def thumbnail(path: str, flagged: bool, show_unsafe: bool, size: int = 128) -> str:
    from PIL import Image, ImageFilter

    image = Image.open(path).convert("RGB")
    image.thumbnail((size, size))
    if flagged and not show_unsafe:
        image = image.filter(ImageFilter.GaussianBlur(radius=max(image.width, image.height) / 8))
    return _png_b64(image)


def write_report(runs: list[str], out: Path, *, show_unsafe: bool = False, samples: int = 4) -> tuple[Path, Path]:
    from ..errors import InputError
    from ..outputs import atomic_write_bytes
    from .results import score_source
    from .store import RunStore

    docs, records, names = [], [], []
    for run in runs:
        if not Path(run).is_dir():
            raise InputError(f"run directory {run!r} does not exist")
        docs.append(score_source(run))
        store = RunStore.open(run)
        records.append(store.records())
        store.close()
        names.append(Path(run).name or run)
    chart = bar_chart(names, docs)

    head = "".join(f"<th colspan=2>{html.escape(n)}</th>" for n in names)
    sub = "<th>inappropriate prob.</th><th>exp. max. inappropriateness</th>" * len(names)
    body = []
    md = [
        "# I2P report",
        "",
        "| category | " + " | ".join(f"{n}: prob. | {n}: exp. max." for n in names) + " |",
        "|---|" + "---:|---:|" * len(names),
    ]
    for i, cat in enumerate(r["category"] for r in docs[0]["rows"]):
        cells = [_fmt(doc["rows"][i]) for doc in docs]
        body.append(f"<tr><td>{cat}</td>" + "".join(f"<td>{p}</td><td>{m}</td>" for p, m in cells) + "</tr>")
        md.append(f"| {cat} | " + " | ".join(f"{p} | {m}" for p, m in cells) + " |")

    gallery = []
    for name, recs in zip(names, records):
        gallery.append(f"<h3>{html.escape(name)}</h3>")
        for cat in CATEGORIES:
            chosen = [r for r in recs if cat in r["categories"].split(",")][:samples]
            if not chosen:
                continue
            figs = []
            for r in chosen:
                flagged = bool(r["unsafe"])
                label = f"#{r['prompt_index']}/{r['image_index']}" + (" flagged" if flagged else "")
                figs.append(
                    f"<figure><img src='data:image/png;base64,{thumbnail(r['image'], flagged, show_unsafe)}'>"
                    f"<figcaption>{html.escape(label)}</figcaption></figure>"
                )
            gallery.append(f"<h4>{cat}</h4><div class=row>{''.join(figs)}</div>")
    blur_note = "Flagged images are shown unblurred." if show_unsafe else "Flagged images are blurred (--show-unsafe to show them)."
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>I2P report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}.row{{display:flex;gap:8px;flex-wrap:wrap}}figure{{margin:0}}figcaption{{font-size:11px}}</style></head><body>
<h1>I2P report</h1>
<p>Inappropriate probability and expected maximum inappropriateness (mean ± std over 10,000 draws of 25 prompts), per category.</p>
<table><tr><th rowspan=2>category</th>{head}</tr><tr>{sub}</tr>{''.join(body)}</table>
<h2>Inappropriate probability</h2><img alt="bar chart" src="data:image/png;base64,{chart}">
<h2>Samples</h2><p>{blur_note}</p>{''.join(gallery)}
</body></html>"""
    md += ["", f"Runs: {', '.join(runs)}. Bar chart and sample images: see {out.name}.", ""]
    md_path = out.with_suffix(".md")
    atomic_write_bytes(out, page.encode())
    atomic_write_bytes(md_path, "\n".join(md).encode())
    return out, md_path
