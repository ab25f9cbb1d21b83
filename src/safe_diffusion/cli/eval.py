"""``safe-diffusion eval``: run, classify, score, export, report and check any prompt suite."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import typer

from ..common.errors import InputError
from . import app as root

app = typer.Typer(help="Safety evaluation on prompt suites (I2P, adversarial suites, any CSV).", no_args_is_help=True)
root.add_typer(app, name="eval")

DEFAULT_JUDGES = "q16,nudenet"
SUITE_HELP = "Suite name (i2p, ring-a-bell-nudity, ...) or a CSV/Parquet file."


def _judge_options(q16_model: str | None, nudenet_model: Path | None, nudenet_resolution: int | None = None) -> dict:
    return {
        "q16": {"model": q16_model},
        "nudenet": {"model": nudenet_model, "resolution": nudenet_resolution},
    }


def _process_state(device: str | None):
    """This process's place in an ``accelerate launch`` / torchrun job (a single process otherwise).

    PartialState only uses gloo on CPUs when asked to; ask when the launcher says so
    (ACCELERATE_USE_CPU, set by ``accelerate launch --cpu``), when --device is cpu, or when there is no CUDA.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def _write_results(store) -> None:
    from ..common.outputs import atomic_write_json
    from ..evals.results import format_table, score_store

    doc = score_store(store)
    atomic_write_json(store.path / "results.json", doc)
    typer.echo(format_table(doc))
    typer.echo(f"wrote {store.path / 'results.json'}")


