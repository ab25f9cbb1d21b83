"""ESD fine-tuning on a tiny model: the loss falls, only the chosen parameters move, and a run killed
with SIGKILL and rerun ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safe_diffusion.erasure.common import esd_parameter_names

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def pipe(tiny_checkpoint):
    from safe_diffusion.common.loading import load_pipeline

    return load_pipeline(str(tiny_checkpoint), device="cpu", dtype=torch.float32)


def _trainer(pipe, method, **kw):
    from safe_diffusion.erasure import ESDTrainer

    return ESDTrainer(pipe, method, ["nudity", "violence"], ddim_steps=4, seed=0, **kw)


def test_esd_loss_decreases(pipe):
    trainer = _trainer(pipe, "esd-x", lr=1e-3)
    samples = [trainer.sample(k) for k in range(4)]
    targets = [trainer.target(s) for s in samples]

    def mean_loss():
        with torch.no_grad():
            return sum(float(trainer.loss(s, t)) for s, t in zip(samples, targets)) / len(samples)

    before = mean_loss()
    for _ in range(3):
        for k in range(4):  # step k draws samples[k] again: its draws depend on (seed, step) alone
            trainer.train_step(k)
    after = mean_loss()
    assert after < 0.7 * before, (before, after)


def test_sample_is_a_function_of_seed_and_step(pipe):
    a, b = _trainer(pipe, "esd-x"), _trainer(pipe, "esd-x")
    for k in (3, 0):
        sa, sb = a.sample(k), b.sample(k)
        assert torch.equal(sa.x, sb.x) and sa.concept == sb.concept and sa.ddim_index == sb.ddim_index
    assert not torch.equal(a.sample(1).x, a.sample(2).x)


@pytest.mark.parametrize("method", ["esd-x", "esd-u"])
def test_esd_changes_only_its_parameters(tiny_checkpoint, pipe, method):
    from diffusers import UNet2DConditionModel

    base = dict(UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet").named_parameters())
    trainer = _trainer(pipe, method, lr=1e-3)
    for k in range(2):
        trainer.train_step(k)
    chosen = set(trainer.param_names)
    assert chosen == set(esd_parameter_names(trainer.unwrapped(), method))
    if method == "esd-x":
        assert chosen and all(".attn2." in n for n in chosen)
        assert {n for n in base if ".attn2." in n} == chosen
    else:
        assert not any(
            ".attn2." in n or n.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")) for n in chosen
        )
        assert any(n.startswith("down_blocks.0.resnets") for n in chosen) and any(".attn1." in n for n in chosen)
    changed = {n for n, p in trainer.unwrapped().named_parameters() if not torch.equal(p.detach(), base[n].detach())}
    assert changed <= chosen
    assert len(changed) >= 0.8 * len(chosen)  # Adam moves every parameter that gets a gradient
    assert set(trainer.trained_weights()) == chosen


def _erase(out: Path, model: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "safe_diffusion",
        "erase",
        "--method",
        "esd-x",
        "--erase",
        "nudity",
        "--erase",
        "violence",
        "--model",
        str(model),
        "--out",
        str(out),
        "--steps",
        "16",
        "--checkpoint-every",
        "4",
        "--ddim-steps",
        "6",
        "--lr",
        "1e-3",
        "--seed",
        "3",
    ]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    full = _erase(whole, tiny_checkpoint)  # uninterrupted, alongside (one thread each)
    # interrupted: SIGKILL as soon as the first checkpoint is reported, then the same command again
    killed = tmp_path / "killed"
    proc = _erase(killed, tiny_checkpoint)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "checkpoint at step 4" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert not killed.exists()  # nothing that looks like a model
    work = tmp_path / ".killed.erasure-partial"
    assert (work / "checkpoints" / "step-00000004" / "state.json").is_file()
    assert any("ETA" in line for line in lines)  # progress with ETA in a log (stderr is not a terminal)

    resumed = _erase(killed, tiny_checkpoint)
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resuming from step 4" in err

    _, err = full.communicate()
    assert full.returncode == 0, err

    a, b = load_file(str(killed / "erasure_weights.safetensors")), load_file(str(whole / "erasure_weights.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((killed / "erasure.json").read_text())
    rb = json.loads((whole / "erasure.json").read_text())
    assert ra["unet"]["files"] == rb["unet"]["files"]  # bit-identical UNet files
    assert ra["training"]["losses"] == rb["training"]["losses"]
    assert ra["training"]["resumed_at"] == [4] and rb["training"]["resumed_at"] == []
    assert not work.exists()
