"""Charts a reader can trust: one colour and one pattern or marker per run, legends drawn from the plotted
artists themselves, error bars, units on the axes, axes that start at zero, labels readable at 1280 px.

Charts are rendered by matplotlib as SVG (text kept as text, so the page can be searched and a browser
test can read it) and, where a Markdown twin needs a file, as PNG. Every plotted artist carries an id
(``<chart>-bar-<run>-<category>``, ``<chart>-legend-<run>``, ``<chart>-point-<run>``) so the rendered page
can be checked for what a reader sees: that a legend's swatch has the colour of its run's bars.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .images import png_bytes

#: Okabe–Ito: eight colours told apart by colour-blind readers; patterns and markers repeat them in greyscale.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
NO_DATA = "no images"
FONT_SIZE = 10  # points; at the SVG's natural size that is 13 px, readable in a 1280 px window
LEGEND_WRAP = 34  # characters per legend line: a long label ("… — inactive: warm-up 7 ≥ 4 steps") wraps


def legend_label(text: str) -> str:
    """A legend entry wrapped onto lines of :data:`LEGEND_WRAP` characters, so the chart stays narrow."""
    import textwrap

    return "\n".join(textwrap.wrap(text, LEGEND_WRAP)) or text


def style(i: int) -> dict:
    """Run i's colour, hatch pattern and marker (cycling after eight runs, shifted so pairs stay distinct)."""
    return {
        "color": PALETTE[i % len(PALETTE)],
        "hatch": HATCHES[(i + i // len(PALETTE)) % len(HATCHES)],
        "marker": MARKERS[(i + i // len(PALETTE)) % len(MARKERS)],
    }


@dataclass
class Chart:
    """A rendered chart: inline SVG for HTML, PNG bytes where a file is wanted (the Markdown twin)."""

    id: str
    title: str
    alt: str
    svg: str
    png: bytes | None = None
    series: list[str] = field(default_factory=list)  # the runs it shows, in legend order
    file: str | None = None  # the PNG's name next to the page, when it is written


@dataclass
class Bar:
    """One bar: value and its interval (None where not computed); `value` None: no data for it."""

    value: float | None
    low: float | None = None
    high: float | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _render(fig, chart_id: str, *, png: bool) -> tuple[str, bytes | None]:
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": chart_id}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]  # no XML prolog or doctype inside HTML
    # matplotlib numbers its clip paths and patches per file: make them unique on a page with several charts
    svg = re.sub(r'id="(?!' + re.escape(chart_id) + r')([^"]+)"', rf'id="{chart_id}-\1"', svg)
    svg = re.sub(r"url\(#(?!" + re.escape(chart_id) + r")([^)]+)\)", rf"url(#{chart_id}-\1)", svg)
    svg = re.sub(r'xlink:href="#(?!' + re.escape(chart_id) + r')([^"]+)"', rf'xlink:href="#{chart_id}-\1"', svg)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{chart_id}" ', 1)
    data = png_bytes(fig, dpi=100, tight=True) if png else None
    return svg, data


def grouped_bars(
    chart_id: str,
    categories: Sequence[str],
    series: Sequence[tuple[str, dict[str, Bar]]],
    *,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] = (0.0, 1.0),
    png: bool = False,
) -> Chart:
    """Bars per category, one bar per run (`series`: (label, {category: Bar})), with interval error bars.

    A category a run has no data for gets a "no images" mark instead of a bar (never a bar of height 0,
    which reads as a measured 0). The legend's handles are the runs' own bar containers (or, for a run
    without a single bar, a swatch in the same colour and pattern).
    """
    plt = _pyplot()
    import numpy as np
    from matplotlib.patches import Patch

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(categories))
    longest = max((len(c) for c in categories), default=4)
    fig_w = min(12.0, max(6.4, 0.55 * len(categories) * max(n, 2) + 2.5))
    fig, ax = plt.subplots(figsize=(fig_w, 4.2 + 0.06 * longest), dpi=100)
    handles = []
    for i, (label, bars) in enumerate(series):
        st = style(i)
        pos, values, lows, highs, cats = [], [], [], [], []
        for c, cat in enumerate(categories):
            bar = bars.get(cat)
            offset = x[c] - 0.4 + width * (i + 0.5)
            if bar is None or bar.value is None or (isinstance(bar.value, float) and math.isnan(bar.value)):
                ax.text(
                    offset,
                    ylim[0] + 0.02 * (ylim[1] - ylim[0]),
                    NO_DATA,
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=FONT_SIZE - 2,
                    color="#555555",
                )
                continue
            pos.append(offset)
            values.append(bar.value)
            lows.append(bar.value - bar.low if bar.low is not None else 0.0)
            highs.append(bar.high - bar.value if bar.high is not None else 0.0)
            cats.append(c)
        if pos:
            container = ax.bar(
                pos,
                values,
                width,
                yerr=[np.maximum(lows, 0), np.maximum(highs, 0)],
                capsize=3,
                color=st["color"],
                hatch=st["hatch"],
                edgecolor="#222222",
                linewidth=0.6,
                label=label,
                error_kw={"elinewidth": 1, "ecolor": "#222222"},
            )
            for patch, cat in zip(container.patches, cats):
                patch.set_gid(f"{chart_id}-bar-{i}-{cat}")
            handles.append(container)
        else:
            handles.append(Patch(facecolor=st["color"], hatch=st["hatch"], edgecolor="#222222", label=label))
    ax.set_xticks(
        x,
        list(categories),
        rotation=30 if longest > 8 or len(categories) > 6 else 0,
        ha="right" if longest > 8 or len(categories) > 6 else "center",
        fontsize=FONT_SIZE,
    )
    ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=FONT_SIZE + 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    legend = ax.legend(
        handles=handles,
        labels=[legend_label(label) for label, _ in series],
        fontsize=FONT_SIZE - 1,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        frameon=False,
    )
    for i, handle in enumerate(legend.legend_handles):
        handle.set_gid(f"{chart_id}-legend-{i}")
    svg, data = _render(fig, chart_id, png=png)
    plt.close(fig)
    return Chart(chart_id, title, f"{title}: {ylabel}", svg, data, [label for label, _ in series])


@dataclass
class Point:
    """One method in a scatter: x and y with optional intervals."""

    label: str
    x: float
    y: float
    y_low: float | None = None
    y_high: float | None = None
    x_low: float | None = None
    x_high: float | None = None


def scatter(
    chart_id: str,
    points: Sequence[Point],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] = (0.0, 1.0),
    png: bool = False,
) -> Chart:
    """One marker per method (distinct colour and shape, in the legend), with interval error bars.

    Both axes start at zero (rates, FID and CLIP score are all non-negative), so a difference looks as
    large as it is relative to the values, not as large as the axis makes it; the intervals show the
    uncertainty.
    """
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=100)
    for i, p in enumerate(points):
        st = style(i)
        yerr = None if p.y_low is None or p.y_high is None else [[max(p.y - p.y_low, 0)], [max(p.y_high - p.y, 0)]]
        xerr = None if p.x_low is None or p.x_high is None else [[max(p.x - p.x_low, 0)], [max(p.x_high - p.x, 0)]]
        line = ax.errorbar(
            [p.x],
            [p.y],
            yerr=yerr,
            xerr=xerr,
            fmt=st["marker"],
            color=st["color"],
            markersize=8,
            markeredgecolor="#222222",
            capsize=3,
            label=p.label,
        )
        line[0].set_gid(f"{chart_id}-point-{i}")
    top = max([p.x_high if p.x_high is not None else p.x for p in points] + [0.0])
    ax.set_xlim(0.0, top * 1.15 if top > 0 else 1.0)
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel, fontsize=FONT_SIZE)
    ax.set_ylabel(ylabel, fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE + 1)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    # the legend shows each method's marker as plotted (not its error bar)
    proxies = [
        Line2D(
            [],
            [],
            marker=style(i)["marker"],
            color=style(i)["color"],
            markeredgecolor="#222222",
            markersize=8,
            linestyle="none",
        )
        for i in range(len(points))
    ]
    legend = ax.legend(
        handles=proxies,
        labels=[legend_label(p.label) for p in points],
        fontsize=FONT_SIZE - 1,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        frameon=False,
    )
    for i, handle in enumerate(legend.legend_handles):
        handle.set_gid(f"{chart_id}-legend-{i}")
    svg, data = _render(fig, chart_id, png=png)
    plt.close(fig)
    return Chart(chart_id, title, f"{title}: {ylabel} against {xlabel}", svg, data, [p.label for p in points])
