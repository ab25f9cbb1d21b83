"""The demo's "Sanitize" tab: upload an image, see it before and after LEDITS++ removes what is inappropriate, with the mask.

``add_sanitize_tab(generator)`` adds the tab's widgets inside an open ``gr.Blocks`` and wires its
button to :func:`safe_diffusion.editing.sanitize.sanitize_image`, on the demo's one pipeline
(``generator.pipe``) under its lock (``generator.lock``), in the same one-at-a-time queue as the
Generate button. :func:`validate_sanitize_request` and :func:`run_sanitize_request` hold the logic
without any UI, so they are testable and reusable.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..common.errors import InputError
from ..guidance.ledits import SAFETY_CONCEPTS

logger = logging.getLogger(__name__)

STEPS_RANGE = (2, 100)
SCALE_RANGE = (0.5, 20.0)
THRESHOLD_RANGE = (0.5, 0.99)
MAX_CONCEPTS = 32
MAX_UPLOAD_SIDE = 4096
INTRO = (
    "Upload an image: LEDITS++ inverts it and removes the checked concepts (and adds any you type), each only "
    "inside its implicit mask. Left: your image; middle: the result; right: the mask (white: pixels the edit may "
    "have changed)."
)


@dataclass(frozen=True)
class SanitizeRequest:
    """A validated tab request; build it with :func:`validate_sanitize_request`."""

    remove: tuple[str, ...]
    add: tuple[str, ...] = ()
    steps: int = 30
    scale: float = 5.0
    threshold: float = 0.9
    seed: int = 0
    keep_unmasked: bool = True


def _concepts(text: str | None) -> list[str]:
    """Comma- or newline-separated concepts, blanks dropped, in order, duplicates once."""
    parts = [p.strip() for line in (text or "").splitlines() for p in line.split(",")]
    return list(dict.fromkeys(p for p in parts if p))


def validate_sanitize_request(
    checked: list[str] | None,
    extra_remove: str | None = None,
    add: str | None = None,
    steps: Any = 30,
    scale: Any = 5.0,
    threshold: Any = 0.9,
    seed: Any = 0,
    keep_unmasked: bool = True,
) -> SanitizeRequest:
    """Check the form's values; a one-line :class:`InputError` names the first problem."""
    from ..common.validation import check_float, check_int, check_seed

    remove = list(dict.fromkeys([*(checked or []), *_concepts(extra_remove)]))
    added = _concepts(add)
    if not remove and not added:
        raise InputError("nothing to edit: check a concept to remove, or type one to remove or add")
    if set(remove) & set(added):
        raise InputError(f"{min(set(remove) & set(added))!r} is both removed and added")
    if len(remove) + len(added) > MAX_CONCEPTS:
        raise InputError(f"at most {MAX_CONCEPTS} concepts, got {len(remove) + len(added)}")
    return SanitizeRequest(
        remove=tuple(remove),
        add=tuple(added),
        steps=check_int("steps", steps, minimum=STEPS_RANGE[0], maximum=STEPS_RANGE[1]),
        scale=check_float("edit scale", scale, minimum=SCALE_RANGE[0], maximum=SCALE_RANGE[1]),
        threshold=check_float("mask threshold", threshold, minimum=THRESHOLD_RANGE[0], maximum=THRESHOLD_RANGE[1]),
        seed=check_seed("seed", seed),
        keep_unmasked=bool(keep_unmasked),
    )


def run_sanitize_request(generator, image, request: SanitizeRequest, progress=None):
    """Edit `image` on the demo's pipeline under its lock: (sanitized image result, settings)."""
    from ..editing.sanitize import SanitizeConfig, sanitize_image

    if image is None:
        raise InputError("upload an image first")
    if max(image.size) > MAX_UPLOAD_SIDE:
        raise InputError(f"the image is {image.width}x{image.height}; at most {MAX_UPLOAD_SIDE} px a side")
    config = SanitizeConfig(
        model=getattr(generator, "model", "?"),
        remove=request.remove,
        add=request.add,
        only_flagged=False,
        judges=(),
        steps=request.steps,
        scale=request.scale,
        threshold=request.threshold,
        seed=request.seed,
        keep_unmasked=request.keep_unmasked,
    )
    stages = {"invert": 0, "edit": 1}

    def report(stage, step, total):
        if progress is not None:
            progress((stages.get(stage, 0) + step / total) / 2, f"{stage}: step {step}/{total}")

    started = time.monotonic()
    with generator.lock:
        result = sanitize_image(
            generator.pipe,
            image,
            config.guidance(),
            seed=request.seed,
            steps=request.steps,
            keep_unmasked=request.keep_unmasked,
            progress=report,
        )
    settings = {
        "model": config.model,
        **asdict(request),
        "mask_coverage": round(result.mask_coverage, 4),
        "work_size": list(result.work_size),
        "seconds": round(time.monotonic() - started, 2),
        "ledits": {k: v for k, v in result.settings.items() if k not in ("timesteps", "guidance")},
    }
    return result, settings


