"""The page kit: every report is a :class:`Page` of a few block types, rendered by jinja2 to HTML and to
its Markdown twin, and written with its companion files together (or not at all).

A page is data, not markup: a title, the basis every figure on it is measured on (:class:`MeasuredOn`:
model and its identity, steps, sampler, judges with their models and thresholds, prompts and images,
mitigation), and sections of blocks — :class:`Table` (cells may carry intervals and marks),
:class:`Note` (``info``, ``warning`` or ``not-comparable``: a figure that must not be read beside its
neighbour says so where it stands), :class:`ChartBlock` (an inline SVG chart, see
:mod:`~safe_diffusion.reports.charts`), :class:`Gallery` (thumbnails: blurred where flagged, masks drawn
visibly), :class:`KeyValues` and :class:`Details`. ``templates/page.html.j2`` holds the one HTML skeleton
and stylesheet, ``templates/blocks.html.j2`` one macro per block type; ``templates/page.md.j2`` and
``templates/blocks.md.j2`` are the same for Markdown (charts become PNG files next to it where the page
writes them, thumbnails are left to the HTML).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from .charts import Chart

PAGE_SUFFIXES = (".html", ".htm")


# -- blocks ------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """A table cell: text, optional CSS classes, a tooltip, spans, and whether it is a header cell."""

    text: Any = ""
    classes: str = ""
    title: str | None = None
    colspan: int = 1
    rowspan: int = 1
    header: bool = False


class _Markup(str):
    """Text that is already HTML (escaped where needed), with a plain-text twin for Markdown."""

    def __new__(cls, html_text: str, plain: str):
        obj = super().__new__(cls, plain)
        obj.html_text = html_text
        return obj

    def __html__(self) -> str:
        return self.html_text


def markup(html_text: str, plain: str) -> Any:
    """Cell or note text shown as `html_text` in HTML (already escaped) and as `plain` in Markdown."""
    return _Markup(html_text, plain)


def cell(value: Any) -> Cell:
    return value if isinstance(value, Cell) else Cell("–" if value is None else value)


@dataclass
class Table:
    """Header rows (usually one) and body rows of cells; plain values are wrapped in :class:`Cell`."""

    head: list[list[Any]]
    rows: list[list[Any]]
    caption: str | None = None
    id: str | None = None
    classes: str = ""
    row_classes: list[str] | None = None
    numeric: bool = True  # body columns after the first are numbers (right-aligned)
    kind: str = "table"

    def __post_init__(self):
        self.head = [[cell(c) for c in row] for row in self.head]
        self.rows = [[cell(c) for c in row] for row in self.rows]

    def flat_head(self) -> list[str]:
        """One header per column, for Markdown: an upper header row's text joined to the last row's."""
        columns = [str(c.text) for c in self.head[-1] for _ in range(c.colspan)]
        for upper in self.head[:-1]:
            spread = [str(c.text) for c in upper for _ in range(c.colspan)]
            spread += [""] * (len(columns) - len(spread))
            # cells with rowspan > 1 in the upper row stand for their column in the rows below
            full = [c for c in upper if c.rowspan > 1]
            if full:
                lower = iter(columns)
                merged, k = [], 0
                for c in upper:
                    for _ in range(c.colspan):
                        merged.append(str(c.text) if c.rowspan > 1 else f"{c.text}: {next(lower)}")
                        k += 1
                columns = merged
            else:
                columns = [f"{u}: {c}" if u and u != c else c or u for u, c in zip(spread, columns)]
        return columns


@dataclass
class Note:
    """A sentence a reader must not miss; `kind` "not-comparable" marks a figure that is not comparable."""

    text: str
    kind_of_note: str = "info"  # info | warning | not-comparable
    id: str | None = None
    kind: str = "note"


@dataclass
class ChartBlock:
    chart: Chart
    kind: str = "chart"


@dataclass
class Figure:
    """One thumbnail (base64 PNG, or None: the file could not be read) with its caption."""

    b64: str | None
    caption: str
    alt: str = ""
    classes: str = ""


@dataclass
class Gallery:
    figures: list[Figure]
    title: str | None = None
    kind: str = "gallery"


@dataclass
class KeyValues:
    pairs: list[tuple[str, Any]]
    id: str | None = None
    kind: str = "keyvalues"


@dataclass
class Details:
    """A collapsible block: a one-line summary, the blocks shown when opened."""

    summary: str
    blocks: list[Any]
    kind: str = "details"


@dataclass
class Paragraph:
    text: str
    id: str | None = None
    kind: str = "paragraph"


@dataclass
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)
    level: int = 2
    id: str | None = None
    sections: list[Section] = field(default_factory=list)


# -- what every figure is measured on ------------------------------------------------------------------

#: The columns of the header, in order; a page shows those that any of its rows fills.
MEASURED_ON_FIELDS = (
    ("label", "run"),
    ("mitigation", "mitigation"),
    ("model", "model (identity)"),
    ("steps", "steps"),
    ("sampler", "sampler"),
    ("guidance", "guidance scale"),
    ("size", "size"),
    ("judges", "judges, metrics (model, threshold)"),
    ("prompts", "prompts"),
    ("images", "images"),
    ("protocol", "protocol"),
)


@dataclass
class MeasuredOn:
    """One row of a page's header per run (or source of figures): what its figures are measured on."""

    rows: list[dict[str, Any]]
    notes: list[Note] = field(default_factory=list)

    def table(self) -> Table:
        shown = [
            (key, title) for key, title in MEASURED_ON_FIELDS if any(r.get(key) not in (None, "") for r in self.rows)
        ]
        rows = []
        for r in self.rows:
            out = []
            for key, _ in shown:
                value = r.get(key)
                if isinstance(value, Cell):
                    out.append(value)
                else:
                    out.append(Cell("–" if value in (None, "") else value, classes=f"m-{key}"))
            rows.append(out)
        return Table([[title for _, title in shown]], rows, id="measured-on", classes="measured-on", numeric=False)


