"""The fairness plot (``safe-diffusion fairness``): per attribute direction, its proportion per prompt without
and with Fair Diffusion, and the target.

Prompt labels are wrapped onto several lines, never cut ("A photo of the face of a do…" said nothing
about the occupation), and the figure grows with the number of prompts; the saved PNG's bounding box
takes in every label.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from .charts import FONT_SIZE, style

WRAP = 22  # characters per label line


def wrap_label(text: str, width: int = WRAP) -> str:
    """`text` on lines of at most `width` characters (words kept whole where they fit)."""
    return "\n".join(textwrap.wrap(text, width=width, break_long_words=True, break_on_hyphens=True)) or text


def plot_proportions(rows: list[dict], directions: list[str], path: str | Path) -> None:
    """One panel per direction: its proportion per prompt before and after, and the target as a line (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..common.outputs import atomic_write_bytes
    from .images import png_bytes

    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    labels = [wrap_label(p) for p in prompts]
    lines = max(label.count("\n") + 1 for label in labels)
    width = max(6.4, 1.6 * len(prompts) + 2.5)
    fig, axes = plt.subplots(
        len(directions), 1, figsize=(width, (2.4 + 0.18 * lines) * len(directions) + 0.4), squeeze=False
    )
    x = np.arange(len(prompts))
    before, after = style(0), style(1)
    for ax, direction in zip(axes[:, 0], directions):
        sel = {r["prompt"]: r for r in rows if r["direction"] == direction}
        ax.bar(
            x - 0.2,
            [sel[p]["before_proportion"] for p in prompts],
            0.4,
            label="without fair guidance",
            color=before["color"],
            hatch=before["hatch"],
            edgecolor="#222222",
            linewidth=0.6,
        )
        ax.bar(
            x + 0.2,
            [sel[p]["after_proportion"] for p in prompts],
            0.4,
            label="with fair guidance",
            color=after["color"],
            hatch=after["hatch"],
            edgecolor="#222222",
            linewidth=0.6,
        )
        ax.axhline(sel[prompts[0]]["target"], color="black", linestyle="--", linewidth=1, label="target")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"P({direction})\n(fraction of images)", fontsize=FONT_SIZE)
        ax.set_xticks(x, labels, fontsize=FONT_SIZE - 1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0, 0].legend(fontsize=FONT_SIZE - 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    data = png_bytes(fig, dpi=100, tight=True)
    plt.close(fig)
    atomic_write_bytes(Path(path), data)
