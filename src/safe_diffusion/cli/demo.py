"""``safe-diffusion demo``: a local web page comparing unguided and guided images from the same seed.

Checks the options and calls :func:`safe_diffusion.app.ui.serve`.
"""

from __future__ import annotations

import typer

from ..common.devices import check_device
from ..common.validation import check_host, check_int
from . import app


@app.command()
def demo(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the demo to your network."),
    port: int = typer.Option(7860, help="Port to serve on."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
) -> None:
    """Serve a web demo: type a prompt, see the unguided and the guided image side by side."""
    port = check_int("--port", port, minimum=1, maximum=65535)
    host = check_host("--host", host)
    check_device("--device", device)
    from ..app.ui import serve

    serve(model, host=host, port=port, device=device, announce=lambda line: typer.echo(line, err=True))
