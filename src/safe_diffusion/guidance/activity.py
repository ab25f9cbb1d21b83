"""Whether guidance ever acted in a run, and the label that says so.

A guidance term acts from its warm-up step on (SLD eq. 3's δ, SEGA's δ per concept; steps count
denoiser evaluations, as the reference pipelines count them), and only through classifier-free
guidance. A run of 4 steps with SLD strong (warm-up 7) is therefore an unguided run: its images are
those of the base model, and a report that calls it "SLD strong" would put the published SLD figure
beside a run of SD. :func:`inactive_parts` says which terms (or concepts) never acted and why;
:func:`activity_label` puts that into the run's label ("SLD strong — inactive: warm-up 7 ≥ 4
steps"); :func:`check_active` is the refusal ``eval run`` applies unless ``--allow-inactive``;
:func:`warmup_problems` is the warning before a run, :func:`first_active_step` the demo's note.

Everything here takes terms as objects (anything with ``describe()``) or as their recorded
``describe()`` dicts, so a frozen run's record is read the same way as a live call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..common.errors import InputError

#: Short names of the term types, for labels.
SHORT_NAMES = {"SafetyGuidance": "SLD", "SemanticGuidance": "SEGA", "FairGuidance": "Fair Diffusion"}
SEPARATOR = " — "


def _described(term: Any) -> Mapping[str, Any]:
    if isinstance(term, Mapping):
        return term
    describe = getattr(term, "describe", None)
    return describe() if callable(describe) else {}


def _warmup(value: Any, fraction: Any, steps: int) -> int | None:
    """The step a part starts acting at: its fraction of `steps` when it has one (floor), else its warm-up."""
    if fraction is not None:
        return int(float(fraction) * steps)
    return None if value is None else int(value)


def _parts(described: Mapping[str, Any], steps: int) -> list[tuple[str | None, int]]:
    """(concept name or None, first active step) for each part of a described term that waits before it acts."""
    warmup, fraction = described.get("warmup_steps"), described.get("warmup_fraction")
    if isinstance(warmup, (list, tuple)) or isinstance(fraction, (list, tuple)):
        concepts = list(described.get("concepts") or [])
        n = max(
            len(warmup) if isinstance(warmup, (list, tuple)) else 0,
            len(fraction) if isinstance(fraction, (list, tuple)) else 0,
        )
        warmups = list(warmup) if isinstance(warmup, (list, tuple)) else [warmup] * n
        fractions = list(fraction) if isinstance(fraction, (list, tuple)) else [fraction] * n
        out = []
        for i, (w, f) in enumerate(zip(warmups, fractions)):
            start = _warmup(w, f, steps)
            if start is not None:
                name = concepts[i] if i < len(concepts) and isinstance(concepts[i], str) else f"concept {i}"
                out.append((name, start))
        return out
    start = _warmup(warmup, fraction, steps)
    return [] if start is None else [(None, start)]


def first_active_step(terms: Iterable[Any], steps: int) -> int:
    """The first evaluation at which any part of `terms` acts (0 for a term without a warm-up)."""
    starts = []
    for term in terms or []:
        parts = _parts(_described(term), int(steps))
        starts.extend([start for _, start in parts] or [0])
    return min(starts, default=0)


def warmup_problems(terms: Iterable[Any], steps: int) -> list[str]:
    """Per term (or SEGA concept) whose warm-up a run of `steps` denoiser evaluations never leaves, why it
    would not apply (a warning before the run; :func:`inactive_parts` labels the run afterwards). A warm-up
    given as a fraction of the run counts as the step it resolves to."""
    problems = []
    for term in terms or []:
        described = _described(term)
        kind = type(term).__name__ if not isinstance(term, Mapping) else str(described.get("type") or "term")
        for name, start in _parts(described, int(steps)):
            if int(steps) <= start:
                what = (
                    kind
                    if name is None
                    else f"{kind} {name}"
                    if name.startswith("concept ")
                    else f"{kind} concept {name!r}"
                )
                problems.append(
                    f"{what} starts after a warm-up of {start} steps, but only {steps} steps run: it would not apply "
                    f"(use --steps above {start})"
                )
    return problems


def inactive_parts(terms: Iterable[Any], steps: int | None, guidance_scale: float | None = None) -> list[str]:
    """Why each term (or SEGA concept) of `terms` never acts in a run of `steps` denoiser evaluations.

    One phrase per part that never acts, e.g. ``"warm-up 7 ≥ 4 steps"``; prefixed with the term's short
    name (and the concept) when `terms` has more than one part. A guidance scale of 1 or less turns
    classifier-free guidance off, and every term with it. Empty when every part acts at some step, or
    when `steps` is unknown.
    """
    described = [_described(t) for t in terms or []]
    if not described or steps is None:
        return []
    if guidance_scale is not None and float(guidance_scale) <= 1:
        return [f"guidance scale {float(guidance_scale):g} ≤ 1 (no classifier-free guidance)"]
    parts = [(d, name, start) for d in described for name, start in _parts(d, int(steps))]
    several = len(parts) > 1
    out = []
    for d, name, start in parts:
        if start < int(steps):
            continue
        phrase = f"warm-up {start} ≥ {int(steps)} steps"
        if several:
            who = SHORT_NAMES.get(str(d.get("type")), str(d.get("type") or "term"))
            phrase = f"{who}{f' {name!r}' if name else ''} {phrase}"
        out.append(phrase)
    return out


def _every_part_inactive(terms: list, steps: int, guidance_scale: float | None) -> bool:
    if guidance_scale is not None and float(guidance_scale) <= 1:
        return True
    parts = [start for t in terms for _, start in _parts(_described(t), int(steps))]
    return bool(parts) and all(start >= int(steps) for start in parts)


def activity_label(label: str, terms: Iterable[Any], steps: int | None, guidance_scale: float | None = None) -> str:
    """`label`, extended with why its guidance never acted: ``"SLD strong — inactive: warm-up 7 ≥ 4 steps"``.

    "partly inactive" when only some terms or concepts never act; `label` unchanged when all act.
    """
    terms = list(terms or [])
    reasons = inactive_parts(terms, steps, guidance_scale)
    if not reasons:
        return label
    word = "inactive" if _every_part_inactive(terms, int(steps), guidance_scale) else "partly inactive"
    return f"{label}{SEPARATOR}{word}: {'; '.join(reasons)}"


def is_inactive_label(label: str | None) -> bool:
    """Whether a label made by :func:`activity_label` says some guidance never acted."""
    return bool(label) and (SEPARATOR + "inactive" in label or SEPARATOR + "partly inactive" in label)


def run_label(config: Mapping[str, Any] | None, label: str | None = None) -> str | None:
    """:func:`activity_label` of a recorded run: its mitigation's label (or `label`) with its terms'
    ``describe()``, its steps and its guidance scale (``config["mitigation"]``, ``config["generation"]``)."""
    config = config or {}
    mitigation, generation = config.get("mitigation") or {}, config.get("generation") or {}
    label = label if label is not None else mitigation.get("label")
    if label is None:
        return None
    return activity_label(
        label, mitigation.get("guidance") or [], generation.get("steps"), generation.get("guidance_scale")
    )


def check_active(
    terms: Iterable[Any],
    steps: int,
    guidance_scale: float | None = None,
    *,
    label: str | None = None,
    allow_inactive: bool = False,
) -> list[str]:
    """Refuse a run in which some guidance never acts (one InputError line), unless `allow_inactive`.

    Returns the reasons (empty when everything acts) so that a caller that allows it can still say so.
    """
    reasons = inactive_parts(terms, steps, guidance_scale)
    if reasons and not allow_inactive:
        who = label or "the guidance"
        raise InputError(
            f"{who} would never act: {'; '.join(reasons)}; raise --steps (or --guidance-scale), or pass"
            " --allow-inactive to run it anyway (its label then says it was inactive)"
        )
    return reasons
