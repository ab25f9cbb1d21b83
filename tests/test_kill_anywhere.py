"""Kill at any instant (issue 18): every long command, SIGKILLed at instants that cover its creation, the middle
of its work and its end, then run again unchanged, completes with what an uninterrupted run gives.

One chain per command, each attempt a fresh process running the same command line: attempt 1 is killed the
moment the command's identity appears on disk (creation), attempt 2 at its first new output (mid-run: a file
is complete, its record not yet written), attempt 3 at a random instant after its first write (seeded; the
delay is in the failure message), attempt 4 the moment its final output appears (the end); attempt 5 runs to
completion. Instants are events on disk seen by polling every few milliseconds, so they do not depend on how
fast the machine is. An uninterrupted run of the same command line (same settings, same machine, one thread)
runs alongside and is the reference: compared as bytes, since it is the same execution repeated
(CONTRIBUTING.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SRC = str(Path(__file__).resolve().parent.parent / "src")
POLL = 0.003
TIMEOUT = 240
#: The random instant of each chain: seconds after the attempt's first write, from a seeded generator.
RANDOM = random.Random(18)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "safe_diffusion", *(str(a) for a in args)]


# -- instants: each is made at an attempt's start and then polled ------------------------------------------------

Instant = Callable[[], Callable[[], bool]]


def _identity(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def appears(path: Path) -> Instant:
    """The moment `path` exists anew (made, or made again, by this attempt)."""

    def start():
        before = _identity(path)
        return lambda: _identity(path) not in (None, before)

    return start


def grows(count: Callable[[], int]) -> Instant:
    """The moment `count()` exceeds its value at the attempt's start."""

    def start():
        base = count()
        return lambda: count() > base

    return start


def later(instant: Instant, seconds: float) -> Instant:
    """`seconds` after `instant`."""

    def start():
        reached = instant()
        since = None

        def check():
            nonlocal since
            if since is None and reached():
                since = time.monotonic()
            return since is not None and time.monotonic() - since >= seconds

        return check

    return start


def files(folder: Path, pattern: str = "*") -> Callable[[], int]:
    return lambda: sum(1 for p in folder.glob(pattern) if not p.name.startswith(".")) if folder.is_dir() else 0


def journal_lines(folder: Path) -> Callable[[], int]:
    """Complete lines in every journal segment under `folder` (records written, by anyone)."""

    def count():
        total = 0
        for seg in folder.glob("*.log") if folder.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):
                total += seg.read_bytes().count(b"\n")
        return total

    return count


# -- a chain of killed attempts ----------------------------------------------------------------------------------


