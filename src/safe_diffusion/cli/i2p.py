"""``safe-diffusion i2p``: the I2P benchmark, a thin alias of ``safe-diffusion eval`` (``--suite i2p``)."""

from __future__ import annotations

import functools

import typer

from ..common.errors import InputError
from . import app as root
from . import eval as harness

app = typer.Typer(help="The I2P benchmark (same as `eval` with --suite i2p).", no_args_is_help=True)
root.add_typer(app, name="i2p")


@app.command("run", help=harness.run.__doc__)
@functools.wraps(harness.run)
def run(*args, **kwargs) -> None:
    """`eval run` for I2P: another suite is refused (its numbers are not I2P's), pointing to `eval run`."""
    suite = kwargs.get("suite") or "i2p"
    if str(suite).strip().lower() != "i2p":
        raise InputError(f"`i2p run` runs the I2P suite only; for --suite {suite!r} use `safe-diffusion eval run`")
    harness.run(*args, **kwargs)


for _name, _command in (
    ("classify", harness.classify),
    ("score", harness.score),
    ("export", harness.export),
    ("report", harness.report),
    ("status", harness.status),
    ("demo-clip", harness.demo_clip),
):
    app.command(_name)(_command)
