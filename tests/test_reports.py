"""Reports that cannot mislead (issue 21, items 1-5 and 8) on the one page kit (issue 22).

Runs are made offline on the tiny random-weight checkpoint over harmless prompts (a custom suite), judged
by the real NudeNet and by Q16 on a random CLIP. Each test names the item of issue 21 it holds to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

PROMPTS = [  # harmless on purpose: screenshots of these pages are kept in docs/
    ("a red apple on a wooden table", "food"),
    ("a blue bicycle by a wall", "vehicles"),
    ("a cat asleep on a sofa", "animals"),
    ("a bowl of ripe oranges", "food"),
]
TINY = ["--steps", "4", "--height", "32", "--width", "32", "--images-per-prompt", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    """Two judged runs over other prompt sets (3 and 2 prompts; the second with SLD strong, inactive at 4
    steps, and without the category "animals") and two quality runs at 8 steps; a random CLIP, a reference."""
    from safe_diffusion.testing import build_clip

    root = tmp_path_factory.mktemp("reports")
    suite = root / "harmless.csv"
    suite.write_text("prompt,categories\n" + "".join(f'"{p}",{c}\n' for p, c in PROMPTS))
    captions = root / "captions.csv"
    captions.write_text("caption\n" + "".join(f"{p}\n" for p, _ in PROMPTS[:3]))
    clip = build_clip(root / "clip")
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    model = ["--model", str(tiny_checkpoint)]
    judges = ["--judges", "q16,nudenet", "--q16-model", str(clip)]
    for name, safety, limit in (("sd", "off", "3"), ("sld", "strong", "2")):
        assert (
            run_cli(
                "eval",
                "run",
                "--suite",
                suite,
                *model,
                "--out",
                root / name,
                "--safety",
                safety,
                "--allow-inactive",
                "--limit",
                limit,
                *judges,
                *TINY,
            )
            == 0
        )
    for safety in ("off", "strong"):
        out = root / f"coco-{safety}"
        assert (
            run_cli(
                "eval",
                "run",
                "--suite",
                "coco",
                "--data",
                captions,
                *model,
                "--out",
                out,
                "--safety",
                safety,
                "--allow-inactive",
                "--judges",
                "none",
                "--steps",
                "8",
                "--height",
                "32",
                "--width",
                "32",
            )
            == 0
        )
        assert (
            run_cli(
                "eval",
                "quality",
                out,
                "--clip-model",
                clip,
                "--fid-reference",
                ref,
                "--feature-extractor",
                "random",
                "--no-progress",
            )
            == 0
        )
    return {"root": root, "clip": clip, "suite": suite, "ckpt": tiny_checkpoint}


def _fills(svg: str, chart: str) -> dict[str, str]:
    """gid → the first fill drawn inside it (not "none"), in an SVG made by reports.charts."""
    out = {}
    for match in re.finditer(rf'<g id="({re.escape(chart)}-(?:bar|legend|point)-[^"]+)">', svg):
        fill = re.search(r'style="fill: (?!none)([^;"]+)', svg[match.end() :])
        out[match.group(1)] = fill.group(1)
    return out


# -- item 1: legends --------------------------------------------------------------------------------


def test_bar_legend_swatches_have_their_runs_colour_and_pattern():
    """Issue 21, item 1: an empty bar per run for the legend made every swatch the first run's colour."""
    from safe_diffusion.reports.charts import Bar, grouped_bars

    series = [
        (f"run {i}", {"a": Bar(0.2 + 0.1 * i, 0.1, 0.5), "b": Bar(0.5)} if i != 1 else {"b": Bar(0.4)})
        for i in range(3)
    ]
    chart = grouped_bars("c", ["a", "b"], series, ylabel="rate (fraction)", title="t")
    fills = _fills(chart.svg, "c")
    legend = [fills[f"c-legend-{i}"] for i in range(3)]
    assert len(set(legend)) == 3, legend  # one colour (and pattern) per run
    for i in range(3):
        bars = [v for k, v in fills.items() if k.startswith(f"c-bar-{i}-")]
        assert bars and set(bars) == {legend[i]}, (i, bars, legend[i])
    assert "no images" in chart.svg  # run 1 has no bar in category a: said, not drawn as a 0


