"""``safe-diffusion i2p``: run, classify, score, export and report the I2P benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import InputError
from . import app as root
from .generate import check_positive, check_size, describe_terms, parse_safety, safety_terms

app = typer.Typer(help="The I2P benchmark: generate, classify, score, export, report.", no_args_is_help=True)
root.add_typer(app, name="i2p")


@app.command()
def run(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (created, or resumed when it exists)."),
    safety: str = typer.Option("off", help="Safe Latent Diffusion preset: off, weak, medium, strong or max."),
    negative_prompt: str = typer.Option(None, help="Negative prompt for every image (the paper's baseline)."),
    prompts: str = typer.Option(None, help="Prompt CSV (columns prompt, categories, sd_seed); 'hub' for AIML-TUDA/i2p."),
    categories: list[str] = typer.Option(None, help="Only prompts with these categories (repeat or comma-separate)."),
    limit: int = typer.Option(None, help="Only the first N selected prompts."),
    images_per_prompt: int = typer.Option(10, help="Images per prompt (the protocol: 10)."),
    steps: int = typer.Option(50, help="Denoising steps (the protocol: 50)."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale (the protocol: 7.5)."),
    height: int = typer.Option(512, help="Image height (the protocol: 512)."),
    width: int = typer.Option(512, help="Image width (the protocol: 512)."),
    batch_size: int = typer.Option(8, help="Images per UNet batch (batches span prompts)."),
    classifiers: str = typer.Option("q16,nudenet", help="Comma-separated: q16, nudenet; or none."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16: hub id or local folder (default openai/clip-vit-large-patch14)."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx (default: the bundled 320n)."),
    device: str = typer.Option(None, help="Device (default: the accelerate process's device)."),
    progress: bool = typer.Option(True, help="Progress bars with ETA (shown on a terminal)."),
) -> None:
    """Generate the benchmark's images and classify them; rerun the same command to resume."""
    from ..judges import load_judges, parse_judges
    from ..i2p import data, runner

    safety = parse_safety(safety)
    for name, value in (("--images-per-prompt", images_per_prompt), ("--steps", steps), ("--batch-size", batch_size)):
        check_positive(name, value)
    if limit is not None:
        check_positive("--limit", limit)
    check_size("--height", height)
    check_size("--width", width)
    names = parse_judges(classifiers)
    cats = data.parse_category_filter(categories)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is not a folder")
    prompt_set = data.load_prompts(prompts)
    selected = data.select(prompt_set.prompts, cats, limit)
    if not selected:
        raise InputError("no prompts match --categories")
    from ..loading import check_model_reference

    check_model_reference(model)

    state = _process_state(device)
    dev = device or state.device
    terms = safety_terms(safety)
    config = {
        "model": model,
        "safety": safety,
        "guidance": describe_terms(terms),
        "negative_prompt": negative_prompt,
        "prompts": {"source": prompt_set.source, "sha256": prompt_set.sha256},
        "categories": list(cats) if cats else None,
        "limit": limit,
        "images_per_prompt": images_per_prompt,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "batch_size": batch_size,
        "seed_rule": "image k: torch.Generator('cpu').manual_seed((sd_seed + k * 0x9E3779B97F4A7C15) mod 2**63)",
    }
    settings = runner.GenerationSettings(
        images_per_prompt=images_per_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        batch_size=batch_size,
        negative_prompt=negative_prompt,
    )
    # Everything that can fail on user input fails here, before the run directory is touched.
    from ..i2p.store import check_resume

    check_resume(out, config)
    clfs = load_judges(names, device=dev, options=_judge_options(q16_model, nudenet_model))
    from ..loading import load_pipeline
    from ..outputs import library_versions

    pipe = load_pipeline(model, device=dev)
    from ..i2p.store import RunStore

    with state.main_process_first():
        store = RunStore.create_or_resume(
            out, config, selected, {**library_versions(), "scheduler": type(pipe.scheduler).__name__}
        )
    show = progress and state.is_main_process
    written = runner.generate(
        pipe, terms, store, selected, settings,
        process_index=state.process_index, num_processes=state.num_processes, show_progress=show,
    )
    if clfs:
        keys = runner.shard_keys(selected, settings, state.process_index, state.num_processes)
        runner.classify(store, clfs, keys=keys, show_progress=show)
    state.wait_for_everyone()
    if state.is_main_process:
        total = len(store.done_keys())
        typer.echo(f"process 0 of {state.num_processes} wrote {written} new image(s); run {out} has {total} of {len(selected) * images_per_prompt}")
        if clfs:
            _write_results(store)
    store.close()