@app.command()
def run(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (created, or resumed)."),
    suite: str = typer.Option("i2p", "--suite", "-s", help=SUITE_HELP),
    data: str = typer.Option(None, "--data", "--prompts", help="Rows of a named suite: FILE, hub or hub:ID."),
    columns: list[str] = typer.Option(None, "--columns", help="Column mapping, e.g. prompt=adv_prompt."),
    safety: str = typer.Option("off", help="SLD preset: off, weak, medium, strong, max."),
    negative_prompt: str = typer.Option(None, help="Negative prompt for every image."),
    categories: list[str] = typer.Option(None, help="Only prompts with these categories."),
    limit: int = typer.Option(None, help="Only the first N selected prompts."),
    images_per_prompt: int = typer.Option(None, help="Images per prompt (I2P: 10, else 1)."),
    steps: int = typer.Option(50, help="Denoising steps (the protocol: 50)."),
    guidance_scale: float = typer.Option(None, help="CFG scale (default: the suite's, else 7.5)."),
    height: int = typer.Option(None, help="Image height (default: the model's native)."),
    width: int = typer.Option(None, help="Image width (default: the model's native)."),
    dtype: str = typer.Option("float32", help="float32 (the protocol), float16 or bfloat16."),
    batch_size: int = typer.Option(8, help="Images per UNet batch (spans prompts)."),
    seed: int = typer.Option(0, help="Base seed for suites without seeds."),
    judges: str = typer.Option(DEFAULT_JUDGES, "--judges", "--classifiers", help="Judges, e.g. q16,nudenet; none."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16 (hub id or folder)."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx."),
    nudenet_resolution: int = typer.Option(None, help="NudeNet input size (default: the file's)."),
    nudenet_mode: str = typer.Option(None, help="NudeNet detector or classifier (v2's; give its file)."),
    nudenet_setup: str = typer.Option(None, help="NudeNet set-up: i2p, unlearndiffatk, rece, safree, p4d."),
    nudenet_threshold: float = typer.Option(None, help="NudeNet threshold (default: the set-up's)."),
    nudenet_labels: str = typer.Option(None, help="NudeNet labels: i2p, unlearndiffatk or LABEL,LABEL."),
    llavaguard_model: str = typer.Option(None, help="LlavaGuard checkpoint: hub id or local folder."),
    device: str = typer.Option(None, help="Device (default: the process's)."),
    progress: bool = typer.Option(True, help="Progress bar, or periodic lines in logs."),
) -> None:
    """Generate a suite's images and judge them; rerun to resume."""
    from ..common.validation import check_device, check_int
    from ..evals import runner, suites
    from ..evals.config import build_run_config, torch_dtype, unsafe_rule
    from ..evals.store import RunStore, check_resume, read_frozen
    from ..judges import judge_options_from, load_judges, parse_judges

    if limit is not None:
        limit = check_int("--limit", limit, minimum=1)
    names = parse_judges(judges)
    judge_options = judge_options_from(
        names, q16_model=q16_model, nudenet_model=nudenet_model, nudenet_resolution=nudenet_resolution,
        nudenet_mode=nudenet_mode, nudenet_setup=nudenet_setup, nudenet_threshold=nudenet_threshold,
        nudenet_labels=nudenet_labels, llavaguard_model=llavaguard_model,
    )
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is not a folder")
    loaded = suites.load_suite(suite, data=data, columns=suites.parse_columns(columns), base_seed=seed)
    cats = suites.parse_category_filter(categories, loaded)
    chosen = suites.select(loaded.prompts, cats, None)
    if not chosen:
        raise InputError("no prompts match --categories")
    config, terms = build_run_config(
        loaded,
        model,
        categories=cats,
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
    )
    config_dict = config.to_dict()
    # Everything that can fail on user input fails here, before the run folder is touched.
    check_resume(out, config_dict, limit)
    frozen = read_frozen(out) if out.is_dir() else None
    dev = check_device("--device", device) if device is not None else None
    state = _process_state(str(dev) if dev is not None else None)
    dev = dev or state.device
    existed = frozen is not None
    missing_parents = []
    parent = out.absolute().parent
    while not parent.exists():
        missing_parents.append(parent)
        parent = parent.parent
    with state.main_process_first():
        store = RunStore.create_or_resume(out, config_dict, chosen, _versions(), limit=limit)
    lock = store.writer_lock(state.process_index)
    try:
        try:
            clfs = load_judges(names, device=dev, options=judge_options)
            runner.check_judges(store, clfs)
            from ..common.loading import load_pipeline

            pipe = load_pipeline(model, device=dev, dtype=torch_dtype(config.generation.dtype))
        except BaseException:
            if not existed and state.num_processes == 1 and not store.journal.segments():
                lock.release()
                shutil.rmtree(out, ignore_errors=True)  # this invocation made it and nothing else is in it
                for folder in missing_parents:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            raise
        state.wait_for_everyone()
        settings = runner.GenerationSettings.from_config(config_dict)
        show = progress and state.is_main_process
        written = runner.generate(
            pipe,
            terms,
            store,
            settings,
            process_index=state.process_index,
            num_processes=state.num_processes,
            show_progress=show,
        )
        if clfs:
            if state.is_main_process:
                store.set_evaluation(unsafe_rule(sorted(set(store.rule_judges()) | set(names))))
            keys = runner.shard_keys(store, settings, state.process_index, state.num_processes)
            runner.classify(store, clfs, keys=keys, show_progress=show)
        state.wait_for_everyone()
        if state.is_main_process:
            total = len(store.wanted_keys())
            done = len(set(store.wanted_keys()) & store.done_keys())
            typer.echo(
                f"process 0 of {state.num_processes} wrote {written} new image(s); run {out} has {done} of {total}"
            )
            if clfs:
                _write_results(store)
    finally:
        lock.release()
        store.close()


def _versions() -> dict:
    from ..common.outputs import library_versions

    return library_versions()


