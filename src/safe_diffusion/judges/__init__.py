"""Image judges: a registry, so adding a judge is adding one module.

``load_judges(["q16", "nudenet"], options={"q16": {"model": ...}})`` instantiates judges (weights
load at once, so a judge that cannot load fails before any work); each has ``judge(paths)`` →
one :class:`Judgment` per image, and ``describe()`` → what a run must record about it.
Third-party judges register with :func:`register_judge`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ..common.errors import InputError
from .base import Judge, Judgment, decode_rgb
from .options import judge_options_from

__all__ = [
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


@dataclass(frozen=True)
class JudgeSpec:
    """A registered judge: how to build it and the one line ``--help`` shows for it."""

    name: str
    target: str | Callable[..., Judge]  # "module:Class" (imported on first use) or a factory
    summary: str

    def build(self, **options: Any) -> Judge:
        factory = self.target
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(import_module(module), attr)
        return factory(**options)


_REGISTRY: dict[str, JudgeSpec] = {}


def register_judge(name: str, target: str | Callable[..., Judge], summary: str = "") -> None:
    """Make `name` usable wherever judges are named (``--judges``). `target`: "module:Class" or a factory."""
    key = name.strip().lower()
    if not key or "," in key:
        raise ValueError(f"invalid judge name {name!r}")
    _REGISTRY[key] = JudgeSpec(key, target, summary)


register_judge("q16", "safe_diffusion.judges.q16:Q16", "CLIP ViT-L/14 + Q16's learned prompts (I2P)")
register_judge(
    "nudenet", "safe_diffusion.judges.nudenet:NudeNet",
    "NudeNet in a published set-up: v3/v2 detector (I2P, UnlearnDiffAtk, RECE) or v2 classifier (SAFREE, P4D)",
)
register_judge(
    "llavaguard", "safe_diffusion.judges.llavaguard:LlavaGuard", "LlavaGuard v1.2 VLM: rating, O1-O9 category, rationale"
)


def available_judges() -> list[str]:
    return list(_REGISTRY)


def get_judge_spec(name: str) -> JudgeSpec:
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise InputError(f"unknown judge {name!r}; choose from: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def parse_judges(value: str | None, *, allow_none: bool = True) -> list[str]:
    """'q16,nudenet' / 'none' → validated names in the order given (duplicates dropped)."""
    if value is None or value.strip().lower() in ("", "none"):
        if not allow_none:
            raise InputError("name at least one judge")
        return []
    names = list(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    for name in names:
        get_judge_spec(name)
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
        spec = get_judge_spec(name)
        kwargs = {k: v for k, v in dict(options.get(name, {})).items() if v is not None}
        kwargs.setdefault("device", device)
        judges.append(spec.build(**kwargs))
    return judges
