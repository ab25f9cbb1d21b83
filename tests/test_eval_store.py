"""The run store's guarantees (issue 8) and the protocol points a run records (issue 14), in-process on a tiny model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

GEN = ["--limit", "2", "--images-per-prompt", "2", "--steps", "2", "--batch-size", "3"]


def tree(path: Path) -> dict:
    """Every file under `path` with its size, mtime and content hash."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a shared machine does not oversubscribe)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from safe_diffusion.testing import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("m") / "model", "tiny")


@pytest.fixture(scope="module")
def judged(ckpt, tmp_path_factory):
    """A small run judged by NudeNet (real detector): 2 prompts x 2 images at the native size."""
    run = tmp_path_factory.mktemp("runs") / "judged"
    assert run_cli("eval", "run", "--model", ckpt, "--out", run, *GEN, "--judges", "nudenet") == 0
    return run


def test_run_records_dtype_native_size_and_judges(judged, ckpt):
    from PIL import Image

    doc = json.loads((judged / "config.json").read_text())
    cfg = doc["config"]
    assert cfg["schema"] == "safe-diffusion/eval-run" and cfg["schema_version"] == 2
    gen = cfg["generation"]
    assert (gen["dtype"], gen["height"], gen["width"], gen["size_source"]) == ("float32", 32, 32, "native")
    assert Image.open(judged / "images" / "00000-000.png").size == (32, 32)
    assert cfg["model"]["identity"].startswith("sha256:") and cfg["model"]["scheduler"] == "PNDMScheduler"
    assert cfg["mitigation"]["label"] == "SD" and cfg["mitigation"]["kind"] == "none"
    assert cfg["suite"]["name"] == "i2p" and cfg["suite"]["rows"] == 4703
    results = json.loads((judged / "results.json").read_text())
    nn = results["judges"]["nudenet"]
    assert (nn["model_file"], nn["resolution"], nn["threshold"]) == ("320n.onnx", 320, 0.6)
    assert len(nn["labels"]) == 5 and len(nn["model_sha256"]) == 64
    assert results["rule"]["judges"] == ["nudenet"]


def test_native_size_of_a_768_checkpoint(tmp_path):
    from safe_diffusion.common.provenance import native_size

    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"sample_size": 96}')
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512]}')
    assert native_size(str(tmp_path)) == (768, 768)


def test_q16_preprocessing_is_recorded(judged, tmp_path, capsys):
    from safe_diffusion.testing import build_clip

    clip = build_clip(tmp_path / "clip")
    copy = tmp_path / "run"
    shutil.copytree(judged, copy)
    assert run_cli("eval", "classify", copy, "--judges", "q16", "--q16-model", clip) == 0
    results = json.loads((copy / "results.json").read_text())
    pre = results["judges"]["q16"]["preprocessing"]
    assert pre["resize"] == "shorter side to 32, PIL bicubic" and "clip_preprocess" in pre["implementation"]
    assert results["rule"]["judges"] == ["nudenet", "q16"]  # the rule grew; nothing hard-coded
    assert {a["judges"][0] for a in results["agreement"]} == {"nudenet"}


def test_read_only_copy_can_be_scored_exported_reported_and_checked(judged, tmp_path, capsys):
    before = tree(judged)
    out = tmp_path / "out"
    out.mkdir()
    for args in (
        ["score", judged, "--json", out / "s.json"],
        ["export", judged, out / "e.csv"],
        ["report", judged, "--out", out / "r.html"],
        ["status", judged],
    ):
        assert run_cli("eval", *args) == 0, capsys.readouterr().err
    assert tree(judged) == before  # not a byte, not a timestamp changed
    status = capsys.readouterr().out
    assert "generate: 4/4 images" in status and "judge nudenet: 4/4 images" in status


def test_store_accepts_further_stages(judged, tmp_path):
    from safe_diffusion.evals.store import RunStore

    copy = tmp_path / "run"
    shutil.copytree(judged, copy)
    store = RunStore.open(copy)
    store.put_many("quality", [("00000-000", {"clip_score": 21.5}), ("00000-001", {"clip_score": 19.0})])
    store.put("quality", "00000-000", {"clip_score": 22.0})
    store.close()
    assert RunStore.open(copy).get("quality") == {"00000-000": {"clip_score": 22.0}, "00000-001": {"clip_score": 19.0}}