@app.command()
def classify(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    judges: str = typer.Option(DEFAULT_JUDGES, "--judges", "--classifiers", help="Judges, e.g. q16,nudenet."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16 (hub id or folder)."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx."),
    nudenet_resolution: int = typer.Option(None, help="NudeNet input size (default: the file's)."),
    nudenet_mode: str = typer.Option(None, help="NudeNet detector or classifier (v2's; give its file)."),
    nudenet_setup: str = typer.Option(None, help="NudeNet set-up: i2p, unlearndiffatk, rece, safree, p4d."),
    nudenet_threshold: float = typer.Option(None, help="NudeNet threshold (default: the set-up's)."),
    nudenet_labels: str = typer.Option(None, help="NudeNet labels: i2p, unlearndiffatk or LABEL,LABEL."),
    llavaguard_model: str = typer.Option(None, help="LlavaGuard checkpoint: hub id or local folder."),
    redo: bool = typer.Option(True, help="Judge again images these judges already judged."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    progress: bool = typer.Option(True, help="Progress bar, or periodic lines in logs."),
) -> None:
    """Judge a run's images again; rescore.

    Nothing is regenerated; --no-redo judges only images without a current verdict.
    """
    from ..common.validation import check_device
    from ..evals import runner
    from ..evals.config import unsafe_rule
    from ..evals.store import RunStore
    from ..judges import judge_options_from, load_judges, parse_judges

    names = parse_judges(judges, allow_none=False)
    judge_options = judge_options_from(
        names, q16_model=q16_model, nudenet_model=nudenet_model, nudenet_resolution=nudenet_resolution,
        nudenet_mode=nudenet_mode, nudenet_setup=nudenet_setup, nudenet_threshold=nudenet_threshold,
        nudenet_labels=nudenet_labels, llavaguard_model=llavaguard_model,
    )
    store = RunStore.open(run_dir)
    dev = check_device("--device", device)
    lock = store.writer_lock(0)
    try:
        clfs = load_judges(names, device=dev, options=judge_options)
        if not redo:
            runner.check_judges(store, clfs)
        n = runner.classify(store, clfs, redo=redo, show_progress=progress)
        store.set_evaluation(unsafe_rule(sorted(set(store.rule_judges()) | set(names))))
        typer.echo(f"judged {n} image(s) with {', '.join(names)}")
        _write_results(store)
    finally:
        lock.release()
        store.close()


def _check_output_file(path: Path, suffixes: tuple[str, ...], what: str) -> None:
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{what} {str(path)!r} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder")
    if not path.parent.exists():
        raise InputError(f"folder {str(path.parent)!r} does not exist")


@app.command()
def score(
    source: str = typer.Argument(..., help="Run folder, or CSV/Parquet (prompt, unsafe[, categories])."),
    json_path: Path = typer.Option(None, "--json", help="Write the results JSON here."),
) -> None:
    """Unsafe image rate and ASR, with 95% CIs.

    Also the I2P paper's metrics for I2P runs and records.
    """
    from ..common.outputs import atomic_write_json
    from ..evals.results import format_table, score_source

    if json_path is not None:
        _check_output_file(json_path, (".json",), "--json")
    doc = score_source(source)
    typer.echo(format_table(doc))
    if json_path is not None:
        atomic_write_json(json_path, doc)
        typer.echo(f"wrote {json_path}")


BASE_COLUMNS = ["prompt_index", "prompt", "categories", "image_index", "seed", "image"]


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    file: Path = typer.Argument(..., help="Output FILE.csv or FILE.parquet."),
) -> None:
    """One row per image, with every verdict.

    Prompt, seed, image path, each judge's verdict and raw scores.
    """
    from ..evals.results import _pandas
    from ..evals.store import RunStore

    _check_output_file(file, (".csv", ".parquet"), "export file")
    pd = _pandas()
    store = RunStore.open(run_dir)
    rows = store.records()
    judges = sorted(set(store.judges()) | set(store.rule_judges()))
    store.close()
    first = BASE_COLUMNS + judges + ["unsafe"]
    frame = pd.DataFrame(rows)
    for col in first:
        if col not in frame.columns:
            frame[col] = None
    frame = frame[first + sorted(c for c in frame.columns if c not in first)]
    import io

    from ..common.outputs import atomic_write_bytes

    buf = io.BytesIO()
    if file.suffix.lower() == ".csv":
        frame.to_csv(buf, index=False)
    else:
        frame.to_parquet(buf, index=False)
    atomic_write_bytes(file, buf.getvalue())
    typer.echo(f"wrote {len(frame)} row(s) to {file}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders to compare side by side."),
    out: Path = typer.Option(..., "--out", "-o", help="report.html (+ report.md next to it); folders are created."),
    show_unsafe: bool = typer.Option(False, help="Show flagged sample images unblurred."),
    samples: int = typer.Option(4, help="Sample images per category and run."),
    label: list[str] = typer.Option(None, "--label", help="A run's name in the report, once per run."),
) -> None:
    """HTML + Markdown report comparing runs.

    Per suite: metrics with intervals side by side, categories, samples.
    """
    from ..common.validation import check_int
    from ..reports.eval import write_report

    samples = check_int("--samples", samples, minimum=0, maximum=64)
    html_path, md_path = write_report(
        [str(r) for r in runs], out, show_unsafe=show_unsafe, samples=samples, labels=label or None
    )
    typer.echo(f"wrote {html_path} and {md_path}")


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Done/total per stage, and damaged images."""
    from ..evals.quality import run_quality
    from ..evals.store import RunStore

    store = RunStore.open(run_dir)
    info = store.status()
    quality = run_quality(store)
    store.close()
    if quality:
        info["quality"] = {k: quality.get(k) for k in ("images", "clip_score", "fid", "kid", "failed")}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"run {info['run']} ({info['label']}): {info['prompts']} prompt(s)")
    typer.echo(f"generate: {info['generated']}/{info['total']} images")
    for name, j in info["judges"].items():
        extra = f", {j['no_verdict']} without a verdict" if j["no_verdict"] else ""
        typer.echo(f"judge {name}: {j['judged']}/{j['total']} images{extra}")
    if info["rule"]:
        typer.echo(f"unsafe rule: any of {', '.join(info['rule']['judges'])}")
    if quality:
        figures = ", ".join(
            f"{k} {v:.4g}" for k, v in info["quality"].items() if k in ("clip_score", "fid", "kid") and v is not None
        )
        typer.echo(f"quality: {info['quality']['images']} image(s): {figures}")
    for name, problem in list(info["image_problems"].items())[:10]:
        typer.echo(f"image {name}: {problem} (a rerun of `eval run` generates it again)")
    if len(info["image_problems"]) > 10:
        typer.echo(f"... and {len(info['image_problems']) - 10} more damaged or missing image(s)")
    typer.echo(f"writers so far: {info['writers']}; last write {info['last_write'] or 'never'}")


@app.command()
def quality(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    clip_model: str = typer.Option(
        "openai/clip-vit-large-patch14", help="CLIP for the CLIP score (hub id or folder); none skips it."
    ),
    fid_reference: str = typer.Option(None, help="Folder of reference images or a statistics .npz for FID/KID."),
    feature_extractor: str = typer.Option("inception", help="FID features: inception (standard) or random."),
    inception_weights: Path = typer.Option(None, help="Local FID InceptionV3 weights (pt_inception-2015-12-05)."),
    cache_dir: Path = typer.Option(None, help="Where reference statistics are cached."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    image_size: int = typer.Option(512, help="Side images are resized to before FID features."),
    json_path: Path = typer.Option(None, "--json", help="Also write the result JSON here."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    progress: bool = typer.Option(True, help="Progress bar, or periodic lines in logs."),
) -> None:
    """CLIP score, FID and KID of a run's images, recorded in the run.

    Resumable: a killed run continues where it stopped.
    """
    from ..common.outputs import atomic_write_json, check_writable
    from ..common.progress import ProgressLog
    from ..common.validation import check_device, check_int
    from ..evals import quality as q
    from ..evals.store import RunStore

    if json_path is not None:
        _check_output_file(json_path, (".json",), "--json")
        check_writable(json_path.parent, "folder of --json")  # now, not after the whole computation
    batch_size = check_int("--batch-size", batch_size, minimum=1, maximum=4096)
    image_size = check_int("--image-size", image_size, minimum=16, maximum=4096)
    clip = None if clip_model.strip().lower() == "none" else clip_model
    if clip is None and fid_reference is None:
        raise InputError("nothing to compute: give --fid-reference, or a --clip-model other than none")
    if fid_reference is not None and not Path(fid_reference).exists():
        raise InputError(f"--fid-reference {fid_reference!r} does not exist (a folder of images or a .npz)")
    if feature_extractor not in q.FEATURE_EXTRACTORS:
        raise InputError(
            f"unknown --feature-extractor {feature_extractor!r};"
            f" choose one of: {', '.join(sorted(q.FEATURE_EXTRACTORS))}"
        )
    dev = check_device("--device", device)
    store = RunStore.open(run_dir)
    lock = store.writer_lock(0)
    bars: dict[str, ProgressLog] = {}

    def show(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = ProgressLog(f"quality {stage}", total, enabled=progress)
        bar.set(done)

    try:
        result = q.evaluate_run(
            store,
            clip_model=clip,
            reference=fid_reference,
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
        store.close()
    summary = result.summary
    parts = [f"{summary['images']} image(s)"]
    for key, name in (("clip_score", "CLIP score"), ("fid", "FID"), ("kid", "KID")):
        if summary.get(key) is not None:
            parts.append(f"{name} {summary[key]:.4g}")
    if result.failed:
        parts.append(f"{len(result.failed)} unreadable (skipped)")
    typer.echo(", ".join(parts))
    if json_path is not None:
        atomic_write_json(json_path, result.to_dict())
        typer.echo(f"wrote {json_path}")


@app.command()
def tradeoff(
    runs: list[Path] = typer.Argument(..., help="Judged runs and runs with a quality stage, of every method."),
    out: Path = typer.Option(..., "--out", "-o", help="tradeoff.html (+ .md and .png next to it); folders are created."),
    label: list[str] = typer.Option(None, "--label", help="The method each run belongs to, once per run."),
) -> None:
    """Safety against quality, one row and one point per method.

    A method's runs (e.g. its I2P run and its COCO run) are grouped by
    mitigation and model, or by --label.
    """
    from ..reports.tradeoff import write_tradeoff

    html_path, md_path = write_tradeoff([str(r) for r in runs], out, labels=label or None)
    typer.echo(f"wrote {html_path} and {md_path}")


@app.command("suites")
def list_suites() -> None:
    """The registered prompt suites."""
    from ..evals.suites import available_suites, get_suite_spec

    for name in available_suites():
        spec = get_suite_spec(name)
        where = "bundled" if spec.bundled else (f"hub {spec.hub}" if spec.hub else "a file you download")
        gated = ", gated" if spec.gated else ""
        typer.echo(f"{name:<24}{spec.title} ({where}{gated})")


@app.command("demo-clip")
def demo_clip(path: Path = typer.Argument(..., help="Folder to write a random-weight CLIP into.")) -> None:
    """Write a random-weight CLIP for offline demos.

    Q16 runs with it offline; its verdicts are meaningless.
    """
    from safetensors import SafetensorError

    from ..common.outputs import check_writable
    from ..records.journal import create_atomically
    from ..testing import build_clip

    if path.exists():
        raise InputError(f"{str(path)!r} already exists")
    check_writable(path.absolute().parent, "folder")
    try:  # built beside `path` and renamed into place: a full disk leaves nothing
        create_atomically(path, build_clip, marker="config.json")
    except SafetensorError as exc:  # how safetensors reports a failed write ("... (os error 28)")
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None
    typer.echo(f"wrote a random-weight CLIP to {path} (demos only: Q16 needs openai/clip-vit-large-patch14)")
