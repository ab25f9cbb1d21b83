"""The harness's quality stage (`eval quality`) and the safety–quality trade-off report (`eval tradeoff`).

Offline: a random-weight CLIP and the random feature extractor; the numbers are noise, the plumbing real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safe_diffusion.common.errors import InputError
from safe_diffusion.evals import quality as q
from safe_diffusion.evals.store import RunStore
from safe_diffusion.testing import RandomFeatureExtractor, build_clip

SRC = str(Path(__file__).resolve().parent.parent / "src")
TINY = ["--steps", "2", "--height", "32", "--width", "32"]
CAPTIONS = ["a cat on a sofa", "a red bus in the rain", "a bowl of fruit", "two dogs on a beach"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    """COCO-style quality runs and I2P safety runs of two methods (SD, SLD strong), plus a reference folder."""
    from safe_diffusion.cli import main

    root = tmp_path_factory.mktemp("tradeoff")
    captions = root / "captions.csv"
    captions.write_text("caption\n" + "\n".join(CAPTIONS) + "\n")
    clip = build_clip(root / "clip")
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    for safety in ("off", "strong"):
        common = ["--model", str(tiny_checkpoint), "--safety", safety, "--allow-inactive", *TINY]
        assert main(
            [
                "eval",
                "run",
                "--suite",
                "coco",
                "--data",
                str(captions),
                "--judges",
                "none",
                "--out",
                str(root / f"coco-{safety}"),
                *common,
            ]
        ) in (0, None)
        assert main(
            [
                "eval",
                "run",
                "--suite",
                "i2p",
                "--limit",
                "2",
                "--images-per-prompt",
                "1",
                "--judges",
                "nudenet",
                "--out",
                str(root / f"i2p-{safety}"),
                *common,
            ]
        ) in (0, None)
    return {"root": root, "clip": clip, "ref": ref}


def _quality(cli, run, runs, *extra):
    return cli(
        "eval",
        "quality",
        run,
        "--clip-model",
        runs["clip"],
        "--fid-reference",
        runs["ref"],
        "--feature-extractor",
        "random",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        *extra,
    )


def test_quality_stage_records_clip_fid_kid_in_the_run(cli, runs, tmp_path):
    run = runs["root"] / "coco-off"
    code, _stdout, err = _quality(cli, run, runs, "--json", tmp_path / "q.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "q.json").read_text())
    assert doc["images"] == len(CAPTIONS) and doc["clip_scored"] == len(CAPTIONS)
    assert all(isinstance(doc[k], float) for k in ("clip_score", "fid", "kid"))
    assert sorted(doc["per_image"]) == [f"{i:05d}-000" for i in range(len(CAPTIONS))]
    assert doc["config"]["clip"]["model"] and doc["config"]["fid"]["extractor"]["extractor"] == "random-conv"
    store = RunStore.open(run)
    recorded = q.run_quality(store)
    store.close()
    assert recorded["clip_score"] == doc["clip_score"] and recorded["fid"] == doc["fid"]
    # each image was scored against its own caption
    scorer = q.ClipScorer(runs["clip"], device="cpu")
    first = q.QualityImage("x", run / "images" / "00000-000.png", CAPTIONS[0])
    direct = q.clip_scores([first], scorer, records=q.Records.in_memory())[0]["x"]["clip_score"]
    assert doc["per_image"]["00000-000"]["clip_score"] == pytest.approx(direct, abs=1e-4)


def test_a_crashed_quality_stage_resumes_without_recomputing(runs):
    store = RunStore.open(runs["root"] / "coco-strong")

    class Crashing(RandomFeatureExtractor):
        calls = 0

        def features(self, images):
            Crashing.calls += 1
            if Crashing.calls > 3 + 1:  # the reference's 6 images (3 batches, then cached), then one batch of ours
                raise RuntimeError("killed")
            return super().features(images)

    options = dict(
        clip_model=None,
        reference=str(runs["ref"]),
        image_size=32,
        batch_size=2,
        device="cpu",
        cache_dir=runs["root"] / "cache",
    )
    with pytest.raises(RuntimeError, match="killed"):
        q.evaluate_run(store, feature_extractor=Crashing(), **options)
    kept = {k for k in store.get(q.RECORDS_STAGE) if k.startswith("features/")}
    assert len(kept) == 2  # the first batch survived the crash

    class Counting(RandomFeatureExtractor):
        images = 0

        def features(self, images):
            Counting.images += len(images)
            return super().features(images)

    resumed = q.evaluate_run(store, feature_extractor=Counting(), **options)
    assert Counting.images == len(CAPTIONS) - 2, "only the images without features are computed again"
    fresh = q.evaluate_quality(
        q.run_images(store), feature_extractor=RandomFeatureExtractor(), records=q.Records.in_memory(), **options
    )
    store.close()
    assert resumed.summary == fresh.summary


def test_tradeoff_report_pairs_each_method_s_safety_and_quality(cli, runs, tmp_path):
    root = runs["root"]
    assert _quality(cli, root / "coco-strong", runs)[0] == 0
    out = tmp_path / "tradeoff.html"
    code, _stdout, err = cli(
        "eval", "tradeoff", root / "i2p-off", root / "coco-off", root / "i2p-strong", root / "coco-strong", "--out", out
    )
    assert code == 0, err
    md = out.with_suffix(".md").read_text()
    methods = md.split("## Methods")[1]
    rows = [line for line in methods.splitlines() if line.startswith("| SD") or line.startswith("| SLD strong")]
    assert len(rows) == 2, md  # one row per method: its I2P run and its COCO run together
    assert "I2P: inappropriate probability [95% CI]" in md
    # the SLD model card's figures (SD 1.4, every prompt) are not put beside a random checkpoint's (issue 21, item 3)
    assert "0.39" not in md and "0.13" not in md
    assert (
        "the published I2P figure (SLD model card: SD 1.4, all 4,703 prompts, 10 images per prompt) is not shown"
        " beside SD (a random-weight checkpoint" in md
    )
    assert out.with_suffix(".png").stat().st_size > 1000 and 'id="tradeoff-chart"' in out.read_text()
    # a run with neither verdicts nor quality is named
    code, _, err = cli(
        "eval",
        "tradeoff",
        root / "coco-off",
        root / "coco-strong",
        runs["root"] / "i2p-off",
        "--out",
        tmp_path / "t2.html",
        "--label",
        "a",
    )
    assert code == 2 and "1 --label value(s) for 3 run(s)" in err


def test_quality_stage_bad_input_is_one_line(cli, runs, tmp_path):
    run = runs["root"] / "coco-off"
    cases = [
        (["--clip-model", "none"], "nothing to compute"),
        (["--fid-reference", str(tmp_path / "nope")], "does not exist"),
        (["--feature-extractor", "vgg", "--fid-reference", str(runs["ref"])], "unknown --feature-extractor 'vgg'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--json", str(tmp_path / "q.txt")], "must end in .json"),
    ]
    for extra, message in cases:
        code, _, err = cli("eval", "quality", run, *extra)
        assert code == 2 and err.count("\n") == 1 and message in err, (extra, err)
    with pytest.raises(InputError, match="needs --data FILE"):
        from safe_diffusion.evals.suites import load_suite

        load_suite("coco-5k")


def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_json_target_that_cannot_be_written_fails_before_anything_is_computed(cli, runs, tmp_path):
    """Issue 18: a read-only --json folder (sysfs: not writable, even for root) is refused in one line at once,
    not after the whole computation; the run is left as it was."""
    run = tmp_path / "run"
    import shutil

    shutil.copytree(runs["root"] / "coco-off", run)
    before = _tree(run)
    code, _, err = _quality(cli, run, runs, "--json", "/sys/quality.json")
    assert code == 2 and err.count("\n") == 1 and "'/sys' is not writable" in err, err
    assert _tree(run) == before


def test_a_full_disk_when_writing_the_json_leaves_no_partial_file(cli, runs, tmp_path, monkeypatch):
    import errno

    from safe_diffusion.common import outputs

    real = outputs.atomic_write_bytes
    target = tmp_path / "q.json"

    def full_disk(path, data):
        if Path(path) == target:
            with open(path.with_name(f".{path.name}.part.tmp"), "wb") as f:
                f.write(data[:10])  # what the disk took before it was full
            Path(f.name).unlink()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(outputs, "atomic_write_bytes", full_disk)
    code, _, err = _quality(cli, runs["root"] / "coco-off", runs, "--json", target)
    assert (
        code == 1
        and err.strip().splitlines()[-1] == f"error: No space left on device ({target}); free some space and rerun"
    )
    assert list(tmp_path.iterdir()) == []


def test_demo_clip_on_a_full_disk_or_a_read_only_folder_leaves_nothing(tmp_path):
    """Issue 18: the random CLIP is built beside its folder and renamed into place; a full disk (a file-size limit,
    which the kernel enforces as it does a full disk) is one line, exit 1, and nothing is left."""
    import resource
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=SRC, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))

    for target, limit, code, words in (
        (tmp_path / "clip", small_files, 1, f"File too large ({tmp_path / 'clip'})"),
        (Path("/sys/clip"), None, 2, "folder '/sys' is not writable: "),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "safe_diffusion.testing", "clip", str(target)],
            env=env,
            capture_output=True,
            text=True,
            preexec_fn=limit,
            timeout=300,
            check=False,
        )
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
        assert proc.returncode == code and len(lines) == 1 and lines[0].startswith(f"error: {words}"), proc.stderr
        assert not target.exists()
    assert list(tmp_path.iterdir()) == []