def test_scatter_axes_start_at_zero_and_show_intervals():
    """Issue 21, item 3: an axis from 0.24855 to 0.24880 made a difference of 3e-4 look large."""
    from safe_diffusion.reports.charts import Point, scatter

    chart = scatter(
        "s", [Point("A", 0.24855, 0.4, 0.3, 0.5), Point("B", 0.24880, 0.5)], xlabel="x", ylabel="y", title="t"
    )
    ticks = [float(t) for t in re.findall(r">\s*(-?\d+\.\d+)\s*</text>", chart.svg)]
    assert min(ticks) == 0.0 and max(ticks) >= 0.24880
    fills = _fills(chart.svg, "s")
    assert fills["s-legend-0"] == fills["s-point-0"] != fills["s-legend-1"] == fills["s-point-1"]


# -- item 2: guidance that never acted ----------------------------------------------------------------


def test_activity_label_says_when_guidance_never_acted():
    from safe_diffusion.common.errors import InputError
    from safe_diffusion.guidance import SafetyGuidance, SemanticGuidance
    from safe_diffusion.guidance.activity import activity_label, check_active, run_label

    strong = SafetyGuidance.from_preset("strong")
    assert activity_label("SLD strong", [strong], 4) == "SLD strong — inactive: warm-up 7 ≥ 4 steps"
    assert activity_label("SLD strong", [strong], 8) == "SLD strong"
    assert activity_label("SLD strong", [strong.describe()], 7) == "SLD strong — inactive: warm-up 7 ≥ 7 steps"
    both = [strong, SemanticGuidance(["hat", "dog"], warmup_steps=[2, 10])]
    assert (
        activity_label("x", both, 5) == "x — partly inactive: SLD warm-up 7 ≥ 5 steps; SEGA 'dog' warm-up 10 ≥ 5 steps"
    )
    assert activity_label("x", [strong], 20, guidance_scale=1.0).startswith("x — inactive: guidance scale 1 ≤ 1")
    assert activity_label("x", [SafetyGuidance(warmup_fraction=0.5)], 10) == "x"
    config = {
        "mitigation": {"label": "SLD strong", "guidance": [strong.describe()]},
        "generation": {"steps": 4, "guidance_scale": 7.5},
    }
    assert run_label(config) == "SLD strong — inactive: warm-up 7 ≥ 4 steps"
    with pytest.raises(InputError, match=r"SLD strong would never act: warm-up 7 ≥ 4 steps.*--allow-inactive"):
        check_active([strong], 4, 7.5, label="SLD strong")
    assert check_active([strong], 4, 7.5, allow_inactive=True) == ["warm-up 7 ≥ 4 steps"]


def test_results_json_and_the_report_say_the_run_was_inactive(world, tmp_path):
    """Issue 21, item 2: results.json, the report and its header said "SLD strong" for a run SLD never touched."""
    root = world["root"]
    results = json.loads((root / "sld" / "results.json").read_text())
    assert results["label"] == "SLD strong — inactive: warm-up 7 ≥ 4 steps"
    out = tmp_path / "r.html"
    assert run_cli("eval", "report", root / "sd", root / "sld", "--out", out, "--samples", "1") == 0
    md = out.with_suffix(".md").read_text()
    assert "| SLD strong — inactive: warm-up 7 ≥ 4 steps |" in md  # the header's row of the run
    assert "### SLD strong — inactive: warm-up 7 ≥ 4 steps" in md


# -- item 3: the trade-off ------------------------------------------------------------------------------


def test_tradeoff_names_random_models_and_features_and_different_steps(world, tmp_path):
    root = world["root"]
    out = tmp_path / "deep" / "er" / "tradeoff.html"  # item 5: folders are created
    assert (
        run_cli("eval", "tradeoff", root / "sd", root / "coco-off", root / "sld", root / "coco-strong", "--out", out)
        == 0
    )
    md = out.with_suffix(".md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| SD |", "| SLD strong —"))]
    assert len(rows) == 2, md  # the methods, each with its safety and its quality run
    for row in rows:
        assert "[random weights]" in row and "(not FID)" in row and "(random CLIP)" in row, row
    assert "| FID |" not in md and "Fréchet distance (FID only on InceptionV3)" in md
    assert "random 16-dimensional random-conv features, not InceptionV3: not FID" in md
    assert "runs used different steps: harmless.csv 4; COCO 2014 val captions" in md and "8." in md
    assert "SLD strong — partly inactive: warm-up 7 ≥ 4 steps (harmless.csv)" in md
    assert "not comparable" in md.lower() and "different prompt sets (3 vs 2 prompts)" in md
    assert out.with_suffix(".png").stat().st_size > 1000


