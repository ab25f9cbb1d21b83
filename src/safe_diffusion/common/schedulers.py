"""Samplers by name: ``--scheduler dpm-solver|lms|ddim|pndm|euler|model``.

Each published protocol fixes its sampler (SAFREE: DPM-Solver, UnlearnDiffAtk: LMS, the SLD paper: the
checkpoint's own), so a run names the one it used. A named sampler is built with ``from_config`` from
the checkpoint's own scheduler config — what the official scripts do with ``from_pretrained(model,
subfolder="scheduler")`` — so the noise schedule (betas, prediction type, timestep spacing) stays the
checkpoint's and only the solver changes. ``model`` keeps the checkpoint's scheduler.

The ε/v samplers here are refused for a flow-matching checkpoint (SD 3, FLUX, Qwen-Image, Wan): their
scheduler is not a solver choice of the same ODE.
"""

from __future__ import annotations

from .errors import InputError
from .registry import Registry

MODEL = "model"

#: name → the diffusers scheduler class (lazy: listing the names imports nothing).
SCHEDULERS: Registry[type] = Registry("schedulers", what="scheduler")
for _name, _cls, _summary in (
    ("dpm-solver", "DPMSolverMultistepScheduler", "DPM-Solver++ multistep (SAFREE, P4D)"),
    ("lms", "LMSDiscreteScheduler", "linear multistep (UnlearnDiffAtk, ESD)"),
    ("ddim", "DDIMScheduler", "DDIM"),
    ("pndm", "PNDMScheduler", "PNDM (SD 1.x's own)"),
    ("euler", "EulerDiscreteScheduler", "Euler"),
):
    SCHEDULERS.register(_name, f"diffusers:{_cls}", summary=_summary)


def check_scheduler(name: str | None, checkpoint_scheduler: str | None = None) -> str:
    """The canonical name of `name` (None: ``model``); refused in one line when unknown, or when the
    checkpoint's scheduler (its class name, from ``model_index.json``) is a flow-matching one."""
    key = MODEL if name is None else str(name).strip().lower()
    if key in (MODEL, "default", "checkpoint"):
        return MODEL
    if key not in SCHEDULERS:
        raise InputError(f"--scheduler {name!r}: choose one of {MODEL}, {', '.join(SCHEDULERS.names())}")
    if checkpoint_scheduler and "FlowMatch" in checkpoint_scheduler:
        raise InputError(
            f"--scheduler {key}: the checkpoint samples with {checkpoint_scheduler} (flow matching); only"
            f" --scheduler {MODEL} applies"
        )
    return key


def scheduler_class_name(name: str, checkpoint_scheduler: str | None) -> str | None:
    """The class a run with scheduler `name` samples with (the checkpoint's own for ``model``)."""
    if name == MODEL:
        return checkpoint_scheduler
    target = SCHEDULERS.entry(name).target
    return target.partition(":")[2] if isinstance(target, str) else target.__name__


def apply_scheduler(pipe, name: str) -> None:
    """Swap `pipe`'s scheduler for sampler `name`, built from the checkpoint's scheduler config."""
    if name == MODEL:
        return
    cls = SCHEDULERS.get(name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
