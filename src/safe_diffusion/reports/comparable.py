"""Whether two figures may be read side by side, and why not: one mechanism for every report.

A figure is measured on a :class:`Basis`: the model (and whether its weights are random), the steps,
sampler and guidance scale, the prompts (a fingerprint of exactly which ones), the images per prompt,
the judges and what determines their verdicts, the feature extractor of a quality figure, the protocol
it follows. :func:`differences` runs every registered check over two bases and returns one short reason
per difference that makes the figures incomparable ("different prompt sets: 6 vs 4 prompts"); reports
put those reasons where the figure stands (a mark on the cell, a "Not comparable" note above the table).

Published figures get a basis too (:func:`published_basis`): what their source states about its protocol.
A published figure is shown beside a run only when :func:`differences` finds nothing — its base model,
its prompts and images, its judges. A field left None is unknown and not checked.

Other modules add checks with :func:`register_check` (a protocol match, issue 19): a check is a function
``(a, b) -> str | None``, called for every pair a report compares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..common.hashing import sha256_text

#: The checkpoint the SLD model card's and the I2P README's figures were measured on.
SD14 = "CompVis/stable-diffusion-v1-4"
#: What the published I2P figures were judged by (the SLD paper and the official I2P code): Q16 on CLIP
#: ViT-L/14, and NudeNet.
PUBLISHED_Q16_MODEL = "openai/clip-vit-large-patch14"
#: Prompts of I2P (the bundled CSV and the hub dataset): the published figures cover all of them.
I2P_PROMPTS = 4703


@dataclass(frozen=True)
class Basis:
    """What a figure is measured on. None: unknown (not checked)."""

    label: str | None = None
    model: str | None = None  # the reference (hub id or folder)
    base_model: str | None = None  # the model an erased checkpoint was erased from (else the model itself)
    random_weights: bool | None = None
    steps: int | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    suite: str | None = None
    prompt_set: str | None = None  # fingerprint of the prompts measured (see prompt_fingerprint)
    prompts: int | None = None
    images_per_prompt: int | None = None
    images: int | None = None
    judges: tuple[tuple[str, str], ...] | None = None  # (judge, what determines its verdicts), sorted
    random_judges: tuple[str, ...] = ()  # judges whose model has random weights
    inactive: tuple[str, ...] = ()  # why the run's guidance never acted (guidance.activity), if it did not
    features: str | None = None  # a quality figure's feature extractor (FID/KID): its identity
    reference: str | None = None  # a quality figure's reference statistics: their identity
    clip: str | None = None  # a CLIP score's model
    protocol: str | None = None
    deviations: tuple[str, ...] = ()  # how a run departs from the protocol it names ("steps: 50 → 4")
    published: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def with_(self, **changes) -> Basis:
        return replace(self, **changes)


def prompt_fingerprint(prompts: Iterable[tuple[int, str]]) -> str:
    """A short digest of (index, text) pairs: equal exactly when the same prompts were measured."""
    return sha256_text("".join(f"{index}\t{text}\n" for index, text in sorted(prompts)))[:16]


Check = Callable[[Basis, Basis], "str | None"]
CHECKS: list[Check] = []


def register_check(check: Check) -> Check:
    """Add a check (usable as a decorator); it returns a reason when `a` and `b` are not comparable."""
    CHECKS.append(check)
    return check


def _known(a: Any, b: Any) -> bool:
    return a is not None and b is not None


@register_check
def _random_weights(a: Basis, b: Basis) -> str | None:
    if a.random_weights and b.published:
        return "a random-weight checkpoint, not the published figure's model"
    if b.random_weights and a.published:
        return "a random-weight checkpoint, not the published figure's model"
    if _known(a.random_weights, b.random_weights) and a.random_weights != b.random_weights:
        return "one model has random weights, the other not"
    return None


@register_check
def _inactive(a: Basis, b: Basis) -> str | None:
    for x, y in ((a, b), (b, a)):
        if x.inactive and y.published:
            return f"its guidance never acted ({'; '.join(x.inactive)})"
    return None


@register_check
def _base_model(a: Basis, b: Basis) -> str | None:
    if not (a.published or b.published):
        return None  # runs compare models with each other: that is the point of the report
    x, y = a.base_model or a.model, b.base_model or b.model
    if _known(x, y) and x != y:
        return f"different base model ({x} vs {y})"
    return None


@register_check
def _prompts(a: Basis, b: Basis) -> str | None:
    if _known(a.suite, b.suite) and a.suite != b.suite:
        return f"different suites ({a.suite} vs {b.suite})"
    if _known(a.prompt_set, b.prompt_set):
        if a.prompt_set == b.prompt_set:
            return None
        if _known(a.prompts, b.prompts) and a.prompts != b.prompts:
            return f"different prompt sets ({a.prompts} vs {b.prompts} prompts)"
        return "different prompt sets (the same number of prompts, not the same prompts)"
    if _known(a.prompts, b.prompts) and a.prompts != b.prompts:
        return f"different prompt sets ({a.prompts} vs {b.prompts} prompts)"
    return None


@register_check
def _images_per_prompt(a: Basis, b: Basis) -> str | None:
    if _known(a.images_per_prompt, b.images_per_prompt) and a.images_per_prompt != b.images_per_prompt:
        return f"different images per prompt ({a.images_per_prompt} vs {b.images_per_prompt})"
    return None


@register_check
def _steps(a: Basis, b: Basis) -> str | None:
    if _known(a.steps, b.steps) and a.steps != b.steps:
        return f"different steps ({a.steps} vs {b.steps})"
    return None


@register_check
def _sampler(a: Basis, b: Basis) -> str | None:
    if _known(a.sampler, b.sampler) and a.sampler != b.sampler:
        return f"different samplers ({a.sampler} vs {b.sampler})"
    return None


@register_check
def _guidance_scale(a: Basis, b: Basis) -> str | None:
    if _known(a.guidance_scale, b.guidance_scale) and float(a.guidance_scale) != float(b.guidance_scale):
        return f"different guidance scales ({a.guidance_scale:g} vs {b.guidance_scale:g})"
    return None


@register_check
def _judges(a: Basis, b: Basis) -> str | None:
    for x, y in ((a, b), (b, a)):
        if x.random_judges and y.published:
            return f"judged by {', '.join(x.random_judges)} on random weights"
    if _known(a.judges, b.judges) and a.judges != b.judges:
        mine, theirs = dict(a.judges), dict(b.judges)
        if set(mine) != set(theirs):
            return f"different judges ({', '.join(sorted(mine)) or 'none'} vs {', '.join(sorted(theirs)) or 'none'})"
        changed = sorted(n for n in mine if mine[n] != theirs[n] and mine[n] and theirs[n])
        if changed:
            return f"judges set up differently ({', '.join(changed)})"
    return None


@register_check
def _quality(a: Basis, b: Basis) -> str | None:
    if _known(a.features, b.features) and a.features != b.features:
        return "FID/KID on different features"
    if _known(a.reference, b.reference) and a.reference != b.reference:
        return "FID/KID against different references"
    if _known(a.clip, b.clip) and a.clip != b.clip:
        return "CLIP score with different CLIP models"
    return None


@register_check
def _protocol(a: Basis, b: Basis) -> str | None:
    if _known(a.protocol, b.protocol) and a.protocol != b.protocol:
        return f"different protocols ({a.protocol} vs {b.protocol})"
    return None


@register_check
def _deviations(a: Basis, b: Basis) -> str | None:
    for x, y in ((a, b), (b, a)):
        if x.deviations and y.published:
            more = f" and {len(x.deviations) - 2} more" if len(x.deviations) > 2 else ""
            return f"deviates from protocol {x.protocol} ({'; '.join(x.deviations[:2])}{more})"
    return None


def differences(a: Basis, b: Basis) -> list[str]:
    """Why figures measured on `a` and on `b` are not comparable: one reason per registered check that
    finds a difference, in registration order; empty when they are comparable."""
    return [reason for check in CHECKS if (reason := check(a, b))]


def published_basis(source: str, method: str) -> Basis:
    """What a published I2P figure (``evals.references``: `source`, `method`) is measured on, as far as its
    source states it: SD 1.4, every I2P prompt, 10 images per prompt, Q16 (CLIP ViT-L/14) and NudeNet."""
    from ..evals.references import sources

    info = sources().get(source, {})
    return Basis(
        label=f"published ({source}, {method})",
        model=SD14,
        base_model=SD14,
        random_weights=False,
        suite="i2p",
        prompts=I2P_PROMPTS,
        images_per_prompt=10,
        judges=None,  # which NudeNet and which thresholds: the protocol's business (issue 19)
        published=True,
        extra={"protocol": info.get("protocol")},
    )


def judge_key(info: dict[str, Any]) -> str:
    """What determines a judge's verdicts, from its describe(), as one comparable string."""
    keys = (
        "model",
        "model_sha256",
        "weights_sha256",
        "model_file",
        "resolution",
        "threshold",
        "labels",
        "mode",
        "projection_dim",
        "prompts_sha256",
        "policy",
    )
    parts = []
    for key in keys:
        if key in info:
            value = info[key]
            if isinstance(value, dict):
                value = value.get("sha256") or value.get("name") or sorted(value.items())
            parts.append(f"{key}={value}")
    return ", ".join(parts)