def test_published_figures_only_beside_runs_on_their_model_and_protocol():
    """Issue 21, item 3: SD 1.4's published figures stood beside a random checkpoint's."""
    from safe_diffusion.reports.comparable import I2P_PROMPTS, SD14, Basis, differences, published_basis

    published = published_basis("sld-model-card", "sld-strong")
    real = Basis(model=SD14, random_weights=False, suite="i2p", prompts=I2P_PROMPTS, images_per_prompt=10, steps=50)
    assert differences(real, published) == []
    random = real.with_(model="/x/ckpt", base_model="/x/ckpt", random_weights=True)
    assert differences(random, published)[:2] == [
        "a random-weight checkpoint, not the published figure's model",
        "different base model (/x/ckpt vs CompVis/stable-diffusion-v1-4)",
    ]
    assert differences(real.with_(prompts=6), published) == ["different prompt sets (6 vs 4703 prompts)"]
    assert differences(real.with_(inactive=("warm-up 7 ≥ 4 steps",)), published) == [
        "its guidance never acted (warm-up 7 ≥ 4 steps)"
    ]
    assert differences(real.with_(random_judges=("q16",)), published) == ["judged by q16 on random weights"]
    # between runs, models differ on purpose; what they were measured on must not
    a = Basis(model="sd", steps=4, prompt_set="p", prompts=6, images_per_prompt=2, judges=(("q16", "m=a"),))
    assert differences(a, a.with_(model="uce")) == []
    assert differences(a, a.with_(steps=10, judges=(("q16", "m=b"),))) == [
        "different steps (4 vs 10)",
        "judges set up differently (q16)",
    ]


# -- item 4: other prompt sets ----------------------------------------------------------------------------


def test_runs_over_other_prompt_sets_are_marked_not_comparable(world, tmp_path):
    """Issue 21, item 4: 'overall 0.83 vs 0.75' over 12 and 8 images was shown side by side without a word."""
    root = world["root"]
    out = tmp_path / "r.html"
    assert run_cli("eval", "report", root / "sd", root / "sld", "--out", out, "--samples", "0") == 0
    md, page = out.with_suffix(".md").read_text(), out.read_text()
    assert (
        "> **Not comparable:** SLD strong — inactive: warm-up 7 ≥ 4 steps (†) and SD: different prompt sets"
        " (3 vs 2 prompts)." in md
    )
    assert 'class="note not-comparable"' in page and 'class="not-comparable" title="not comparable with SD' in page
    # the same run twice is comparable with itself: no note
    assert run_cli("eval", "report", root / "sd", root / "sd", "--out", tmp_path / "s.html", "--samples", "0") == 0
    assert "Not comparable" not in (tmp_path / "s.md").read_text()


# -- item 5: folders are created ---------------------------------------------------------------------------


def test_report_tradeoff_and_audit_create_their_out_folders(world, tmp_path):
    root = world["root"]
    assert run_cli("eval", "report", root / "sd", "--out", tmp_path / "a" / "b" / "r.html", "--samples", "0") == 0
    assert run_cli("eval", "tradeoff", root / "coco-off", "--out", tmp_path / "c" / "t.html") == 0
    assert (
        run_cli("audit", root / "sd" / "images", "--out", tmp_path / "d" / "e" / "audit.html", "--judges", "nudenet")
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "d" / "e").iterdir()) == [
        "audit.csv",
        "audit.html",
        "audit.json",
        "audit.md",
    ]
    for page in ("a/b/r.html", "a/b/r.md", "c/t.html", "c/t.md"):
        assert (tmp_path / page).is_file(), page


