"""End to end on a tiny random checkpoint: run, resume after SIGKILL, sharding, classifiers, score, export, report."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_images_close

SRC = str(Path(__file__).resolve().parent.parent / "src")
ARGS = ["--limit", "3", "--images-per-prompt", "2", "--steps", "2", "--height", "32", "--width", "32"]


def env():
    e = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    e.update(TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return e


def cli(*args, check=True, launcher=None):
    cmd = (launcher or [sys.executable, "-m", "safe_diffusion"]) + [str(a) for a in args]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def raw_image_records(run: Path) -> list[str]:
    """The key of every image record in every journal segment (duplicates included)."""
    from safe_diffusion.records.journal import _decode

    keys = []
    for seg in sorted((run / "journal").glob("*.log")):
        for line in seg.read_bytes().split(b"\n"):
            rec = _decode(line)
            if rec and rec[0] == "image":
                keys.append(rec[1])
    return keys


def snapshot(run: Path):
    """Records (key -> seed, image, sha256), the bytes' hash of every image file, and duplicated records."""
    from safe_diffusion.evals.store import RunStore

    store = RunStore.open(run)
    records = {key: (r["seed"], r["image"], r["sha256"]) for key, r in store.images().items()}
    keys = raw_image_records(run)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "images").glob("*.png"))}
    return records, files, len(keys) - len(set(keys))


def assert_same_run(run: Path, ref: Path) -> None:
    """`run`, made by another execution than `ref` (other processes or launcher): the same records (keys, seeds,
    files), each record's hash that of its file, nothing duplicated, and images equal within float32 rounding
    (never compared as bytes across executions: CONTRIBUTING.md)."""
    records, files, dupes = snapshot(run)
    ref_records, ref_files, _ = snapshot(ref)
    assert dupes == 0
    assert {k: r[:2] for k, r in records.items()} == {k: r[:2] for k, r in ref_records.items()}
    assert sorted(files) == sorted(ref_files)
    assert {Path(r[1]).name: r[2] for r in records.values()} == files  # each record describes its own file
    for name in files:
        assert_images_close(run / "images" / name, ref / "images" / name, what=name)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from safe_diffusion.testing import build_clip

    return build_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, clip, tmp_path_factory):
    """An uninterrupted run, batch size 1, with both classifiers (NudeNet runs for real)."""
    run = tmp_path_factory.mktemp("runs") / "ref"
    proc = cli(
        "i2p",
        "run",
        "--model",
        tiny_checkpoint,
        "--out",
        run,
        *ARGS,
        "--batch-size",
        "1",
        "--classifiers",
        "q16,nudenet",
        "--q16-model",
        clip,
        "--safety",
        "strong",
        "--allow-inactive",
    )
    return run, proc


def test_run_writes_a_self_describing_store(reference):
    run, proc = reference
    records, files, dupes = snapshot(run)
    assert sorted(records) == [(p, k) for p in range(3) for k in range(2)] and dupes == 0
    assert len(files) == 6
    # seed of image 0 is the prompt's sd_seed
    from safe_diffusion.evals.suites import load_prompts

    prompts = load_prompts().prompts
    assert records[(1, 0)][0] == prompts[1].sd_seed and records[(1, 1)][0] != prompts[1].sd_seed
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["suite"]["sha256"] == "c5ab09e3f37a0f6f01899f8771495385ab68934fb844f6398a6dd12183a6dfbc"
    assert cfg["versions"]["torch"] and cfg["config"]["mitigation"]["sld_preset"] == "strong"
    results = json.loads((run / "results.json").read_text())
    assert results["schema_version"] == 3 and results["i2p"]
    assert results["label"] == "SLD strong — inactive: warm-up 7 ≥ 2 steps"  # 2 steps: SLD never acted
    assert [r["category"] for r in results["rows"]][-1] == "overall"
    assert results["judges"]["nudenet"]["nudenet"] == "3.4.2"
    assert results["rule"]["judges"] == ["nudenet", "q16"] and results["rule"]["combine"] == "any"
    # prompts never reach the output at info level
    for p in prompts[:3]:
        assert p.text[:30] not in proc.stdout + proc.stderr