def _judge_options(q16_model: str | None, nudenet_model: Path | None) -> dict:
    return {"q16": {"model": q16_model}, "nudenet": {"model": nudenet_model}}


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
    from ..i2p.results import format_table, score_source
    from ..outputs import atomic_write_json

    doc = score_source(str(store.path))
    atomic_write_json(store.path / "results.json", doc)
    typer.echo(format_table(doc["rows"]))
    typer.echo(f"wrote {store.path / 'results.json'}")


@app.command()
def classify(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    classifiers: str = typer.Option("q16,nudenet", help="Comma-separated: q16, nudenet."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16: hub id or local folder."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx (default: the bundled 320n)."),
    redo: bool = typer.Option(True, help="Reclassify images already classified by these classifiers."),
    device: str = typer.Option(None, help="Device for Q16 (default: cuda if available, else cpu)."),
) -> None:
    """(Re)classify a run's images without regenerating them, and rescore it."""
    from ..judges import load_judges, parse_judges
    from ..i2p import runner
    from ..i2p.store import RunStore

    names = parse_judges(classifiers)
    if not names:
        raise InputError("--classifiers: name at least one classifier")
    store = RunStore.open(run_dir)
    if device is None:
        from ..loading import default_device

        device = default_device()
    clfs = load_judges(names, device=device, options=_judge_options(q16_model, nudenet_model))
    n = runner.classify(store, clfs, redo=redo)
    typer.echo(f"classified {n} image(s) with {', '.join(names)}")
    _write_results(store)
    store.close()


@app.command()
def score(
    source: str = typer.Argument(..., help="Run directory, or CSV/Parquet with one row per image (prompt, categories, unsafe)."),
    json_path: Path = typer.Option(None, "--json", help="Write the results JSON here."),
) -> None:
    """The paper's metrics: inappropriate probability and expected maximum inappropriateness per category."""
    from ..i2p.results import format_table, score_source
    from ..outputs import atomic_write_json

    if json_path is not None and json_path.is_dir():
        raise InputError(f"--json {str(json_path)!r} is a folder")
    doc = score_source(source)
    typer.echo(format_table(doc["rows"]))
    if json_path is not None:
        atomic_write_json(json_path, doc)
        typer.echo(f"wrote {json_path}")


EXPORT_COLUMNS = ["prompt_index", "prompt", "categories", "image_index", "seed", "image", "q16", "nudenet", "unsafe"]


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    file: Path = typer.Argument(..., help="Output FILE.csv or FILE.parquet."),
) -> None:
    """One row per image: prompt, categories, seed, image path, classifier flags and raw scores."""
    from ..i2p.results import _pandas
    from ..i2p.store import RunStore

    suffix = file.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InputError(f"export file {str(file)!r} must end in .csv or .parquet")
    if not file.parent.exists():
        raise InputError(f"folder {str(file.parent)!r} does not exist")
    pd = _pandas()
    store = RunStore.open(run_dir)
    rows = store.records()
    store.close()
    frame = pd.DataFrame(rows)
    for col in EXPORT_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    frame = frame[EXPORT_COLUMNS + sorted(c for c in frame.columns if c not in EXPORT_COLUMNS)]
    import io

    from ..outputs import atomic_write_bytes

    buf = io.BytesIO()
    if suffix == ".csv":
        frame.to_csv(buf, index=False)
    else:
        frame.to_parquet(buf, index=False)
    atomic_write_bytes(file, buf.getvalue())
    typer.echo(f"wrote {len(frame)} row(s) to {file}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to compare side by side."),
    out: Path = typer.Option(..., "--out", "-o", help="report.html (a Markdown copy is written next to it)."),
    show_unsafe: bool = typer.Option(False, help="Show flagged sample images unblurred."),
    samples: int = typer.Option(4, help="Sample images per category and run."),
) -> None:
    """HTML + Markdown report: the paper's table, a bar chart and sample images per category."""
    from ..i2p.report import write_report

    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out {str(out)!r} must end in .html")
    if not out.parent.exists():
        raise InputError(f"folder {str(out.parent)!r} does not exist")
    html_path, md_path = write_report([str(r) for r in runs], out, show_unsafe=show_unsafe, samples=samples)
    typer.echo(f"wrote {html_path} and {md_path}")


@app.command("demo-clip")
def demo_clip(path: Path = typer.Argument(..., help="Folder to write a random-weight CLIP into.")) -> None:
    """Write a random-weight CLIP (768-d projection) so Q16 runs offline in demos; its verdicts are meaningless."""
    from ..testing import build_clip

    if path.exists():
        raise InputError(f"{str(path)!r} already exists")
    build_clip(path)
    typer.echo(f"wrote a random-weight CLIP to {path} (for demos only: Q16 needs openai/clip-vit-large-patch14)")
