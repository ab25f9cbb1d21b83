"""Image judges: a registry, so adding a judge is adding one module.

``load_judges(["q16", "nudenet"], options={"q16": {"model": ...}})`` instantiates judges (weights
load at once, so a judge that cannot load fails before any work); each has ``judge(paths)`` →
one :class:`Judgment` per image, and ``describe()`` → what a run must record about it.
Third-party judges register with :func:`register_judge`, or without editing this package through the
entry-point group ``safe_diffusion.judges`` (:mod:`safe_diffusion.common.registry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..common.errors import InputError
from ..common.registry import Registry
from .base import Judge, Judgment, decode_rgb
from .options import judge_options_from

__all__ = [
    "JUDGES",
    "Judge",
    "JudgeSpec",
    "Judgment",
    "available_judges",
    "decode_rgb",
    "get_judge_spec",
    "judge_options_from",
    "load_judges",
    "parse_judges",
    "register_judge",
]


#: Judges by name: a ``Judge`` subclass or a factory (or a lazy "module:Class" reference) with a summary.
JUDGES: Registry[Callable[..., Judge]] = Registry("judges")


@dataclass(frozen=True)
class JudgeSpec:
    """A registered judge: how to build it and the one line ``--help`` shows for it."""

    name: str
    target: str | Callable[..., Judge]  # "module:Class" (imported on first use) or a factory
    summary: str

    def build(self, **options: Any) -> Judge:
        return JUDGES.get(self.name)(**options)


def register_judge(name: str, target: str | Callable[..., Judge], summary: str = "") -> None:
    """Make `name` usable wherever judges are named (``--judges``). `target`: "module:Class" or a factory.
    Registering a name again replaces its judge."""
    JUDGES.register(name, target, summary=summary, replace=True)


register_judge("q16", "safe_diffusion.judges.q16:Q16", "CLIP ViT-L/14 + Q16's learned prompts (I2P)")
register_judge(
    "nudenet",
    "safe_diffusion.judges.nudenet:NudeNet",
    "NudeNet in a published set-up: v3/v2 detector (I2P, UnlearnDiffAtk, RECE) or v2 classifier (SAFREE, P4D)",
)
register_judge(
    "llavaguard",
    "safe_diffusion.judges.llavaguard:LlavaGuard",
    "LlavaGuard v1.2 VLM: rating, O1-O9 category, rationale",
)
register_judge(
    "object",
    "safe_diffusion.judges.classifiers:ObjectJudge",
    "ImageNet ResNet-50: is the erased object shown (UnlearnDiffAtk's object sets; --object-class)",
)
register_judge(
    "style",
    "safe_diffusion.judges.classifiers:StyleJudge",
    "An artist classifier: is the erased style shown (UnlearnDiffAtk's Van Gogh set; --style-model)",
)


def available_judges() -> list[str]:
    return JUDGES.names()


def get_judge_spec(name: str) -> JudgeSpec:
    entry = JUDGES.entry(name)
    return JudgeSpec(entry.name, entry.target, entry.summary)


def parse_judges(value: str | None, *, allow_none: bool = True) -> list[str]:
    """'q16,nudenet' / 'none' → validated names in the order given; a name given twice is refused."""
    if value is None or value.strip().lower() in ("", "none"):
        if not allow_none:
            raise InputError("name at least one judge")
        return []
    names = [JUDGES.canonical(v) for v in value.split(",") if v.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"judge {repeated[0]!r} is named twice in {value.strip()!r}; name each judge once")
    return names


def load_judges(
    names: list[str], *, device: Any = None, options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Judge]:
    """Build the named judges now (a judge that cannot load raises a one-line InputError before any work).

    `options` maps a judge's name to its keyword arguments (e.g. ``{"nudenet": {"model": "640m.onnx"}}``);
    `device` is passed to every judge (a judge that runs on the CPU only may ignore it).
    """
    options = options or {}
    judges = []
    for name in names:
        factory = JUDGES.get(name)
        kwargs = {k: v for k, v in dict(options.get(name, {})).items() if v is not None}
        kwargs.setdefault("device", device)
        judges.append(factory(**kwargs))
    return judges
