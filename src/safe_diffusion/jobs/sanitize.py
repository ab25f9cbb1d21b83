"""The sanitize job: edit inappropriate content out of a folder of images with LEDITS++, copy the rest.

:func:`sanitize` is the library's entry point for a whole run, as :func:`~safe_diffusion.jobs.evaluate.evaluate`
is for an evaluation: it turns plain settings into a :class:`~safe_diffusion.editing.sanitize.SanitizeConfig`,
finds this process's place in an ``accelerate launch`` job, and runs
:func:`safe_diffusion.editing.sanitize.sanitize` (which checks every input before writing, resumes, and
writes the report). ``safe-diffusion sanitize`` only parses and prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..common.devices import check_device, process_state
from ..common.validation import check_int
from ..editing.sanitize import SanitizeConfig, SanitizeResult
from ..editing.sanitize import sanitize as run
from ..judges import parse_judges


def sanitize(
    folder: str | Path,
    out: str | Path,
    *,
    model: str,
    remove: Sequence[str] | None = None,
    add: Sequence[str] | None = None,
    only_flagged: bool = True,
    judges: str = "q16,nudenet",
    q16_model: str | None = None,
    nudenet_model: str | Path | None = None,
    steps: int | None = None,
    skip: float = 0.15,
    scale: float = 5.0,
    threshold: float = 0.9,
    warmup: int = 0,
    masking: str = "intersect",
    seed: int = 0,
    resolution: int | None = None,
    keep_unmasked: bool = True,
    unet_batch_size: int | None = None,
    report: str | Path | None = None,
    show_unsafe: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> SanitizeResult:
    """Sanitise `folder` into `out` (rerun to resume). `remove`: the concepts to remove (default: the 20 parts of
    SLD's safety concept, unless only `add` is given). A judge's model option applies only when that judge
    is among `judges`."""
    from ..guidance.ledits import SAFETY_CONCEPTS

    names = parse_judges(judges)
    if unet_batch_size is not None:
        check_int("--unet-batch-size", unet_batch_size, minimum=1)
    dev = check_device("--device", device) if device is not None else None
    models = {"q16": {"model": q16_model}, "nudenet": {"model": None if nudenet_model is None else str(nudenet_model)}}
    config = SanitizeConfig(
        model=model,
        remove=tuple(remove) if remove else (() if add else SAFETY_CONCEPTS),
        add=tuple(add or ()),
        only_flagged=only_flagged,
        judges=tuple(names),
        judge_options={k: v for k, v in models.items() if k in names},
        steps=steps,
        skip=skip,
        scale=scale,
        threshold=threshold,
        warmup_steps=warmup,
        masking=masking,
        seed=seed,
        resolution=resolution,
        keep_unmasked=keep_unmasked,
    )
    state = process_state(dev)
    return run(
        folder,
        out,
        config,
        device=dev or state.device,
        report=report,
        show_unsafe=show_unsafe,
        unet_batch_size=unet_batch_size,
        process_index=state.process_index,
        num_processes=state.num_processes,
        barrier=state.wait_for_everyone,
        show_progress=progress and state.is_main_process,
    )
