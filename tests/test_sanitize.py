"""`safe-diffusion sanitize` on tiny random-weight SD and SDXL checkpoints: end to end, locality, resume, sharding,
the report, bad input."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_images_close, run_cli
from PIL import Image

from safe_diffusion.judges import Judge, Judgment, register_judge

FAST = ["--steps", "3", "--remove", "nudity", "--remove", "blood"]


class Redness(Judge):
    """A test judge: an image is unsafe when its red channel's mean is above the threshold."""

    name = "redness"

    def __init__(self, threshold: float = 150.0, device=None):
        self.threshold = threshold

    def describe(self):
        return {"judge": self.name, "threshold": self.threshold, "rule": "unsafe when mean red > threshold"}

    def judge_images(self, images):
        means = [float(np.asarray(im)[..., 0].mean()) for im in images]
        return [Judgment(m > self.threshold, {"score": m / 255}) for m in means]


register_judge("redness", Redness, "test judge: mean red channel")


def _image(path: Path, color, size=(32, 32), seed=0, mode="RGB", **save):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)))
    image.save(path, **save)
    return path


def _dataset(root: Path) -> Path:
    data = root / "data"
    _image(data / "red.png", (220, 40, 40), seed=1)  # flagged by the test judge
    _image(data / "nested" / "red-alpha.png", (230, 30, 30), size=(48, 40), seed=2, mode="RGBA")  # flagged
    _image(data / "nested" / "blue.png", (30, 40, 220), seed=3)
    _image(data / "green.jpg", (30, 200, 40), seed=4, quality=90)
    (data / "notes.txt").write_text("not an image")
    good = (data / "red.png").read_bytes()
    (data / "broken.png").write_bytes(good[: len(good) // 2])
    return data


def _records(out: Path) -> dict[str, dict]:
    from safe_diffusion.editing.sanitize import load_records

    return load_records(out)


def _mask(record) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(record["mask_png"]))).convert("L")) > 0


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"), dtype=np.int16)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """One sanitize run with the test judge: 2 flagged, 2 clean, 2 skipped files."""
    root = tmp_path_factory.mktemp("sanitize")
    data = _dataset(root)
    out = root / "out"
    code = run_cli("sanitize", data, "--model", tiny_checkpoint, "--out", out, "--judges", "redness", *FAST)
    assert code == 0
    return data, out


def test_flagged_images_are_edited_only_inside_their_mask_and_rejudged(run):
    data, out = run
    records = _records(out)
    for rel in ("red.png", "nested/red-alpha.png"):
        r = records[rel]
        assert r["status"] == "edited" and r["flagged_before"] is True
        assert set(r["after"]) == {"redness"} and r["flagged_after"] in (True, False)
        before, after = Image.open(data / rel), Image.open(out / rel)
        assert (after.size, after.mode, after.format) == (before.size, before.mode, before.format)
        a, b = _pixels(data / rel), _pixels(out / rel)
        mask = _mask(r)
        assert mask.shape == a.shape[:2] and 0 < mask.mean() == pytest.approx(r["mask_coverage"], abs=1e-6)
        # Outside the mask the pixels are the input's own, exactly; inside the edit changed them.
        assert np.array_equal(a[~mask], b[~mask])
        assert (a[mask] != b[mask]).any()
        assert np.array_equal(a[..., 3], b[..., 3])  # the alpha channel is the input's
    assert records["nested/red-alpha.png"]["work_size"] == [32, 24]  # 48x40 at the model's 32 px, multiples of 8


def test_unflagged_images_are_copied_byte_for_byte_and_bad_files_skipped(run):
    data, out = run
    records = _records(out)
    for rel in ("nested/blue.png", "green.jpg"):
        assert records[rel]["status"] == "copied" and records[rel]["flagged_before"] is False
        assert (out / rel).read_bytes() == (data / rel).read_bytes()
    assert records["notes.txt"] == {**records["notes.txt"], "status": "skipped", "reason": "not an image"}
    assert records["broken.png"]["status"] == "skipped" and "damaged image" in records["broken.png"]["reason"]
    assert not (out / "notes.txt").exists() and not (out / "broken.png").exists()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".sanitize" not in p.parts)
    assert files == ["green.jpg", "nested/blue.png", "nested/red-alpha.png", "red.png"]


def test_report_lists_every_file_with_verdicts_coverage_and_blurred_thumbnails(run, tmp_path):
    from safe_diffusion.reports.sanitize import write_report

    data, out = run
    report = out / ".sanitize" / "report.html"
    page = report.read_text()
    md = report.with_suffix(".md").read_text()
    rows = list(csv.DictReader(report.with_suffix(".csv").open()))
    assert [r["image"] for r in rows] == [
        "broken.png",
        "green.jpg",
        "nested/blue.png",
        "nested/red-alpha.png",
        "notes.txt",
        "red.png",
    ]
    by = {r["image"]: r for r in rows}
    assert by["red.png"]["status"] == "edited" and by["red.png"]["redness_before"] == "flagged"
    assert float(by["red.png"]["redness_score_before"]) > 150 / 255 and by["red.png"]["redness_after"]
    assert float(by["red.png"]["mask_coverage"]) > 0 and by["green.jpg"]["redness_after"] == ""
    summary = "6 file(s): 4 image(s) and 2 skipped; 2 flagged before; 2 edited, of which"
    assert summary in page and summary in md
    assert "| notes.txt | skipped: not an image |" in md
    assert "rule: unsafe when mean red &gt; threshold" in page and "removed</dt><dd>nudity, blood" in page
    assert "final sigma" in page and "Deviations from diffusers" in page
    # Flagged thumbnails are blurred unless --show-unsafe: the embedded pixels differ, and only for flagged images.
    shown = write_report(data, out, tmp_path / "shown.html", show_unsafe=True)[0].read_text()

    def thumbnails(text):  # per table row: its embedded images
        return [row.split("<img")[1:] for row in text.split('id="images"')[1].split("<tr>")[2:]]

    blurred_rows, shown_rows = thumbnails(page), thumbnails(shown)
    assert [len(r) for r in blurred_rows] == [0, 1, 1, 3, 0, 3]  # copied: before; edited: before, after, mask
    records = _records(out)
    for rel, blurred, plain in zip(sorted(records), blurred_rows, shown_rows):
        if blurred:
            assert (blurred[0] != plain[0]) == records[rel]["flagged_before"], rel  # the before thumbnail
        if len(blurred) == 3:
            assert (blurred[1] != plain[1]) == records[rel]["flagged_after"], rel  # the after thumbnail
            assert blurred[2] == plain[2]  # masks are never blurred


def test_the_report_renders_in_a_browser(run):
    from helpers import chromium

    _, out = run
    for browser in chromium():
        page = browser.new_page()
        page.goto((out / ".sanitize" / "report.html").as_uri())
        assert page.locator("#images tr").count() == 7  # header + 6 files
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
        assert len(widths) == 8 and all(w > 0 for w in widths)
        assert "2 flagged before" in page.locator("#summary").inner_text()


def test_progress_shows_as_lines_when_stderr_is_not_a_terminal(tiny_checkpoint, tmp_path, cli, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # another in-process command may have run with --quiet
    data = tmp_path / "data"
    _image(data / "a.png", (200, 30, 30))
    code, stdout, err = cli(
        "sanitize", data, "--model", tiny_checkpoint, "--out", tmp_path / "o", "--all", "--judges", "none", *FAST
    )
    assert code == 0
    assert "sanitize: 1/1 images (100.0%), 1 edited, 0 copied, 0 skipped," in err and "ETA" in err
    assert "1 file(s): 1 edited (0 still flagged), 0 copied, 0 skipped" in stdout


def test_sdxl_end_to_end(tmp_path, cli):
    from safe_diffusion.testing import build_sdxl_checkpoint

    model = build_sdxl_checkpoint(tmp_path / "sdxl")
    data = tmp_path / "data"
    _image(data / "a.png", (200, 30, 30))
    out = tmp_path / "out"
    code, _, err = cli("sanitize", data, "--model", model, "--out", out, "--all", "--judges", "none", *FAST)
    assert code == 0, err
    record = next(iter(_records(out).values()))
    assert record["status"] == "edited" and record["intersect_from_timestep"] is None  # SDXL: every step
    state = json.loads((out / ".sanitize" / "config.json").read_text())
    assert state["ledits"]["family"] == "sdxl" and state["ledits"]["zero_noise_steps"] == 3
    assert Image.open(out / "a.png").size == (32, 32)


# -- locality, measured against the reconstruction ------------------------------------------------


def test_edits_change_the_image_only_where_the_mask_is_set(tmp_path_factory):
    """The reconstruction error is measured first: LEDITS++ reconstructs the latents exactly, so what the
    round trip loses is the VAE's. Kept-unmasked output: outside the mask, the input itself (less than even that
    error); inside, the edit. The whole LEDITS++ output: its change from the reconstruction concentrates in the mask.
    """
    import torch
    from diffusers import StableDiffusionPipeline
    from helpers import load_float64

    from safe_diffusion.editing import edit, invert
    from safe_diffusion.editing.sanitize import sanitize_image
    from safe_diffusion.guidance.ledits import LEditsGuidance
    from safe_diffusion.testing import build_checkpoint

    pipe = load_float64(StableDiffusionPipeline, build_checkpoint(tmp_path_factory.mktemp("ckpt") / "deep", "deep"))
    image = Image.open(_image(tmp_path_factory.mktemp("img") / "a.png", (200, 60, 60), size=(64, 64)))
    guidance = LEditsGuidance(["nudity", "blood"], reverse=True, scale=8.0)
    inv = invert(pipe, image, num_inversion_steps=6, generator=torch.Generator().manual_seed(0))
    reconstruction = edit(pipe, inv, None, output_type="latent").images
    assert (reconstruction - inv.x0).abs().max() <= 1e-12  # exact in latent space
    rec_pixels = np.asarray(edit(pipe, inv, None).images[0], dtype=np.int16)
    input_pixels = np.asarray(image, dtype=np.int16)
    rec_error = np.abs(rec_pixels - input_pixels).max(-1)
    assert rec_error.max() > 0  # the VAE's round trip

    kept = sanitize_image(pipe, image, guidance, seed=0, steps=6)
    mask = np.asarray(kept.mask) > 0
    out = np.asarray(kept.image, dtype=np.int16)
    assert 0 < mask.mean() < 1
    assert np.array_equal(out[~mask], input_pixels[~mask])
    edit_mask = np.asarray(kept.edit_mask) > 0
    assert edit_mask.sum() and not (edit_mask & ~mask).any()  # the kept region contains every edited pixel
    assert (np.abs(out - input_pixels).max(-1)[edit_mask] > rec_error[edit_mask]).any()

    # Without keeping the input's pixels: the full LEDITS++ output, whose change from the reconstruction
    # concentrates where the edit acted (the UNet and VAE spill some of it outside).
    full = edit(pipe, inv, guidance, output_type="latent")
    where = full.concept_masks[0].any(0)
    change = (full.images[0] - reconstruction[0]).abs().amax(0)
    assert change[where].mean() > 2 * change[~where].mean()


# -- resume after SIGKILL, and sharding -----------------------------------------------------------


def _env():
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return env


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.is_file() and not p.name.startswith("report.")
    }


def test_sigkill_then_resume_does_each_image_once(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    for i in range(5):
        _image(data / f"{i}.png", (200, 30, 30), seed=i)
    out = tmp_path / "out"
    args = [
        "sanitize",
        str(data),
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--all",
        "--judges",
        "none",
        *FAST,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "safe_diffusion", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(_records(out)) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _snapshot(out)
    done = set(_records(out))
    assert 2 <= len(done) < 5, "the run was not killed midway"

    code = run_cli(*args)
    assert code == 0
    final = _snapshot(out)
    # Every image once: what the killed run finished (its files and records) is untouched, the rest is new.
    for key, (content, mtime) in partial.items():
        if key.startswith(".sanitize/journal/") or key in done:
            assert final[key] == (content, mtime), key
    recs = _records(out)
    assert sorted(recs) == [f"{i}.png" for i in range(5)] and all(r["status"] == "edited" for r in recs.values())
    assert not list(out.rglob("*.tmp"))
    # Rerunning a finished run does nothing, and a different config is refused without writing anything.
    assert run_cli(*args) == 0 and _snapshot(out) == final
    assert run_cli(*args[:-1], "cruelty") == 2 and _snapshot(out) == final


def test_accelerate_two_processes_split_the_images(tiny_checkpoint, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(4):
        _image(data / f"{i}.png", (200, 30, 30), seed=i)
    out = tmp_path / "out"
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "safe_diffusion",
    ]
    proc = subprocess.run(
        [*launcher, "sanitize", data, "--model", tiny_checkpoint, "--out", out, "--all", "--judges", "none", *FAST],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = _records(out)
    assert {rel: r["process"] for rel, r in records.items()} == {"0.png": 0, "1.png": 1, "2.png": 0, "3.png": 1}
    assert proc.stdout.count("4 file(s): 4 edited") == 1  # the main process reports, once
    # Each image's edit depends only on its path: one process gives the same images. Two executions of
    # float32 code (launched processes against this one): equal within rounding, never compared as bytes.
    single = tmp_path / "single"
    code = run_cli("sanitize", data, "--model", tiny_checkpoint, "--out", single, "--all", "--judges", "none", *FAST)
    assert code == 0
    for i in range(4):
        assert_images_close(single / f"{i}.png", out / f"{i}.png", what=f"{i}.png")


# -- bad input: one line, exit 2, nothing written -------------------------------------------------


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    _image(folder / "a.png", (200, 30, 30))
    return folder


def _fails(cli, *args, message: str):
    code, _, err = cli("sanitize", *args)
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err, err
    assert "Traceback" not in err


def test_bad_folders_and_outputs(cli, tiny_checkpoint, data, tmp_path):
    model = ["--model", tiny_checkpoint, "--all", "--judges", "none"]
    _fails(cli, tmp_path / "missing", "--out", tmp_path / "o", *model, message="does not exist")
    _fails(cli, data / "a.png", "--out", tmp_path / "o", *model, message="is not a folder")
    _fails(cli, data, "--out", data / "clean", *model, message="inside the input folder")
    _fails(cli, data, "--out", data, *model, message="inside the input folder")
    _fails(cli, data, "--out", tmp_path, *model, message="the input folder is inside --out")
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _fails(cli, data, "--out", blocker / "sub", *model, message="is a file")
    _fails(cli, data, "--out", blocker, *model, message="is not a folder")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    _fails(cli, data, "--out", tmp_path / "busy", *model, message="not a sanitize output")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(cli, empty, "--out", tmp_path / "o", *model, message="has no files")
    _fails(cli, data, "--out", tmp_path / "o", *model, "--report", tmp_path / "r.txt", message="must end in .html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "data", "empty", "file.txt"]
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_bad_models_and_options(cli, tiny_checkpoint, data, tmp_path):
    import shutil

    out = tmp_path / "o"
    base = [data, "--out", out, "--all", "--judges", "none"]
    no_vae = tmp_path / "no-vae"
    shutil.copytree(tiny_checkpoint, no_vae)
    index = json.loads((no_vae / "model_index.json").read_text())
    index["vae"] = [None, None]
    (no_vae / "model_index.json").write_text(json.dumps(index))
    _fails(cli, *base, "--model", no_vae, message="lacks vae, which LEDITS++ needs")
    _fails(cli, *base, "--model", tmp_path / "nothing", message="not found")
    _fails(
        cli, data, "--out", out, "--model", tiny_checkpoint, "--judges", "none", message="--only-flagged needs a judge"
    )
    _fails(cli, *base, "--model", tiny_checkpoint, "--judges", "q17", message="unknown judge 'q17'")
    _fails(cli, *base, "--model", tiny_checkpoint, "--threshold", "1.5", message="--threshold must be at most 1")
    _fails(cli, *base, "--model", tiny_checkpoint, "--masking", "box", message="--masking 'box'")
    _fails(cli, *base, "--model", tiny_checkpoint, "--remove", "blood", "--add", "blood", message="named twice")
    assert not out.exists()


def test_a_pipeline_without_ledits_components_is_refused_in_one_line(tiny_checkpoint):
    from diffusers import StableDiffusionPipeline

    from safe_diffusion.common.errors import InputError
    from safe_diffusion.editing import pipeline_family

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None, requires_safety_checker=False)
    assert pipeline_family(pipe) == "sd"
    pipe.vae = None
    with pytest.raises(InputError, match="lacks vae, which LEDITS"):
        pipeline_family(pipe)


def test_a_full_disk_at_the_first_image_leaves_no_output(tiny_checkpoint, tmp_path):
    """Issue 18: the first write fails (a file-size limit, which the kernel enforces as it does a full disk):
    one line, exit 1, and the folder this call made is gone, its run state included."""
    import resource

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):  # noise: each PNG is larger than the limit, the run's small state files are not
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"noise{i}.png")
    out = tmp_path / "out"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    proc = subprocess.run(
        [sys.executable, "-m", "safe_diffusion", "sanitize", str(data), "--model", str(tiny_checkpoint), "--out",
         str(out), "--all", "--judges", "none", *FAST],
        env=_env(), capture_output=True, text=True, timeout=300, preexec_fn=small_files,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: File too large") and "Traceback" not in proc.stderr
    assert not out.exists()