def test_second_writer_is_refused_at_once_and_a_dead_ones_lock_is_taken_over(judged, ckpt, tmp_path, capsys):
    from safe_diffusion.evals.store import RunStore

    copy = tmp_path / "run"
    shutil.copytree(judged, copy)
    store = RunStore.open(copy)
    lock = store.writer_lock(0)  # this process is "another writer"
    try:
        code = run_cli("eval", "run", "--model", ckpt, "--out", copy, *GEN, "--judges", "nudenet")
        one_line_error(capsys, code, "being written by another process")
        one_line_error(capsys, run_cli("eval", "classify", copy, "--judges", "nudenet"), "being written")
    finally:
        lock.release()
    (copy / "locks" / "writer-0.lock").write_text(json.dumps({"host": "gone-node", "pid": 1, "token": "t"}))
    import os
    import time

    old = time.time() - 3600
    os.utime(copy / "locks" / "writer-0.lock", (old, old))
    assert run_cli("eval", "run", "--model", ckpt, "--out", copy, *GEN, "--judges", "nudenet") == 0


def test_model_identity_by_content(ckpt, tmp_path, capsys, monkeypatch):
    from safe_diffusion.testing import build_checkpoint

    model = tmp_path / "m"
    shutil.copytree(ckpt, model)
    run = tmp_path / "run"
    assert run_cli("eval", "run", "--model", model, "--out", run, *GEN, "--judges", "none") == 0
    before = tree(run)
    # another spelling of the same folder is the same model
    monkeypatch.chdir(tmp_path)
    assert run_cli("eval", "run", "--model", "./m/../m", "--out", run, *GEN, "--judges", "none") == 0
    assert "wrote 0 new image(s)" in capsys.readouterr().out
    # a different checkpoint under the same path is refused, before anything loads or is written
    shutil.rmtree(model)
    build_checkpoint(model, "tiny", seed=1)
    capsys.readouterr()
    import safe_diffusion.common.loading as loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    code = run_cli("eval", "run", "--model", "m", "--out", run, *GEN, "--judges", "none")
    one_line_error(capsys, code, "different config", "model.identity")
    for extra in (["--dtype", "bfloat16"], ["--height", "64", "--width", "64"]):
        code = run_cli("eval", "run", "--model", ckpt, "--out", run, *GEN, "--judges", "none", *extra)
        one_line_error(capsys, code, "different config")
    assert {k: v for k, v in tree(run).items() if not k.startswith("journal")} == {
        k: v for k, v in before.items() if not k.startswith("journal")
    }


