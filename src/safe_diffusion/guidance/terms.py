"""Guidance terms: the paper's hyper-parameters bound to their math, ready to attach to a pipeline.

A term names the concepts whose noise estimates it needs, says at which steps it needs them, and
turns the estimates into a correction of the prompt's estimate ε_p: the pipeline's own
classifier-free guidance, ε_∅ + s_g·(ε_p + Δ − ε_∅), then yields the guided estimate. Terms hold
no tensors between runs; each run's state is created by :meth:`initial_state` and passed back in.

Every term is a config object in the spirit of diffusers' ``register_to_config`` / ``from_config``:
:meth:`to_config` gives its constructor arguments as a JSON-ready dict with a ``"type"`` key, and
``type(term).from_config(config)`` (or :func:`safe_diffusion.guidance.mitigation.term_from_config`,
which reads the type) builds an equal term, so a run's record rebuilds the guidance it used.
:meth:`describe` is that config plus read-only facts (:data:`READ_ONLY_KEYS`: the prediction space
the term acts in on a given model, Fair Diffusion's per-image directions). A term says in which
prediction space its thresholds and scales act (``space``, see :data:`SPACES` and docs/guidance.md),
and may give its warm-up as a fraction of the schedule, resolved to steps for one run by
:meth:`for_schedule`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .fair import check_proportions, directions_for_seeds, minimal_run_length
from .sega import needs_edit_estimate, sega_step
from .sld import DEFAULT_SAFETY_CONCEPT, SafetyConfig, needs_safety_estimate, sld_step

Concept = str | torch.Tensor  # a text, or precomputed text-encoder embeddings of shape (tokens, dim)

#: Where a term's thresholds and scales act. "model": on the denoiser's own output, whatever it
#: predicts. "epsilon": on the ε-equivalent of the output (its differences rescaled to those of a
#: noise prediction at the same x_t). "auto": "model" for ε- and v-prediction models (exactly what the
#: reference pipelines do) and "epsilon" for flow-matching velocity models. See docs/guidance.md.
SPACES = ("auto", "model", "epsilon")


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")


def _check_fraction(name: str, value) -> None:
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be a fraction of the schedule in [0, 1], got {v}")


def steps_from_fraction(fraction: float, total_steps: int) -> int:
    """The first step at or after `fraction` of a run of `total_steps` denoiser evaluations (floor, as diffusers'
    guiders turn their ``start``/``stop`` fractions into steps)."""
    return int(float(fraction) * total_steps)


#: Keys :meth:`describe` adds to a term's config: facts about one use of it, never constructor arguments.
READ_ONLY_KEYS = ("prediction", "acts_in", "assigned_directions")
#: How :meth:`describe` shows a concept given as precomputed embeddings (such a term has no config).
EMBEDDINGS = "<embeddings>"


def _config_value(value, *, strict: bool):
    if isinstance(value, torch.Tensor):
        if strict:
            raise ValueError("a term built from precomputed embeddings has no config: give its concepts as text")
        return EMBEDDINGS
    if isinstance(value, (list, tuple)):
        return [_config_value(v, strict=strict) for v in value]
    return value


def config_fields(term, *, strict: bool = True) -> dict:
    """``{"type": …, <every constructor field>…}`` of a dataclass term, JSON-ready. `strict`: a concept given as
    embeddings raises ValueError (a config must rebuild the term); otherwise it shows as ``"<embeddings>"``."""
    out = {"type": type(term).__name__}
    for f in dataclasses.fields(term):
        if f.init:
            out[f.name] = _config_value(getattr(term, f.name), strict=strict)
    return out


def describe_fields(term, prediction: str | None = None) -> dict:
    """:func:`config_fields` (embeddings as ``"<embeddings>"``) and, given the pipeline's `prediction` type
    ("epsilon", "v_prediction", "flow"), ``"prediction"`` and ``"acts_in"``: the space ("model" or "epsilon")
    the term's ``space`` setting means there."""
    out = config_fields(term, strict=False)
    if prediction is not None:
        out["prediction"] = prediction
        out["acts_in"] = resolve_space(getattr(term, "space", "auto"), prediction)
    return out


