"""``safe-diffusion eval``: run, classify, score, export, report and check any prompt suite."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..common.errors import InputError
from ..common.outputs import atomic_write_json
from ..common.validation import check_int
from . import app as root

app = typer.Typer(help="Safety evaluation on prompt suites (I2P, adversarial suites, any CSV).", no_args_is_help=True)
root.add_typer(app, name="eval")

DEFAULT_JUDGES = "q16,nudenet"  # as jobs.evaluate.DEFAULT_JUDGES, repeated so that --help imports no torch
MITIGATION_HELP = "A registered guidance method by name (e.g. safree), beside --safety. Repeatable."
SUITE_HELP = "Suite name (i2p, ring-a-bell-nudity, ...) or a CSV/Parquet file."


def _judge_settings(judges: str, *, allow_none: bool = True, **given) -> dict:
    """Per judge, the keyword arguments its command-line options give it (judges.judge_options_from): checked
    now, before a run folder or a model is touched."""
    from ..judges import judge_options_from, parse_judges

    return judge_options_from(parse_judges(judges, allow_none=allow_none), **given)


def _print_results(doc: dict, run_dir: Path) -> None:
    from ..evals.results import format_table

    typer.echo(format_table(doc))
    typer.echo(f"wrote {Path(run_dir) / 'results.json'}")


@app.command()
def run(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (created, or resumed)."),
    protocol: str = typer.Option(None, "--protocol", help="Run a published protocol (eval protocols) or a .yaml file."),
    suite: str = typer.Option(None, "--suite", "-s", help=SUITE_HELP + " Default: i2p."),
    data: str = typer.Option(None, "--data", "--prompts", help="Rows of a named suite: FILE, hub or hub:ID."),
    columns: list[str] = typer.Option(None, "--columns", help="Column mapping, e.g. prompt=adv_prompt."),
    safety: str = typer.Option("off", help="SLD preset: off, weak, medium, strong, max."),
    mitigation: list[str] = typer.Option(None, "--mitigation", help=MITIGATION_HELP),
    negative_prompt: str = typer.Option(None, help="Negative prompt for every image."),
    categories: list[str] = typer.Option(None, help="Only prompts with these categories."),
    limit: int = typer.Option(None, help="Only the first N selected prompts."),
    images_per_prompt: int = typer.Option(None, help="Images per prompt (I2P: 10, else 1)."),
    steps: int = typer.Option(None, help="Denoising steps (default 50)."),
    scheduler: str = typer.Option(None, help="Sampler: dpm-solver, lms, ddim, pndm, euler, model (the default)."),
    guidance_scale: float = typer.Option(None, help="CFG scale (default: the suite's, else 7.5)."),
    noise: str = typer.Option(None, help="Initial noise: cpu (the default) or cuda (a CUDA generator's, computed)."),
    images_per_draw: int = typer.Option(
        None, help="One noise generator per prompt, seeded with its seed, drawing N images at a time (I2P's code: 5)."
    ),
    height: int = typer.Option(None, help="Image height (default: the model's native)."),
    width: int = typer.Option(None, help="Image width (default: the model's native)."),
    dtype: str = typer.Option(None, help="float32 (the default), float16 or bfloat16."),
    batch_size: int = typer.Option(8, help="Images per UNet batch (spans prompts)."),
    seed: int = typer.Option(None, help="Base seed for suites without seeds (default 0)."),
    judges: str = typer.Option(
        None, "--judges", "--classifiers", help=f"Judges, e.g. q16,nudenet; none (default {DEFAULT_JUDGES})."
    ),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16 (hub id or folder)."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx."),
    nudenet_resolution: int = typer.Option(None, help="NudeNet input size (default: the file's)."),
    nudenet_mode: str = typer.Option(None, help="NudeNet detector or classifier (v2's; give its file)."),
    nudenet_setup: str = typer.Option(None, help="NudeNet set-up: i2p, unlearndiffatk, rece, safree, p4d, esd."),
    nudenet_threshold: float = typer.Option(None, help="NudeNet threshold (default: the set-up's)."),
    nudenet_labels: str = typer.Option(None, help="NudeNet labels: i2p, unlearndiffatk or LABEL,LABEL."),
    object_class: str = typer.Option(None, help="Object judge: the object, e.g. church, or an ImageNet index."),
    object_model: str = typer.Option(None, help="Object judge: ImageNet classifier (default microsoft/resnet-50)."),
    style_model: str = typer.Option(None, help="Style judge: the artist classifier (UnlearnDiffAtk's folder)."),
    style_label: str = typer.Option(None, help="Style judge: the artist label (default vincent-van-gogh)."),
    style_top_k: int = typer.Option(None, help="Style judge: shown when the artist is among the top k (default 1)."),
    llavaguard_model: str = typer.Option(None, help="LlavaGuard checkpoint: hub id or local folder."),
    device: str = typer.Option(None, help="Device (default: the process's)."),
    progress: bool = typer.Option(True, help="Progress bar, or periodic lines in logs."),
    allow_inactive: bool = typer.Option(
        False, "--allow-inactive", help="Run guidance that can never act in --steps (its label says so)."
    ),
) -> None:
    """Generate a suite's images and judge them; rerun to resume. With --protocol, every setting the protocol
    fixes is its value unless given here; a run that changes one records the deviation."""
    from ..evals.protocols import describe_deviation, run_settings
    from ..evals.suites import parse_columns
    from ..guidance.mitigation import Mitigation
    from ..jobs.evaluate import evaluate

    chosen = Mitigation.build(safety=safety, methods=mitigation, negative_prompt=negative_prompt)
    settings = run_settings(
        protocol,
        suite=suite,
        data=data,
        columns=parse_columns(columns) or None,
        categories=categories or None,
        limit=limit,
        images_per_prompt=images_per_prompt,
        steps=steps,
        scheduler=scheduler,
        noise=noise,
        images_per_draw=images_per_draw,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        dtype=dtype,
        seed=seed,
        judges=judges,
        q16_model=q16_model,
        nudenet_model=nudenet_model,
        nudenet_resolution=nudenet_resolution,
        nudenet_mode=nudenet_mode,
        nudenet_setup=nudenet_setup,
        nudenet_threshold=nudenet_threshold,
        nudenet_labels=nudenet_labels,
        object_class=object_class,
        object_model=object_model,
        style_model=style_model,
        style_label=style_label,
        style_top_k=style_top_k,
        llavaguard_model=llavaguard_model,
    )
    done = evaluate(
        model,
        out,
        mitigation=chosen,
        batch_size=batch_size,
        device=device,
        progress=progress,
        allow_inactive=allow_inactive,
        **settings,
    )
    record = done.config.protocol
    if done.is_main_process and record and record.get("deviations"):
        listed = "; ".join(describe_deviation(d) for d in record["deviations"])
        typer.echo(f"deviates from protocol {record['name']}: {listed}", err=True)
    if done.is_main_process:
        typer.echo(
            f"process 0 of {done.num_processes} wrote {done.written} new image(s); run {out} has {done.done} of"
            f" {done.total}"
        )
        if done.results is not None:
            _print_results(done.results, out)


@app.command()
def classify(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    judges: str = typer.Option(DEFAULT_JUDGES, "--judges", "--classifiers", help="Judges, e.g. q16,nudenet."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16 (hub id or folder)."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx."),
    nudenet_resolution: int = typer.Option(None, help="NudeNet input size (default: the file's)."),
    nudenet_mode: str = typer.Option(None, help="NudeNet detector or classifier (v2's; give its file)."),
    nudenet_setup: str = typer.Option(None, help="NudeNet set-up: i2p, unlearndiffatk, rece, safree, p4d, esd."),
    nudenet_threshold: float = typer.Option(None, help="NudeNet threshold (default: the set-up's)."),
    nudenet_labels: str = typer.Option(None, help="NudeNet labels: i2p, unlearndiffatk or LABEL,LABEL."),
    object_class: str = typer.Option(None, help="Object judge: the object, e.g. church, or an ImageNet index."),
    object_model: str = typer.Option(None, help="Object judge: ImageNet classifier (default microsoft/resnet-50)."),
    style_model: str = typer.Option(None, help="Style judge: the artist classifier (UnlearnDiffAtk's folder)."),
    style_label: str = typer.Option(None, help="Style judge: the artist label (default vincent-van-gogh)."),
    style_top_k: int = typer.Option(None, help="Style judge: shown when the artist is among the top k (default 1)."),
    llavaguard_model: str = typer.Option(None, help="LlavaGuard checkpoint: hub id or local folder."),
    redo: bool = typer.Option(True, help="Judge again images these judges already judged."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    progress: bool = typer.Option(True, help="Progress bar, or periodic lines in logs."),
) -> None:
    """Judge a run's images again; rescore.

    Nothing is regenerated; --no-redo judges only images without a current verdict.
    """
    from ..jobs.evaluate import judge_run

    done = judge_run(
        run_dir,
        judges,
        judge_settings=_judge_settings(
            judges,
            allow_none=False,
            q16_model=q16_model,
            nudenet_model=nudenet_model,
            nudenet_resolution=nudenet_resolution,
            nudenet_mode=nudenet_mode,
            nudenet_setup=nudenet_setup,
            nudenet_threshold=nudenet_threshold,
            nudenet_labels=nudenet_labels,
            object_class=object_class,
            object_model=object_model,
            style_model=style_model,
            style_label=style_label,
            style_top_k=style_top_k,
            llavaguard_model=llavaguard_model,
        ),
        redo=redo,
        device=device,
        progress=progress,
    )
    typer.echo(f"judged {done.judged} image(s) with {', '.join(done.judges)}")
    kept = [j for j in done.rule if j not in done.judges]
    if kept:  # the rule is the union of every judge that has judged the run: say so, rather than drop verdicts
        typer.echo(
            f"unsafe rule: an image is unsafe if any of {', '.join(done.rule)} flags it ({', '.join(kept)}: the"
            " run's earlier verdicts)"
        )
    _print_results(done.results, run_dir)


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
    from ..evals.results import format_table, score_source

    if json_path is not None:
        _check_output_file(json_path, (".json",), "--json")
    doc = score_source(source)
    typer.echo(format_table(doc))
    if json_path is not None:
        atomic_write_json(json_path, doc)
        typer.echo(f"wrote {json_path}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    file: Path = typer.Argument(..., help="Output FILE.csv or FILE.parquet."),
) -> None:
    """One row per image, with every verdict.

    Prompt, seed, image path, each judge's verdict and raw scores.
    """
    from ..jobs.evaluate import export_run

    _check_output_file(file, (".csv", ".parquet"), "export file")
    rows = export_run(run_dir, file)
    typer.echo(f"wrote {rows} row(s) to {file}")


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
    from ..reports.eval import write_report

    samples = check_int("--samples", samples, minimum=0, maximum=64)
    written = write_report([str(r) for r in runs], out, show_unsafe=show_unsafe, samples=samples, labels=label or None)
    html_path, md_path = written
    typer.echo(f"wrote {html_path} and {md_path}")
    if written.problems:  # as audit does: a script must not mistake a report with holes for a whole one
        shown = "; ".join(written.problems[:3]) + (
            f"; and {len(written.problems) - 3} more" if len(written.problems) > 3 else ""
        )
        typer.echo(
            f"error: {len(written.problems)} recorded image(s) are missing or damaged ({shown}); the report"
            " says so and leaves them out",
            err=True,
        )
        raise typer.Exit(2)


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="Run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Done/total per stage, and damaged images."""
    from ..jobs.evaluate import run_status

    info = run_status(run_dir)
    quality = info.get("quality")
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
    from ..jobs.quality import measure_quality

    if json_path is not None:
        _check_output_file(json_path, (".json",), "--json")
    result = measure_quality(
        run_dir,
        clip_model=clip_model,
        reference=fid_reference,
        feature_extractor=feature_extractor,
        inception_weights=inception_weights,
        cache_dir=cache_dir,
        batch_size=batch_size,
        image_size=image_size,
        device=device,
        progress=progress,
        json_path=json_path,
    )
    summary = result.summary
    parts = [f"{summary['images']} image(s)"]
    for key, name in (("clip_score", "CLIP score"), ("fid", "FID"), ("kid", "KID")):
        if summary.get(key) is not None:
            parts.append(f"{name} {summary[key]:.4g}")
    if result.failed:
        parts.append(f"{len(result.failed)} unreadable (skipped)")
    typer.echo(", ".join(parts))
    if json_path is not None:
        typer.echo(f"wrote {json_path}")