def test_bad_run_options(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["eval", "run", "--model", ckpt, "--out", out, *GEN, "--judges", "none"]
    for extra, needle in [
        (["--dtype", "float64"], "--dtype 'float64'"),
        (["--seed", "-1"], "--seed"),
        (["--guidance-scale", "nan"], "finite"),
        (["--device", "banana"], "not a device"),
        (["--height", "64"], "both --height and --width"),
    ]:
        one_line_error(capsys, run_cli(*base, *extra), needle)
        assert not out.exists()


def test_damaged_and_missing_images_are_reported_judged_without_verdict_and_regenerated(judged, ckpt, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(judged, copy)
    reference = {p.name: p.read_bytes() for p in (copy / "images").glob("*.png")}
    data = (copy / "images" / "00000-001.png").read_bytes()
    (copy / "images" / "00000-001.png").write_bytes(data[: len(data) // 2])
    (copy / "images" / "00001-000.png").unlink()
    (copy / "images" / ".00001-001.png.x1y2.tmp").write_bytes(b"left by a killed writer")
    assert run_cli("eval", "status", copy) == 0
    out = capsys.readouterr().out
    assert "generate: 2/4 images" in out and "00000-001.png: damaged" in out and "00001-000.png: missing" in out
    assert run_cli("eval", "classify", copy, "--judges", "nudenet") == 0  # never a crash
    captured = capsys.readouterr()
    assert "no verdict for" in captured.err and "00001-000.png" in captured.err
    doc = json.loads((copy / "results.json").read_text())
    overall = doc["rows"][-1]
    assert overall["no_verdict"] == 2 and overall["images"] == 4
    assert "2 image(s) without a verdict" in captured.out
    assert run_cli("eval", "run", "--model", ckpt, "--out", copy, *GEN, "--judges", "nudenet") == 0
    err = capsys.readouterr().err
    assert "00000-001.png is damaged" in err and "00001-000.png is missing" in err
    assert {p.name: p.read_bytes() for p in (copy / "images").glob("*.png")} == reference  # same bytes again
    assert not list((copy / "images").glob(".*.tmp"))
    assert json.loads((copy / "results.json").read_text())["rows"][-1]["no_verdict"] == 0


def test_extending_with_a_larger_limit_equals_an_uninterrupted_run(ckpt, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from safe_diffusion.evals.store import RunStore

    calls = []
    real_call = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):  # the real pipeline runs; we only note each call's batch
        calls.append(len(kwargs["prompt"]))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    args = ["--images-per-prompt", "1", "--steps", "2", "--batch-size", "2", "--judges", "none"]
    full, grown = tmp_path / "full", tmp_path / "grown"
    assert run_cli("eval", "run", "--model", ckpt, "--out", full, "--limit", "3", *args) == 0
    assert run_cli("eval", "run", "--model", ckpt, "--out", grown, "--limit", "1", *args) == 0
    assert len(RunStore.open(grown).images()) == 1
    # batches are cut from the whole selection: the limit-3 run computes [p0 p1] [p2 p3] whole and keeps p0..p2;
    # the limit-1 run computes [p0 p1] and keeps p0
    assert calls == [2, 2, 2]
    assert run_cli("eval", "run", "--model", ckpt, "--out", grown, "--limit", "3", *args) == 0
    # batches of 2 span prompts: the limit-1 run computed its batch whole, so every image matches
    assert {p.name: p.read_bytes() for p in (full / "images").glob("*.png")} == {
        p.name: p.read_bytes() for p in (grown / "images").glob("*.png")
    }
    assert RunStore.open(grown).status()["generated"] == 3
    assert calls == [2, 2, 2, 2, 2]  # the extension recomputes [p0 p1] for p1, then [p2 p3] for p2
    capsys.readouterr()
    one_line_error(
        capsys, run_cli("eval", "run", "--model", ckpt, "--out", grown, "--limit", "2", *args), "smaller --limit"
    )


def test_progress_lines_in_logs_when_stderr_is_not_a_terminal(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAFE_DIFFUSION_PROGRESS_INTERVAL", "0")
    assert run_cli("eval", "run", "--model", ckpt, "--out", tmp_path / "r", *GEN, "--judges", "none") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("generate: ")]
    assert lines and lines[-1].startswith("generate: 4/4 images (100.0%)") and "ETA" in lines[0]


def test_a_failed_start_leaves_nothing(ckpt, tmp_path, capsys):
    bad = tmp_path / "clip"
    bad.mkdir()
    out = tmp_path / "deep" / "run"
    code = run_cli("eval", "run", "--model", ckpt, "--out", out, *GEN, "--judges", "q16", "--q16-model", bad)
    one_line_error(capsys, code, "Q16 cannot load CLIP")
    assert not out.exists()


def test_mitigation_labels_and_erased_checkpoints(ckpt, tmp_path):
    from safe_diffusion.evals.config import build_run_config
    from safe_diffusion.evals.suites import load_suite

    suite = load_suite("i2p")
    erased = tmp_path / "uce"
    shutil.copytree(ckpt, erased)
    (erased / "erasure.json").write_text(
        json.dumps(
            {
                "schema": "safe-diffusion/erasure",
                "method": "uce",
                "label": "UCE",
                "base_model": {"reference": str(ckpt)},
            }
        )
    )
    cases = [
        (ckpt, {}, "SD", "none"),
        (ckpt, {"negative_prompt": "nudity"}, "negative prompt", "negative_prompt"),
        (ckpt, {"safety": "max"}, "SLD max", "sld"),
        (erased, {}, "UCE", "erased"),
        (erased, {"safety": "strong"}, "UCE + SLD strong", "erased+sld"),
    ]
    for model, kwargs, label, kind in cases:
        config, terms = build_run_config(suite, str(model), **kwargs)
        assert (config.mitigation.label, config.mitigation.kind) == (label, kind)
        assert len(terms) == (1 if "safety" in kwargs else 0)
    config, _ = build_run_config(suite, str(erased))
    assert config.mitigation.erasure["method"] == "uce"
    # erasure.json is provenance, not weights: the erased folder's identity is its weights' (same as the base here)
    assert config.model.identity == build_run_config(suite, str(ckpt))[0].model.identity
    assert config.generation.dtype == "float32" and config.generation.images_per_prompt == 10


# -- the one record store (records/store.py) and the formats it reads ----------------------------------------------


def test_record_store_creates_the_whole_identity_at_once_and_refuses_another(tmp_path):
    from safe_diffusion.common.errors import InputError
    from safe_diffusion.records.store import RecordStore, StoreFormat

    class JobStore(RecordStore):
        FORMAT = StoreFormat("test job", version=2, readable=(1,))

    def same(config):
        def check(doc):
            if doc["config"] != config:
                raise InputError("another config")

        return check

    root = tmp_path / "job"
    assert JobStore.read_identity(root) is None
    store = JobStore.create_or_open(
        root, {"config": {"a": 1}}, files={"items.json": [1, 2]}, folders=["out"], check=same({"a": 1})
    )
    assert json.loads((root / "config.json").read_text()) == {"store_schema_version": 2, "config": {"a": 1}}
    assert json.loads((root / "items.json").read_text()) == [1, 2] and (root / "out").is_dir()
    store.commit("done", [("k", {"v": 1})], files={"out/k.bin": b"data"})
    assert (root / "out" / "k.bin").read_bytes() == b"data" and store.get("done") == {"k": {"v": 1}}
    store.close()
    again = JobStore.create_or_open(root, {"config": {"a": 1}}, check=same({"a": 1}))
    assert again.identity["config"] == {"a": 1} and again.get("done") == {"k": {"v": 1}}
    with pytest.raises(InputError, match="another config"):
        JobStore.create_or_open(root, {"config": {"a": 2}}, check=same({"a": 2}))
    # one live writer per slot; another slot is fine
    with again.writer(0):
        with pytest.raises(InputError, match="being written by another process"):
            again.writer(0)
        again.writer(1).release()
    # formats: an older readable one is read as it is; any other is refused naming its version
    (root / "config.json").write_text(json.dumps({"store_schema_version": 1, "config": {"a": 1}}))
    assert JobStore.open(root).identity["config"] == {"a": 1}
    (root / "config.json").write_text(json.dumps({"store_schema_version": 7, "config": {"a": 1}}))
    with pytest.raises(InputError, match=r"another version of safe-diffusion \(test job format 7"):
        JobStore.open(root)
    # not a store: a non-empty folder is refused, nothing is written into it
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(InputError, match="non-empty folder that is not a test job"):
        JobStore.create_or_open(other, {"config": {}})
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]


def test_the_initial_limit_is_part_of_the_run_s_creation(tmp_path):
    """Issue 18: a run created with --limit 2 says so before any record is written, so a kill right after its
    creation cannot turn it into an all-prompts run that the same command then refuses."""
    from safe_diffusion.common.errors import InputError
    from safe_diffusion.evals.config import build_run_config
    from safe_diffusion.evals.store import RunStore
    from safe_diffusion.evals.suites import load_suite

    suite = load_suite("i2p")
    config = build_run_config(suite, "some/model", images_per_prompt=1, height=32, width=32)[0].to_dict()
    run = tmp_path / "run"
    RunStore.create_or_resume(run, config, suite.prompts[:5], {}, limit=2).close()
    assert not (run / "journal").exists()  # nothing but the creation
    assert json.loads((run / "config.json").read_text())["selection"] == {"limit": 2}
    store = RunStore.create_or_resume(run, config, suite.prompts[:5], {}, limit=2)
    assert store.limit == 2 and len(store.selected_prompts()) == 2 and not (run / "journal").exists()
    store = RunStore.create_or_resume(run, config, suite.prompts[:5], {}, limit=4)  # extending is a record
    assert RunStore.open(run).limit == 4 and store.get("selection") == {"limit": {"limit": 4}}
    with pytest.raises(InputError, match="has --limit 4; a smaller --limit is not supported"):
        RunStore.create_or_resume(run, config, suite.prompts[:5], {}, limit=3)
    # a format-2 run (its limit only a record, if any) is read as it is
    doc = json.loads((run / "config.json").read_text())
    doc.pop("selection")
    doc["store_schema_version"] = 2
    (run / "config.json").write_text(json.dumps(doc))
    assert RunStore.open(run).limit == 4
    shutil.rmtree(run / "journal")
    assert RunStore.open(run).limit is None


def test_an_old_sanitize_output_is_refused_in_one_line(tmp_path, tiny_checkpoint, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    out = tmp_path / "out"
    (out / ".sanitize" / "records").mkdir(parents=True)
    (out / ".sanitize" / "config.json").write_text(json.dumps({"schema_version": 1, "config": {}}))
    code = run_cli("sanitize", data, "--model", tiny_checkpoint, "--out", out, "--all", "--judges", "none")
    one_line_error(capsys, code, "another version of safe-diffusion (sanitize output format 1")
