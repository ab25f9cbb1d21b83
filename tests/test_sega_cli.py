"""`safe-diffusion generate --edit/--fair`: guidance from the command line, SDXL included; bad input is one line,
exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

ARGS = ["--steps", "3", "--height", "32", "--width", "32"]


def _png(path):
    return np.asarray(Image.open(path), dtype=float)


def test_edit_and_fair_combine_with_safety(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(
        "generate",
        "a photo of a doctor",
        "--model",
        tiny_checkpoint,
        "--out",
        out,
        "--safety",
        "max",
        "--compare",
        "--edit",
        "+sunglasses",
        "--edit",
        "-beard",
        "--edit-scale",
        "6",
        "--edit-scale",
        "3",
        "--edit-warmup",
        "0",
        "--fair",
        "male person,female person",
        "--num-images",
        "2",
        *ARGS,
    )
    assert code == 0, err
    meta = [json.loads((out / f"000{k}-seed{k}.json").read_text()) for k in range(2)]
    kinds = [g["type"] for g in meta[0]["guidance"]]
    assert kinds == ["SafetyGuidance", "SemanticGuidance", "FairGuidance"]
    sega = meta[0]["guidance"][1]
    assert sega["concepts"] == ["sunglasses", "beard"] and sega["reverse"] == [False, True]
    assert sega["scale"] == [6.0, 3.0] and sega["warmup_steps"] == [0, 0] and sega["threshold"] == [0.9, 0.9]
    assert sorted(m["fair_direction"] for m in meta) == ["female person", "male person"]  # 2 images, 50/50
    assert meta[0]["edits"] == ["+sunglasses", "-beard"]
    assert np.abs(_png(out / "0000-seed0.png") - _png(out / "0000-seed0-unguided.png")).max() > 0


def test_edit_changes_the_image(cli, tiny_checkpoint, tmp_path):
    base = ["generate", "a cat", "--model", tiny_checkpoint, "--safety", "off", *ARGS]
    assert cli(*base, "--out", tmp_path / "plain")[0] == 0
    assert cli(*base, "--out", tmp_path / "edit", "--edit", "+a hat", "--edit-warmup", "0")[0] == 0
    assert np.abs(_png(tmp_path / "plain" / "0000-seed0.png") - _png(tmp_path / "edit" / "0000-seed0.png")).max() > 0


def test_sdxl_checkpoint_via_model(cli, tmp_path):
    from safe_diffusion.testing import build_sdxl_checkpoint

    model = build_sdxl_checkpoint(tmp_path / "sdxl")
    out = tmp_path / "out"
    code, _, err = cli(
        "generate",
        "a cat",
        "--model",
        model,
        "--out",
        out,
        "--safety",
        "max",
        "--edit",
        "+sunglasses",
        "--edit-warmup",
        "0",
        "--compare",
        *ARGS,
    )
    assert code == 0, err
    meta = json.loads((out / "0000-seed0.json").read_text())
    assert meta["pipeline"] == "StableDiffusionXLPipeline"
    assert np.abs(_png(out / "0000-seed0.png") - _png(out / "0000-seed0-unguided.png")).max() > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--edit", "sunglasses"], "must start with + (add the concept) or - (remove it)"),
        (["--edit", "+"], "names no concept"),
        (["--edit", "+a", "--edit-scale", "1", "--edit-scale", "2"], "2 --edit-scale values for 1 edit(s)"),
        (
            ["--edit", "+a", "--edit", "-b", "--edit-warmup", "1", "--edit-warmup", "2", "--edit-warmup", "3"],
            "3 --edit-warmup values for 2 edit(s)",
        ),
        (["--edit-threshold", "0.5"], "--edit-threshold given without any --edit"),
        (["--edit", "+a", "--edit-threshold", "1.5"], "--edit-threshold must be at most 1"),
        (["--fair", "male person,female person", "--fair-proportions", "0.5,0.6"], "must sum to 1"),
        (["--fair", "male person,female person", "--fair-proportions", "1"], "1 proportions given for 2 directions"),
        (["--fair", "male person,female person", "--fair-proportions", "a,b"], "comma-separated numbers"),
        (["--fair", "male person"], "two or more comma-separated"),
        (["--fair-proportions", "0.5,0.5"], "--fair-proportions given without --fair"),
    ],
)
def test_bad_guidance_options_are_one_line_errors(cli, tiny_checkpoint, tmp_path, extra, message):
    out = tmp_path / "never"
    code, _, err = cli("generate", "a cat", "--model", tiny_checkpoint, "--out", out, *ARGS, *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not out.exists()