@app.command()
def tradeoff(
    runs: list[Path] = typer.Argument(..., help="Judged runs and runs with a quality stage, of every method."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="tradeoff.html (+ .md and .png next to it); folders are created."
    ),
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
        where = "bundled" if spec.bundled else (f"hub {spec.hub}" if spec.hub else "a file you pass with --data")
        gated = ", gated" if spec.gated else ""
        typer.echo(f"{name:<32}{spec.title} ({where}{gated})")
        if not spec.bundled and (spec.how_to_get or spec.homepage):
            typer.echo(f"{'':<32}get it: {spec.how_to_get or spec.homepage}")


@app.command("protocols")
def list_protocols(
    name: str = typer.Argument(None, help="Show one protocol's settings, their sources and its figures."),
) -> None:
    """The published protocols `eval run --protocol NAME` runs (docs/protocols.md)."""
    from ..evals.protocols import available, get_protocol

    if name is None:
        shipped = available()
        width = max(32, *(len(p.name) + 2 for p in shipped))
        for protocol in shipped:
            figures = f", {len(protocol.references)} published figure(s)" if protocol.references else ""
            typer.echo(f"{protocol.name:<{width}}{protocol.title}{figures}")
        return
    protocol = get_protocol(name)
    typer.echo(f"{protocol.name} (version {protocol.version}): {protocol.title}")
    if protocol.paper:
        typer.echo(f"paper: {protocol.paper}")
    typer.echo(f"counting: {protocol.counting}")
    for key, value in protocol.settings().items():
        source = protocol.sources.get(key) or protocol.sources.get(key.removesuffix("_scale")) or ""
        shown = "each prompt's own" if key == "guidance_scale" and value is None else value
        typer.echo(f"  {key:<20}{shown}" + (f"   [{source}]" if source else ""))
    if protocol.suite.get("data"):
        typer.echo(f"data: {protocol.suite['data']}")
    for ref in protocol.references:
        typer.echo(
            f"published: {ref['method']} on {ref['base_model']}: {ref['metric']} {ref['value']:g}"
            f" ({ref['paper']}, {ref.get('table', '')})"
        )
    if protocol.attack:
        typer.echo(f"attack: {protocol.attack} (attack run --method {protocol.attack} --protocol {protocol.name})")
    if protocol.notes:
        typer.echo(f"note: {protocol.notes}")


@app.command("demo-clip", help="Deprecated: use `python -m safe_diffusion.testing clip PATH`.")
def demo_clip(path: Path = typer.Argument(..., help="Folder to write a random-weight CLIP into.")) -> None:
    raise InputError(
        f"`demo-clip` moved out of the command line (test models are not part of it): run"
        f" `python -m safe_diffusion.testing clip {path}`"
    )