def test_a_report_over_missing_or_damaged_images_names_them_and_exits_2(world, tmp_path, capsys):
    """Issue 18: a report over a run whose recorded images are gone or truncated says which, in the page and
    on stderr, and exits 2, so a script cannot take it for a report over every image."""
    import shutil

    run = tmp_path / "sd"
    shutil.copytree(world["root"] / "sd", run)
    images = sorted((run / "images").rglob("*.png"))
    images[0].unlink()
    images[1].write_bytes(images[1].read_bytes()[:20])
    capsys.readouterr()
    assert run_cli("eval", "report", run, "--out", tmp_path / "r.html", "--samples", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 2 recorded image(s) are missing or damaged"), err
    assert images[0].name in err[0] and "missing" in err[0] and "damaged (20 bytes" in err[0]
    md = (tmp_path / "r.md").read_text()
    assert "2 recorded image(s) are missing or damaged" in md and images[0].name in md


# -- item 8: images a reader can read ----------------------------------------------------------------------


def test_masks_are_drawn_visibly_and_a_full_mask_is_not_blank():
    """Issue 21, item 8: white masks on a white page; a full mask looked like a missing image."""
    from safe_diffusion.reports.images import MASK_COLOUR, mask_preview

    full = np.asarray(mask_preview(Image.new("L", (64, 64), 255)), dtype=int)
    empty = np.asarray(mask_preview(Image.new("L", (64, 64), 0)), dtype=int)
    inner = (slice(4, -4), slice(4, -4))
    assert (full[inner] == MASK_COLOUR).all()  # a solid coloured square
    assert (empty[inner] != 255).any(axis=-1).all() and len(np.unique(empty[inner].reshape(-1, 3), axis=0)) == 2
    assert (full[0] == full[0, 0]).all() and tuple(full[0, 0]) != (255, 255, 255)  # framed


def test_side_by_side_is_captioned_with_a_gap():
    from safe_diffusion.reports.images import side_by_side

    left, right = Image.new("RGB", (40, 40), (200, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 200))
    pair = np.asarray(side_by_side(left, right, ("unguided", "guided: SLD strong")), dtype=int)
    red = np.argwhere((pair == (200, 0, 0)).all(-1))
    blue = np.argwhere((pair == (0, 0, 200)).all(-1))
    assert red[:, 0].min() > 0 and red[:, 0].min() == blue[:, 0].min()  # a caption band above both
    assert blue[:, 1].min() - red[:, 1].max() > 16  # a gap
    band = pair[: red[:, 0].min()]
    assert (band < 100).all(-1).sum() > 50  # dark caption text over each image


def test_fairness_plot_labels_are_whole():
    """Issue 21, item 8: the fairness plot cut its labels to 'A photo of the face of a do…'."""
    from safe_diffusion.reports.fairness import wrap_label

    prompt = "A photo of the face of a doctor of veterinary medicine"
    label = wrap_label(prompt)
    assert "…" not in label and label.replace("\n", " ") == prompt and max(map(len, label.split("\n"))) <= 22


# -- the kit --------------------------------------------------------------------------------------------------


def test_the_kit_renders_html_and_its_markdown_twin_and_escapes():
    from safe_diffusion.reports.kit import Cell, MeasuredOn, Note, Page, Section, Table, render_html, render_markdown

    page = Page(
        "T <1>",
        MeasuredOn([{"label": "a|b", "steps": 4}]),
        sections=[
            Section(
                "S",
                [
                    Table(
                        [[Cell("k", rowspan=2), Cell("run", colspan=2)], ["x", "y"]],
                        [["<i>", Cell("1", classes="not-comparable", title="why")]],
                    ),
                    Note("other prompts", "not-comparable"),
                ],
            )
        ],
    )
    html, md = render_html(page), render_markdown(page)
    assert "<title>T &lt;1&gt;</title>" in html and "<td>&lt;i&gt;</td>" in html and "<i>" not in html
    assert 'title="why">1<span class="mark"' in html and "Not comparable:</span> other prompts" in html
    assert "| k | run: x | run: y |" in md and "| a\\|b | 4 |" in md and "> **Not comparable:** other prompts" in md


# -- the pages in a real browser ---------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs"
VIEWPORT = {"width": 1280, "height": 860}
#: Every element inside the viewport's width; SVG text inside its chart; text at least 9 px tall.
LAYOUT = """() => {
  const w = window.innerWidth, bad = [];
  if (document.documentElement.scrollWidth > w) bad.push('page scrolls sideways: ' + document.documentElement.scrollWidth);
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (r.left < -0.5 || r.right > w + 0.5) bad.push(el.tagName + ' ' + (el.id || el.className.baseVal || el.className) + ' ' + r.left + '..' + r.right);
  }
  for (const svg of document.querySelectorAll('figure.chart svg')) {
    const box = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll('text')) {
      const r = t.getBoundingClientRect();
      if (!t.textContent.trim()) continue;
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
        bad.push('cut: ' + t.textContent);
      if (r.height < 9) bad.push('too small: ' + t.textContent + ' ' + r.height);
    }
  }
  return bad;
}"""
#: The first fill an SVG group draws (marker definitions left out): what a reader sees of it.
FILL_OF = """id => [...document.getElementById(id).querySelectorAll('path, use')].filter(e => !e.closest('defs'))
  .map(e => getComputedStyle(e).fill).find(f => f !== 'none')"""
FILL = FILL_OF
FILLS = (
    """(chart) => {
  const fill = """
    + FILL_OF
    + """;
  const out = {legend: [], bars: []};
  for (let i = 0; document.getElementById(chart + '-legend-' + i); i++) {
    out.legend.push(fill(chart + '-legend-' + i));
    out.bars.push([...document.querySelectorAll('[id^="' + chart + '-bar-' + i + '-"]')].map(g => fill(g.id)));
  }
  return out;
}"""
)


@pytest.fixture(scope="module")
def browser():
    from helpers import chromium

    yield from chromium()


def _open(browser, path: Path):
    page = browser.new_page(viewport=VIEWPORT)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    page.goto(path.as_uri())
    return page


def _screenshot(page, name: str):
    import os

    if os.environ.get("SAFE_DIFFUSION_UPDATE_SCREENSHOT") == "1":  # random weights, harmless prompts only
        path = DOCS / name
        page.set_viewport_size({"width": VIEWPORT["width"], "height": 1400})
        page.screenshot(path=str(path), full_page=False)
        page.set_viewport_size(VIEWPORT)
        Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)  # small enough for the repository
        assert path.stat().st_size < 200_000


