"""The ``safe-diffusion`` command line: one Typer app, one module per command group."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
import warnings

import typer
from typer._click.exceptions import ClickException

from .. import __version__
from ..common import stop
from ..common.errors import InputError

LOG_LEVELS = ("debug", "info", "warning", "error")
logger = logging.getLogger("safe_diffusion")

app = typer.Typer(
    name="safe-diffusion",
    help="Instruct text-to-image diffusion models at inference time, and measure what they produce.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safe-diffusion {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning or error."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only: no progress bars, no warnings."),
) -> None:
    """Instruct text-to-image diffusion models at inference time, and measure what they produce."""
    level = log_level.strip().lower()
    if level not in LOG_LEVELS:
        raise InputError(f"--log-level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    configure_logging("error" if quiet else level, progress=not quiet)


def configure_logging(level: str, progress: bool = True) -> None:
    """Our log lines go to stderr at `level`; diffusers and transformers only say errors unless debugging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    os.environ["SAFE_DIFFUSION_LOG_LEVEL"] = level
    if level != "debug":
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["DIFFUSERS_VERBOSITY"] = "error"
        # Libraries' deprecation notices are for developers, not for someone running a command.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not progress:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm, and so every progress bar of diffusers and ours


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Click's usage errors (a bad option value, a missing argument): from the click Typer vendors, and from
    click itself where a command still raises those."""
    errors: list[type[BaseException]] = [ClickException]
    try:
        import click

        errors.append(click.ClickException)
    except ImportError:
        pass
    return tuple(errors)


def _register() -> None:
    # Every module of this package registers its commands on `app` when imported, so adding a
    # command is adding a module. Modules import torch and diffusers inside their commands, so
    # `--help` stays fast.
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        importlib.import_module(f"{__name__}.{module}")


def deprecated_strict(given: bool) -> bool:
    """`--strict` on `generate`/`fairness` meant "refuse guidance that cannot act"; it is `--refuse-inactive` now,
    so that "strict" names one thing: the engine's refusal of a call without classifier-free guidance."""
    if given:
        typer.echo("warning: --strict is deprecated; use --refuse-inactive (same meaning)", err=True)
    return given


def _interrupt(signum, frame) -> None:
    stop.record(130)
    # Ctrl-C unwinds once; a second one (or a late duplicate delivery) while the rollbacks run is ignored, so
    # it cannot cut the clean-up short and end the process by the signal (exit -2) with partial output left.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _lost_interrupt_hook(default):
    """A ``sys.unraisablehook`` that gives back a Ctrl-C an object's ``__del__`` swallowed.

    Python runs the SIGINT handler at the next bytecode, which may be inside a finalizer (``__del__`` of some
    library object, run by the garbage collector); the KeyboardInterrupt raised there is printed as "Exception
    ignored" and dropped, and the command would run on with Ctrl-C ignored. This hook re-arms the handler and
    has SIGINT sent again 50 ms later from another thread, so that the handler runs in the command once the
    finalizer has returned (were it to land in a finalizer again, this hook repeats). SIGTERM's SystemExit,
    dropped the same way, is sent again the same way."""

    def hook(unraisable) -> None:
        lost = unraisable.exc_value
        if isinstance(lost, KeyboardInterrupt):
            sig, handler = signal.SIGINT, _interrupt
        elif isinstance(lost, SystemExit) and lost.code == 128 + signal.SIGTERM:
            sig, handler = signal.SIGTERM, _terminate
        else:
            default(unraisable)
            return
        if signal.getsignal(sig) is not signal.SIG_IGN:  # not our handler's doing: nothing to give back
            default(unraisable)
            return
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: nothing to re-arm from here
            default(unraisable)
            return
        resend = threading.Timer(0.05, os.kill, args=(os.getpid(), sig))
        resend.daemon = True
        resend.start()

    return hook