class ConfigTerm:
    """The config round trip of a dataclass term: :meth:`to_config` and :meth:`from_config`."""

    def to_config(self) -> dict:
        """The constructor arguments, JSON-ready, with ``"type"``: the class name."""
        return config_fields(self)

    @classmethod
    def from_config(cls, config: dict):
        """The term `config` describes (a :meth:`to_config` or :meth:`describe` output): read-only keys are
        ignored; a config of another type, or with unknown keys, raises ValueError."""
        config = dict(config)
        kind = config.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"a {kind} config cannot build a {cls.__name__}")
        for key in READ_ONLY_KEYS:
            config.pop(key, None)
        if EMBEDDINGS in _flatten(config.values()):
            raise ValueError(f"this {kind} was built from precomputed embeddings, which its record does not hold")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"{kind} has no setting {', '.join(map(repr, unknown))}")
        return cls(**config)


def _flatten(values) -> list:
    out = []
    for value in values:
        out.extend(_flatten(value) if isinstance(value, (list, tuple)) else [value])
    return out


def resolve_space(space: str, prediction: str) -> str:
    """The space a term with setting `space` acts in on a model predicting `prediction`
    ("epsilon", "v_prediction", "flow", …): "model" or "epsilon"."""
    _check_space(space)
    if space != "auto":
        return space
    return "epsilon" if prediction == "flow" else "model"


@runtime_checkable
class GuidanceTerm(Protocol):
    """What the engine (:mod:`safe_diffusion.engine`) asks of a term.

    Optional members, used when present: ``space`` (one of :data:`SPACES`, default "auto"),
    ``for_schedule(total_steps)`` (the term with fractional warm-ups resolved for one run), and
    ``to_config()`` / ``from_config(config)`` (:class:`ConfigTerm`: what lets a run's record rebuild the term;
    a dataclass term without them is serialised from its fields).
    """

    @property
    def concepts(self) -> Sequence[Concept]: ...

    def needs(self, step: int) -> list[bool]:
        """Per concept, whether its estimate is used at `step` (unused ones are not evaluated)."""

    def initial_state(self) -> Any: ...

    def apply(
        self,
        eps_uncond: torch.Tensor,
        eps_text: torch.Tensor,
        eps_concepts: Sequence[torch.Tensor | None],
        step: int,
        state: Any,
        guidance_scale: float,
    ) -> tuple[torch.Tensor, Any]:
        """The correction Δ to ε_p at `step`, and the new state."""

    def describe(self, prediction: str | None = None) -> dict:
        """JSON-ready settings: type, hyper-parameters, the prediction space it acts in."""


def for_schedule(terms: Sequence[GuidanceTerm], total_steps: int) -> list[GuidanceTerm]:
    """The terms for a run of `total_steps` denoiser evaluations (fractional warm-ups resolved where a term has
    them)."""
    return [t.for_schedule(int(total_steps)) if callable(getattr(t, "for_schedule", None)) else t for t in terms]


def needed_concepts(terms: Sequence[GuidanceTerm], step: int) -> list[tuple[int, int]]:
    """(term index, concept index) of every concept estimate some term uses at `step`."""
    return [(ti, ci) for ti, term in enumerate(terms) for ci, flag in enumerate(term.needs(step)) if flag]


