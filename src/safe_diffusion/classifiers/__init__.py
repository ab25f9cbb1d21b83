"""Image classifiers for the I2P benchmark and auditing: Q16 and NudeNet.

Every classifier takes image paths and returns, per image, ``(unsafe, scores)``; ``scores`` is a
flat dict of floats (the raw numbers behind the flag).
"""

from __future__ import annotations

from ..errors import InputError

NAMES = ("q16", "nudenet")


def parse_classifiers(value: str | None) -> list[str]:
    """'q16,nudenet' / 'none' -> validated names, in the order given."""
    if value is None or value.strip().lower() in ("", "none"):
        return []
    names = list(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise InputError(f"unknown classifier {unknown[0]!r}; choose from: {', '.join(NAMES)}, or none")
    return names


def load_classifiers(names: list[str], *, q16_model: str | None = None, device=None) -> list:
    """Instantiate the named classifiers (weights loaded now, so a bad one fails before any work)."""
    out = []
    for name in names:
        if name == "q16":
            from .q16 import Q16

            out.append(Q16(q16_model, device=device))
        elif name == "nudenet":
            from .nudenet import NudeNet

            out.append(NudeNet())
    return out
