"""What the demo does, without any UI: validate a request, generate both images, write the downloads.

Kept free of gradio so it is unit-testable and reusable; :mod:`safe_diffusion.app.ui` only wires
widgets to :meth:`DemoGenerator.generate`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import InputError
from ..common.loading import load_pipeline
from ..common.outputs import atomic_write_json, save_image_atomic
from ..common.validation import check_float, check_safety, parse_signed_concept
from ..guidance import describe_terms
from ..guidance.mitigation import MITIGATIONS, Mitigation
from ..jobs.compare import KINDS, generate_guided_images, pipeline_record

MAX_SEED = 2**32 - 1
STEPS_RANGE = (1, 150)
GUIDANCE_SCALE_RANGE = (1.0, 30.0)
MAX_PROMPT_CHARS = 2000
MAX_EDITS = 8

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Edit:
    """One semantic edit: add (`remove=False`) or remove a concept."""

    concept: str
    remove: bool = False


@dataclass(frozen=True)
class DemoRequest:
    """A validated demo request; build it with :func:`validate_request`."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 25
    guidance_scale: float = 7.5
    safety: str = "medium"
    safety_concept: str | None = None
    edits: tuple[Edit, ...] = ()
    methods: tuple[str, ...] = ()  # registered mitigations (MITIGATIONS), by name

    def mitigation(self) -> Mitigation:
        """What the guided image is given: SLD for the preset (unless off), SEGA for the edits, then the methods."""
        return Mitigation.build(
            safety=self.safety,
            safety_concept=self.safety_concept,
            edits=[("-" if e.remove else "+") + e.concept for e in self.edits],
            methods=self.methods,
            negative_prompt=self.negative_prompt,
        )


@dataclass
class DemoResult:
    unguided: Any  # PIL image
    guided: Any  # PIL image
    settings: dict
    files: list[Path] = field(default_factory=list)


def parse_edits(text: str | None) -> tuple[Edit, ...]:
    """``+sunglasses`` / ``-beard``, one per line (blank lines ignored), or a one-line InputError naming the line."""
    edits = []
    for number, raw in enumerate((text or "").splitlines(), start=1):
        if raw.strip():
            concept, remove = parse_signed_concept(raw, f"edit line {number}")
            edits.append(Edit(concept=concept, remove=remove))
    if len(edits) > MAX_EDITS:
        raise InputError(f"at most {MAX_EDITS} edit concepts, got {len(edits)}")
    return tuple(edits)