def make_sanitize_handler(generator):
    """The click handler: validates, edits, and turns every failure into a message in the page."""
    import gradio as gr

    def run(image, checked, extra_remove, add, steps, scale, threshold, seed, keep_unmasked, progress=gr.Progress()):
        skip = (gr.skip(),) * 3  # after, mask, settings: the status is the message
        try:
            request = validate_sanitize_request(
                checked, extra_remove, add, steps, scale, threshold, seed, keep_unmasked
            )
            result, settings = run_sanitize_request(
                generator, image, request, progress=lambda fraction, desc: progress(fraction, desc=desc)
            )
        except InputError as exc:
            return (f"**Cannot edit:** {exc}", *skip)
        except Exception as exc:  # the page gets one line; the server log gets the traceback
            logger.exception("sanitize failed")
            text = str(exc).strip()
            return (f"**Edit failed:** {text.splitlines()[0] if text else type(exc).__name__}", *skip)
        status = (
            f"**Done.** Removed {len(request.remove)} concept(s)"
            + (f", added {len(request.add)}" if request.add else "")
            + f"; the mask covers {100 * result.mask_coverage:.1f}% of the image; {settings['seconds']} s."
        )
        return status, result.image, result.mask, json.dumps(settings, indent=2, default=str)

    return run


def add_sanitize_tab(generator, label: str = "Sanitize") -> dict:
    """Add the tab inside the current ``gr.Blocks``; returns its components by name (for tests and layout)."""
    import gradio as gr

    with gr.Tab(label, elem_id="sanitize-tab"):
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="Image",
                    type="pil",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    elem_id="sanitize-input",
                )
                checked = gr.CheckboxGroup(
                    list(SAFETY_CONCEPTS),
                    value=list(SAFETY_CONCEPTS),
                    label="Remove (the parts of SLD's safety concept)",
                    elem_id="sanitize-remove",
                )
                extra_remove = gr.Textbox(label="Also remove (comma-separated)", elem_id="sanitize-extra")
                add = gr.Textbox(label="Add (comma-separated), e.g. fully clothed", elem_id="sanitize-add")
                with gr.Accordion("Edit settings", open=False):
                    steps = gr.Slider(*STEPS_RANGE, value=30, step=1, label="Steps", elem_id="sanitize-steps")
                    scale = gr.Slider(*SCALE_RANGE, value=5.0, step=0.5, label="Edit scale", elem_id="sanitize-scale")
                    threshold = gr.Slider(
                        *THRESHOLD_RANGE, value=0.9, step=0.01, label="Mask threshold", elem_id="sanitize-threshold"
                    )
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="sanitize-seed")
                    keep = gr.Checkbox(
                        value=True, label="Keep the input's pixels outside the mask", elem_id="sanitize-keep"
                    )
                button = gr.Button("Remove", variant="primary", elem_id="sanitize-run")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="sanitize-status")
                with gr.Row():
                    before = gr.Image(label="Before", interactive=False, height=280, elem_id="sanitize-before")
                    after = gr.Image(
                        label="After", format="png", interactive=False, height=280, elem_id="sanitize-after"
                    )
                    mask = gr.Image(label="Mask", format="png", interactive=False, height=280, elem_id="sanitize-mask")
                settings = gr.Code(
                    label="Settings used", language="json", interactive=False, max_lines=14, elem_id="sanitize-settings"
                )
        image.change(lambda im: im, inputs=image, outputs=before, queue=False, api_name=False)
        button.click(
            make_sanitize_handler(generator),
            inputs=[image, checked, extra_remove, add, steps, scale, threshold, seed, keep],
            outputs=[status, after, mask, settings],
            api_name="sanitize",
            concurrency_limit=1,
            concurrency_id="device",
        )
    return {
        "image": image,
        "remove": checked,
        "extra_remove": extra_remove,
        "add": add,
        "steps": steps,
        "scale": scale,
        "threshold": threshold,
        "seed": seed,
        "keep_unmasked": keep,
        "button": button,
        "status": status,
        "before": before,
        "after": after,
        "mask": mask,
        "settings": settings,
    }
