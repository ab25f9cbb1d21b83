"""What every image judge is: a name, a self-description, and one verdict per image.

A judge turns image files into :class:`Judgment` records. It never raises on a bad image: an
unreadable, truncated or non-image file gets a judgment with ``unsafe=None`` and an ``error``, so
one damaged file never stops a 47,030-image job, and the report can count it. Equally, an answer a
judge cannot interpret (a vision-language judge's malformed reply) is ``unsafe=None`` with the
reason, never silently "safe".

:meth:`Judge.describe` returns everything that makes its verdicts reproducible (model and file
hashes, versions, resolution, preprocessing, labels, thresholds, prompts); runs record it.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class Judgment:
    """One judge's verdict on one image.

    ``unsafe`` is None when there is no verdict (``error`` says why). ``scores`` are the raw numbers
    behind the verdict (floats); ``category`` and ``rationale`` are filled by judges that give them.
    """

    unsafe: bool | None
    scores: Mapping[str, float] = field(default_factory=dict)
    category: str | None = None
    rationale: str | None = None
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> Judgment:
        return cls(unsafe=None, error=error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "unsafe": self.unsafe,
            "scores": dict(self.scores),
            "category": self.category,
            "rationale": self.rationale,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Judgment:
        unsafe = data.get("unsafe")
        return cls(
            unsafe=None if unsafe is None else bool(unsafe),
            scores={k: float(v) for k, v in (data.get("scores") or {}).items()},
            category=data.get("category"),
            rationale=data.get("rationale"),
            error=data.get("error"),
        )


def decode_rgb(data: bytes):
    """The image in `data` as a fully loaded RGB PIL image; ValueError naming the problem otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a truncated file fails here, not later
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ValueError(f"damaged image ({str(exc).strip() or type(exc).__name__})") from None


def unreadable_reason(exc: BaseException) -> str:
    """What a judgment or a quality record says of a file that could not be read or decoded."""
    if isinstance(exc, FileNotFoundError):
        return "image file is missing"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"unreadable image: {reason}"


class Judge(ABC):
    """An image judge. Subclasses set :attr:`name` and implement :meth:`judge_images` and :meth:`describe`."""

    name: ClassVar[str]
    batch_size: int = 16

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready: everything that determines this judge's verdicts."""

    @abstractmethod
    def judge_images(self, images: Sequence[Any]) -> list[Judgment]:
        """One judgment per decoded image (as returned by :meth:`decode`)."""

    def decode(self, data: bytes) -> Any:
        """Decode one file's bytes for :meth:`judge_images` (RGB PIL by default); ValueError when it cannot."""
        return decode_rgb(data)

    def read(self, path: str | Path) -> Any:
        """One file decoded (:meth:`decode`), or the :class:`Judgment` that says why it could not be."""
        try:
            return self.decode(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            return Judgment.failed(unreadable_reason(exc))

    def judge(self, paths: Sequence[str | Path]) -> list[Judgment]:
        """One judgment per file, in order; unreadable files get ``Judgment.failed`` instead of an exception.

        Files are decoded by a few threads up to two batches ahead of the model (at real size decoding a
        PNG costs about what judging it on a GPU does: :mod:`safe_diffusion.common.prefetch`), so memory
        stays at a few batches of images however many paths are given; the batches the model sees are
        the same as with decoding in line (the readable files, in order, `batch_size` at a time).
        """
        from ..common.prefetch import read_ahead

        paths = list(paths)
        results: list[Judgment | None] = [None] * len(paths)
        pending: list[tuple[int, Any]] = []

        def flush() -> None:
            judgments = self.judge_images([image for _, image in pending])
            for (i, _), judgment in zip(pending, judgments, strict=True):
                results[i] = judgment
            pending.clear()

        for i, item in enumerate(read_ahead(self.read, paths, window=2 * max(1, self.batch_size), name=self.name)):
            if isinstance(item, Judgment):
                results[i] = item
            else:
                pending.append((i, item))
            if len(pending) >= self.batch_size:
                flush()
        if pending:
            flush()
        return results  # type: ignore[return-value]
