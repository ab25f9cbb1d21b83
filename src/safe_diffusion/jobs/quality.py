"""The quality job: CLIP score, FID and KID of a run's images, resumable and recorded in the run
(``safe-diffusion eval quality``; the measurement itself is :mod:`safe_diffusion.evals.quality`)."""

from __future__ import annotations

from pathlib import Path

from ..common.devices import check_device
from ..common.errors import InputError
from ..common.outputs import atomic_write_json, check_writable
from ..common.progress import ProgressLog
from ..common.validation import check_int
from ..evals import quality as q
from ..evals.store import RunStore

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def measure_quality(
    run_dir: str | Path,
    *,
    clip_model: str | None = DEFAULT_CLIP_MODEL,
    reference: str | None = None,
    feature_extractor: str = "inception",
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    image_size: int = 512,
    device: str | None = None,
    progress: bool = True,
    json_path: str | Path | None = None,
):
    """Measure a run's image quality (`clip_model` None or "none": no CLIP score; `reference`: images or a
    statistics .npz for FID/KID), record it in the run and, with `json_path`, also write it there.

    Resumable: a killed call continues where it stopped. Returns the
    :class:`~safe_diffusion.evals.quality.QualityResult`.
    """
    if json_path is not None:
        check_writable(Path(json_path).absolute().parent, "folder of --json")  # now, not after the whole computation
    batch_size = check_int("--batch-size", batch_size, minimum=1, maximum=4096)
    image_size = check_int("--image-size", image_size, minimum=16, maximum=4096)
    clip = None if clip_model is None or clip_model.strip().lower() == "none" else clip_model
    if clip is None and reference is None:
        raise InputError("nothing to compute: give --fid-reference, or a --clip-model other than none")
    if reference is not None and not Path(reference).exists():
        raise InputError(f"--fid-reference {reference!r} does not exist (a folder of images or a .npz)")
    if feature_extractor not in q.FEATURE_EXTRACTORS:
        raise InputError(
            f"unknown --feature-extractor {feature_extractor!r};"
            f" choose one of: {', '.join(sorted(q.FEATURE_EXTRACTORS))}"
        )
    dev = check_device("--device", device)
    store = RunStore.open(run_dir)
    bars: dict[str, ProgressLog] = {}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = ProgressLog(f"quality {stage}", total, enabled=progress)
        bar.set(done)

    try:
        lock = store.writer_lock(0)
        try:
            result = q.evaluate_run(
                store,
                clip_model=clip,
                reference=reference,
                feature_extractor=feature_extractor,
                inception_weights=inception_weights,
                cache_dir=cache_dir,
                batch_size=batch_size,
                image_size=image_size,
                device=dev,
                progress=show,
            )
        finally:
            for bar in bars.values():
                bar.close()
            lock.release()
    finally:
        store.close()
    if json_path is not None:
        atomic_write_json(Path(json_path), result.to_dict())
    return result
