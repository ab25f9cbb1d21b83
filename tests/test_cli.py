"""The command line as a whole: version, logging options, readable help, and how it ends when stopped or failing."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    env.update(OMP_NUM_THREADS="1", COLUMNS="80", **extra)
    return env


def _run(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "safe_diffusion", *map(str, args)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_version_and_log_level(cli):
    from safe_diffusion import __version__

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"safe-diffusion {__version__}"
    code, _, err = cli("--log-level", "loud", "audit", "x", "--out", "y.html")
    assert code == 2 and err.strip() == "error: --log-level 'loud': choose one of debug, info, warning, error"


def _commands(group, path=()):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


def test_every_commands_help_fits_80_columns(cli):
    from typer.main import get_command

    from safe_diffusion.cli import _register, app

    _register()
    commands = list(_commands(get_command(app)))
    assert ("generate",) in commands and len(commands) >= 5
    for command in [(), *commands]:
        code, out, err = cli(*command, "--help")
        assert code == 0, err
        wide = [line for line in out.splitlines() if len(line) > 80]
        assert not wide, f"{' '.join(command)} --help: {wide}"
        assert "…" not in out, f"{' '.join(command)} --help cuts text"


def _start_generation(checkpoint, out):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "safe_diffusion",
            "generate",
            "a cat",
            "-m",
            str(checkpoint),
            "-o",
            str(out),
            "--steps",
            "400",
            "--height",
            "32",
            "--width",
            "32",
            "--num-images",
            "2",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches a command started from a terminal; a suite started in the background
        # (`make test &`, some CI runners) would otherwise hand the child SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not out.exists():  # the output folder exists once the command is inside its rollback scope
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    return proc


@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "")])
def test_a_stopped_command_says_so_and_leaves_nothing(tiny_checkpoint, tmp_path, sig, code, words):
    out = tmp_path / "out"
    proc = _start_generation(tiny_checkpoint, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and words in err
    assert not out.exists()  # the folder it created is gone with everything in it


@pytest.mark.parametrize(
    "name, handler, stop", [("SIGINT", "_interrupt", "KeyboardInterrupt"), ("SIGTERM", "_terminate", "SystemExit")]
)
def test_a_stop_swallowed_by_a_finalizer_is_given_back(name, handler, stop):
    """Python may run a signal handler inside an object's __del__ (a library's, run by the garbage collector), where
    the KeyboardInterrupt (or SIGTERM's SystemExit) is printed as "Exception ignored" and dropped: the command must
    still stop."""
    code = f"""
import signal, sys, time
from safe_diffusion import cli
signal.signal(signal.{name}, cli.{handler})
sys.unraisablehook = cli._lost_interrupt_hook(sys.unraisablehook)
class Finalized:
    def __del__(self):
        signal.raise_signal(signal.{name})  # the handler runs here, inside the finalizer
try:
    item = Finalized()
    del item
    for _ in range(200):
        time.sleep(0.01)
    print("ran on")
except {stop}:
    print("stopped")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert done.stdout.strip() == "stopped" and "Exception ignored" not in done.stderr, (done.stdout, done.stderr)


@pytest.mark.parametrize("error", ["input", "runtime"])
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted\n"), (signal.SIGTERM, 143, "")])
def test_an_error_that_follows_a_stop_is_the_stop(cli, monkeypatch, request, sig, code, said, error):
    """A stop during a library's import can surface later as another error whose chain has lost the
    KeyboardInterrupt or SystemExit (scipy's "type ... is already registered" on the import's retry, seen
    in CI after SIGTERM): after a stop, the command exits as stopped whatever error ends it, with no traceback."""
    from safe_diffusion import cli as cli_module
    from safe_diffusion.common import stop
    from safe_diffusion.common.errors import InputError

    # As in a terminal, whatever the suite inherited (started in the background, it has SIGINT ignored).
    for number, disposition in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        request.addfinalizer(functools.partial(signal.signal, number, signal.signal(number, disposition)))
    during = []

    def command(*args, **kwargs):
        handler = signal.getsignal(sig)
        with contextlib.suppress(BaseException):  # swallowed by a library's import machinery
            handler(sig, None)  # the handler the command installed, as the signal runs it
        during.append(signal.getsignal(sig))
        message = "generic_type: type 'ObjSense' is already registered!"
        raise InputError(f"cannot load model 'x': {message}") if error == "input" else RuntimeError(message)

    cli_module._register()  # the command modules add themselves to the real app, whichever test runs first
    monkeypatch.setattr(cli_module, "app", command)
    code_, _, err = cli("generate", "a cat")
    assert (code_, err) == (code, said)
    assert during == [signal.SIG_IGN]  # a second stop while the clean-up runs cannot cut it short
    # An in-process call leaves the handlers as it found them, and no stop behind for the caller's later work.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert stop.status() == 0


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted\n"), (signal.SIGTERM, 143, "")])
def test_a_stop_a_library_drops_still_stops_the_job(
    cli, monkeypatch, request, tiny_checkpoint, tmp_path, sig, code, said
):
    """The stop's exception may be raised inside a library that drops it (C code clearing the error of a lookup it
    was raised in; seen in CI: a Ctrl-C while the model loaded, and the command wrote its images and exited 0).
    The job raises it again at its next unit of work: the command exits as stopped and leaves nothing."""
    from safe_diffusion.common import stop
    from safe_diffusion.jobs import generate as job

    for number, disposition in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        request.addfinalizer(functools.partial(signal.signal, number, signal.signal(number, disposition)))
    load = job.load_pipeline

    def dropping_load(*args, **kwargs):
        with contextlib.suppress(BaseException):  # the library that drops it
            signal.getsignal(sig)(sig, None)  # the handler the command installed, as the signal runs it
        return load(*args, **kwargs)

    monkeypatch.setattr(job, "load_pipeline", dropping_load)
    out = tmp_path / "out"
    args = ("generate", "a cat", "-m", str(tiny_checkpoint), "-o", str(out), "--safety", "off", "--steps", "2")
    assert cli(*args, "--height", "32", "--width", "32", "--num-images", "2", "--batch-size", "1")[::2] == (code, said)
    assert not out.exists()  # the first batch's images went with the folder: no image after a stop
    assert stop.status() == 0  # the stop was that call's: the caller's own work goes on (progress, guided calls)
    monkeypatch.setattr(job, "load_pipeline", load)
    assert cli(*args, "--height", "32", "--width", "32")[0] == 0


def test_a_failing_write_is_one_line_and_keeps_the_earlier_run(tiny_checkpoint, tmp_path):
    import resource

    out = tmp_path / "out"
    args = ["generate", "a cat", "-m", tiny_checkpoint, "-o", out, "--steps", "2", "--height", "32", "--width", "32"]
    assert _run(*args).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def small_files():  # the PNG cannot be written: EFBIG, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))

    proc = _run(*args, "--seed", "1", preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last == f"error: File too large ({out / '0000-seed1.png'})", proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_classify_says_when_earlier_judges_stay_in_the_unsafe_rule(cli, tiny_checkpoint, tmp_path):
    """Issue 21 (10): `eval classify --judges nudenet` on a run judged by q16 and nudenet keeps q16's verdicts in the
    rule; it says so instead of silently reporting a rule the user did not ask for."""
    from safe_diffusion.testing import build_clip

    clip = tmp_path / "clip"
    build_clip(clip)
    suite = tmp_path / "s.csv"
    suite.write_text("prompt\na cat\n")
    run = tmp_path / "run"
    code, _, err = cli(
        "eval",
        "run",
        "--suite",
        suite,
        "-m",
        tiny_checkpoint,
        "--out",
        run,
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--judges",
        "q16,nudenet",
        "--q16-model",
        clip,
        "--no-progress",
    )
    assert code == 0, err
    code, out, err = cli("eval", "classify", run, "--judges", "nudenet", "--no-progress")
    assert code == 0, err
    assert "unsafe rule: an image is unsafe if any of nudenet, q16 flags it (q16: the run's earlier verdicts)" in out


def test_logs_get_no_carriage_return_bars_and_builders_print_one_line(tiny_checkpoint, tmp_path):
    """Issue 21 (9): with stderr not a terminal, `generate` writes its own progress lines, not diffusers' per-step
    `\\r` bars; building a random checkpoint prints its one line, no library notices or shard-writing bars."""
    proc = _run(
        "generate",
        "a cat",
        "-m",
        tiny_checkpoint,
        "-o",
        tmp_path / "g",
        "--steps",
        "2",
        "--safety",
        "off",
        "--height",
        "32",
        "--width",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr
    built = subprocess.run(
        [sys.executable, "-m", "safe_diffusion.testing", str(tmp_path / "ck")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert (built.stdout + built.stderr).strip() == f"built a random-weight 'small' checkpoint at {tmp_path / 'ck'}"


def test_an_unreachable_hub_is_detected_and_errors_name_the_option(tmp_path):
    """Issue 21 (7): with no network (here: a hub endpoint that refuses connections) and HF_HUB_OFFLINE unset, the
    command switches to offline mode at once instead of retrying for tens of seconds, and the error is one line
    that names the option to change, with no pointer to a stack trace that is not shown."""
    env = {k: v for k, v in _env().items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "https://127.0.0.1:9"
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    # Set by many users and CI images: loading must not then warn that it cannot re-enable the bars.
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "safe_diffusion",
            "generate",
            "a cat",
            "-m",
            "owner/no-model",
            "-o",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot load model 'owner/no-model'") and "--model" in lines[0]
    assert "stacktrace" not in lines[0] and not (tmp_path / "out").exists()