def test_sigkill_then_resume_equals_uninterrupted(reference, tiny_checkpoint, clip, tmp_path):
    ref, _ = reference
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "safe_diffusion",
        "i2p",
        "run",
        "--model",
        str(tiny_checkpoint),
        "--out",
        str(run),
        *ARGS,
        "--batch-size",
        "1",
        "--classifiers",
        "none",
        "--safety",
        "strong",
        "--allow-inactive",
    ]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "images").is_dir() and any((run / "images").glob("*.png")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial, _, _ = snapshot(run)
    assert len(partial) < 6, "the run finished before it was killed"
    cli(
        "i2p",
        "run",
        "--model",
        tiny_checkpoint,
        "--out",
        run,
        *ARGS,
        "--batch-size",
        "1",
        "--classifiers",
        "none",
        "--safety",
        "strong",
        "--allow-inactive",
    )
    assert snapshot(run) == snapshot(ref)
    assert not list((run / "images").glob(".*tmp"))
    # a different config is refused, and nothing is written
    before = snapshot(run)
    bad = cli(
        "i2p",
        "run",
        "--model",
        tiny_checkpoint,
        "--out",
        run,
        *ARGS,
        "--batch-size",
        "1",
        "--classifiers",
        "none",
        "--safety",
        "max",
        "--allow-inactive",
        check=False,
    )
    assert bad.returncode == 2 and "different config" in bad.stderr and "'SLD strong' -> 'SLD max'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert snapshot(run) == before


def test_accelerate_two_processes_match_one(reference, tiny_checkpoint, tmp_path, monkeypatch):
    ref, _ = reference
    run = tmp_path / "sharded"
    # `accelerate launch --cpu` starts several CPU processes only through mpirun; --multi_gpu starts them with
    # torchrun, and ACCELERATE_USE_CPU (what --cpu sets) makes the runner use gloo on the CPU.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
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
    proc = cli(
        "i2p",
        "run",
        "--model",
        tiny_checkpoint,
        "--out",
        run,
        *ARGS,
        "--batch-size",
        "1",
        "--classifiers",
        "none",
        "--safety",
        "strong",
        "--allow-inactive",
        launcher=launcher,
    )
    assert "process 0 of 2 wrote 3 new image(s)" in proc.stdout  # batches 0, 2, 4 of 6; process 1 wrote the rest
    assert_same_run(run, ref)


def test_classify_score_export_report(reference, clip, tmp_path):
    import pandas as pd

    ref, _ = reference
    proc = cli("i2p", "score", ref, "--json", tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert {r["category"] for r in doc["rows"]} >= {"overall", "hate"} and "overall" in proc.stdout
    for name in ("e.csv", "e.parquet"):
        cli("i2p", "export", ref, tmp_path / name)
    frame = pd.read_csv(tmp_path / "e.csv", keep_default_na=False)
    assert list(frame.columns[:9]) == [
        "prompt_index",
        "prompt",
        "categories",
        "image_index",
        "seed",
        "image",
        "nudenet",
        "q16",
        "unsafe",
    ]
    assert {"q16_score", "nudenet_score", "nudenet_female_breast_exposed"} <= set(frame.columns)
    assert len(frame) == 6 and len(pd.read_parquet(tmp_path / "e.parquet")) == 6
    # the export scores the same as the run
    for name in ("e.csv", "e.parquet"):
        cli("i2p", "score", tmp_path / name, "--json", tmp_path / "x.json")
        assert json.loads((tmp_path / "x.json").read_text())["rows"] == doc["rows"]
    # reclassify with NudeNet only (real detector) without regenerating
    before = snapshot(ref)
    cli("i2p", "classify", ref, "--classifiers", "nudenet")
    assert snapshot(ref) == before
    cli("i2p", "report", ref, ref, "--out", tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64" in html and "overall" in html
    assert "| overall |" in (tmp_path / "r.md").read_text()
    proc = cli(
        "audit", ref / "images", "--out", tmp_path / "a.html", "--classifiers", "nudenet,q16", "--q16-model", clip
    )
    audit = pd.read_csv(tmp_path / "a.csv")
    assert len(audit) == 6 and {"image", "nudenet", "q16", "unsafe", "nudenet_score", "q16_score"} <= set(audit.columns)


WORKER = """
import os, signal, sys
from safe_diffusion.evals import runner
from safe_diffusion.evals.store import RunStore
from safe_diffusion.common.loading import load_pipeline

run, model, rank, die_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = RunStore.open(run)
lock = store.writer_lock(rank)
pipe = load_pipeline(model, device="cpu")

def on_batch(written):
    if die_after and written >= die_after:
        os.kill(os.getpid(), signal.SIGKILL)  # right after a record was appended

# the run's config and guidance come from its frozen record alone
runner.generate(pipe, store, process_index=rank, num_processes=2, show_progress=False, on_batch=on_batch)
lock.release()
"""


def test_two_writers_on_a_shared_folder_survive_sigkills(reference, tiny_checkpoint, tmp_path):
    """The multi-node mode: two processes (no shared lock, no SQLite) write one run folder, each is SIGKILLed
    (one right after a record, one at a random moment), both restart: same records and bytes as one
    uninterrupted process, nothing duplicated, no temp files left."""
    from safe_diffusion.evals.config import build_run_config
    from safe_diffusion.evals.store import RunStore
    from safe_diffusion.evals.suites import load_suite

    ref, _ = reference
    suite = load_suite("i2p")
    config, _ = build_run_config(
        suite, str(tiny_checkpoint), safety="strong", height=32, width=32, steps=2, images_per_prompt=2, batch_size=1
    )
    assert config.to_dict() == json.loads((ref / "config.json").read_text())["config"]
    run = tmp_path / "shared"
    store = RunStore.create_or_resume(run, config.to_dict(), suite.prompts, {}, limit=3)
    store.close()

    def start(rank, die_after):
        worker = [sys.executable, "-c", WORKER, str(run), str(tiny_checkpoint), str(rank), str(die_after)]
        return subprocess.Popen(worker, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    first = [start(0, 1), start(1, 0)]
    deadline = time.time() + 120
    while time.time() < deadline and first[1].poll() is None:
        if any((run / "images").glob("00000-001.png")) or any((run / "images").glob(".00000-001*")):
            break  # rank 1's first image (batch 1) is being written or done
        time.sleep(0.002)
    first[1].send_signal(signal.SIGKILL)
    for p in first:
        p.wait()
    assert [p.returncode for p in first] == [-9, -9]
    assert len(snapshot(run)[0]) < 6, "the processes finished before they were killed"
    second = [start(0, 0), start(1, 0)]
    for p in second:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert_same_run(run, ref)
    assert not list((run / "images").glob(".*tmp"))
    assert len(list((run / "journal").glob("*.log"))) >= 3  # one segment per writer start that wrote