def _reads_well(page):
    assert page.evaluate(LAYOUT) == []


@pytest.mark.browser
def test_eval_report_in_a_browser(world, browser, tmp_path):
    root = world["root"]
    out = tmp_path / "eval.html"
    assert run_cli("eval", "report", root / "sd", root / "sld", "--out", out, "--samples", "2") == 0
    page = _open(browser, out)
    for chart in ("chart-0-rate", "chart-0-asr"):
        fills = page.evaluate(FILLS, chart)
        assert len(fills["legend"]) == 2 and len(set(fills["legend"])) == 2, fills
        for swatch, bars in zip(fills["legend"], fills["bars"]):
            assert bars and set(bars) == {swatch}, fills  # what the legend shows is what the bars are
    assert page.locator("#measured-on .badge.inactive").inner_text() == "inactive: warm-up 7 ≥ 4 steps"
    note = page.locator(".note.not-comparable").first
    assert note.is_visible() and "different prompt sets (3 vs 2 prompts)" in note.inner_text()
    assert page.get_by_text("random weights").first.is_visible()
    _reads_well(page)
    _screenshot(page, "report-eval.png")
    page.close()


@pytest.mark.browser
def test_tradeoff_in_a_browser(world, browser, tmp_path):
    root = world["root"]
    out = tmp_path / "tradeoff.html"
    assert (
        run_cli("eval", "tradeoff", root / "sd", root / "coco-off", root / "sld", root / "coco-strong", "--out", out)
        == 0
    )
    page = _open(browser, out)
    legend = [page.evaluate(FILL, f"tradeoff-chart-legend-{i}") for i in range(2)]
    points = [page.evaluate(FILL, f"tradeoff-chart-point-{i}") for i in range(2)]
    assert legend == points and len(set(points)) == 2
    for text in ("not FID", "random CLIP", "random weights"):
        assert page.locator("#tradeoff-table").get_by_text(text).first.is_visible(), text
    assert page.locator("#steps-note").is_visible()
    _reads_well(page)
    _screenshot(page, "report-tradeoff.png")
    page.close()


@pytest.mark.browser
def test_sanitize_report_in_a_browser(world, browser, tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i, colour in enumerate(((220, 60, 40), (40, 120, 220))):
        pixels = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / f"photo-{i}.png")
    out = tmp_path / "clean"
    assert (
        run_cli(
            "sanitize",
            data,
            "--model",
            world["ckpt"],
            "--out",
            out,
            "--all",
            "--judges",
            "none",
            "--steps",
            "3",
            "--remove",
            "a red patch",
        )
        == 0
    )
    page = _open(browser, out / ".sanitize" / "report.html")
    masks = page.locator("img.mask")
    assert masks.count() == 2
    # a mask is drawn in colour over a checkerboard: never blank, never white on white
    colours = page.evaluate("""() => [...document.querySelectorAll('img.mask')].map(img => {
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; let white = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 245 && d[i+1] > 245 && d[i+2] > 245) white++;
        return white / (d.length / 4); })""")
    assert all(w < 0.05 for w in colours), colours
    _reads_well(page)
    _screenshot(page, "report-sanitize.png")
    page.close()


@pytest.mark.browser
def test_audit_report_in_a_browser(world, browser, tmp_path):
    out = tmp_path / "audit" / "report.html"
    assert (
        run_cli(
            "audit",
            world["root"] / "sd" / "images",
            "--out",
            out,
            "--judges",
            "q16,nudenet",
            "--q16-model",
            world["clip"],
        )
        == 0
    )
    page = _open(browser, out)
    assert page.locator("#images img").count() == 6
    assert page.locator("#measured-on").get_by_text("random weights").is_visible()  # Q16 on a random CLIP
    _reads_well(page)
    _screenshot(page, "report-audit.png")
    page.close()