def _exit_interrupted() -> None:
    """End the program with status 130 once an interrupt has been handled (rollbacks run, "interrupted" said).

    A plain ``sys.exit(130)`` is not enough: CPython flags a KeyboardInterrupt that ends code run through its
    C API (``PyRun_String`` and kin: ``run_eval_code_obj`` in ``Python/pythonrun.c``, which extensions reach
    through pybind11's ``exec`` or PyO3's ``py.run``) as *unhandled*, even when a caller handles it, and then
    ends the process by SIGINT (-2) after our exit (seen with strace: ``SIG_DFL``, then ``kill(self, SIGINT)``,
    about 1 time in 30 when Ctrl-C lands while a model loads). So the interpreter's own clean-up runs here —
    atexit callbacks, the standard streams flushed — and the process ends with 130 at once."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(130)


def _terminate(signum, frame) -> None:
    # SIGTERM (Slurm's time limit, `kill`, a service manager) unwinds like Ctrl-C, so every
    # `finally` and rollback runs: no partial outputs, no temp folders left behind.
    # As for Ctrl-C, a second SIGTERM while the rollbacks run is ignored, so it cannot cut the clean-up short.
    stop.record(128 + signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _stop_status(exc: BaseException) -> int:
    """The exit status of the stop (Ctrl-C 130, SIGTERM 143) that caused ``exc``, else 0.

    Once a stop is seen, any error that follows is its doing: a library's import cut short fails later with its
    own error (scipy's "type ... is already registered" on the import's retry), its chain no longer holding the
    KeyboardInterrupt or SystemExit."""
    if stop.status():
        return stop.status()
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM:
            return exc.code
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return 0


def _stopped(status: int) -> None:
    """End a stopped command: Ctrl-C says "interrupted"; SIGTERM, sent by a scheduler, ends quietly."""
    if status == 130:
        typer.echo("interrupted", err=True)
    sys.exit(status)


def _os_error_line(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    hint = "; free some space and rerun" if exc.errno == 28 else ""
    return f"error: {reason}{where}{hint}"


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback.

    Exit status: 0 done, 1 the environment failed (a full disk, an I/O error), 2 bad input,
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM). ``--log-level debug`` shows tracebacks.
    """
    # transformers warns at import time about optional image back-ends; that is noise on a command line.
    environment = dict(os.environ)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    terminate = signal.getsignal(signal.SIGTERM)
    if terminate is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread
            terminate = None
    else:
        terminate = None
    stop.clear()
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupt)
        except ValueError:  # not the main thread
            previous = None
    else:
        previous = None
    unraisable = sys.unraisablehook
    if previous is not None or terminate is not None:
        sys.unraisablehook = _lost_interrupt_hook(unraisable)
    try:
        _run(argv)
    except SystemExit as exc:
        if argv is None and exc.code == 130:
            _exit_interrupted()
        raise
    finally:
        # Called in-process with arguments (tests, a user's script): leave Ctrl-C as it was. As the program
        # itself (no arguments: the console script, python -m), a Ctrl-C once seen stays ignored until the
        # process has exited: a late duplicate during interpreter shutdown, when CPython has put SIGINT back
        # to the default action, would end it by the signal (-2) after it printed 'interrupted'.
        if previous is not None and (argv is not None or signal.getsignal(signal.SIGINT) is _interrupt):
            signal.signal(signal.SIGINT, previous)
        if terminate is not None and argv is not None:
            signal.signal(signal.SIGTERM, terminate)
        if argv is not None:  # the stop was this command's: the caller's later work must not see it
            stop.clear()
        sys.unraisablehook = unraisable
        # ... and the environment: the variables a command sets for itself (offline mode, verbosity, no
        # bars) would otherwise reach every process the caller starts afterwards.
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        for key, value in environment.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _run(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and not {"--help", "--version"} & set(args):
        from ..common.hub import go_offline_if_unreachable

        if go_offline_if_unreachable():
            logger.info("the Hugging Face hub is not reachable: offline mode (set HF_HUB_OFFLINE=0 to retry it)")
    _register()
    try:
        code = app(args=argv, standalone_mode=False)
    except InputError as exc:
        if status := _stop_status(exc):  # e.g. a model that "cannot load" because a stop cut its import short
            _stopped(status)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        _stopped(130)
    except OSError as exc:
        if status := _stop_status(exc):
            _stopped(status)
        if logger.isEnabledFor(logging.DEBUG):
            raise
        typer.echo(_os_error_line(exc), err=True)
        sys.exit(1)
    except UnicodeEncodeError as exc:
        # A name that is not valid UTF-8 (a file from another system) reached text that must be UTF-8.
        if logger.isEnabledFor(logging.DEBUG):
            raise
        bad = exc.object[max(exc.start - 20, 0) : exc.end + 20] if isinstance(exc.object, str) else ""
        shown = bad.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        typer.echo(f"error: a file name or text is not valid UTF-8 (near {shown!r}); rename it and rerun", err=True)
        sys.exit(2)
    except _usage_errors() as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code or 2)
    except Exception as exc:
        # A stop during a library's lazy import (diffusers re-raises it as RuntimeError "Failed to import").
        if not (status := _stop_status(exc)):
            raise
        _stopped(status)
    if status := stop.status():  # a stop a library dropped, after the job's last check: still a stop
        _stopped(status)
    if code == 130:  # Typer turns Ctrl-C into a silent Exit(130) after the command's cleanup ran
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)