@dataclass
class Page:
    title: str
    measured_on: MeasuredOn | None = None
    intro: list[Any] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    footer: list[Any] = field(default_factory=list)


# -- rendering -------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _environment(markdown: bool):
    try:
        import jinja2
    except ImportError:
        raise InputError("reports need jinja2: pip install 'safe-diffusion[eval]'") from None
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("safe_diffusion.reports", "templates"),
        autoescape=not markdown,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["md"] = md_escape
    env.filters["md_cell"] = md_cell
    return env


def md_escape(value: Any) -> str:
    """Text for Markdown prose: nothing that starts a table cell or HTML."""
    return str(value).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def md_cell(value: Any) -> str:
    return md_escape(value).strip() or " "


def render_html(page: Page) -> str:
    return _environment(False).get_template("page.html.j2").render(page=page)


def render_markdown(page: Page) -> str:
    text = _environment(True).get_template("page.md.j2").render(page=page)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


# -- writing ----------------------------------------------------------------------------------------------


def printable(path: str | os.PathLike) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 appear as ``\\xNN``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_page_path(out: str | Path, what: str = "--out", companions: tuple[str, ...] = (".md",)) -> Path:
    """`out` as a page path, checked before any work: it ends in .html, neither it nor a companion file
    (the same name with each suffix) is a folder, and its folder exists and is writable or can be created.
    Creates nothing."""
    out = Path(out)
    if out.suffix.lower() not in PAGE_SUFFIXES:
        raise InputError(f"{what} '{printable(out)}' must end in .html")
    for path in (out, *(out.with_suffix(s) for s in companions)):
        if path.is_dir():
            raise InputError(f"'{printable(path)}' is a folder; choose another {what}")
    parent = out.parent.absolute()
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what}: '{printable(existing)}' is not a folder")
    try:  # fail now, not after the work
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{what}: folder '{printable(existing)}' is not writable: {exc.strerror or exc}") from None
    return out


def write_files(folder: str | Path, files: dict[str, bytes], what: str = "--out folder") -> list[Path]:
    """Write `files` (name → bytes) into `folder`, creating it and its parents, each file atomically and
    all of them or none: if one fails, the files this call created are removed, those it replaced get
    their earlier content back and the folders it created are removed. Returns the paths written."""
    from ..common.outputs import output_dir

    for name in files:
        if (Path(folder) / name).is_dir():
            raise InputError(f"'{printable(Path(folder) / name)}' is a folder; choose another {what}")
    written = []
    try:
        with output_dir(folder, what) as out:
            from ..common.outputs import atomic_write_bytes

            for name, data in files.items():
                path = out.file(name)
                atomic_write_bytes(path, data)
                written.append(path)
    except OSError as exc:
        name = getattr(exc, "filename", None) or folder
        raise InputError(f"cannot write '{printable(Path(name))}': {exc.strerror or exc}") from None
    return written


def write_page(page: Page, out: str | Path, *, files: dict[str, bytes] | None = None) -> tuple[Path, Path]:
    """Write `page` as `out` (HTML) and its Markdown twin next to it, with `files` (name → bytes: chart PNGs,
    CSV, JSON) in the same folder, all together or none; the folder is created if missing."""
    out = check_page_path(out)
    md_path = out.with_suffix(".md")
    payload = dict(files or {})
    payload[md_path.name] = render_markdown(page).encode("utf-8", "backslashreplace")
    payload[out.name] = render_html(page).encode("utf-8", "backslashreplace")
    write_files(out.parent, payload)
    return out, md_path
