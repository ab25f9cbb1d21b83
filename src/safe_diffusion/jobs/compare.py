"""Guided and unguided images from the same seeds, and what each image was given.

The one implementation behind ``generate --compare``, the demo's two images and ``fairness``'s
before/after: each image gets its own CPU generator seeded with its seed, so an image depends on its
seed alone (not on the other kind being generated, nor on its batch but for the rounding of batched
arithmetic), and guidance runs strict (a call that would run unguided raises instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..common.outputs import library_versions
from ..engine import guide
from ..guidance import describe_terms
from ..guidance.mitigation import bind_to_seeds

KINDS = ("unguided", "guided")


@dataclass
class GuidedImages:
    """One prompt's images for a list of seeds: ``images[kind][i]`` is the image of ``seeds[i]``."""

    seeds: list[int]
    terms: list  # as applied to the guided images (bound to the seeds)
    images: dict[str, list]

    @property
    def guided(self) -> list:
        return self.images["guided"]

    @property
    def unguided(self) -> list | None:
        return self.images.get("unguided")

    def fair_direction(self, index: int) -> str | None:
        """The Fair Diffusion direction the guided image `index` was given, if a term assigns one."""
        for term in self.terms:
            if hasattr(term, "assignments"):
                return term.directions[term.assignments()[index]]
        return None

    def record(self, index: int, kind: str) -> dict:
        """JSON-ready: the image's seed, the guidance applied to it and, for Fair Diffusion, its direction."""
        applied = self.terms if kind == "guided" else []
        out: dict[str, Any] = {"seed": self.seeds[index], "guidance": describe_terms(applied)}
        direction = self.fair_direction(index) if kind == "guided" else None
        if direction is not None:
            out["fair_direction"] = direction
        return out


def generate_guided_images(
    pipe,
    prompt: str,
    seeds: Sequence[int],
    terms: Sequence,
    *,
    kinds: Sequence[str] = ("guided",),
    step_callback: Callable[[str], Callable | None] | None = None,
    **call,
) -> GuidedImages:
    """`pipe(prompt, …)` once per kind ("unguided": no terms; "guided": `terms` bound to `seeds`), one
    image per seed. `step_callback(kind)` may give a ``callback_on_step_end`` for that kind's call;
    `call` holds the pipeline's other arguments (steps, guidance scale, size, negative prompt …)."""
    seeds = [int(s) for s in seeds]
    bound = bind_to_seeds(terms, seeds)
    images = {}
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        extra = {}
        callback = step_callback(kind) if step_callback else None
        if callback is not None:
            extra["callback_on_step_end"] = callback
        with guide(pipe, *(bound if kind == "guided" else []), strict=True):
            images[kind] = pipe(
                prompt=prompt, num_images_per_prompt=len(seeds), generator=generators, **call, **extra
            ).images
    return GuidedImages(seeds=seeds, terms=bound, images=images)


def pipeline_record(pipe, image) -> dict:
    """JSON-ready: which pipeline and scheduler made `image`, its size, and the library versions."""
    return {
        "height": image.height,
        "width": image.width,
        "scheduler": type(pipe.scheduler).__name__,
        "pipeline": type(pipe).__name__,
        "versions": library_versions(),
    }
