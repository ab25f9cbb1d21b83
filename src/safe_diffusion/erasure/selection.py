"""RECE's validation-based choice of the epoch it keeps, as the official ``train.py`` does it.

The official loop generates one image per validation prompt (``dataset/validation_inappropriate.csv``:
110 prompts, each with its ``evaluation_seed``; LMS, 50 steps, CFG 7.5, 512×512) for the original model,
the UCE model and after every epoch, judges them (NudeNet for nudity, Q16 for the I2P concepts), and
saves an epoch only when its unsafe rate is below every earlier one; the last saved is the result
(:func:`safe_diffusion.erasure.closed_form.select_epoch`). Here the images are judged with this
project's judges (configurable and recorded); the official file is bundled
(``safe_diffusion/data/rece_validation_inappropriate.csv``, Apache-2.0, see data/PROVENANCE.md).

The validation prompts are inappropriate by design: they are never logged.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..common.errors import InputError
from ..common.hashing import sha256_bytes

BUNDLED = "rece_validation_inappropriate.csv"
#: The official generation settings (RECE execs/generate_images.py).
GUIDANCE = 7.5
DEFAULT_SEED = 42
#: RECE's judge set-ups: NudeNet as its compute_nudity_rate (9 labels, > 0.6, NudeNet 3.0's detector
#: post-processing), Q16 as its run_model_imagefolder.
JUDGE_OPTIONS = {"nudenet": {"setup": "rece"}}


@dataclass
class ValidationSet:
    """Validation prompts with their seeds and guidance scales, and where they came from."""

    prompts: list[str]
    seeds: list[int]
    guidance: list[float]
    source: str
    sha256: str

    def describe(self) -> dict:
        return {"file": self.source, "sha256": self.sha256, "prompts": len(self.prompts)}


def _read_bytes(path: str | None) -> tuple[bytes, str]:
    if path is None:
        return resources.files("safe_diffusion.data").joinpath(BUNDLED).read_bytes(), f"bundled:{BUNDLED}"
    try:
        return Path(path).read_bytes(), str(path)
    except FileNotFoundError:
        raise InputError(f"--rece-validation file {str(path)!r} not found") from None
    except OSError as exc:
        raise InputError(f"--rece-validation file {str(path)!r} is unreadable: {exc.strerror or exc}") from None


def load_validation_set(path: str | None = None) -> ValidationSet:
    """The validation prompts: a CSV with a ``prompt`` (or ``adv_prompt``) column and, optionally,
    ``evaluation_seed`` (or ``sd_seed``; 42 otherwise, as the official code) and ``evaluation_guidance``
    (7.5 otherwise). None: the official file, bundled."""
    from ..common.validation import MAX_SEED

    data, source = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"--rece-validation file {source!r} is not UTF-8 text") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise InputError(f"--rece-validation file {source!r} has no rows")
    column = next((c for c in ("adv_prompt", "prompt") if c in rows[0]), None)
    if column is None:
        raise InputError(f"--rece-validation file {source!r} has no 'prompt' column")
    seed_column = next((c for c in ("evaluation_seed", "sd_seed") if c in rows[0]), None)
    prompts, seeds, guidance = [], [], []
    for number, row in enumerate(rows, start=2):
        prompt = (row.get(column) or "").strip()
        if not prompt:
            raise InputError(f"--rece-validation file {source!r}, line {number}: empty prompt")
        try:
            seed = int(float(row[seed_column])) if seed_column else DEFAULT_SEED
            scale = float(row.get("evaluation_guidance") or GUIDANCE)
        except (TypeError, ValueError):
            raise InputError(
                f"--rece-validation file {source!r}, line {number}: seed or guidance is not a number"
            ) from None
        if not 0 <= seed <= MAX_SEED or not 0 <= scale <= 100:
            raise InputError(f"--rece-validation file {source!r}, line {number}: seed or guidance out of range")
        prompts.append(prompt)
        seeds.append(seed)
        guidance.append(scale)
    return ValidationSet(prompts, seeds, guidance, source, sha256_bytes(data))


def check_scheduler_dependencies() -> None:
    """LMS (the official validation sampler) needs scipy: refuse in one line before any model loads."""
    try:
        import scipy.integrate  # noqa: F401
    except ImportError:
        raise InputError("--rece-selection validation samples with LMS, which needs scipy: pip install scipy") from None


@dataclass
class RECEValidator:
    """Generates and judges the validation images of one stage; called as ``rate = validator("epoch-1")``.

    Images: one per prompt, LMS with the official schedule (β from 0.00085 to 0.012, scaled linear, 1000
    training steps), `steps` steps, each prompt's guidance scale, the model's native size, and the initial
    noise ``torch.cuda.manual_seed(seed)`` draws for the prompt's seed (computed on any device,
    :func:`safe_diffusion.common.noise.cuda_randn`), as the official ``generate_images`` seeds it. An image
    is unsafe when any judge flags it; the rate is over the images
    with a verdict.
    """

    pipe: object
    validation: ValidationSet
    judges: list
    folder: Path
    steps: int = 50
    stages: dict = field(default_factory=dict)

    def __call__(self, stage: str) -> float:
        import torch
        from diffusers import LMSDiscreteScheduler

        from ..common.noise import initial_noise

        pipe = self.pipe
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the model's native size
        original = pipe.scheduler
        pipe.scheduler = LMSDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
        )
        folder = self.folder / stage
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        try:
            for i, (prompt, seed, scale) in enumerate(
                zip(self.validation.prompts, self.validation.seeds, self.validation.guidance)
            ):
                noise = initial_noise(pipe, "cuda", [seed], side, side)
                with torch.no_grad():
                    image = pipe(
                        prompt, num_inference_steps=self.steps, guidance_scale=scale, height=side, width=side, **noise
                    ).images[0]
                path = folder / f"{i:05d}.png"
                image.save(path)
                paths.append(path)
        finally:
            pipe.scheduler = original
        verdicts = [j.judge(paths) for j in self.judges]
        unsafe = known = 0
        for per_image in zip(*verdicts):
            if any(v.unsafe for v in per_image):
                unsafe += 1
                known += 1
            elif all(v.unsafe is not None for v in per_image):
                known += 1
        rate = unsafe / known if known else float("nan")
        self.stages[stage] = {"images": len(paths), "unsafe": unsafe, "with_verdict": known, "rate": rate}
        return rate

    def describe(self) -> dict:
        return {
            "rule": "keep an epoch only when its validation unsafe rate is below every earlier one "
            "(original model, UCE, earlier epochs); the last kept is the result (official train.py)",
            "validation": self.validation.describe(),
            "generation": {
                "scheduler": "LMSDiscreteScheduler(0.00085, 0.012, scaled_linear)",
                "steps": self.steps,
                "images_per_prompt": 1,
                "seeds": "evaluation_seed, CUDA generator (torch.cuda.manual_seed; computed: common.noise)",
                "size": "the model's native size",
            },
            "judges": {j.name: j.describe() for j in self.judges},
            "combine": "unsafe when any judge flags",
            "stages": self.stages,
        }
