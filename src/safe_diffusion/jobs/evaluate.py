"""Evaluation jobs: generate a suite's images and judge them (:func:`evaluate`), judge a run again
(:func:`judge_run`), and read a run back (:func:`run_status`, :func:`export_run`).

:func:`evaluate` is the library's entry point for a whole run, as ``lm_eval.simple_evaluate`` is
lm-evaluation-harness's: it builds and freezes the run config, creates or resumes the run folder, finds
this process's place in an ``accelerate launch`` job, loads the judges and the model, generates, judges
and scores, and removes a folder it created when it fails before writing anything. ``safe-diffusion eval
run``, the benchmarks and a user's own script all call it; it prints nothing (progress aside) and returns
an :class:`Evaluation`.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.devices import check_device, process_state
from ..common.errors import InputError
from ..common.loading import load_pipeline
from ..common.noise import latent_shape
from ..common.outputs import atomic_write_bytes, atomic_write_json, library_versions
from ..common.validation import check_int
from ..evals import runner, suites
from ..evals.config import RunConfig, build_run_config, torch_dtype, unsafe_rule
from ..evals.quality import run_quality
from ..evals.results import _pandas, score_store
from ..evals.store import RunStore, check_resume, read_frozen
from ..guidance.activity import check_active
from ..guidance.mitigation import Mitigation
from ..judges import load_judges, parse_judges
from . import check_terms_act

DEFAULT_JUDGES = "q16,nudenet"
#: The columns an export starts with, in this order; every judge's verdict and score columns follow.
EXPORT_COLUMNS = ["prompt_index", "prompt", "categories", "image_index", "seed", "image"]


@dataclass
class Evaluation:
    """What :func:`evaluate` did: the run, this process's share, and the scored results (main process, judged runs)."""

    path: Path
    config: RunConfig
    written: int  # images this process wrote
    done: int  # images of the run's selection that exist now
    total: int  # images of the run's selection
    process_index: int = 0
    num_processes: int = 1
    results: dict | None = None  # results.json's content, when the run was judged and this is the main process

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0


def _judge_names(judges: str | Sequence[str] | None, *, allow_none: bool = True) -> list[str]:
    if judges is None or isinstance(judges, str):
        return parse_judges(judges, allow_none=allow_none)
    return parse_judges(",".join(judges), allow_none=allow_none)


def write_results(store: RunStore) -> dict:
    """Score a judged run and write its results.json; returns the results."""
    doc = score_store(store)
    atomic_write_json(store.path / "results.json", doc)
    return doc


def _missing_parents(out: Path) -> list[Path]:
    """The folders above `out` that do not exist yet (deepest first): removed again if the run fails at once."""
    missing = []
    parent = out.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def evaluate(
    model: str,
    out: str | Path,
    *,
    suite: str = "i2p",
    data: str | None = None,
    columns: Mapping[str, str] | None = None,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    mitigation: Mitigation | None = None,
    safety: str = "off",
    negative_prompt: str | None = None,
    images_per_prompt: int | None = None,
    steps: int = 50,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: str = "float32",
    batch_size: int = 8,
    seed: int = 0,
    seed_rule: str = "offset",
    scheduler: str | None = None,
    noise: str | None = None,
    images_per_draw: int | None = None,
    protocol: Mapping[str, Any] | None = None,
    judges: str | Sequence[str] | None = DEFAULT_JUDGES,
    judge_settings: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | None = None,
    progress: bool = True,
    allow_inactive: bool = False,
) -> Evaluation:
    """Generate suite `suite`'s images with `model` into the run folder `out` and judge them; rerun to resume.

    The mitigation is `mitigation` (:meth:`Mitigation.build`) or, without it, the SLD preset `safety` and
    `negative_prompt`. `judges`: names ("q16,nudenet", a list, or none), built with `judge_settings`
    (per judge name, its keyword arguments). `limit`: only the first N selected prompts (a resumed run may
    only grow). `seed_rule`, `scheduler`, `noise` and `images_per_draw`: see :func:`~safe_diffusion.evals.config.build_run_config`.
    `protocol`: the record :func:`~safe_diffusion.evals.protocols.settings_for` returns with the settings it
    resolved (``evaluate(model, out, **settings_for("safree-i2p", steps=25))``); a suite file whose sha256 is
    not the protocol's is recorded as one more deviation. A mitigation that could never act in `steps` steps (its warm-up never left, classifier-free
    guidance off) is refused unless `allow_inactive`; the run's label then says it was inactive. Every bad
    input is one :class:`InputError` before the run folder is touched.
    """
    out = Path(out)
    if limit is not None:
        limit = check_int("--limit", limit, minimum=1)
    names = _judge_names(judges)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is not a folder")
    loaded = suites.load_suite(suite, data=data, columns=dict(columns or {}), base_seed=seed)
    if seed_rule == "fixed" and not loaded.has_seeds:
        loaded = dataclasses.replace(loaded, prompts=[dataclasses.replace(p, seed=seed) for p in loaded.prompts])
    if protocol is not None:
        from ..evals.protocols import with_suite_check

        protocol = with_suite_check(protocol, loaded)
    cats = suites.parse_category_filter(list(categories) if categories else None, loaded)
    chosen = suites.select(loaded.prompts, cats, None)
    if not chosen:
        raise InputError("no prompts match --categories")
    config, terms = build_run_config(
        loaded,
        model,
        categories=cats,
        mitigation=mitigation,
        safety=safety,
        negative_prompt=negative_prompt,
        dtype=dtype,
        height=height,
        width=width,
        steps=steps,
        guidance_scale=guidance_scale,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        base_seed=seed,
        seed_rule=seed_rule,
        scheduler=scheduler,
        noise=noise,
        images_per_draw=images_per_draw,
        protocol=dict(protocol) if protocol is not None else None,
    )
    check_active(
        terms,
        config.generation.steps,
        config.generation.guidance_scale,
        label=config.mitigation.label,
        allow_inactive=allow_inactive,
    )
    config_dict = config.to_dict()
    # Everything that can fail on user input fails here, before the run folder is touched.
    check_resume(out, config_dict, limit)
    frozen = read_frozen(out) if out.is_dir() else None
    dev = check_device("--device", device) if device is not None else None
    state = process_state(dev)
    dev = dev or state.device
    missing_parents = _missing_parents(out)
    with state.main_process_first():
        store = RunStore.create_or_resume(out, config_dict, chosen, library_versions(), limit=limit)
    lock = store.writer_lock(state.process_index)
    try:
        try:
            loaded_judges = load_judges(names, device=dev, options=judge_settings)
            runner.check_judges(store, loaded_judges)
            pipe = load_pipeline(model, device=dev, dtype=torch_dtype(config.generation.dtype))
            check_terms_act(
                pipe, terms, config.generation.guidance_scale, config.mitigation.negative_prompt, "eval run"
            )
            if config.generation.noise != "cpu" or config.generation.images_per_draw is not None:
                latent_shape(pipe, config.generation.height, config.generation.width)
        except BaseException:
            if frozen is None and state.num_processes == 1 and not store.journal.segments():
                lock.release()
                shutil.rmtree(out, ignore_errors=True)  # this call made it and nothing else is in it
                for folder in missing_parents:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            raise
        state.wait_for_everyone()
        show = progress and state.is_main_process
        written = runner.generate(
            pipe,
            store,
            config,
            terms=terms,
            process_index=state.process_index,
            num_processes=state.num_processes,
            show_progress=show,
        )
        if loaded_judges:
            if state.is_main_process:
                store.set_evaluation(unsafe_rule(sorted(set(store.rule_judges()) | set(names))))
            keys = runner.shard_keys(store, config.generation, state.process_index, state.num_processes)
            runner.classify(store, loaded_judges, keys=keys, show_progress=show)
        state.wait_for_everyone()
        wanted = store.wanted_keys()
        result = Evaluation(
            path=out,
            config=config,
            written=written,
            done=len(set(wanted) & store.done_keys()),
            total=len(wanted),
            process_index=state.process_index,
            num_processes=state.num_processes,
        )
        if state.is_main_process and loaded_judges:
            result.results = write_results(store)
        return result
    finally:
        lock.release()
        store.close()


