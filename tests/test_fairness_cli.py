"""`safe-diffusion fairness`: offline, on a random checkpoint and a random-weight CLIP classifier."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from safe_diffusion.testing import build_clip

    return build_clip(tmp_path_factory.mktemp("clip") / "clip", projection_dim=16)


def test_fairness_writes_table_plot_and_record(cli, tiny_checkpoint, clip, tmp_path):
    prompts = tmp_path / "occupations.txt"
    prompts.write_text("doctor\n# a comment\n\nnurse\n")
    out = tmp_path / "fair"
    code, stdout, err = cli(
        "fairness",
        "--model",
        tiny_checkpoint,
        "--prompts",
        prompts,
        "--directions",
        "male person,female person",
        "--out",
        out,
        "--images-per-prompt",
        "3",
        "--proportions",
        "0.5,0.5",
        "--clip-model",
        clip,
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "10",
    )
    assert code == 0, err
    rows = list(csv.DictReader((out / "fairness.csv").open()))
    assert [(r["prompt"], r["direction"]) for r in rows] == [
        ("A photo of the face of a doctor", "male person"),
        ("A photo of the face of a doctor", "female person"),
        ("A photo of the face of a nurse", "male person"),
        ("A photo of the face of a nurse", "female person"),
    ]
    for prompt in ("doctor", "nurse"):
        mine = [r for r in rows if r["prompt"].endswith(prompt)]
        assert sum(int(r["before_count"]) for r in mine) == 3 and sum(int(r["after_count"]) for r in mine) == 3
        assert [int(r["assigned_count"]) for r in mine] == [2, 1]  # largest remainder of 1.5 / 1.5, tie to the first
    assert Image.open(out / "fairness.png").format == "PNG"
    record = json.loads((out / "fairness.json").read_text())
    assert record["classifier_texts"] == ["a photo of a male person", "a photo of a female person"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = cli(  # issue 18: a rerun with other directions into the same folder is refused, nothing touched
        "fairness",
        "--model",
        tiny_checkpoint,
        "--prompts",
        prompts,
        "--directions",
        "young person,old person",
        "--out",
        out,
        "--images-per-prompt",
        "3",
        "--clip-model",
        clip,
        "--steps",
        "3",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "10",
    )
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: {str(out)!r} holds a fairness run with other settings (directions); use a new --out to keep both"
    ), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert record["seeds"] == [10, 11, 12]
    after = [x for x in record["images"] if x["kind"] == "after"]
    assert sorted(x["assigned"] for x in after[:3]) == ["female person", "male person", "male person"]
    # same seeds before and after; fair guidance changed the images
    import numpy as np

    before = np.asarray(Image.open(out / "000-before-seed10.png"), dtype=float)
    guided = np.asarray(Image.open(out / "000-after-seed10.png"), dtype=float)
    assert before.shape == guided.shape == (32, 32, 3)
    assert "2 prompt(s)" in stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--proportions", "0.7,0.7"], "must sum to 1"),
        (["--directions", "male person"], "two or more"),
        (["--template", "no placeholder"], "must contain {}"),
        (["--images-per-prompt", "0"], "--images-per-prompt must be at least 1"),
        (["--steps", "nan"], "Invalid value for '--steps'"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--seed", "18446744073709551617"], "--seed must be at most"),
        (["--device", "banana"], "is not a device"),
        (["--refuse-inactive", "--steps", "3"], "FairGuidance starts after a warm-up of 5 steps, but only 3 steps run"),
    ],
)
def test_fairness_bad_input_is_one_line(cli, tiny_checkpoint, tmp_path, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("doctor\n")
    args = [
        "fairness",
        "--model",
        tiny_checkpoint,
        "--prompts",
        prompts,
        "--directions",
        "male person,female person",
        "--out",
        tmp_path / "never",
        *extra,
    ]
    code, _, err = cli(*args)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "never").exists()


def test_fairness_missing_prompts_file_and_bad_clip(cli, tiny_checkpoint, tmp_path):
    code, _, err = cli(
        "fairness",
        "--model",
        tiny_checkpoint,
        "--prompts",
        tmp_path / "nope.txt",
        "--directions",
        "a,b",
        "--out",
        tmp_path / "o",
    )
    assert code == 2 and "not found" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("doctor\n")
    code, _, err = cli(
        "fairness",
        "--model",
        tiny_checkpoint,
        "--prompts",
        prompts,
        "--directions",
        "a,b",
        "--out",
        tmp_path / "o",
        "--clip-model",
        tmp_path / "no-clip",
        "--steps",
        "1",
    )
    assert code == 2 and "cannot load CLIP model" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