def _attempt(cmd: list[str], check: Callable[[], bool] | None) -> tuple[int, str]:
    """Run `cmd`; SIGKILL it when `check()` becomes true. (return code, stderr tail)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + TIMEOUT
        try:
            while proc.poll() is None:
                if check is not None and check():
                    proc.send_signal(signal.SIGKILL)
                    break
                assert time.monotonic() < deadline, f"{cmd[3:5]} ran past {TIMEOUT} s"
                time.sleep(POLL)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        code = proc.wait()
        err.seek(0)
        return code, err.read().decode(errors="replace")[-3000:]


def kill_chain(cmd: list[str], instants: list[tuple[str, Instant, bool]]) -> list[str]:
    """Each instant in a fresh attempt of `cmd`, then `cmd` to completion; returns what happened, in order.

    An instant marked as required must find the command still running (else the test would not test it); an
    attempt that finishes before its instant ends the chain (the command is complete).
    """
    log = []
    for name, instant, required in instants:
        code, err = _attempt(cmd, instant())
        if code == -signal.SIGKILL:
            log.append(f"killed at {name}")
            continue
        assert code == 0, f"after {log}, the attempt to be killed at {name} failed ({code}):\n{err}"
        assert not required, f"the command finished before {name}: {log}"
        log.append(f"finished before {name}")
        return log
    code, err = _attempt(cmd, None)
    assert code == 0, f"after {log}, the same command failed ({code}):\n{err}"
    log.append("completed")
    return log


def _random_instant(first_write: Instant) -> tuple[str, Instant, bool]:
    delay = round(RANDOM.uniform(0.05, 1.5), 3)
    return (f"{delay} s after the first write", later(first_write, delay), False)


def _in_parallel(reference: Callable[[], None], chain: Callable[[], list[str]]) -> list[str]:
    """The uninterrupted reference in its own process alongside the chain (one thread each)."""
    import threading

    failure = []

    def run():
        try:
            reference()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        log = chain()
    finally:
        thread.join()
    if failure:
        raise failure[0]
    return log


def _digest_tree(root: Path, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not skip(p.relative_to(root).as_posix())
    }


def _no_leftovers(*folders: Path) -> None:
    for folder in folders:
        left = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".creating-")]
        assert not left, left


# -- the commands ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from safe_diffusion.testing import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("kill") / "tiny", "tiny")


EVAL = ["--limit", "2", "--images-per-prompt", "2", "--steps", "2", "--batch-size", "2", "--judges", "nudenet"]


def _run_outcome(run: Path) -> dict:
    """What an evaluation run ended with: image bytes, records and results (without where and when it ran)."""
    from safe_diffusion.evals.store import RunStore

    results = json.loads((run / "results.json").read_text())
    for key in ("source", "created"):
        results.pop(key)
    store = RunStore.open(run)
    rows = [{k: v for k, v in row.items() if k != "image"} for row in store.records()]
    return {"images": _digest_tree(run / "images"), "records": rows, "results": results, "limit": store.limit}


def test_eval_run_killed_anywhere_completes_as_uninterrupted(model, tmp_path):
    runs = tmp_path / "runs"
    run, reference = runs / "killed", runs / "reference"
    cmd = _command("eval", "run", "--model", model, "--out", run, *EVAL)
    first_image = grows(files(run / "images", "*.png"))
    log = _in_parallel(
        lambda: _attempt(_command("eval", "run", "--model", model, "--out", reference, *EVAL), None),
        lambda: kill_chain(
            cmd,
            [
                ("creation (config.json appears)", appears(run / "config.json"), True),
                ("the first image of this attempt", first_image, True),
                _random_instant(grows(journal_lines(run / "journal"))),
                ("the end (results.json appears)", appears(run / "results.json"), False),
            ],
        ),
    )
    assert log[:2] == ["killed at creation (config.json appears)", "killed at the first image of this attempt"]
    outcome = _run_outcome(run)
    assert outcome == _run_outcome(reference), log
    assert len(outcome["images"]) == 4 and outcome["limit"] == 2
    _no_leftovers(runs)


def _erasure_outcome(out: Path) -> dict:
    """An erased model: every file's bytes (safetensors files: their tensors' bytes and metadata, since the
    library writes the metadata in no fixed order), and its record without times and resume provenance."""
    from safetensors import safe_open

    record = json.loads((out / "erasure.json").read_text())
    for key in ("seconds", "created"):
        record.pop(key)
    record["edited_weights"].pop("sha256")  # of the file's bytes, which the metadata's order changes
    for key in ("resumed_at", "seconds_this_session", "steps_per_second"):
        record.get("training", {}).pop(key, None)
    tensors = {}
    for path in sorted(out.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors[path.relative_to(out).as_posix()] = (
                f.metadata(),
                {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest() for k in sorted(f.keys())},
            )
    files = _digest_tree(out, skip=lambda rel: rel == "erasure.json" or rel.endswith(".safetensors"))
    return {"files": files, "tensors": tensors, "record": record}


@pytest.mark.parametrize(
    "method, extra",
    [
        ("uce", ["--preserve", "a cat"]),
        ("esd-x", ["--steps", "8", "--checkpoint-every", "2", "--ddim-steps", "4", "--lr", "1e-3", "--seed", "3"]),
    ],
)
def test_erase_killed_anywhere_completes_as_uninterrupted(model, tmp_path, method, extra):
    out, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["erase", "--method", method, "--erase", "nudity", "--model", model, *extra, "--device", "cpu"]
    work = tmp_path / ".killed.erasure-partial"
    esd = method.startswith("esd")
    # UCE's work after creation is one closed-form step (milliseconds): its later instants may come too late
    mid = grows(files(work / "checkpoints", "step-*")) if esd else appears(work / "model")
    log = _in_parallel(
        lambda: _attempt(_command(*args, "--out", reference), None),
        lambda: kill_chain(
            _command(*args, "--out", out),
            [
                ("creation (the work folder appears)", appears(work), True),
                ("mid-run", mid, esd),
                _random_instant(mid),
                ("the end (the finished record, before publishing)", appears(work / "model" / "erasure.json"), False),
            ],
        ),
    )
    assert _erasure_outcome(out) == _erasure_outcome(reference), log
    assert not work.exists()
    _no_leftovers(tmp_path)


def _images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _sanitize_outcome(out: Path) -> dict:
    from safe_diffusion.editing.sanitize import load_records

    records = {
        rel: {k: v for k, v in rec.items() if k not in ("seconds", "process")} for rel, rec in load_records(out).items()
    }
    outputs = _digest_tree(out, skip=lambda rel: rel.startswith(".sanitize/"))
    return {"outputs": outputs, "records": records}


def test_sanitize_killed_anywhere_completes_as_uninterrupted(model, tmp_path):
    data = _images(tmp_path / "data", 3)
    out, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["sanitize", data, "--model", model, "--all", "--judges", "none", "--steps", "3", "--remove", "nudity"]
    log = _in_parallel(
        lambda: _attempt(_command(*args, "--out", reference), None),
        lambda: kill_chain(
            _command(*args, "--out", out),
            [
                ("creation (the state appears)", appears(out / ".sanitize" / "config.json"), True),
                ("the first output of this attempt", grows(files(out, "*.png")), True),
                _random_instant(grows(journal_lines(out / ".sanitize" / "journal"))),
                ("the end (the report appears)", appears(out / ".sanitize" / "report.html"), False),
            ],
        ),
    )
    outcome = _sanitize_outcome(out)
    assert outcome == _sanitize_outcome(reference), log
    assert sorted(outcome["records"]) == ["0.png", "1.png", "2.png"]
    _no_leftovers(out)


@pytest.fixture(scope="module")
def quality_inputs(model, tmp_path_factory):
    """A finished run of 4 captions (no judges), a reference folder and a random-weight CLIP."""
    from helpers import run_cli

    from safe_diffusion.testing import build_clip

    root = tmp_path_factory.mktemp("quality")
    captions = root / "captions.csv"
    captions.write_text("caption\na cat on a sofa\na red bus\na bowl of fruit\ntwo dogs on a beach\n")
    run = root / "run"
    code = run_cli(
        "eval",
        "run",
        "--suite",
        "coco",
        "--data",
        captions,
        "--judges",
        "none",
        "--model",
        model,
        "--steps",
        "2",
        "--out",
        run,
    )
    assert code == 0
    return {"run": run, "ref": _images(root / "ref", 6), "clip": build_clip(root / "clip")}


def test_eval_quality_killed_anywhere_completes_as_uninterrupted(quality_inputs, tmp_path):
    def command(name: str) -> list[str]:
        run = tmp_path / name
        if not run.exists():
            shutil.copytree(quality_inputs["run"], run)
        return _command(
            "eval",
            "quality",
            run,
            "--clip-model",
            quality_inputs["clip"],
            "--fid-reference",
            quality_inputs["ref"],
            "--feature-extractor",
            "random",
            "--image-size",
            "32",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--cache-dir",
            tmp_path / f"cache-{name}",
            "--json",
            tmp_path / f"{name}.json",
        )

    killed = command("killed")
    journal = journal_lines(tmp_path / "killed" / "journal")
    log = _in_parallel(
        lambda: _attempt(command("reference"), None),
        lambda: kill_chain(
            killed,
            [
                ("the first record", grows(journal), True),
                ("reference features", appears(tmp_path / "cache-killed"), True),
                _random_instant(grows(journal)),
                ("the end (the JSON appears)", appears(tmp_path / "killed.json"), False),
            ],
        ),
    )

    def outcome(name: str) -> dict:
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        doc.pop("config")
        return doc

    assert outcome("killed") == outcome("reference"), log
    assert outcome("killed")["images"] == 4 and outcome("killed")["fid"] is not None
    _no_leftovers(tmp_path / "killed", tmp_path / "cache-killed")


ATTACK = ["--iterations", "1", "--timesteps", "1", "--steps", "2", "--height", "32", "--width", "32"]


def _attack_outcome(out: Path) -> dict:
    """An attack run: its images' bytes and its records without their wall-clock seconds."""
    from safe_diffusion.jobs.attack import STAGE, AttackStore

    store = AttackStore.open(out)
    try:
        records = {k: {f: v for f, v in r.items() if f != "seconds"} for k, r in store.get(STAGE).items()}
    finally:
        store.close()
    return {"images": _digest_tree(out / "images"), "records": records}


def test_attack_run_killed_anywhere_completes_as_uninterrupted(model, tmp_path):
    suite = tmp_path / "s.csv"
    suite.write_text("prompt,evaluation_seed\na cat,1\na dog,2\n")
    runs = tmp_path / "runs"
    run, reference = runs / "killed", runs / "reference"
    args = ["attack", "run", "--model", model, "--suite", suite, "--judges", "nudenet", *ATTACK]
    log = _in_parallel(
        lambda: _attempt(_command(*args, "--out", reference), None),
        lambda: kill_chain(
            _command(*args, "--out", run),
            [
                ("creation (config.json appears)", appears(run / "config.json"), True),
                ("the first image of this attempt", grows(files(run / "images", "*.png")), True),
                _random_instant(grows(journal_lines(run / "journal"))),
                ("the end (the last prompt's image)", appears(run / "images" / "00001-post.png"), False),
            ],
        ),
    )
    assert log[:2] == ["killed at creation (config.json appears)", "killed at the first image of this attempt"]
    outcome = _attack_outcome(run)
    assert outcome == _attack_outcome(reference), log
    assert sorted(outcome["records"]) == ["0", "1"] and len(outcome["images"]) == 4
    _no_leftovers(runs)