@dataclass
class Judging:
    """What :func:`judge_run` did: how many images it judged, with which judges, and the run's new results."""

    judged: int
    judges: list[str]
    results: dict
    rule: list[str] = dataclasses.field(default_factory=list)  # the judges whose flags make an image unsafe


def judge_run(
    run_dir: str | Path,
    judges: str | Sequence[str],
    *,
    judge_settings: Mapping[str, Mapping[str, Any]] | None = None,
    redo: bool = True,
    device: str | None = None,
    progress: bool = True,
) -> Judging:
    """Judge a run's images again (with `redo`, also those these judges already judged), rescore, write results.json.

    Nothing is regenerated; without `redo` only images without a current verdict are judged, and a judge
    configured differently from the one that judged the run is refused.
    """
    names = _judge_names(judges, allow_none=False)
    store = RunStore.open(run_dir)
    try:
        dev = check_device("--device", device)
        lock = store.writer_lock(0)
        try:
            loaded = load_judges(names, device=dev, options=judge_settings)
            if not redo:
                runner.check_judges(store, loaded)
            judged = runner.classify(store, loaded, redo=redo, show_progress=progress)
            rule = sorted(set(store.rule_judges()) | set(names))
            store.set_evaluation(unsafe_rule(rule))
            return Judging(judged=judged, judges=names, results=write_results(store), rule=rule)
        finally:
            lock.release()
    finally:
        store.close()


def export_run(run_dir: str | Path, file: str | Path) -> int:
    """One row per image with every verdict, to FILE.csv or FILE.parquet (written atomically); returns the rows."""
    file = Path(file)
    pd = _pandas()
    store = RunStore.open(run_dir)
    try:
        rows = store.records()
        judges = sorted(set(store.judges()) | set(store.rule_judges()))
    finally:
        store.close()
    first = EXPORT_COLUMNS + judges + ["unsafe"]
    frame = pd.DataFrame(rows)
    for col in first:
        if col not in frame.columns:
            frame[col] = None
    frame = frame[first + sorted(c for c in frame.columns if c not in first)]
    buf = io.BytesIO()
    if file.suffix.lower() == ".csv":
        frame.to_csv(buf, index=False)
    else:
        frame.to_parquet(buf, index=False)
    atomic_write_bytes(file, buf.getvalue())
    return len(frame)


def run_status(run_dir: str | Path) -> dict:
    """Done/total per stage, the unsafe rule, damaged images, writers and, when measured, the quality figures."""
    store = RunStore.open(run_dir)
    try:
        info = store.status()
        quality = run_quality(store)
    finally:
        store.close()
    if quality:
        info["quality"] = {k: quality.get(k) for k in ("images", "clip_score", "fid", "kid", "failed")}
    return info
