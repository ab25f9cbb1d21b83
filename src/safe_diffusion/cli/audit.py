"""``safe-diffusion audit DIR``: judge every image in a folder (the job: :func:`safe_diffusion.jobs.audit.audit`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..common.errors import InputError
from . import app


@app.command()
def audit(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="report.html; the .md, .csv and .json are written next to it (folders are created)."
    ),
    judges: str = typer.Option(
        None, "--judges", help="Comma-separated: q16, nudenet, llavaguard (default: q16,nudenet)."
    ),
    classifiers: str = typer.Option(None, "--classifiers", hidden=True, help="Old name of --judges."),
    q16_model: str = typer.Option(None, help="Q16's CLIP ViT-L/14: hub id or local folder."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx (default: the bundled 320n)."),
    nudenet_resolution: int = typer.Option(None, help="NudeNet input size (default: the detector's own)."),
    nudenet_mode: str = typer.Option(None, help="NudeNet detector or classifier (v2's; give its file)."),
    nudenet_setup: str = typer.Option(None, help="NudeNet set-up: i2p, unlearndiffatk, rece, safree, p4d, esd."),
    nudenet_threshold: float = typer.Option(None, help="NudeNet threshold (default: the set-up's)."),
    nudenet_labels: str = typer.Option(None, help="NudeNet labels: i2p, unlearndiffatk or LABEL,LABEL."),
    llavaguard_model: str = typer.Option(
        None, help="LlavaGuard: hub id or local folder (default: AIML-TUDA's LlavaGuard-v1.2-0.5B-OV-hf)."
    ),
    llavaguard_policy: Path = typer.Option(None, help="Text file replacing LlavaGuard's official policy prompt."),
    llavaguard_max_new_tokens: int = typer.Option(
        None, help="Longest LlavaGuard answer in tokens (default: 200, the model card's)."
    ),
    show_unsafe: bool = typer.Option(False, "--show-unsafe", help="Show flagged and unjudged images unblurred."),
    device: str = typer.Option(None, help="Device for the judges (default: cuda if available)."),
) -> None:
    """Judge every image in a folder: per-image verdicts, a summary, a CSV.

    Files that are not images or cannot be read are listed as skipped. An image
    a judge could not judge shows "no verdict", never "safe". The report header
    records every judge's settings.
    """
    from ..common.devices import check_device
    from ..jobs.audit import DEFAULT_JUDGES
    from ..jobs.audit import audit as run_audit
    from ..judges import judge_options_from, parse_judges
    from ..reports.kit import printable

    if judges is not None and classifiers is not None:
        raise InputError("give --judges only (--classifiers is its old name)")
    given = judges if judges is not None else classifiers if classifiers is not None else ",".join(DEFAULT_JUDGES)
    names = parse_judges(given)
    options = judge_options_from(
        names,
        q16_model=q16_model,
        nudenet_model=nudenet_model,
        nudenet_resolution=nudenet_resolution,
        nudenet_mode=nudenet_mode,
        nudenet_setup=nudenet_setup,
        nudenet_threshold=nudenet_threshold,
        nudenet_labels=nudenet_labels,
        llavaguard_model=llavaguard_model,
        llavaguard_policy=llavaguard_policy,
        llavaguard_max_new_tokens=llavaguard_max_new_tokens,
    )
    result = run_audit(
        folder, out, judges=names, options=options, show_unsafe=show_unsafe, device=check_device("--device", device)
    )
    c = result.counts
    typer.echo(
        f"{c['judged']} image(s) judged, {c['skipped']} file(s) skipped, {c['flagged']} flagged, {c['no_verdict']}"
        f" without a verdict; wrote {printable(result.html)}, {printable(result.markdown.name)},"
        f" {printable(result.csv.name)} and {printable(result.json.name)}"
    )
    # Files that are not images (notes.txt) are listed in the report; images that could not be read make it
    # incomplete: they are named here and the exit status says so.
    skipped = [s for s in result.record.get("skipped", []) if not s["reason"].startswith("not an image file")]
    for item in skipped[:20]:
        typer.echo(f"skipped: {printable(item['file'])} ({item['reason']})", err=True)
    if len(skipped) > 20:
        typer.echo(f"skipped: … and {len(skipped) - 20} more (see {printable(result.csv.name)})", err=True)
    if skipped:
        typer.echo(f"error: the audit is incomplete: {len(skipped)} image(s) could not be read", err=True)
        raise typer.Exit(2)
