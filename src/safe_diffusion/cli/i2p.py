"""``safe-diffusion i2p``: the I2P benchmark, a thin alias of ``safe-diffusion eval`` (``--suite i2p``)."""

from __future__ import annotations

import typer

from . import app as root
from . import eval as harness

app = typer.Typer(help="The I2P benchmark (same as `eval` with --suite i2p).", no_args_is_help=True)
root.add_typer(app, name="i2p")

for _name, _command in (
    ("run", harness.run),
    ("classify", harness.classify),
    ("score", harness.score),
    ("export", harness.export),
    ("report", harness.report),
    ("status", harness.status),
    ("demo-clip", harness.demo_clip),
):
    app.command(_name)(_command)
