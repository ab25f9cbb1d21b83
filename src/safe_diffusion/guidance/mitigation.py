"""One serialisable mitigation: what a run was asked to do against unwanted content, and the guidance terms
that do it.

A :class:`Mitigation` holds the guidance terms of a run in the order they are applied (an SLD preset or a
custom safety term, SEGA edits, Fair Diffusion, and methods chosen by name from :data:`MITIGATIONS`, such as
SAFREE), the negative prompt, and, for an erased checkpoint, its erasure record. It is the one place where a
user's choices become terms (``generate``, ``eval run``, the demo and the library all call
:meth:`Mitigation.build`), and it round-trips: :meth:`Mitigation.to_dict` is what a run records (its
``mitigation`` section) and :meth:`Mitigation.from_dict` rebuilds equal terms from it, so a frozen run can
be regenerated from its record alone.

Terms serialise through their config (:func:`term_config` / :func:`term_from_config`, after diffusers'
``register_to_config`` / ``from_config``); a term's type is found in :data:`TERM_TYPES`, or among the
classes registered as mitigations. Other packages add methods without editing this one, through the
entry-point group ``safe_diffusion.mitigations`` (see :mod:`safe_diffusion.common.registry`)::

    [project.entry-points."safe_diffusion.mitigations"]
    my-method = "my_package.guidance:MyGuidance"   # a term class; called without arguments
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..common.errors import InputError
from ..common.registry import Registry
from ..common.validation import check_float, check_int, check_safety, check_text, parse_signed_concept
from .fair import check_proportions
from .sld import SafetyConfig
from .terms import FairGuidance, SafetyGuidance, SemanticGuidance, config_fields, safety_terms

#: Term classes by name: what a config's ``"type"`` resolves to.
TERM_TYPES: Registry[type] = Registry("guidance_terms", what="guidance term type", normalize=str.strip)
TERM_TYPES.register("SafetyGuidance", "safe_diffusion.guidance.terms:SafetyGuidance", summary="SLD")
TERM_TYPES.register("SemanticGuidance", "safe_diffusion.guidance.terms:SemanticGuidance", summary="SEGA")
TERM_TYPES.register("FairGuidance", "safe_diffusion.guidance.terms:FairGuidance", summary="Fair Diffusion")

#: Guidance methods chosen by name (``--mitigation NAME``): each entry builds one term with its defaults.
MITIGATIONS: Registry[Callable[[], Any]] = Registry("mitigations")


def register_mitigation(name: str, target: Any, *, label: str | None = None, summary: str = "", **metadata) -> None:
    """Make `name` usable as ``--mitigation NAME`` (and in :meth:`Mitigation.build`'s `methods`).

    `target`: a term class or a ``"module:Class"`` reference (imported on first use), called without
    arguments for the method's defaults; `label`: how reports name the method ("SAFREE").
    """
    MITIGATIONS.register(name, target, summary=summary, label=label or name, **metadata)


register_mitigation(
    "safree",
    "safe_diffusion.guidance.safree:SafreeGuidance",
    label="SAFREE",
    summary="SAFREE (Yoon et al., ICLR 2025): toxic-subspace projection of the prompt, self-validating filter",
    term_type="SafreeGuidance",
)


def available_mitigations() -> list[str]:
    return MITIGATIONS.names()


# -- one term <-> its config ------------------------------------------------------------------------


def term_config(term: Any) -> dict:
    """`term`'s config: its ``to_config()``, or the fields of a dataclass term; ValueError if it has none."""
    if callable(getattr(term, "to_config", None)):
        return term.to_config()
    if dataclasses.is_dataclass(term) and not isinstance(term, type):
        return config_fields(term)
    raise ValueError(f"{type(term).__name__} cannot be recorded: give it to_config() or make it a dataclass")


def _reference_tail(target: Any) -> str | None:
    if isinstance(target, str):
        return target.rpartition(":")[2].rpartition(".")[2]
    return getattr(target, "__name__", None)


def _mitigation_entry(type_name: str):
    """The mitigations-registry entry whose term class is called `type_name`, or None."""
    for entry in MITIGATIONS.entries():
        if type_name in (entry.metadata.get("term_type"), _reference_tail(entry.target)):
            return entry
    return None


def term_type(type_name: str) -> type:
    """The term class a config's ``"type"`` names (:data:`TERM_TYPES`, then the registered mitigations)."""
    if type_name in TERM_TYPES:
        return TERM_TYPES.get(type_name)
    entry = _mitigation_entry(type_name)
    if entry is None:
        known = ", ".join([*TERM_TYPES.names(), *(_reference_tail(e.target) for e in MITIGATIONS.entries())])
        raise InputError(f"unknown guidance term type {type_name!r}; known: {known}")
    return MITIGATIONS.get(entry.name)


def term_from_config(config: dict) -> Any:
    """The term a :func:`term_config` (or ``describe()``) output stands for; one-line InputError if it cannot be
    rebuilt."""
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise InputError(f"a guidance term's config is a dict with a 'type', got {config!r:.80}")
    cls = term_type(config["type"])
    try:
        if callable(getattr(cls, "from_config", None)):
            return cls.from_config(config)
        fields = {k: v for k, v in config.items() if k != "type"}
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot rebuild {config['type']} from its record: {exc}") from None


def bind_to_seeds(terms: Sequence, seeds: Sequence[int]) -> list:
    """Terms that decide per image from its seed (Fair Diffusion) bound to a batch's seeds, in batch order."""
    return [t.for_seeds(list(seeds)) if hasattr(t, "for_seeds") else t for t in terms]


# -- the mitigation ---------------------------------------------------------------------------------

ERASURE_LABELS = {"uce": "UCE", "rece": "RECE", "esd-x": "ESD-x", "esd-u": "ESD-u"}


def erasure_label(record: dict) -> str:
    """How reports name an erased checkpoint: its record's label, else its method's usual name."""
    if record.get("label"):
        return str(record["label"])
    method = str(record.get("method", "erased"))
    return ERASURE_LABELS.get(method.lower(), method)


@dataclass(frozen=True)
class Mitigation:
    """The guidance terms of a run in the order they apply, its negative prompt and its model's erasure record.

    Build it with :meth:`build` (from a user's choices), :meth:`from_dict` (from a run's record) or directly
    from terms. ``label`` names it in reports ("UCE + SLD strong"), ``kind`` says which parts it has.
    """

    guidance: tuple = ()
    negative_prompt: str | None = None
    erasure: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "guidance", tuple(self.guidance))

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        *,
        safety: str | None = "off",
        safety_concept: str | None = None,
        edits: Sequence[str] | None = None,
        edit_scale: Sequence[float] | None = None,
        edit_threshold: Sequence[float] | None = None,
        edit_warmup: Sequence[int] | None = None,
        fair: Sequence[str] | None = None,
        fair_proportions: Sequence[float] | None = None,
        fair_seeds: Sequence[int] | None = None,
        methods: Sequence[str] | None = None,
        terms: Sequence[Any] | None = None,
        negative_prompt: str | None = None,
        erasure: dict | None = None,
    ) -> Mitigation:
        """A mitigation from a user's choices; every bad value is one InputError line naming its option.

        `safety`: an SLD preset (off, weak, medium, strong, max), steering away from `safety_concept`
        (default: the paper's). `edits`: SEGA edits, ``"+concept"`` adds and ``"-concept"`` removes, with
        `edit_scale` / `edit_threshold` / `edit_warmup` given once for all edits or once per edit.
        `fair`: Fair Diffusion's directions (two or more) with target `fair_proportions` (default uniform);
        with `fair_seeds` the term is bound to those images (the run is the images generated).
        `methods`: names registered in :data:`MITIGATIONS`. `terms`: further terms, as given. The terms
        apply in that order: SLD, SEGA, Fair Diffusion, methods, terms.
        """
        preset = check_safety("safety", safety)
        concept = None if safety_concept is None else check_text("--safety-concept", safety_concept)
        guidance: list = list(safety_terms(preset, concept))
        guidance += edit_terms(edits, edit_scale, edit_threshold, edit_warmup)
        guidance += fair_terms(fair, fair_proportions, fair_seeds)
        for name in methods or ():
            guidance.append(method_term(name))
        guidance += list(terms or ())
        if negative_prompt is not None:
            negative_prompt = check_text("--negative-prompt", negative_prompt, allow_empty=True) or None
        return cls(guidance=tuple(guidance), negative_prompt=negative_prompt, erasure=erasure)

    def with_erasure(self, erasure: dict | None) -> Mitigation:
        """This mitigation on a checkpoint with erasure record `erasure` (None: not erased)."""
        return dataclasses.replace(self, erasure=erasure)

    # -- the terms ----------------------------------------------------------------------------------
    def terms(self, seeds: Sequence[int] | None = None) -> list:
        """The guidance terms to attach, in order; with `seeds`, terms that decide per image are bound to them."""
        return bind_to_seeds(self.guidance, seeds) if seeds is not None else list(self.guidance)

    def _of_type(self, name: str) -> list:
        return [t for t in self.guidance if type(t).__name__ == name]

    @property
    def safety(self):
        """The SLD term (the first, if several), or None."""
        found = self._of_type("SafetyGuidance")
        return found[0] if found else None

    @property
    def edits(self):
        """The SEGA term (the first, if several), or None."""
        found = self._of_type("SemanticGuidance")
        return found[0] if found else None

    @property
    def fair(self):
        """The Fair Diffusion term, or None."""
        found = self._of_type("FairGuidance")
        return found[0] if found else None

    @property
    def sld_preset(self) -> str | None:
        """The SLD preset the safety term is (weak … max), "custom" for other settings, None without SLD."""
        term = self.safety
        if term is None:
            return None
        for name in ("weak", "medium", "strong", "max"):
            preset = dataclasses.replace(term, **_preset_fields(SafetyConfig.get(name)))
            if term.warmup_fraction is None and preset == term:
                return name
        return "custom" if isinstance(term, SafetyGuidance) else None

    def _parts(self) -> list[tuple[str, str]]:
        """(kind, label) of each part, in the order labels show them."""
        parts = []
        if self.erasure is not None:
            parts.append(("erased", erasure_label(self.erasure)))
        for term in self.guidance:
            name = type(term).__name__
            if name == "SafetyGuidance":
                parts.append(("sld", f"SLD {self.sld_preset}"))
            elif name == "SemanticGuidance":
                parts.append(("sega", "SEGA"))
            elif name == "FairGuidance":
                parts.append(("fair", "Fair Diffusion"))
            else:
                entry = _mitigation_entry(name)
                key = entry.name if entry is not None else name.lower()
                parts.append((key, entry.metadata.get("label", entry.name) if entry is not None else name))
        if self.negative_prompt:
            parts.append(("negative_prompt", "negative prompt"))
        return list(dict.fromkeys(parts))

    @property
    def label(self) -> str:
        """How reports name it: "SD" (nothing), "SLD strong", "UCE + SLD strong", "SLD medium + SEGA", …"""
        return " + ".join(label for _, label in self._parts()) or "SD"

    @property
    def kind(self) -> str:
        """Its parts: none, or "+"-joined among erased, sld, sega, fair, a method's name, negative_prompt."""
        return "+".join(dict.fromkeys(kind for kind, _ in self._parts())) or "none"

    # -- records ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready, as runs record it: label, kind and SLD preset (read-only facts), every term's config in
        order, the negative prompt and the erasure record."""
        return {
            "kind": self.kind,
            "label": self.label,
            "sld_preset": self.sld_preset,
            "guidance": [term_config(t) for t in self.guidance],
            "negative_prompt": self.negative_prompt,
            "erasure": self.erasure,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Mitigation:
        """The mitigation a :meth:`to_dict` output (a run's ``mitigation`` record) describes, with equal terms."""
        if not isinstance(data, dict):
            raise InputError(f"a mitigation record is a dict, got {type(data).__name__}")
        guidance = data.get("guidance") or []
        if not isinstance(guidance, list):
            raise InputError("a mitigation record's 'guidance' is a list of term configs")
        return cls(
            guidance=tuple(term_from_config(c) for c in guidance),
            negative_prompt=data.get("negative_prompt"),
            erasure=data.get("erasure"),
        )


def _preset_fields(preset) -> dict:
    return {
        "scale": preset.sld_guidance_scale,
        "warmup_steps": preset.sld_warmup_steps,
        "threshold": preset.sld_threshold,
        "momentum_scale": preset.sld_momentum_scale,
        "mom_beta": preset.sld_mom_beta,
    }


# -- user choices -> terms --------------------------------------------------------------------------


def method_term(name: str) -> Any:
    """The term of the method registered as `name`, with its defaults."""
    if not MITIGATIONS.names():
        raise InputError(
            f"unknown mitigation {name!r}: none is registered (install a package that registers one under the"
            " entry points safe_diffusion.mitigations)"
        )
    return MITIGATIONS.get(name)()


def _per_edit(name: str, values: Sequence | None, n: int) -> list | None:
    """One value for all edits, one per edit, or None (the default); anything else is a one-line error."""
    values = list(values or [])
    if not values:
        return None
    if n == 0:
        raise InputError(f"{name} given without any --edit")
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InputError(f"{len(values)} {name} values for {n} edit(s); give one for all edits or one per edit")
    return values


def edit_terms(
    edits: Sequence[str] | None,
    scales: Sequence[float] | None = None,
    thresholds: Sequence[float] | None = None,
    warmups: Sequence[int] | None = None,
) -> list:
    """The SEGA term for edits ``"+concept"`` (add) / ``"-concept"`` (remove) and their per-edit settings."""
    concepts, reverse = [], []
    for edit in edits or ():
        concept, remove = parse_signed_concept(edit, f"--edit {edit!r}")
        concepts.append(concept)
        reverse.append(remove)
    n = len(concepts)
    scales = _per_edit("--edit-scale", scales, n)
    thresholds = _per_edit("--edit-threshold", thresholds, n)
    warmups = _per_edit("--edit-warmup", warmups, n)
    if not n:
        return []
    kwargs: dict[str, Any] = {"reverse": reverse}
    if scales is not None:
        kwargs["scale"] = [check_float("--edit-scale", v, minimum=0.0, maximum=1e4) for v in scales]
    if thresholds is not None:
        kwargs["threshold"] = [check_float("--edit-threshold", t, minimum=0.0, maximum=1.0) for t in thresholds]
    if warmups is not None:
        kwargs["warmup_steps"] = [check_int("--edit-warmup", w, minimum=0) for w in warmups]
    return [SemanticGuidance(concepts, **kwargs)]


def fair_terms(
    directions: Sequence[str] | None, proportions: Sequence[float] | None = None, seeds: Sequence[int] | None = None
) -> list:
    """The Fair Diffusion term for `directions` and target `proportions` (default uniform); bound to `seeds`
    (then the run is those images) when given."""
    if not directions:
        if proportions is not None:
            raise InputError("--fair-proportions given without --fair")
        return []
    directions = [check_text("--fair", d).strip() for d in directions]
    if len(directions) < 2:
        raise InputError(f"Fair Diffusion needs two or more directions, got {directions}")
    if len(set(directions)) != len(directions):
        raise InputError(f"directions {', '.join(directions)!r} repeat a direction")
    props = [1.0 / len(directions)] * len(directions) if proportions is None else list(proportions)
    try:
        props = check_proportions(props, len(directions))
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if seeds is None:
        return [FairGuidance(directions, props)]
    return [FairGuidance(directions, props, run_length=len(seeds)).for_seeds(list(seeds))]
