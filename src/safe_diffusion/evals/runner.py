"""The generate and judge stages of an evaluation run.

Determinism: image k of a prompt starts from latent noise drawn by its own generator seeded with
:func:`image_seed` (the prompt's seed, k) — independent of batch composition, process count and resume
order. The generator is a CPU ``torch.Generator``, or with the ``cuda`` noise the CUDA generator's draw
computed on the CPU (:mod:`safe_diffusion.common.noise`), so that a script that seeds with
``torch.cuda.manual_seed`` is followed on any machine. With ``images_per_draw`` B, a prompt's images
instead come from one generator seeded with the prompt's seed, B per draw (the official I2P code's rule):
image k is row k mod B of draw k // B, still independent of how the run is batched. The prompt's seed is
the suite's (I2P's ``sd_seed``, UnlearnDiffAtk's ``evaluation_seed``) or, for a suite without seeds,
base_seed + row.

Batching and sharding: the keys (prompt_index, image_index) of the run's whole prompt selection, in
order, are cut into fixed batches of ``batch_size`` that span prompts (and are also cut where the
per-prompt guidance scale or image size changes, since one pipeline call has one of each); batch b belongs
to process b mod N. A batch's composition depends neither on N, nor on what is already done, nor on ``--limit``
(a batch cut by the limit is computed whole and only its wanted images are kept), so every image
comes out of the same batched UNet computation whether the run used 1 or N processes, was resumed, or
was extended with a larger limit — the pixels are bit-identical, not merely close.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from diffusers.utils import logging as diffusers_logging

from ..common.errors import InputError
from ..common.hashing import sha256_bytes
from ..common.noise import drawn_latents, initial_noise
from ..common.outputs import atomic_write_bytes, png_bytes
from ..common.progress import ProgressLog
from ..common.schedulers import apply_scheduler
from ..engine import guide
from .config import GenerationRecord, RunConfig
from .store import RunStore, clean_temp_files, image_name
from .suites import Prompt

logger = logging.getLogger(__name__)

_GOLDEN = 0x9E3779B97F4A7C15


def image_seed(seed: int, k: int) -> int:
    """Seed of image k of a prompt: the prompt's seed itself for k = 0, then spread by the golden-ratio constant.

    This does not reproduce the official I2P images: the official code draws all of a prompt's latents at
    once from one CUDA generator seeded with sd_seed, so even its first image differs from ours.
    """
    return (seed + k * _GOLDEN) % (2**63)


def plan(prompts: list[Prompt], settings: GenerationRecord) -> list[list[tuple[Prompt, int]]]:
    """All (prompt, image_index) of the selection in key order, cut into fixed batches."""
    batches: list[list[tuple[Prompt, int]]] = []
    current: list[tuple[Prompt, int]] = []
    for p in prompts:
        for k in range(settings.images_per_prompt):
            if current and (
                len(current) == settings.batch_size
                or settings.scale_of(current[0][0]) != settings.scale_of(p)
                or settings.size_of(current[0][0]) != settings.size_of(p)
            ):
                batches.append(current)
                current = []
            current.append((p, k))
    if current:
        batches.append(current)
    return batches


def shard_keys(store: RunStore, settings: GenerationRecord, process_index: int, num_processes: int) -> set:
    """The wanted keys of this process's batches."""
    wanted = set(store.wanted_keys())
    batches = plan(store.prompts(), settings)[process_index::num_processes]
    return {(p.index, k) for b in batches for p, k in b} & wanted


def report_image_problems(store: RunStore, keys: set) -> int:
    """Warn, by file name, about recorded images of `keys` whose file is missing or damaged; returns how many."""
    records = store.images()
    bad = [(records[k]["image"], store.image_problem(records[k])) for k in sorted(keys) if k in records]
    bad = [(name, why) for name, why in bad if why]
    for name, why in bad[:5]:
        print(f"warning: {store.path / name} is {why}; generating it again", file=sys.stderr)
    if len(bad) > 5:
        print(f"warning: {len(bad) - 5} more damaged or missing image(s) will be generated again", file=sys.stderr)
    return len(bad)


