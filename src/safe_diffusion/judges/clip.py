"""The one CLIP loader: Q16, the zero-shot attribute classifier and the quality stage's CLIP score load CLIP here.

:func:`load_clip` loads a transformers ``CLIPModel`` (hub id or local folder) onto a device, with its
tokenizer or processor when asked, and fails in one :class:`~safe_diffusion.common.errors.InputError`
line that names the option that fixes it (``--q16-model``, ``--clip-model``). :class:`LoadedClip` also
says what identifies the weights (the weight files' sha256 for a folder, the hub commit otherwise) and
whether they are random (a folder built by :mod:`safe_diffusion.testing`), so that every figure measured
with it can say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.errors import InputError

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model can raise for a bad reference: missing or unreadable files, an offline hub,
    configs or weights that are not a CLIP's."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, RuntimeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency of transformers
        pass
    return tuple(errors)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def weights_identity(reference: str, model=None) -> dict[str, Any]:
    """What identifies a CLIP's weights: ``{"weights_sha256": {file: sha256}}`` for a local folder, else
    ``{"revision": <hub commit>}`` (None when unknown)."""
    path = Path(reference)
    if path.is_dir():
        from ..common.hashing import sha256_file

        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
        return {"weights_sha256": {p.name: sha256_file(p) for p in files}}
    return {"revision": getattr(getattr(model, "config", None), "_commit_hash", None)}


@dataclass
class LoadedClip:
    """A loaded CLIP and what a record says about it."""

    model: Any  # transformers CLIPModel, in eval mode, on its device
    reference: str
    random_weights: bool
    tokenizer: Any = None
    processor: Any = None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)


def load_clip(
    reference: str | Path | None = None,
    *,
    device=None,
    dtype=None,
    tokenizer: bool = False,
    processor: bool = False,
    who: str = "",
    option: str | None = None,
) -> LoadedClip:
    """Load CLIP `reference` (default: :data:`DEFAULT_MODEL`) in eval mode on `device` (and `dtype`).

    `tokenizer` / `processor`: also load its ``AutoTokenizer`` / ``CLIPProcessor``. On failure one
    InputError line: "`who` cannot load CLIP '…' (`option`): <the first line of the cause>", and for a hub
    id the hint to pass a local folder.
    """
    import torch
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    from ..common.provenance import random_weights

    hf_logging.disable_progress_bar()
    ref = str(reference or DEFAULT_MODEL)
    try:
        model = CLIPModel.from_pretrained(ref)
        tok = AutoTokenizer.from_pretrained(ref) if tokenizer else None
        proc = CLIPProcessor.from_pretrained(ref) if processor else None
    except _load_errors() as exc:
        where = f" ({option})" if option else ""
        hint = "" if Path(ref).exists() else " (offline? pass a local CLIP folder)"
        raise InputError(
            f"{who + ' ' if who else ''}cannot load CLIP {ref!r}{where}: {first_line(exc)}{hint}"
        ) from None
    model = model.to(torch.device(device) if device is not None else torch.device("cpu"))
    if dtype is not None:
        model = model.to(dtype)
    return LoadedClip(model.eval(), ref, random_weights(ref), tok, proc, weights_identity(ref, model))
