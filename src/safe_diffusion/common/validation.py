"""Checks of user-given values, shared by the CLI, the app and the library: each failure is one InputError line.

Every check names the option (or field) it was given, says what is wrong and what is allowed, and
returns the normalised value, so callers write ``steps = check_int("--steps", steps, minimum=1)``.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path
from typing import Any

from .devices import check_device as check_device  # re-exported: the --device check is one of these checks
from .errors import InputError

#: Seeds go to ``torch.Generator.manual_seed``, which takes 64-bit values; image k uses seed + k.
MAX_SEED = 2**63 - 1
#: Larger images than this are almost certainly a typo (SDXL's native size is 1024).
MAX_IMAGE_SIDE = 4096


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer within [minimum, maximum]."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not isinstance(value, int):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a whole number, got {value!r}") from None
        if not math.isfinite(number) or not number.is_integer():
            raise InputError(f"{name} must be a whole number, got {value!r}")
        value = int(number)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    """A finite number within [minimum, maximum] (and > `above` when given); NaN and ±inf are refused."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise InputError(f"{name} must be at least {minimum:g}, got {number:g}")
    if maximum is not None and number > maximum:
        raise InputError(f"{name} must be at most {maximum:g}, got {number:g}")
    if above is not None and number <= above:
        raise InputError(f"{name} must be above {above:g}, got {number:g}")
    return number


def check_seed(name: str, value: Any, count: int = 1) -> int:
    """A seed such that seed, seed + 1, …, seed + count − 1 are all valid generator seeds."""
    return check_int(name, value, minimum=0, maximum=MAX_SEED - max(count - 1, 0))


def check_image_side(name: str, value: Any | None) -> int | None:
    """None (the model's own size) or a positive multiple of 8 up to MAX_IMAGE_SIDE."""
    if value is None:
        return None
    side = check_int(name, value, minimum=8, maximum=MAX_IMAGE_SIDE)
    if side % 8:
        raise InputError(f"{name} must be a multiple of 8, got {side}")
    return side


def check_text(name: str, value: Any, *, allow_empty: bool = False) -> str:
    """Text that is valid Unicode (a non-UTF-8 command-line argument arrives as lone surrogates)."""
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None
    if not allow_empty and not text.strip():
        raise InputError(f"{name} is empty")
    return text


#: ``--safety`` values: no SLD, or one of the paper's presets.
SAFETY_CHOICES = ("off", "weak", "medium", "strong", "max")


def check_safety(name: str, value: Any) -> str:
    """A safety preset name, normalised to lower case."""
    key = str(value if value is not None else "off").strip().lower()
    if key not in SAFETY_CHOICES:
        raise InputError(f"unknown {name} preset {value!r}; choose one of: {', '.join(SAFETY_CHOICES)}")
    return key


def parse_signed_concept(text: Any, where: str) -> tuple[str, bool]:
    """``+sunglasses`` → ("sunglasses", False); ``-beard`` → ("beard", True): the concept and whether to remove it."""
    line = check_text(where, text, allow_empty=True).strip()
    if not line or line[0] not in "+-":
        raise InputError(f"{where} ({line!r}) must start with + (add the concept) or - (remove it), e.g. +sunglasses")
    concept = line[1:].strip()
    if not concept:
        raise InputError(f"{where} ({line!r}) names no concept after {line[0]!r}")
    return concept, line[0] == "-"


def cfg_problem(terms: Any, guidance_scale: float) -> str | None:
    """Why `terms` cannot act at all at this classifier-free guidance scale, or None.

    SLD and SEGA act through classifier-free guidance, so a guidance scale of 1 or less disables them.
    """
    terms = list(terms or [])
    if not terms or guidance_scale > 1:
        return None
    names = ", ".join(dict.fromkeys(type(t).__name__ for t in terms))
    return (
        f"{names} act through classifier-free guidance, which --guidance-scale {guidance_scale:g} turns off "
        "(use a scale above 1)"
    )


def check_host(name: str, host: str, port: int = 0) -> str:
    """An address this machine can listen on (a name that resolves, an IP of one of its interfaces)."""
    host = check_text(name, host).strip()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputError(f"{name} {host!r} is not an IP address or host name; use e.g. 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address[0], 0))
        except OSError as exc:
            raise InputError(f"{name} {host!r} is not an address of this machine ({exc.strerror})") from None
    return host


def read_lines(path: Any, what: str, *, empty: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file that are not ``#`` comments, stripped.

    `what` names the file in messages ("prompts file", "--erase-file file"); `empty` says what a file
    without such lines lacks ("has no prompts").
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{what} {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {str(path)!r} is unreadable: {exc}") from None
    found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise InputError(f"{what} {str(path)!r} {empty}")
    return found
