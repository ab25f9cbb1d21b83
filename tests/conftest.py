"""Shared fixtures: random-weight checkpoints built offline once per test session."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*deprecated.*")
logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random-weight SD 1.x checkpoint folder (32x32 images at the default size)."""
    from safe_diffusion.testing import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A small random-weight SD 1.x checkpoint folder (64x64 images at the default size)."""
    from safe_diffusion.testing import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", "small")


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory):
    """``family_checkpoints("flux")``: a tiny random-weight checkpoint folder of that family
    (:data:`safe_diffusion.testing.FAMILIES`), built once per test session."""
    from safe_diffusion.testing import FAMILIES

    built = {}

    def get(name):
        if name not in built:
            built[name] = FAMILIES[name](tmp_path_factory.mktemp("families") / name)
        return built[name]

    return get


@pytest.fixture
def cli(capsys):
    """Run the console entry point in-process: ``code, out, err = cli("generate", ...)``."""
    from helpers import run_cli

    def run(*args: str):
        code = run_cli(*args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
