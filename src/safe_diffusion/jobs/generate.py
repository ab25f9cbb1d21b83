"""The generate job: a prompt's images with a mitigation (and, with `compare`, without it), each written as a
PNG with a JSON sidecar saying how it was made (``safe-diffusion generate``).

The sidecar of a guided image holds its :class:`~safe_diffusion.guidance.mitigation.Mitigation` record, so
``Mitigation.from_dict(sidecar["mitigation"])`` rebuilds the guidance that made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.devices import check_device
from ..common.errors import InputError
from ..common.loading import check_model_reference, load_pipeline
from ..common.outputs import atomic_write_json, output_dir, save_image_atomic
from ..common.progress import ProgressLog
from ..common.validation import (
    cfg_problem,
    check_float,
    check_image_side,
    check_int,
    check_seed,
    check_text,
)
from ..guidance.activity import activity_label, warmup_problems
from ..guidance.mitigation import Mitigation
from ..reports.images import side_by_side
from . import check_terms_act
from .compare import generate_guided_images, pipeline_record

logger = logging.getLogger(__name__)

#: More images than this in one invocation is almost certainly a typo; split larger jobs (or use `eval run`).
MAX_IMAGES = 10_000
#: Classifier-free guidance scales beyond this only saturate the image.
MAX_GUIDANCE_SCALE = 100.0
MAX_STEPS = 1000
EXISTING = ("refuse", "overwrite", "skip")


def check_guidance(
    terms: Sequence, *, steps: int, guidance_scale: float, strict: bool, warn: Callable[[str], None] | None = None
) -> list[str]:
    """Refuse settings under which the terms cannot act at all; for a term whose warm-up is never left, refuse
    with `strict`, else pass the reason to `warn` (default: the log). Returns those reasons."""
    problem = cfg_problem(terms, guidance_scale)
    if problem:  # a "guided" image without guidance is never what was asked for
        raise InputError(problem)
    problems = warmup_problems(terms, steps)
    for problem in problems:
        if strict:
            raise InputError(problem)
        (warn or logger.warning)(problem)
    return problems


def image_files(stem: str, compare: bool) -> list[str]:
    """The files one image of `generate` consists of."""
    names = [f"{stem}.png", f"{stem}.json"]
    if compare:
        names += [f"{stem}-unguided.png", f"{stem}-unguided.json", f"{stem}-side-by-side.png"]
    return names


def guided_caption(mitigation: Mitigation, terms: Sequence, steps: int, guidance_scale: float) -> str:
    """The side-by-side's caption of the guided image: "guided: SLD strong + SEGA +sunglasses", extended with
    "— inactive: …" when its guidance never acts in `steps` steps."""
    return activity_label(f"guided: {mitigation.label or 'no guidance'}", terms, steps, guidance_scale)


@dataclass
class Generation:
    """What :func:`generate` did: the PNGs it wrote (none when every image was already there)."""

    out: Path
    written: list[Path] = field(default_factory=list)
    requested: int = 0
    warnings: list[str] = field(default_factory=list)


def generate(
    prompt: str,
    *,
    model: str,
    out: str | Path,
    mitigation: Mitigation,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    num_images: int = 1,
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    compare: bool = False,
    existing: str = "refuse",
    strict: bool = False,
    device: str | None = None,
    record: dict[str, Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Generation:
    """Generate `num_images` images of `prompt` (image k from seed + k) with `mitigation`, into the folder `out`.

    Every value is checked before the model loads (one :class:`InputError` line each). `compare` also
    writes each image without guidance, from the same seed, and both side by side. `existing` says what
    to do with images already in `out`: ``refuse`` (an error before anything loads), ``overwrite``, or
    ``skip`` (make only the missing ones: each image depends on its seed alone, so the result is that of
    one uninterrupted run, to the rounding of batched arithmetic). `record`: further facts for every
    sidecar. A term whose warm-up the run never leaves is refused with `strict`, else reported to `warn`.
    """
    prompt = check_text("the prompt", prompt)
    steps = check_int("--steps", steps, minimum=1, maximum=MAX_STEPS)
    num_images = check_int("--num-images", num_images, minimum=1, maximum=MAX_IMAGES)
    if batch_size is not None:
        batch_size = check_int("--batch-size", batch_size, minimum=1)
    seed = check_seed("--seed", seed, num_images)
    guidance_scale = check_float("--guidance-scale", guidance_scale, minimum=0.0, maximum=MAX_GUIDANCE_SCALE)
    height = check_image_side("--height", height)
    width = check_image_side("--width", width)
    if existing not in EXISTING:
        raise ValueError(f"existing must be one of {EXISTING}, got {existing!r}")
    check_device("--device", device)
    check_model_reference(model)
    terms = mitigation.terms()
    warnings = check_guidance(terms, steps=steps, guidance_scale=guidance_scale, strict=strict, warn=warn)
    out = Path(out)
    stems = {seed + k: f"{k:04d}-seed{seed + k}" for k in range(num_images)}
    present = [n for st in stems.values() for n in image_files(st, compare) if (out / n).exists()]
    if present and existing == "refuse":
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        raise InputError(
            f"{out / present[0]}{more} already exist(s); use --overwrite to replace or --skip-existing to keep them"
        )
    if existing == "skip":
        todo = [s for s, st in stems.items() if not all((out / n).exists() for n in image_files(st, compare))]
    else:
        todo = list(stems)
    result = Generation(out=out, requested=num_images, warnings=warnings)
    if not todo:
        return result
    batch = batch_size or len(todo)
    unguided = Mitigation(negative_prompt=mitigation.negative_prompt)
    with output_dir(out) as folder:
        pipe = load_pipeline(model, device=device)
        check_terms_act(pipe, terms, guidance_scale, mitigation.negative_prompt, "generate")
        progress = ProgressLog("generate", total=len(todo), unit="images")
        for start in range(0, len(todo), batch):
            seeds = todo[start : start + batch]
            made = generate_guided_images(
                pipe,
                prompt,
                seeds,
                terms,
                kinds=("guided", "unguided") if compare else ("guided",),
                negative_prompt=mitigation.negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
            )
            common = {
                "prompt": prompt,
                "negative_prompt": mitigation.negative_prompt,
                "model": model,
                "steps": steps,
                "guidance_scale": guidance_scale,
                **pipeline_record(pipe, made.guided[0]),
                **(record or {}),
            }
            for i, s in enumerate(seeds):
                stem = stems[s]
                for kind, kind_images in made.images.items():
                    name = stem if kind == "guided" else f"{stem}-unguided"
                    png = folder.file(f"{name}.png")
                    save_image_atomic(kind_images[i], png)
                    applied = mitigation if kind == "guided" else unguided
                    sidecar = {
                        **common,
                        "image_index": s - seed,
                        "image": png.name,
                        **made.record(i, kind),
                        "mitigation": applied.to_dict(),
                    }
                    atomic_write_json(folder.file(f"{name}.json"), sidecar)
                    result.written.append(png)
                if made.unguided is not None:
                    png = folder.file(f"{stem}-side-by-side.png")
                    caption = guided_caption(mitigation, terms, steps, guidance_scale)
                    save_image_atomic(side_by_side(made.unguided[i], made.guided[i], ("unguided", caption)), png)
                    result.written.append(png)
            progress.update(len(seeds))
        progress.close()
    return result
