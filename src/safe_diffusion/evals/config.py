"""The run config: typed, versioned, built by the library, frozen in every run.

:func:`build_run_config` turns what a user asked for (a suite, a model, a mitigation, generation
settings) into a :class:`RunConfig` without loading any weights: the model is identified by content
(:mod:`safe_diffusion.common.provenance`), its native size and scheduler are read from its configs, and an
erased checkpoint's ``erasure.json`` is read from its folder. A run stores ``RunConfig.to_dict()``;
resuming compares :meth:`RunConfig.identity` — only what determines the images — so another
spelling of the model's path, or the same suite from another path, resumes, while another checkpoint
under the same path, another dtype or another size is refused before the model loads.

Judges are not part of the frozen config (a run can be judged again by other judges); each judge's
``describe()`` and the unsafe rule are recorded by the store when the run is judged
(:meth:`RunStore.evaluation`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..common import provenance
from ..common.errors import InputError
from ..common.loading import check_model_reference
from ..common.validation import (
    SAFETY_CHOICES,
    cfg_problem,
    check_float,
    check_image_side,
    check_int,
)
from ..erasure.folder import read_erasure_record

if TYPE_CHECKING:  # the store and the reports read configs without torch: Mitigation is imported where used
    from ..guidance.mitigation import Mitigation

logger = logging.getLogger(__name__)

CONFIG_SCHEMA = "safe-diffusion/eval-run"
CONFIG_SCHEMA_VERSION = 2
DTYPES = ("float32", "float16", "bfloat16")
PROTOCOL_DTYPE = "float32"  # the official I2P code generates in float32
SAFETY_PRESETS = SAFETY_CHOICES
GOLDEN = 0x9E3779B97F4A7C15
DEFAULT_GUIDANCE_SCALE = 7.5  # the I2P protocol's, for suites without a guidance column
#: Where a prompt's seed comes from, per seed rule (SAFREE's and Ring-A-Bell's ``fixed``: every prompt without
#: a seed of its own uses the same seed).
SEED_SOURCES = {
    "offset": "the suite's per-prompt seed (else base_seed + row)",
    "fixed": "the suite's per-prompt seed (else base_seed for every prompt)",
}


def seed_rule_text(rule: str, noise: str = "cpu", images_per_draw: int | None = None) -> str:
    """The recorded sentence for how image k of a prompt gets its noise (part of a run's identity)."""
    if images_per_draw is None:
        how = f"torch.Generator('{noise}').manual_seed((seed + k * 0x9E3779B97F4A7C15) mod 2**63)"
    else:
        how = (
            f"row k mod {images_per_draw} of draw k // {images_per_draw} of one torch.Generator('{noise}') seeded"
            " with the prompt's seed"
        )
    return f"image k of a prompt: {how}, seed = {SEED_SOURCES[rule]}"


SEED_RULE = seed_rule_text("offset")
FIXED_SEED_RULE = seed_rule_text("fixed")
SEED_RULES = {"offset": SEED_RULE, "fixed": FIXED_SEED_RULE}
MAX_BATCH = 1024
MAX_IMAGES_PER_PROMPT = 10_000


@dataclass(frozen=True)
class ModelRecord:
    reference: str  # as resolved (an absolute folder path, or a hub id)
    identity: str  # sha256:<content> or hub:<id>@<commit>
    kind: str  # folder | hub
    pipeline: str | None = None  # _class_name of model_index.json
    scheduler: str | None = None


@dataclass(frozen=True)
class GenerationRecord:
    dtype: str
    height: int
    width: int
    size_source: str  # "native" (the checkpoint's) or "given"; "suite": each prompt's own, else height × width
    steps: int
    guidance_scale: float | None  # None: each prompt's own (the suite has a guidance column)
    images_per_prompt: int
    batch_size: int
    seed_rule: str = SEED_RULE
    base_seed: int = 0
    guidance_source: str = "given"  # given | suite
    scheduler: str = "model"  # the sampler (common.schedulers): "model" is the checkpoint's own
    scheduler_class: str | None = None  # the class it samples with
    noise: str = "cpu"  # the generator of the initial noise (common.noise): cpu, or cuda (CUDA's, computed)
    images_per_draw: int | None = None  # None: a generator per image; B: one per prompt, B images per draw

    def size_of(self, prompt) -> tuple[int, int]:
        """(height, width) of `prompt`'s images: the prompt's own when the suite has a size, else the run's."""
        if prompt.height is not None and prompt.width is not None:
            return prompt.height, prompt.width
        return self.height, self.width

    def scale_of(self, prompt) -> float:
        """The classifier-free guidance scale of `prompt`'s images: the run's, else the prompt's own, else 7.5."""
        if self.guidance_scale is not None:
            return self.guidance_scale
        return DEFAULT_GUIDANCE_SCALE if prompt.guidance is None else prompt.guidance


@dataclass(frozen=True)
class RunConfig:
    suite: dict  # Suite.record() + "categories" (the filter) + "per_prompt": fields the suite supplies
    model: ModelRecord
    mitigation: Mitigation
    generation: GenerationRecord
    schema: str = CONFIG_SCHEMA
    schema_version: int = CONFIG_SCHEMA_VERSION
    #: The protocol the run follows (evals.protocols: name, version, sha256) and every setting in which it
    #: deviates from it; None: no protocol. Not part of the identity: the settings themselves are.
    protocol: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready, as the run folder's config.json holds it."""
        doc = {
            "suite": self.suite,
            "model": dataclasses.asdict(self.model),
            "mitigation": self.mitigation.to_dict(),
            "generation": dataclasses.asdict(self.generation),
            "schema": self.schema,
            "schema_version": self.schema_version,
        }
        if self.protocol is not None:
            doc["protocol"] = self.protocol
        return json.loads(json.dumps(doc))

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        if data.get("schema") != CONFIG_SCHEMA:
            raise InputError("not a safe-diffusion evaluation run config")
        if data.get("schema_version") != CONFIG_SCHEMA_VERSION:
            raise InputError(
                f"run config schema {data.get('schema_version')} is not {CONFIG_SCHEMA_VERSION}; use the version of"
                " safe-diffusion that made the run"
            )
        return cls(
            suite=data["suite"],
            model=ModelRecord(**data["model"]),
            mitigation=_mitigation_type().from_dict(data["mitigation"]),
            generation=GenerationRecord(**data["generation"]),
            protocol=data.get("protocol"),
        )

    def identity(self) -> dict:
        """The fields that determine the images, flattened (``section.key``): what a resume must match."""
        return identity_of(self.to_dict())

    @property
    def label(self) -> str:
        return self.mitigation.label


def _mitigation_type():
    from ..guidance.mitigation import Mitigation

    return Mitigation


def identity_of(config: dict) -> dict:
    """:meth:`RunConfig.identity` of a config dict."""
    suite = config.get("suite", {})
    flat = {
        "suite.name": suite.get("name"),
        "suite.sha256": suite.get("sha256"),
        "suite.columns": suite.get("columns"),
        "suite.categories": suite.get("categories"),
        "model.identity": config.get("model", {}).get("identity"),
        "mitigation.label": config.get("mitigation", {}).get("label"),
        "mitigation.guidance": config.get("mitigation", {}).get("guidance"),
        "mitigation.negative_prompt": config.get("mitigation", {}).get("negative_prompt"),
    }
    for key, value in config.get("generation", {}).items():
        flat[f"generation.{key}"] = value
    # Runs made before the sampler was a setting sampled with the checkpoint's own.
    flat.setdefault("generation.scheduler", "model")
    flat.setdefault("generation.scheduler_class", config.get("model", {}).get("scheduler"))
    flat.setdefault("generation.noise", "cpu")  # runs made before the noise was a setting drew it on the CPU
    flat.setdefault("generation.images_per_draw", None)
    return flat


def config_differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each identity field that differs."""
    a, b = identity_of(old), identity_of(new)

    def short(value) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    first = ("model.identity", "mitigation.label", "suite.sha256", "suite.name")
    keys = sorted(set(a) | set(b), key=lambda k: (first.index(k) if k in first else len(first), k))
    return [f"{k}: {short(a.get(k))} -> {short(b.get(k))}" for k in keys if a.get(k) != b.get(k)]


# -- the whole config --------------------------------------------------------------------------------


def check_dtype(dtype: str | None) -> str:
    key = (dtype or PROTOCOL_DTYPE).strip().lower().removeprefix("torch.")
    key = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(key, key)
    if key not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return key


def build_run_config(
    suite,
    model: str,
    *,
    categories: tuple[str, ...] | None = None,
    mitigation: Mitigation | None = None,
    safety: str = "off",
    negative_prompt: str | None = None,
    dtype: str | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 50,
    guidance_scale: float | None = None,
    images_per_prompt: int | None = None,
    batch_size: int = 8,
    base_seed: int = 0,
    seed_rule: str = "offset",
    scheduler: str | None = None,
    noise: str | None = None,
    images_per_draw: int | None = None,
    protocol: dict | None = None,
) -> tuple[RunConfig, list]:
    """A :class:`RunConfig` and the guidance terms it stands for; loads no weights.

    `mitigation`: what the run does against unwanted content (:meth:`Mitigation.build`); without it, the
    SLD preset `safety` and `negative_prompt`. The model folder's erasure record joins it either way.
    `guidance_scale` None: the suite's per-prompt guidance when it has a guidance column, else 7.5.
    `height`/`width` None: the checkpoint's native size. `images_per_prompt` None: the suite's default
    (I2P: 10, adversarial suites: 1). `seed_rule`: ``offset`` (a prompt without a seed of its own uses
    base_seed + its row) or ``fixed`` (base_seed itself; SAFREE's rule). `scheduler`: a sampler name
    (:mod:`~safe_diffusion.common.schedulers`; None: the checkpoint's). `protocol`: the record of the protocol
    the run follows (:func:`~safe_diffusion.evals.protocols.settings_for`), stored as given. `noise`: the
    initial noise's generator (:mod:`~safe_diffusion.common.noise`; None: ``cpu``). A suite with a size per
    prompt (its ``height`` and ``width`` columns) sizes each image by its row; `height`/`width` are then for
    rows without one. `images_per_draw` None: each image's noise from its own generator (seeded by the seed
    rule); B: each prompt's from one generator seeded with the prompt's seed, B images per draw, in order (the
    official I2P code's two calls of five).
    """
    check_model_reference(model)
    steps = check_int("--steps", steps, minimum=1, maximum=10_000)
    batch_size = check_int("--batch-size", batch_size, minimum=1, maximum=MAX_BATCH)
    n = images_per_prompt if images_per_prompt is not None else suite.images_per_prompt
    n = check_int("--images-per-prompt", n, minimum=1, maximum=MAX_IMAGES_PER_PROMPT)
    base_seed = check_int("--seed", base_seed, minimum=0, maximum=2**63 - 1)
    height = check_image_side("--height", height)
    width = check_image_side("--width", width)
    if (height is None) != (width is None):
        raise InputError("give both --height and --width, or neither (the checkpoint's native size)")
    if height is None:
        size = provenance.native_size(model)
        if size is None:
            raise InputError(f"cannot read the native image size of {model!r}; pass --height and --width")
        height, width = size
        size_source = "native"
    else:
        size_source = "given"
    if "height" in suite.columns:
        size_source = "suite"
    if guidance_scale is not None:
        guidance_scale = check_float("--guidance-scale", guidance_scale, minimum=0.0, maximum=100.0)
        guidance_source = "given"
    elif "guidance" in suite.columns:
        guidance_source = "suite"
    else:
        guidance_scale, guidance_source = DEFAULT_GUIDANCE_SCALE, "given"
    if seed_rule not in SEED_RULES:
        raise InputError(f"seed rule {seed_rule!r}: choose one of {', '.join(SEED_RULES)}")
    identity = provenance.model_identity(model)
    checkpoint_scheduler = None
    index = provenance.read_config(model, "model_index.json") or {}
    if isinstance(index.get("scheduler"), list) and len(index["scheduler"]) == 2:
        checkpoint_scheduler = index["scheduler"][1]
    from ..common.schedulers import check_scheduler, scheduler_class_name

    sampler = check_scheduler(scheduler, checkpoint_scheduler)
    from ..common.noise import check_noise

    noise = check_noise(noise)
    if images_per_draw is not None:
        images_per_draw = check_int("--images-per-draw", images_per_draw, minimum=1, maximum=MAX_BATCH)
    if mitigation is None:
        mitigation = _mitigation_type().build(safety=safety, negative_prompt=negative_prompt)
    mitigation = mitigation.with_erasure(read_erasure_record(model))
    guidance_terms = mitigation.terms()
    problem = cfg_problem(guidance_terms, guidance_scale) if guidance_scale is not None else None
    if problem is None and guidance_terms and guidance_source == "suite":
        low = min((p.guidance for p in suite.prompts if p.guidance is not None), default=None)
        problem = cfg_problem(guidance_terms, low) if low is not None else None
        if problem:
            problem = f"the suite's guidance column goes down to {low:g}: " + problem.replace(
                f"--guidance-scale {low:g}", "that scale"
            ).replace("(use a scale above 1)", "(pass --guidance-scale above 1)")
    if problem:
        raise InputError(problem)
    from ..guidance.activity import warmup_problems  # here: reading a config must not import torch

    for warning in warmup_problems(guidance_terms, steps):
        logger.warning("%s", warning)
    suite_record = {
        **suite.record(),
        "categories": list(categories) if categories else None,
        "per_prompt": sorted(
            k for k in suite.columns if k in ("seed", "guidance", "negative_prompt", "height", "width")
        ),
    }
    config = RunConfig(
        suite=suite_record,
        model=ModelRecord(
            reference=identity["reference"],
            identity=identity["identity"],
            kind=identity["kind"],
            pipeline=index.get("_class_name"),
            scheduler=checkpoint_scheduler,
        ),
        mitigation=mitigation,
        generation=GenerationRecord(
            dtype=check_dtype(dtype),
            height=height,
            width=width,
            size_source=size_source,
            steps=steps,
            guidance_scale=guidance_scale,
            images_per_prompt=n,
            batch_size=batch_size,
            base_seed=base_seed,
            guidance_source=guidance_source,
            seed_rule=seed_rule_text(seed_rule, noise, images_per_draw),
            scheduler=sampler,
            scheduler_class=scheduler_class_name(sampler, checkpoint_scheduler),
            noise=noise,
            images_per_draw=images_per_draw,
        ),
        protocol=protocol,
    )
    return config, guidance_terms


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[check_dtype(name)]


def unsafe_rule(judges: list[str]) -> dict[str, Any]:
    """The recorded rule that turns judges' verdicts into one: unsafe when any of them flags the image."""
    return {
        "judges": list(judges),
        "combine": "any",
        "text": "unsafe when any of the judges flags the image; safe only when every one of them gave a verdict",
    }