@dataclass(frozen=True)
class SafetyGuidance(ConfigTerm):
    """Safe Latent Diffusion (Schramowski et al., CVPR 2023): steer away from a safety concept.

    Defaults are the MEDIUM preset, as in diffusers' ``StableDiffusionPipelineSafe``. Steps count
    denoiser evaluations, as the reference does (a second-order scheduler such as Heun evaluates twice
    per step); ``warmup_fraction`` instead starts guidance at that fraction of the run's evaluations
    (not the reference's rule). ``space``: see :data:`SPACES`.
    """

    concept: Concept = DEFAULT_SAFETY_CONCEPT
    scale: float = 1000.0
    warmup_steps: int = 10
    threshold: float = 0.01
    momentum_scale: float = 0.3
    mom_beta: float = 0.4
    warmup_fraction: float | None = None
    space: str = "auto"

    def __post_init__(self):
        _check_space(self.space)
        _check_fraction("warmup_fraction", self.warmup_fraction)
        if int(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {self.warmup_steps}")

    @classmethod
    def from_preset(cls, name: str, concept: Concept = DEFAULT_SAFETY_CONCEPT, **overrides) -> SafetyGuidance:
        """The paper's WEAK / MEDIUM / STRONG / MAX hyper-parameters (SLD, Table 1); `overrides` replace fields
        (e.g. ``space="model"``, ``warmup_fraction=0.2``)."""
        p = SafetyConfig.get(name)
        fields_ = dict(
            concept=concept,
            scale=p.sld_guidance_scale,
            warmup_steps=p.sld_warmup_steps,
            threshold=p.sld_threshold,
            momentum_scale=p.sld_momentum_scale,
            mom_beta=p.sld_mom_beta,
        )
        return cls(**{**fields_, **overrides})

    @property
    def concepts(self) -> list[Concept]:
        return [self.concept]

    def for_schedule(self, total_steps: int) -> SafetyGuidance:
        """This term for a run of `total_steps` denoiser evaluations: ``warmup_fraction`` turned into steps."""
        if self.warmup_fraction is None:
            return self
        return dataclasses.replace(
            self, warmup_steps=steps_from_fraction(self.warmup_fraction, total_steps), warmup_fraction=None
        )

    def describe(self, prediction: str | None = None) -> dict:
        return describe_fields(self, prediction)

    def needs(self, step: int) -> list[bool]:
        return [needs_safety_estimate(step, warmup_steps=self.warmup_steps, momentum_scale=self.momentum_scale)]

    def initial_state(self) -> None:
        return None

    def apply(self, eps_uncond, eps_text, eps_concepts, step, state, guidance_scale):
        gamma, momentum = sld_step(
            eps_uncond,
            eps_text,
            eps_concepts[0],
            step,
            state,
            scale=self.scale,
            warmup_steps=self.warmup_steps,
            threshold=self.threshold,
            momentum_scale=self.momentum_scale,
            mom_beta=self.mom_beta,
        )
        return -gamma, momentum  # SLD eq. (3): γ is subtracted inside the guidance bracket


def _per_concept(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} edit concepts")
        return list(value)
    return [value] * n


@dataclass(frozen=True)
class SemanticGuidance(ConfigTerm):
    """Semantic guidance, SEGA (Brack et al., NeurIPS 2023): add or remove concepts.

    Every per-concept setting is a single value or a list with one entry per concept; `reverse`
    removes a concept instead of adding it. Defaults are those of diffusers'
    ``SemanticStableDiffusionPipeline``. ``warmup_fraction`` / ``cooldown_fraction`` (one value or
    one per concept) replace the step counts by fractions of the run's denoiser evaluations (not the
    reference's rule). ``space``: see :data:`SPACES`.
    """

    concepts: Sequence[Concept] = ()
    reverse: bool | Sequence[bool] = False
    scale: float | Sequence[float] = 5.0
    threshold: float | Sequence[float] = 0.9
    warmup_steps: int | Sequence[int] = 10
    cooldown_steps: int | Sequence[int | None] | None = None
    weights: Sequence[float] | None = None
    momentum_scale: float = 0.1
    mom_beta: float = 0.4
    warmup_fraction: float | Sequence[float | None] | None = None
    cooldown_fraction: float | Sequence[float | None] | None = None
    space: str = "auto"
    _signs: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_space(self.space)
        concepts = [self.concepts] if isinstance(self.concepts, (str, torch.Tensor)) else list(self.concepts)
        if not concepts:
            raise ValueError("SemanticGuidance needs at least one edit concept")
        object.__setattr__(self, "concepts", concepts)
        n = len(concepts)
        for name in ("reverse", "scale", "threshold", "warmup_steps", "cooldown_steps"):
            object.__setattr__(self, name, _per_concept(getattr(self, name), n, name))
        for name in ("warmup_fraction", "cooldown_fraction"):
            value = getattr(self, name)
            if value is not None:
                value = _per_concept(value, n, name)
                _check_fraction(name, value)
                object.__setattr__(self, name, value)
        weights = [1.0] * n if self.weights is None else _per_concept(list(self.weights), n, "weights")
        object.__setattr__(self, "weights", weights)
        for t in self.threshold:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold must be a percentile in [0, 1], got {t}")
        object.__setattr__(self, "_signs", tuple(-1.0 if r else 1.0 for r in self.reverse))

    def signs(self, batch: int) -> Sequence[float | torch.Tensor]:
        """Per concept, +1 to add it or −1 to remove it (a scalar, or a per-image tensor in subclasses)."""
        return self._signs

    def for_schedule(self, total_steps: int) -> SemanticGuidance:
        """This term for a run of `total_steps` denoiser evaluations: fractional warm-ups/cool-downs turned into
        steps."""
        if self.warmup_fraction is None and self.cooldown_fraction is None:
            return self
        changes: dict = {"warmup_fraction": None, "cooldown_fraction": None}
        if self.warmup_fraction is not None:
            changes["warmup_steps"] = [
                w if f is None else steps_from_fraction(f, total_steps)
                for w, f in zip(self.warmup_steps, self.warmup_fraction)
            ]
        if self.cooldown_fraction is not None:
            changes["cooldown_steps"] = [
                c if f is None else steps_from_fraction(f, total_steps)
                for c, f in zip(self.cooldown_steps, self.cooldown_fraction)
            ]
        return dataclasses.replace(self, **changes)

    def describe(self, prediction: str | None = None) -> dict:
        return describe_fields(self, prediction)

    def needs(self, step: int) -> list[bool]:
        return [
            needs_edit_estimate(step, warmup_steps=w, cooldown_steps=c, momentum_scale=self.momentum_scale)
            for w, c in zip(self.warmup_steps, self.cooldown_steps)
        ]

    def initial_state(self) -> None:
        return None

    def apply(self, eps_uncond, eps_text, eps_concepts, step, state, guidance_scale):
        return self.apply_signed(eps_uncond, eps_concepts, step, state, guidance_scale, self.signs(eps_uncond.shape[0]))

    def apply_signed(self, eps_uncond, eps_concepts, step, state, guidance_scale, signs):
        """:meth:`apply` with explicit per-concept signs (scalars or per-image tensors)."""
        term, momentum = sega_step(
            eps_uncond,
            eps_concepts,
            step,
            state,
            scales=self.scale,
            thresholds=self.threshold,
            signs=signs,
            weights=self.weights,
            warmup_steps=self.warmup_steps,
            cooldown_steps=self.cooldown_steps,
            momentum_scale=self.momentum_scale,
            mom_beta=self.mom_beta,
        )
        # SEGA eq. (2) adds γ outside the guidance bracket; as a correction of ε_p it is γ / s_g.
        return term / guidance_scale, momentum


@dataclass(frozen=True)
class FairGuidance(ConfigTerm):
    """Fair Diffusion (Friedrich et al., 2023): each image gets one edit direction, added while the others are removed.

    Which image gets which direction is decided by :mod:`safe_diffusion.guidance.fair` from the
    image's seed, so that any `run_length` consecutive seeds realise the target `proportions`
    exactly (largest-remainder rounding). The term must be bound to the seeds of the images in the
    batch, in batch order: ``FairGuidance(["male person", "female person"]).for_seeds(seeds)``.
    `run_length` defaults to the shortest run over which the proportions are whole numbers.
    Defaults are those of the paper's code: warm-up 5, edit scale 4, threshold 0.95, momentum 0.5, β 0.6.
    ``warmup_fraction`` and ``space`` as in :class:`SemanticGuidance`.
    """

    directions: Sequence[str] = ()
    proportions: Sequence[float] | None = None
    warmup_steps: int = 5
    scale: float = 4.0
    threshold: float = 0.95
    momentum_scale: float = 0.5
    mom_beta: float = 0.6
    run_length: int | None = None
    seeds: Sequence[int] | None = None
    warmup_fraction: float | None = None
    space: str = "auto"
    _semantic: SemanticGuidance = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_space(self.space)
        _check_fraction("warmup_fraction", self.warmup_fraction)
        directions = [self.directions] if isinstance(self.directions, str) else list(self.directions)
        if len(directions) < 2:
            raise ValueError("Fair Diffusion needs at least two directions")
        if len(set(directions)) != len(directions):
            raise ValueError(f"directions must be distinct, got {directions}")
        object.__setattr__(self, "directions", directions)
        props = [1.0 / len(directions)] * len(directions) if self.proportions is None else self.proportions
        object.__setattr__(self, "proportions", check_proportions(props, len(directions)))
        if self.run_length is None:
            object.__setattr__(self, "run_length", minimal_run_length(self.proportions))
        if self.run_length <= 0:
            raise ValueError(f"run_length must be positive, got {self.run_length}")
        if self.seeds is not None:
            object.__setattr__(self, "seeds", [int(s) for s in self.seeds])
        object.__setattr__(
            self,
            "_semantic",
            SemanticGuidance(
                directions,
                scale=self.scale,
                threshold=self.threshold,
                warmup_steps=self.warmup_steps,
                momentum_scale=self.momentum_scale,
                mom_beta=self.mom_beta,
                warmup_fraction=self.warmup_fraction,
                space=self.space,
            ),
        )

    def for_seeds(self, seeds: Sequence[int]) -> FairGuidance:
        """This term bound to the seeds of a batch's images, in batch order."""
        return dataclasses.replace(self, seeds=list(seeds))

    def assignments(self) -> list[int]:
        """Per image of the bound batch, the index of its direction."""
        if self.seeds is None:
            raise ValueError("FairGuidance must be bound to the images' seeds: use .for_seeds(seeds)")
        return directions_for_seeds(self.seeds, self.proportions, self.run_length)

    @property
    def concepts(self) -> list[str]:
        return self.directions

    def for_schedule(self, total_steps: int) -> FairGuidance:
        """This term for a run of `total_steps` denoiser evaluations: ``warmup_fraction`` turned into steps."""
        if self.warmup_fraction is None:
            return self
        return dataclasses.replace(
            self, warmup_steps=steps_from_fraction(self.warmup_fraction, total_steps), warmup_fraction=None
        )

    def describe(self, prediction: str | None = None) -> dict:
        """Settings as :meth:`SemanticGuidance.describe`; when bound to seeds, also each image's direction."""
        out = describe_fields(self, prediction)
        if self.seeds is not None:
            out["assigned_directions"] = [self.directions[i] for i in self.assignments()]
        return out

    def signs(self, batch: int) -> list[torch.Tensor]:
        """Per direction, a per-image tensor: +1 where it is the image's direction, −1 elsewhere."""
        chosen = torch.tensor(self.assignments())
        if chosen.numel() != batch:
            raise ValueError(f"FairGuidance is bound to {chosen.numel()} seeds but the batch has {batch} images")
        return [torch.where(chosen == i, 1.0, -1.0) for i in range(len(self.directions))]

    def needs(self, step: int) -> list[bool]:
        return self._semantic.needs(step)

    def initial_state(self) -> None:
        return None

    def apply(self, eps_uncond, eps_text, eps_concepts, step, state, guidance_scale):
        signs = self.signs(eps_uncond.shape[0])
        return self._semantic.apply_signed(eps_uncond, eps_concepts, step, state, guidance_scale, signs)


def describe_terms(terms: Sequence[Any]) -> list[dict]:
    """JSON-ready settings of guidance terms, for sidecars and run records (each term's ``describe()``)."""
    return [term.describe() for term in terms]


def safety_terms(preset: str, concept: Concept | None = None) -> list:
    """The SLD term of a preset name (``weak`` … ``max``), or none for ``off``."""
    if preset == "off":
        return []
    return [SafetyGuidance.from_preset(preset, concept=concept or DEFAULT_SAFETY_CONCEPT)]
