"""The generate and classify stages of an I2P run.

Determinism: image k of a prompt starts from latent noise drawn on the CPU by its own
``torch.Generator`` seeded with :func:`image_seed` (sd_seed, k) — independent of batch
composition, process count and resume order.

Batching and sharding: the run's keys (prompt_index, image_index), in order, are cut into fixed
batches of ``batch_size`` that span prompts; batch b belongs to process b mod N. Because a
batch's composition never depends on N or on what is already done, every image comes out of the
same batched UNet computation whether the run used 1 or N processes or was resumed — so the
pixels are bit-identical, not merely close. A batch whose keys are all recorded is skipped; a
partly recorded one is recomputed and only its missing images are written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .data import Prompt
from .store import RunStore, image_name

logger = logging.getLogger(__name__)

_GOLDEN = 0x9E3779B97F4A7C15


def image_seed(sd_seed: int, k: int) -> int:
    """Seed of image k of a prompt: sd_seed itself for k = 0, then spread apart by the golden-ratio constant.

    This does not reproduce the official images: the official code draws all of a prompt's latents at
    once from one CUDA generator seeded with sd_seed, so even its first image differs from ours.
    """
    return (sd_seed + k * _GOLDEN) % (2**63)


@dataclass
class GenerationSettings:
    images_per_prompt: int = 10
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    batch_size: int = 8
    negative_prompt: str | None = None


def plan(prompts: list[Prompt], images_per_prompt: int, batch_size: int) -> list[list[tuple[Prompt, int]]]:
    """All (prompt, image_index) of a run in key order, cut into fixed batches."""
    keys = [(p, k) for p in prompts for k in range(images_per_prompt)]
    return [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]


def progress(total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or not sys.stderr.isatty(), dynamic_ncols=True)


def generate(
    pipe,
    terms: list,
    store: RunStore,
    prompts: list[Prompt],
    settings: GenerationSettings,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Generate this process's missing images into `store`; returns how many it wrote."""
    import torch

    from ..outputs import save_image_atomic
    from ..pipelines import guide

    # diffusers warns with the prompt text when it truncates a prompt: I2P prompts must not reach logs.
    logging.getLogger("diffusers.pipelines").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    batches = plan(prompts, settings.images_per_prompt, settings.batch_size)[process_index::num_processes]
    done = store.done_keys()
    todo = [b for b in batches if any((p.index, k) not in done for p, k in b)]
    total = sum(1 for b in todo for p, k in b if (p.index, k) not in done)
    written = 0
    pipe.set_progress_bar_config(disable=True)
    with guide(pipe, *terms), progress(total, "generate", show_progress) as bar:
        for batch in todo:
            texts = [p.text for p, _ in batch]
            generators = [torch.Generator("cpu").manual_seed(image_seed(p.sd_seed, k)) for p, k in batch]
            negative = None if settings.negative_prompt is None else [settings.negative_prompt] * len(batch)
            images = pipe(
                prompt=texts,
                negative_prompt=negative,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=generators,
            ).images
            rows = []
            for (p, k), image in zip(batch, images):
                if (p.index, k) in done:
                    continue
                name = image_name(p.index, k)
                save_image_atomic(image, store.path / name)  # the image is complete on disk ...
                rows.append((p.index, k, image_seed(p.sd_seed, k), name))
            store.add_images(rows)  # ... before its record commits
            written += len(rows)
            bar.update(len(rows))
            if on_batch is not None:
                on_batch(written)
    return written


def classify(
    store: RunStore,
    judges: list,
    *,
    keys: set[tuple[int, int]] | None = None,
    redo: bool = False,
    chunk: int = 64,
    show_progress: bool = True,
) -> int:
    """Judge recorded images (only `keys` when given) that a judge has not seen (all with `redo`)."""
    from ..errors import InputError

    records = [r for r in store.images() if keys is None or (r[0], r[1]) in keys]
    count = 0
    for judge in judges:
        seen = set() if redo else store.classified_keys(judge.name)
        todo = [r for r in records if (r[0], r[1]) not in seen]
        with progress(len(todo), judge.name, show_progress) as bar:
            for i in range(0, len(todo), chunk):
                part = todo[i : i + chunk]
                results = judge.judge([store.path / r[3] for r in part])
                failed = [(r, j) for r, j in zip(part, results) if j.unsafe is None]
                if failed:
                    r, j = failed[0]
                    raise InputError(
                        f"{judge.name} has no verdict for {r[3]} in {str(store.path)!r}: {j.error}"
                        f" ({len(failed)} such image(s) in this chunk)"
                    )
                store.set_classifications(
                    judge.name, [(r[0], r[1], j.unsafe, dict(j.scores)) for r, j in zip(part, results)]
                )
                bar.update(len(part))
                count += len(part)
        store.set_meta(f"classifier.{judge.name}", judge.describe())
    return count


def shard_keys(prompts: list[Prompt], settings: GenerationSettings, process_index: int, num_processes: int) -> set:
    batches = plan(prompts, settings.images_per_prompt, settings.batch_size)[process_index::num_processes]
    return {(p.index, k) for b in batches for p, k in b}
