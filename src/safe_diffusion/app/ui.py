"""The Gradio page: widgets wired to :class:`~safe_diffusion.app.core.DemoGenerator`, and :func:`serve`. No generation
logic here."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from importlib import resources

from diffusers.utils import logging as diffusers_logging

from ..common.errors import InputError
from ..common.loading import check_model_reference
from ..common.validation import SAFETY_CHOICES
from ..guidance import DEFAULT_SAFETY_CONCEPT
from ..guidance.mitigation import MITIGATIONS
from .core import (
    GUIDANCE_SCALE_RANGE,
    MAX_SEED,
    STEPS_RANGE,
    DemoGenerator,
    settings_json,
    validate_request,
    warmup_note,
)
from .sanitize_tab import add_sanitize_tab

logger = logging.getLogger(__name__)

EDITS_PLACEHOLDER = "+sunglasses\n-beard"
INTRO = (
    "# Safe Latent Diffusion demo\n"
    "Type a prompt and press **Generate**: the same seed gives the model's own image (left) and the image "
    "with safety guidance and your edits (right). Requests run one at a time; others wait in the queue."
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_handler(generator: DemoGenerator):
    """The click handler: validates, generates, and turns every failure into a message in the page."""
    import gradio as gr

    # gradio injects the progress tracker through this default.
    def run(
        prompt,
        negative_prompt,
        seed,
        steps,
        guidance_scale,
        safety,
        safety_concept,
        edits,
        methods=None,
        progress=gr.Progress(),
    ):
        skip = (gr.skip(),) * 4
        try:
            request = validate_request(
                prompt, negative_prompt, seed, steps, guidance_scale, safety, safety_concept, edits, methods
            )
        except InputError as exc:
            return (f"**Cannot generate:** {exc}", *skip)
        try:
            result = generator.generate(request, progress=lambda fraction, desc: progress(fraction, desc=desc))
        except InputError as exc:
            return (f"**Cannot generate:** {exc}", *skip)
        except (RuntimeError, OSError, ValueError, MemoryError) as exc:  # out of memory, a full disk, a model error:
            # the page gets one line; the server log gets the traceback
            logger.exception("generation failed")
            return (f"**Generation failed:** {_first_line(exc)}", *skip)
        status = (
            f"**Done.** Seed {request.seed}, {request.steps} steps, safety **{request.safety}**"
            f"{', ' + str(len(request.edits)) + ' edit(s)' if request.edits else ''}"
            f"{', ' + ', '.join(request.methods) if request.methods else ''}"
            f": done in {result.settings['seconds']} s."
        )
        note = warmup_note(request)
        if note:
            status += f" Note: {note}."
        return status, result.unguided, result.guided, settings_json(result.settings), [str(f) for f in result.files]

    return run


def build_demo(generator: DemoGenerator):
    """The Blocks app for `generator`; call :func:`launch` (or ``.launch(**launch_options())``) to serve it."""
    import gradio as gr

    with gr.Blocks(title="safe-diffusion demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"Model: `{generator.model}`")
        with gr.Tab("Generate", elem_id="generate-tab"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a cat on a sofa")
                    negative_prompt = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", scale=3)
                        random_seed = gr.Button("Random seed", elem_id="random-seed", scale=1)
                    steps = gr.Slider(*STEPS_RANGE, value=25, step=1, label="Steps", elem_id="steps")
                    guidance_scale = gr.Slider(
                        *GUIDANCE_SCALE_RANGE, value=7.5, step=0.5, label="Guidance scale", elem_id="guidance-scale"
                    )
                    safety = gr.Radio(list(SAFETY_CHOICES), value="medium", label="Safety preset", elem_id="safety")
                    safety_concept = gr.Textbox(
                        value=DEFAULT_SAFETY_CONCEPT,
                        lines=3,
                        label="Safety concept (what SLD steers away from)",
                        elem_id="safety-concept",
                    )
                    edits = gr.Textbox(
                        lines=3,
                        label="Edit concepts, one per line: +add / -remove",
                        placeholder=EDITS_PLACEHOLDER,
                        elem_id="edits",
                    )
                    # Methods registered by name (SAFREE, a user's own): shown when there are any.
                    registered = MITIGATIONS.entries()
                    methods = gr.CheckboxGroup(
                        choices=[(e.metadata.get("label", e.name), e.name) for e in registered],
                        value=[],
                        label="Other guidance methods",
                        visible=bool(registered),
                        elem_id="methods",
                    )
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    status = gr.Markdown(elem_id="status")
                    with gr.Row():
                        unguided = gr.Image(
                            label="Unguided", format="png", interactive=False, height=320, elem_id="unguided"
                        )
                        guided = gr.Image(label="Guided", format="png", interactive=False, height=320, elem_id="guided")
                    settings = gr.Code(
                        label="Settings used", language="json", interactive=False, max_lines=14, elem_id="settings"
                    )
                    files = gr.File(
                        label="Download: both images and the settings",
                        file_count="multiple",
                        interactive=False,
                        elem_id="files",
                    )

            # A random seed is picked in the browser: nothing to queue behind a running generation.
            random_seed.click(None, None, seed, js=f"() => Math.floor(Math.random() * {MAX_SEED + 1})")
            button.click(
                make_handler(generator),
                inputs=[prompt, negative_prompt, seed, steps, guidance_scale, safety, safety_concept, edits, methods],
                outputs=[status, unguided, guided, settings, files],
                api_name="generate",
                concurrency_limit=1,
                concurrency_id="device",
            )
        add_sanitize_tab(generator)
    # One request at a time on the device; the rest wait, and the page shows their place in the queue.
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch_options() -> dict:
    """Theme and CSS with system fonts only, so the page needs nothing from the internet."""
    import gradio as gr

    theme = gr.themes.Default(
        font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace")
    )
    css = resources.files("safe_diffusion.app").joinpath("demo.css").read_text()
    return {"theme": theme, "css": css}


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Load `model` once, build the page and serve it on `host`:`port` until stopped (Ctrl-C, SIGTERM).

    Nothing leaves the machine (no usage statistics, no update check, no fonts from the internet). A server's
    log is not a terminal: no loading or step progress bars (the page shows its own) and no library
    deprecation chatter, so a model that fails to load is one line. `announce` gets one line once serving.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401  (the `app` extra: refuse in one line when it is missing)
    except ImportError:
        raise InputError("the demo needs gradio: pip install 'safe-diffusion[app]'") from None
    check_model_reference(model)
    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers_logging.disable_progress_bar()
    generator = DemoGenerator.load(model, device=device)  # the model loads once, before the server starts
    page = build_demo(generator)
    if announce is not None:
        announce(f"model {model!r} loaded; serving on http://{host}:{port} (Ctrl+C stops)")
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
