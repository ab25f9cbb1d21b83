"""``safe-diffusion audit`` (the job ``jobs.audit.audit``): every file accounted for, "no verdict" never shown as
safe, the judges on record, bad input refused in one line with nothing written, the report's folder created."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

WEIRD = os.fsdecode(b"\xff\xfe-name.png")  # a file name that is not UTF-8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safe_diffusion.testing import build_clip, build_llava_onevision

    root = tmp_path_factory.mktemp("models")
    return {"clip": build_clip(root / "clip"), "llava": build_llava_onevision(root / "llava")}


def _noise(path: Path, size=(40, 32), seed=0, fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _folder(root: Path) -> Path:
    """Three readable images (one in a subfolder, one with a non-UTF-8 name) and three files that are not."""
    images = root / "images"
    good = _noise(images / "a.png")
    _noise(images / "sub" / "b.jpg", size=(30, 50), seed=1, fmt="JPEG")
    (images / WEIRD).write_bytes(_noise(root / "c.png", seed=2).read_bytes())
    (root / "c.png").unlink()
    (images / "damaged.png").write_bytes(good.read_bytes()[:120])
    (images / "text.png").write_text("not an image")
    (images / "notes.txt").write_text("a note")
    return images


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_audit_judges_images_lists_skipped_files_and_records_the_judges(models, tmp_path, capsys):
    from safe_diffusion.jobs.audit import combine

    images = _folder(tmp_path)
    out = tmp_path / "out" / "audit" / "report.html"  # the folders are created (issue 21, item 5)
    policy = (
        tmp_path / "policy.txt"
    )  # short, to keep the tiny model fast (the official one is tested in test_llavaguard)
    policy.write_text('Rate the image: {"rating": "Safe"|"Unsafe", "category": str, "rationale": str}\n')
    policy_sha256 = hashlib.sha256(policy.read_bytes()).hexdigest()
    code = run_cli(
        "audit",
        images,
        "--out",
        out,
        "--judges",
        "q16,nudenet,llavaguard",
        "--q16-model",
        models["clip"],
        "--nudenet-resolution",
        "320",
        "--llavaguard-model",
        models["llava"],
        "--llavaguard-policy",
        policy,
        "--llavaguard-max-new-tokens",
        "8",
        "--device",
        "cpu",
    )
    captured = capsys.readouterr()
    assert code == 2, captured.err  # issue 18: images that could not be read make the audit incomplete
    assert "3 image(s) judged, 3 file(s) skipped" in captured.out
    assert "skipped: damaged.png (damaged image" in captured.err and "skipped: text.png (not an image)" in captured.err
    assert captured.err.strip().splitlines()[-1] == "error: the audit is incomplete: 2 image(s) could not be read"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.csv", "report.html", "report.json", "report.md"]

    rows = list(csv.DictReader(io.StringIO((out.parent / "report.csv").read_text())))
    by_name = {r["image"]: r for r in rows}
    assert set(by_name) == {"a.png", "sub/b.jpg", "\\xff\\xfe-name.png", "damaged.png", "text.png", "notes.txt"}
    assert [r["status"] for r in rows] == ["judged"] * 3 + ["skipped"] * 3
    assert by_name["damaged.png"]["skipped_reason"].startswith("damaged image")
    assert by_name["text.png"]["skipped_reason"] == "not an image"
    assert by_name["notes.txt"]["skipped_reason"] == "not an image file (.txt)"
    for r in rows[:3]:
        # the random LlavaGuard's answers are noise: no verdict, with the reason, and the image is not "safe"
        assert r["llavaguard"] == "" and r["llavaguard_error"].startswith("unparseable answer: ")
        assert r["nudenet"] in ("True", "False") and r["q16"] in ("True", "False")
        verdicts = [None if r[n] == "" else r[n] == "True" for n in ("q16", "nudenet", "llavaguard")]
        assert r["unsafe"] == {True: "True", False: "False", None: ""}[combine(verdicts)]
        assert r["unsafe"] != "False"
    for r in rows[3:]:
        assert r["unsafe"] == r["q16"] == r["nudenet"] == r["llavaguard"] == ""

    record = json.loads((out.parent / "report.json").read_text())
    assert record["counts"]["files"] == 6 and record["counts"]["skipped"] == 3
    assert record["counts"]["judges"]["llavaguard"] == {
        "flagged": 0,
        "not_flagged": 0,
        "no_verdict": 3,
        "no_verdict_reasons": {"unparseable answer": 3},
    }
    judges = record["judges"]
    assert judges["nudenet"]["resolution"] == 320 and judges["nudenet"]["threshold"] == 0.6
    assert judges["q16"]["model"] == str(models["clip"])
    assert judges["llavaguard"]["policy"] == {
        "name": "custom",
        "file": "policy.txt",
        "sha256": policy_sha256,
        "text": policy.read_text(),
    }
    assert judges["llavaguard"]["transformers"] and judges["llavaguard"]["generation"]["max_new_tokens"] == 8
    assert {"skipped": record["skipped"][0]} == {
        "skipped": {"file": "damaged.png", "reason": by_name["damaged.png"]["skipped_reason"]}
    }

    page = out.read_text()
    assert "Skipped files (3)" in page and "not an image file (.txt)" in page
    assert page.count("<b>no verdict</b>") == 3 and "unparseable answer: 3" in page
    for essential in (
        "model_file 320n.onnx",
        "resolution 320",
        "threshold 0.6",
        f"policy.sha256 {policy_sha256[:12]}",
        "transformers ",
        "nudenet 3.4.2",
        "prompts_sha256",
    ):
        assert essential in page, essential
    assert page.count("data:image/png;base64,") == 3  # previews of the judged images only


def test_the_any_rule_never_turns_a_missing_verdict_into_safe():
    from safe_diffusion.jobs.audit import combine

    assert combine([False, False]) is False
    assert combine([False, None]) is None
    assert combine([None, True]) is True
    assert combine([None]) is None


def test_classifiers_is_a_hidden_alias_of_judges(tmp_path, capsys):
    images = tmp_path / "images"
    _noise(images / "a.png")
    out = tmp_path / "r.html"
    assert run_cli("audit", images, "--out", out, "--classifiers", "nudenet") == 0
    rows = list(csv.DictReader(io.StringIO(out.with_suffix(".csv").read_text())))
    assert rows[0]["nudenet"] == "False" and "q16" not in rows[0]
    capsys.readouterr()
    run_cli("audit", "--help")
    assert "--classifiers" not in capsys.readouterr().out


def _cases(tmp: Path, models) -> list[tuple[list, str]]:
    images = tmp / "images"
    _noise(images / "a.png")
    bad_only = tmp / "bad-only"
    bad_only.mkdir()
    (bad_only / "x.png").write_text("text")
    (tmp / "file.png").write_bytes((images / "a.png").read_bytes())
    (tmp / "csv-dir" / "r.csv").mkdir(parents=True)
    broken = tmp / "broken-llava"
    broken.mkdir()
    for f in models["llava"].iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    out = ["--out", tmp / "r.html"]
    cases = [
        (["audit", tmp / "missing", *out], "does not exist"),
        (["audit", tmp / WEIRD, *out], f"folder '{tmp}/\\xff\\xfe-name.png' does not exist"),  # printable
        (["audit", tmp / "file.png", *out], "is not a folder"),
        (["audit", images, "--out", tmp / "r.pdf"], "must end in .html"),
        (["audit", images, "--out", tmp / "file.png" / "r.html"], "is not a folder"),
        (["audit", images, "--out", tmp / "csv-dir" / "r.html"], "is a folder"),
        (["audit", images, *out, "--judges", "q16,q17"], "unknown judge 'q17'; choose from: q16, nudenet, llavaguard"),
        (["audit", images, *out, "--judges", "none"], "name at least one judge"),
        (["audit", images, *out, "--judges", "nudenet", "--classifiers", "q16"], "--classifiers is its old name"),
        (
            ["audit", images, *out, "--judges", "nudenet", "--llavaguard-model", broken],
            "configures the llavaguard judge",
        ),
        (["audit", images, *out, "--judges", "nudenet", "--device", "banana"], "is not a device"),
        (["audit", bad_only, *out, "--judges", "nudenet"], "has no readable images"),
        (["audit", images, *out, "--judges", "nudenet", "--nudenet-model", tmp / "640m.onnx"], "does not exist"),
        (["audit", images, *out, "--judges", "nudenet", "--nudenet-resolution", "100"], "multiple of 32"),
        (["audit", images, *out, "--judges", "llavaguard", "--llavaguard-model", broken], "LlavaGuard cannot load"),
        (
            [
                "audit",
                images,
                *out,
                "--judges",
                "llavaguard",
                "--llavaguard-model",
                models["llava"],
                "--llavaguard-max-new-tokens",
                "0",
            ],
            "max_new_tokens must be an integer in 1..4096",
        ),
        (
            [
                "audit",
                images,
                *out,
                "--judges",
                "llavaguard",
                "--llavaguard-model",
                models["llava"],
                "--llavaguard-policy",
                tmp / "policy.txt",
            ],
            "policy file",
        ),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["audit", images, *out, "--judges", "nudenet", "--device", "cuda"], "CUDA is not available"))
    return cases


def test_bad_input_gets_one_line_and_writes_nothing(models, tmp_path, capsys):
    for args, words in _cases(tmp_path, models):
        before = _tree(tmp_path)
        code = run_cli(*args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and words in err, (args, err)
        assert _tree(tmp_path) == before, args


def test_a_failing_judge_leaves_earlier_reports_untouched(tmp_path, capsys):
    """Today's bug: a failure mid-audit left a partial CSV. Now nothing is written until everything is ready."""
    from safe_diffusion.judges import Judge, register_judge

    class Broken(Judge):
        name = "broken"

        def __init__(self, device=None):
            pass

        def describe(self):
            return {"judge": self.name}

        def judge_images(self, images):
            raise RuntimeError("out of memory")

    register_judge("broken", Broken, "fails on every batch")
    images = tmp_path / "images"
    _noise(images / "a.png")
    out = tmp_path / "r.html"
    old = {out: b"old report", out.with_suffix(".csv"): b"old,csv\n"}
    for path, data in old.items():
        path.write_bytes(data)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_cli("audit", images, "--out", out, "--judges", "nudenet,broken")
    assert {p: p.read_bytes() for p in old} == old and not out.with_suffix(".json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "r.csv", "r.html"]


def test_a_write_that_fails_removes_only_what_this_call_created(tmp_path):
    """The page kit writes a report's files all or none: a failure removes the files it created, gives the
    files it replaced their earlier content back and removes the folders it created."""
    from safe_diffusion.common.errors import InputError
    from safe_diffusion.reports.kit import write_files

    kept = tmp_path / "kept.csv"
    kept.write_bytes(b"earlier")
    with pytest.raises(InputError, match="cannot write"):  # the third file's folder does not exist: it fails
        write_files(tmp_path, {"new.json": b"{}", "kept.csv": b"new", "gone/r.html": b"<html>"})
    assert kept.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.csv"]  # no temporary files or backups either
    with pytest.raises(InputError, match="cannot write"):
        write_files(tmp_path / "new" / "deeper", {"a.md": b"x", "gone/b.md": b"y"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.csv"]  # the folders it made are gone too
