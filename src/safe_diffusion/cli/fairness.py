"""``safe-diffusion fairness``: attribute proportions per prompt, before and after Fair Diffusion.

Parses the options and calls :func:`safe_diffusion.jobs.fairness.fairness`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import app, deprecated_strict
from .generate import parse_directions, parse_proportions

DEFAULT_TEMPLATE = "A photo of the face of a {}"  # as jobs.fairness's, repeated so that --help imports no torch
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@app.command()
def fairness(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file, one subject (e.g. an occupation) per line."),
    directions: str = typer.Option(
        ..., "--directions", help="Comma-separated attribute directions, e.g. 'male person,female person'."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the table, the plot and the images."),
    proportions: str = typer.Option(None, help="Target proportions per direction, e.g. '0.5,0.5' (default: uniform)."),
    images_per_prompt: int = typer.Option(
        8, "--images-per-prompt", help="Images per prompt, with and without guidance."
    ),
    clip_model: str = typer.Option(
        DEFAULT_CLIP, "--clip-model", help="transformers CLIP model for the zero-shot classifier."
    ),
    template: str = typer.Option(DEFAULT_TEMPLATE, help="Prompt template; {} is replaced by each line of --prompts."),
    steps: int = typer.Option(50, help="Denoising steps."),
    seed: int = typer.Option(0, help="Seed of each prompt's first image; image k uses seed + k."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    height: int = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: int = typer.Option(None, help="Image width in pixels (default: the model's)."),
    save_images: bool = typer.Option(True, help="Also write every image as PNG."),
    refuse_inactive: bool = typer.Option(
        False, "--refuse-inactive", help="Refuse settings under which guidance would not apply (else warn)."
    ),
    strict: bool = typer.Option(False, "--strict", hidden=True, help="Deprecated spelling of --refuse-inactive."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
) -> None:
    """Measure attribute proportions per prompt with and without Fair Diffusion; write fairness.csv and fairness.png."""
    from ..jobs.fairness import fairness as run

    done = run(
        model=model,
        prompts=prompts,
        directions=parse_directions(directions),
        out=out,
        proportions=parse_proportions(proportions),
        images_per_prompt=images_per_prompt,
        clip_model=clip_model,
        template=template,
        steps=steps,
        seed=seed,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        save_images=save_images,
        strict=refuse_inactive or deprecated_strict(strict),
        device=device,
        warn=lambda problem: typer.echo(f"warning: {problem}", err=True),
    )
    typer.echo(
        f"wrote fairness.csv and fairness.png for {len(done.prompts)} prompt(s) to {out}"
        f" ({done.moved} of {len(done.rows)} proportions moved towards their target)"
    )
