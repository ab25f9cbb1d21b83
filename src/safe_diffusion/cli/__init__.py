"""The ``safe-diffusion`` command line: one Typer app, one module per command group."""

from __future__ import annotations

import os
import sys

import typer

from ..errors import InputError

app = typer.Typer(
    name="safe-diffusion",
    help="Instruct text-to-image diffusion models at inference time, and measure what they produce.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Instruct text-to-image diffusion models at inference time, and measure what they produce."""


def _is_usage_error(exc: BaseException) -> bool:
    # Typer vendors its own click; its usage errors are recognised by shape, whichever click raised them.
    return hasattr(exc, "format_message") and hasattr(exc, "exit_code")


def _register() -> None:
    # Every module of this package registers its commands on `app` when imported, so adding a
    # command is adding a module. Modules import torch and diffusers inside their commands, so
    # `--help` stays fast.
    import importlib
    import pkgutil

    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        importlib.import_module(f"{__name__}.{module}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    # transformers warns at import time about optional image back-ends; that is noise on a command line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _register()
    try:
        code = app(args=argv, standalone_mode=False)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code or 2)
    if isinstance(code, int) and code:
        sys.exit(code)
