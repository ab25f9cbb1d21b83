"""``safe-diffusion sanitize DIR --model M --out OUT``: find inappropriate images and edit away only what is inappropriate."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command()
def sanitize(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    model: str = typer.Option(..., "--model", "-m", help="SD 1.x/2.x or SDXL: hub id or local folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (resumed when it exists)."),
    remove: list[str] = typer.Option(
        None, "--remove", help="Concept to remove; repeat. Default: the 20 parts of SLD's safety concept."
    ),
    add: list[str] = typer.Option(None, "--add", help="Concept to add; repeat (e.g. 'fully clothed')."),
    only_flagged: bool = typer.Option(
        True, "--only-flagged/--all", help="Edit flagged images only (default), or every image."
    ),
    judges: str = typer.Option("q16,nudenet", help="Comma-separated judges, or none (with --all)."),
    steps: int = typer.Option(None, help="Inversion and edit steps [default: 30 SD, 50 SDXL]."),
    skip: float = typer.Option(0.15, help="Share of the noisiest steps skipped."),
    scale: float = typer.Option(5.0, help="Edit guidance scale s_e, per concept."),
    threshold: float = typer.Option(0.9, help="Mask threshold λ (quantile), per concept."),
    warmup: int = typer.Option(0, help="Steps before the edit guidance starts."),
    masking: str = typer.Option("intersect", help="intersect, cross_attention or noise."),
    seed: int = typer.Option(0, help="Seed of the inversion noise (per image: hashed with its path)."),
    resolution: int = typer.Option(None, help="Longest side edited at [default: the model's]."),
    keep_unmasked: bool = typer.Option(
        True, help="Keep the input's pixels outside the edit mask (default), or take the whole LEDITS++ output."
    ),
    unet_batch_size: int = typer.Option(None, help="Rows per UNet call (lower it to save memory)."),
    report: Path = typer.Option(None, help="Report .html [default: OUT/.sanitize/report.html]."),
    show_unsafe: bool = typer.Option(False, help="Show flagged images unblurred in the report."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16: hub id or local folder."),
    nudenet_model: Path = typer.Option(None, help="NudeNet detector file, e.g. 640m.onnx."),
    device: str = typer.Option(None, help="Device [default: the accelerate process's]."),
    progress: bool = typer.Option(True, help="Progress bar (a line every 30 s in logs)."),
) -> None:
    """Edit inappropriate content out of images with LEDITS++; copy the rest.

    Flagged images (every image with --all) are inverted and edited with each
    removal concept removed inside its implicit mask, and written under the
    same path in OUT; unflagged images are copied byte for byte; unreadable
    files are skipped and listed. Edited images are judged again. Rerun the
    same command to resume; shard with `accelerate launch`.
    """
    from ..editing.sanitize import display_path
    from ..jobs.sanitize import sanitize as run

    result = run(
        folder,
        out,
        model=model,
        remove=remove,
        add=add,
        only_flagged=only_flagged,
        judges=judges,
        q16_model=q16_model,
        nudenet_model=nudenet_model,
        steps=steps,
        skip=skip,
        scale=scale,
        threshold=threshold,
        warmup=warmup,
        masking=masking,
        seed=seed,
        resolution=resolution,
        keep_unmasked=keep_unmasked,
        unet_batch_size=unet_batch_size,
        report=report,
        show_unsafe=show_unsafe,
        device=device,
        progress=progress,
    )
    if result.report is None:
        return
    c = result.counts
    typer.echo(
        f"{c['files']} file(s): {c['edited']} edited ({c['still_flagged_after']} still flagged),"
        f" {c['copied']} copied, {c['skipped']} skipped"
        + (f", {c['pending']} pending (rerun to finish)" if c["pending"] else "")
        + f"; wrote {display_path(str(out))}; report: {display_path(str(result.report))}"
    )
