"""``safe-diffusion demo``: a local web page comparing unguided and guided images from the same seed."""

from __future__ import annotations

import os
import warnings

import typer

from ..common.errors import InputError
from . import app


@app.command()
def demo(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the demo to your network."),
    port: int = typer.Option(7860, help="Port to serve on."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
) -> None:
    """Serve a web demo: type a prompt, see the unguided and the guided image side by side."""
    from ..common.validation import check_device, check_host, check_int

    port = check_int("--port", port, minimum=1, maximum=65535)
    host = check_host("--host", host)
    check_device("--device", device)
    # Nothing leaves the machine: no usage statistics, no update check.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InputError("the demo needs gradio: pip install 'safe-diffusion[app]'") from None
    from ..app.core import DemoGenerator
    from ..app.ui import build_demo, launch_options
    from ..common.loading import check_model_reference

    check_model_reference(model)
    # A server's log is not a terminal: no loading/step progress bars (the page has its own progress
    # indicator) and no library deprecation chatter, so a model that fails to load is one line.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    generator = DemoGenerator.load(model, device=device)  # the model loads once, before the server starts
    page = build_demo(generator)
    typer.echo(f"model {model!r} loaded; serving on http://{host}:{port} (Ctrl+C stops)", err=True)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            show_error=False,
            ssr_mode=False,
            footer_links=["api"],
            allowed_paths=[str(generator.output_root)],
            quiet=True,
            **launch_options(),
        )
    except OSError as exc:
        raise InputError(f"cannot serve on {host}:{port}: {str(exc).splitlines()[0]}") from None
    finally:
        generator.close()
