"""`safe-diffusion generate`: real files on the random checkpoint; every bad input is one line, exit 2, nothing
written."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ARGS = ["--steps", "3", "--height", "32", "--width", "32"]


def test_generate_writes_pngs_and_sidecars(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(
        "generate",
        "a photo of a cat",
        "--model",
        tiny_checkpoint,
        "--out",
        out,
        "--num-images",
        "2",
        "--seed",
        "7",
        "--safety",
        "strong",
        *ARGS,
    )
    assert code == 0, err
    names = ["0000-seed7.json", "0000-seed7.png", "0001-seed8.json", "0001-seed8.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    meta = json.loads((out / "0001-seed8.json").read_text())
    assert meta["prompt"] == "a photo of a cat" and meta["seed"] == 8 and meta["safety"] == "strong"
    assert meta["guidance"][0]["type"] == "SafetyGuidance" and meta["guidance"][0]["scale"] == 2000
    assert {"torch", "diffusers", "transformers", "safe-diffusion"} <= set(meta["versions"])
    assert Image.open(out / "0000-seed7.png").size == (32, 32)
    assert str(out) in stdout
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # readable by group and others as the umask allows, like any other tool's files
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


def _where(canvas, image):
    """(y, x) of `image` inside `canvas` (arrays), or None."""
    h, w = image.shape[:2]
    for y in range(canvas.shape[0] - h + 1):
        for x in range(canvas.shape[1] - w + 1):
            if np.array_equal(canvas[y : y + h, x : x + w], image):
                return y, x
    return None


def test_compare_writes_unguided_and_side_by_side_from_the_same_seed(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "cmp"
    code, _, err = cli(
        "generate", "a cat", "--model", tiny_checkpoint, "--out", out, "--compare", "--safety", "max", *ARGS
    )
    assert code == 0, err
    guided = np.asarray(Image.open(out / "0000-seed0.png"), dtype=float)
    unguided = np.asarray(Image.open(out / "0000-seed0-unguided.png"), dtype=float)
    pair = np.asarray(Image.open(out / "0000-seed0-side-by-side.png"), dtype=float)
    # captioned and apart (issue 21, item 8): unguided on the left, guided on the right, white between them
    (uy, ux), (gy, gx) = _where(pair, unguided), _where(pair, guided)
    assert uy == gy > 0 and gx - (ux + 32) >= 16 and (pair[uy:, ux + 32 : gx] == 255).all()
    assert np.abs(guided - unguided).max() > 0, "max safety guidance changed nothing"
    assert json.loads((out / "0000-seed0-unguided.json").read_text())["guidance"] == []
    # the unguided image is plain diffusers Stable Diffusion from the same seed, bit for bit
    import torch
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None, requires_safety_checker=False)
    expected = plain("a cat", num_inference_steps=3, height=32, width=32, generator=[torch.Generator().manual_seed(0)])
    assert np.array_equal(np.asarray(expected.images[0], dtype=float), unguided)


def test_safety_off_is_plain_stable_diffusion(cli, tiny_checkpoint, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    # 12 steps: past the 10-step warm-up of the drop-in's MEDIUM defaults, so stray guidance would show
    code, _, err = cli(
        "generate",
        "a cat",
        "--model",
        tiny_checkpoint,
        "--out",
        tmp_path,
        "--safety",
        "off",
        "--steps",
        "12",
        "--height",
        "32",
        "--width",
        "32",
    )
    assert code == 0, err
    plain = StableDiffusionPipeline.from_pretrained(tiny_checkpoint, safety_checker=None, requires_safety_checker=False)
    expected = plain("a cat", num_inference_steps=12, height=32, width=32, generator=[torch.Generator().manual_seed(0)])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "0000-seed0.png")), np.asarray(expected.images[0]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/no/such/model"], "not found"),
        (["--safety", "extreme"], "choose one of: off, weak, medium, strong, max"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--height", "-8"], "--height must be at least 8"),
        (["--width", "20"], "--width must be a multiple of 8"),
        (["--height", "16384", "--width", "16384"], "--height must be at most 4096"),
        (["--num-images", "0"], "--num-images must be at least 1"),
        (["--num-images", "200000"], "--num-images must be at most 10000"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--seed", "18446744073709551617"], "--seed must be at most"),
        (["--seed", "-1"], "--seed must be at least 0"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
        (["--guidance-scale", "-5"], "--guidance-scale must be at least 0"),
        (["--edit", "+hat", "--edit-scale", "nan"], "--edit-scale must be a finite number"),
        (["--edit", "hat"], "must start with + (add the concept) or - (remove it)"),
        (["--edit", "+"], "names no concept"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:999"], "--device"),
        (["--overwrite", "--skip-existing"], "exclude each other"),
        (["--refuse-inactive", "--safety", "medium"], "starts after a warm-up of 10 steps, but only 3 steps run"),
        (["--guidance-scale", "1"], "SafetyGuidance act through classifier-free guidance, which --guidance-scale 1"),
        (["--negative-prompt", "\udcff"], "--negative-prompt is not valid UTF-8 text"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cli, tiny_checkpoint, tmp_path, extra, message):
    out = tmp_path / "never"
    args = ["generate", "a cat", "--model", tiny_checkpoint, "--out", out, *ARGS, *extra]
    code, _, err = cli(*args)
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_settings_that_disable_guidance_warn(cli, tiny_checkpoint, tmp_path):
    code, _, err = cli(
        "generate", "a cat", "--model", tiny_checkpoint, "--out", tmp_path / "o", "--safety", "medium", *ARGS
    )
    assert code == 0
    assert "SafetyGuidance starts after a warm-up of 10 steps, but only 3 steps run" in err


def test_existing_images_are_refused_kept_or_replaced(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "o"
    args = ["generate", "a cat", "--model", tiny_checkpoint, "--out", out, "--safety", "max", *ARGS]
    assert cli(*args, "--num-images", "2")[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "0001-seed1.png").write_bytes(b"mine")
    code, _, err = cli(*args, "--num-images", "3")
    assert code == 2 and "0000-seed0.png" in err and "--overwrite" in err and "--skip-existing" in err
    assert (out / "0001-seed1.png").read_bytes() == b"mine" and not (out / "0002-seed2.png").exists()
    # --skip-existing keeps every complete image and makes the missing one
    code, stdout, err = cli(*args, "--num-images", "3", "--skip-existing")
    assert code == 0, err
    assert (out / "0001-seed1.png").read_bytes() == b"mine"
    assert (out / "0000-seed0.png").read_bytes() == first["0000-seed0.png"]
    assert json.loads((out / "0002-seed2.json").read_text())["seed"] == 2 and "wrote 1 image(s)" in stdout
    # --overwrite makes them all again, from their seeds; --batch-size splits the calls
    code, stdout, err = cli(*args, "--num-images", "3", "--overwrite", "--batch-size", "2")
    assert code == 0, err
    assert (out / "0001-seed1.png").read_bytes() != b"mine" and "wrote 3 image(s)" in stdout
    assert (out / "0000-seed0.png").read_bytes() == first["0000-seed0.png"]  # the same seed in the same first batch
    assert [json.loads((out / f"000{k}-seed{k}.json").read_text())["image_index"] for k in range(3)] == [0, 1, 2]


def test_unwritable_output_folder(cli, tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = cli(
        "generate", "a cat", "--model", tiny_checkpoint, "--out", blocker / "sub", "--safety", "max", *ARGS
    )
    assert code == 2 and "not writable" in err and err.count("\n") == 1
    assert blocker.read_text() == "x"


def test_model_that_fails_to_load_leaves_no_output_folder(cli, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    out = tmp_path / "a" / "b"
    code, _, err = cli("generate", "a cat", "--model", broken, "--out", out, "--safety", "max", *ARGS)
    assert code == 2 and err.startswith("error: cannot load model")
    assert not (tmp_path / "a").exists()


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "safe_diffusion", "generate", "x", "--model", "/nope", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: model '/nope' not found: no such folder, and not a hub id like 'owner/name'"


def test_mitigation_safree_is_registered_for_generate_and_eval_run(cli, tiny_checkpoint, tmp_path):
    """SAFREE registers itself by name: `--mitigation safree` guides `generate` and `eval run`, and the record says so."""
    out = tmp_path / "gen"
    code, _, err = cli(
        "generate",
        "a photo of a cat",
        "--model",
        tiny_checkpoint,
        "--out",
        out,
        "--mitigation",
        "safree",
        "--safety",
        "off",
        *ARGS,
    )
    assert code == 0, err
    meta = json.loads((out / "0000-seed0.json").read_text())
    assert meta["mitigation"]["label"] == "SAFREE"
    assert [t["type"] for t in meta["mitigation"]["guidance"]] == ["SafreeGuidance"]
    suite = tmp_path / "suite.csv"
    suite.write_text("prompt\na photo of a cat\n")
    run = tmp_path / "run"
    code, _, err = cli(
        "eval",
        "run",
        "--suite",
        suite,
        "--model",
        tiny_checkpoint,
        "--out",
        run,
        "--judges",
        "none",
        "--mitigation",
        "safree",
        *ARGS,
    )
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    frozen = config.get("config", config)
    assert frozen["mitigation"]["label"] == "SAFREE", frozen["mitigation"]


def test_safety_defaults_to_medium_only_when_no_other_guidance_is_chosen(cli, tiny_checkpoint, tmp_path):
    """Issue 21 (6): an --edit-only run gets SEGA alone, not SLD too; a plain prompt gets SLD medium; --strict is the
    deprecated spelling of --refuse-inactive."""
    code, _, err = cli("generate", "a cat", "--model", tiny_checkpoint, "--out", tmp_path / "plain", *ARGS)
    assert code == 0, err
    assert json.loads((tmp_path / "plain" / "0000-seed0.json").read_text())["mitigation"]["label"] == "SLD medium"
    code, _, err = cli(
        "generate",
        "a cat",
        "--model",
        tiny_checkpoint,
        "--out",
        tmp_path / "edit",
        "--edit",
        "+hat",
        "--edit-warmup",
        "0",
        *ARGS,
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "edit" / "0000-seed0.json").read_text())
    assert meta["safety"] == "off" and [t["type"] for t in meta["mitigation"]["guidance"]] == ["SemanticGuidance"]
    code, _, err = cli(
        "generate",
        "a cat",
        "--model",
        tiny_checkpoint,
        "--out",
        tmp_path / "strict",
        "--strict",
        "--safety",
        "off",
        *ARGS,
    )
    assert code == 0 and "warning: --strict is deprecated; use --refuse-inactive (same meaning)" in err