def _as_int(name: str, value: Any) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{name} is missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise InputError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def validate_request(
    prompt: str | None,
    negative_prompt: str | None = None,
    seed: Any = 0,
    steps: Any = 25,
    guidance_scale: Any = 7.5,
    safety: str | None = "medium",
    safety_concept: str | None = None,
    edits: str | None = None,
    methods: Any = None,
) -> DemoRequest:
    """Check the form's values; a one-line :class:`InputError` names the first problem."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise InputError("the prompt is empty: type what to generate")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt is too long ({len(prompt)} characters, at most {MAX_PROMPT_CHARS})")
    seed = _as_int("seed", seed)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    steps = _as_int("steps", steps)
    lo, hi = STEPS_RANGE
    if not lo <= steps <= hi:
        raise InputError(f"steps must be between {lo} and {hi}, got {steps}")
    if guidance_scale is None or (isinstance(guidance_scale, str) and not guidance_scale.strip()):
        raise InputError("guidance scale is missing")
    guidance_scale = check_float("guidance scale", guidance_scale)
    lo, hi = GUIDANCE_SCALE_RANGE
    if not lo <= guidance_scale <= hi:
        raise InputError(f"guidance scale must be between {lo:g} and {hi:g}, got {guidance_scale:g}")
    key = check_safety("safety", safety or "")
    parsed_edits = parse_edits(edits)
    chosen = tuple(dict.fromkeys(MITIGATIONS.canonical(m) for m in (methods or ()) if str(m).strip()))
    if (key != "off" or parsed_edits or chosen) and guidance_scale <= 1.0:
        raise InputError("guidance scale must be above 1 for safety guidance or edits to act")
    concept = (safety_concept or "").strip() or None
    return DemoRequest(
        prompt=prompt,
        negative_prompt=(negative_prompt or "").strip() or None,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        safety=key,
        safety_concept=concept,
        edits=parsed_edits,
        methods=chosen,
    )


def guidance_terms(request: DemoRequest) -> list:
    """The terms the guided image uses: SLD for the preset (unless off), SEGA for the edits, then the methods."""
    return request.mitigation().terms()


class DemoGenerator:
    """Holds the one loaded pipeline and generates both images of a request, one request at a time.

    The pipeline and the guidance hooks attached to it are not safe to share between threads, so
    :meth:`generate` holds :attr:`lock` for the whole request, whatever queue sits in front of it.
    """

    def __init__(self, pipe, model: str, output_root: str | Path | None = None):
        self.pipe = pipe
        self.model = model
        self.lock = threading.Lock()
        self._own_root = output_root is None
        self.output_root = Path(output_root or tempfile.mkdtemp(prefix="safe-diffusion-demo-"))
        self.output_root.mkdir(parents=True, exist_ok=True)
        self._count = 0

    @classmethod
    def load(cls, model: str, device: str | None = None, output_root: str | Path | None = None) -> DemoGenerator:
        """Load `model` once (a one-line InputError if it will not load)."""
        return cls(load_pipeline(model, device=device), model, output_root=output_root)

    def close(self) -> None:
        if self._own_root:
            shutil.rmtree(self.output_root, ignore_errors=True)

    def generate(self, request: DemoRequest, progress: Progress | None = None) -> DemoResult:
        """The unguided and the guided image from the same seed, the settings, and files to download."""
        mitigation = request.mitigation()
        terms = mitigation.terms()
        report = progress or (lambda fraction, desc: None)

        def step_callback(kind):
            index = KINDS.index(kind)
            report(index / 2, f"{kind} image: starting")

            def on_step(pipe, step, timestep, kwargs):
                # Some schedulers (PNDM) take more denoising steps than asked for; count theirs.
                n = max(getattr(pipe, "num_timesteps", 0) or request.steps, step + 1)
                report((index + (step + 1) / n) / 2, f"{kind} image: step {step + 1}/{n}")
                return kwargs

            return on_step

        with self.lock:
            started = time.monotonic()
            made = generate_guided_images(
                self.pipe,
                request.prompt,
                [request.seed],
                terms,
                kinds=KINDS,
                step_callback=step_callback,
                negative_prompt=request.negative_prompt,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
            )
            images = {kind: made.images[kind][0] for kind in KINDS}
            seconds = round(time.monotonic() - started, 2)

            self._count += 1
            folder = self.output_root / f"{self._count:05d}-seed{request.seed}"
            folder.mkdir(parents=True, exist_ok=True)

        settings = {
            "model": self.model,
            **{k: v for k, v in asdict(request).items() if k not in ("edits", "methods")},
            "safety_concept": None if mitigation.safety is None else mitigation.safety.concept,
            "edits": [("-" if e.remove else "+") + e.concept for e in request.edits],
            "methods": list(request.methods),
            "label": mitigation.label,
            **pipeline_record(self.pipe, images["guided"]),
            "device": str(getattr(self.pipe, "device", "")),
            "seconds": seconds,
            "guidance": describe_terms(terms),
            "mitigation": mitigation.to_dict(),
        }
        files = []
        for kind, image in images.items():
            png = folder / f"seed{request.seed}-{kind}.png"
            save_image_atomic(image, png)
            files.append(png)
        sidecar = folder / f"seed{request.seed}-settings.json"
        atomic_write_json(sidecar, {**settings, "images": {k: f"seed{request.seed}-{k}.png" for k in images}})
        files.append(sidecar)
        return DemoResult(unguided=images["unguided"], guided=images["guided"], settings=settings, files=files)


def warmup_note(request: DemoRequest) -> str | None:
    """Why the two images may be identical: every guidance term still in its warm-up for all the steps."""
    terms = guidance_terms(request)
    if not terms:
        return "safety is off and there are no edits, so both images are the same"
    from ..guidance.activity import first_active_step  # the one reading of warm-ups (fractions included)

    first = first_active_step(terms, request.steps)
    if request.steps <= first:
        return f"guidance starts after a warm-up of {first} steps; with {request.steps} steps both images are the same"
    return None


def settings_json(settings: dict) -> str:
    return json.dumps(settings, indent=2, ensure_ascii=False)