def generate(
    pipe,
    store: RunStore,
    config: RunConfig | None = None,
    *,
    terms: list | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Generate this process's missing images into `store`; returns how many it wrote.

    `config`: the run's (default: the one frozen in `store`); `terms`: the guidance terms (default: those
    the config's mitigation rebuilds from its record), the negative prompt is the mitigation's.
    """
    if config is None:
        config = RunConfig.from_dict(store.config)
    settings = config.generation
    if terms is None:
        terms = config.mitigation.terms()
    default_negative = config.mitigation.negative_prompt

    # diffusers warns with the prompt text when it truncates a prompt: suite prompts must not reach logs.
    logging.getLogger("diffusers.pipelines").setLevel(logging.ERROR)
    diffusers_logging.set_verbosity_error()
    apply_scheduler(pipe, settings.scheduler)
    wanted = set(store.wanted_keys())
    batches = plan(store.prompts(), settings)[process_index::num_processes]
    mine = {(p.index, k) for b in batches for p, k in b} & wanted
    clean_temp_files(store, mine)
    report_image_problems(store, mine)
    done = store.done_keys()
    todo = [b for b in batches if any((p.index, k) in wanted and (p.index, k) not in done for p, k in b)]
    total = sum(1 for b in todo for p, k in b if (p.index, k) in wanted and (p.index, k) not in done)
    written = 0
    pipe.set_progress_bar_config(disable=True)
    with guide(pipe, *terms, strict=True), ProgressLog("generate", total, enabled=show_progress) as bar:
        for batch in todo:
            texts = [p.text for p, _ in batch]
            height, width = settings.size_of(batch[0][0])
            if settings.images_per_draw is None:
                noise = initial_noise(pipe, settings.noise, [image_seed(p.seed, k) for p, k in batch], height, width)
            else:
                keys = [(p.seed, k) for p, k in batch]
                noise = drawn_latents(pipe, settings.noise, keys, settings.images_per_draw, height, width)
            negatives = [p.negative_prompt if p.negative_prompt is not None else default_negative for p, _ in batch]
            negative = None if all(n is None for n in negatives) else [n or "" for n in negatives]
            images = pipe(
                prompt=texts,
                negative_prompt=negative,
                num_inference_steps=settings.steps,
                guidance_scale=settings.scale_of(batch[0][0]),
                height=height,
                width=width,
                **noise,
            ).images
            rows = []
            for (p, k), image in zip(batch, images):
                if (p.index, k) not in wanted or (p.index, k) in done:
                    continue
                data = png_bytes(image)
                name = image_name(p.index, k)
                atomic_write_bytes(store.path / name, data)  # the image is complete on disk ...
                rows.append(
                    {
                        "prompt_index": p.index,
                        "image_index": k,
                        "seed": image_seed(p.seed, k),
                        "image": name,
                        "bytes": len(data),
                        "sha256": sha256_bytes(data),
                    }
                )
            store.add_images(rows)  # ... before its record is appended
            written += len(rows)
            bar.update(len(rows))
            if on_batch is not None:
                on_batch(written)
    return written


def check_judges(store: RunStore, judges: list) -> None:
    """Refuse to add judgments from a judge configured differently from the one that judged this run."""
    recorded = store.judges()
    for judge in judges:
        old = recorded.get(judge.name)
        if old is None or not store.judgments(judge.name):
            continue
        new = judge.describe()
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise InputError(
                f"run {str(store.path)!r} was judged by {judge.name} configured differently ({', '.join(diff[:3])});"
                f" rejudge it with `safe-diffusion eval classify {store.path} --judges {judge.name}`"
            )


def classify(
    store: RunStore,
    judges: list,
    *,
    keys: set[tuple[int, int]] | None = None,
    redo: bool = False,
    chunk: int = 64,
    show_progress: bool = True,
) -> int:
    """Judge recorded images (only `keys` when given) a judge has no current verdict for (all with `redo`).

    A verdict is current when it judged the image's recorded bytes; a missing or damaged image gets a
    judgment without a verdict (its error), reported by name and counted, never an exception.
    """
    records = store.images()
    wanted = set(store.wanted_keys())
    candidates = sorted(k for k in records if k in wanted and (keys is None or k in keys))
    count = 0
    for judge in judges:
        existing = {} if redo else store.judgments(judge.name)
        todo = []
        for key in candidates:
            j = existing.get(key)
            if j is None or j.get("unsafe") is None or j.get("image_sha256") != records[key].get("sha256"):
                todo.append(key)
        store.set_judge(judge.name, judge.describe())
        failures = []
        with ProgressLog(judge.name, len(todo), enabled=show_progress) as bar:
            for i in range(0, len(todo), chunk):
                part = todo[i : i + chunk]
                results = judge.judge([store.path / records[k]["image"] for k in part])
                items = []
                for key, result in zip(part, results):
                    payload = result.to_dict()
                    payload["image_sha256"] = records[key].get("sha256")
                    items.append((key, payload))
                    if result.unsafe is None:
                        failures.append((records[key]["image"], result.error))
                store.set_judgments(judge.name, items)
                bar.update(len(part))
                count += len(part)
        for name, error in failures[:5]:
            print(f"warning: {judge.name} has no verdict for {store.path / name}: {error}", file=sys.stderr)
        if len(failures) > 5:
            print(f"warning: {judge.name} has no verdict for {len(failures) - 5} more image(s)", file=sys.stderr)
    return count
