"""``safe-diffusion generate``: images with (and, with --compare, without) guidance, each with a JSON sidecar.

Parses the options, builds the mitigation and calls :func:`safe_diffusion.jobs.generate.generate`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..common.errors import InputError
from ..common.validation import check_int, check_seed
from . import app, deprecated_strict

MAX_IMAGES = 10_000  # as jobs.generate.MAX_IMAGES, repeated here so that --help imports no torch
MITIGATION_HELP = "A registered guidance method by name (e.g. safree), beside --safety. Repeatable."


def parse_directions(value: str) -> list[str]:
    """``"male person,female person"`` → two directions; at least two, distinct, non-empty."""
    directions = [d.strip() for d in value.split(",")]
    if len(directions) < 2 or any(not d for d in directions):
        raise InputError(
            f"directions {value!r} must be two or more comma-separated texts, e.g. 'male person,female person'"
        )
    if len(set(directions)) != len(directions):
        raise InputError(f"directions {value!r} repeat a direction")
    return directions


def parse_proportions(value: str | None) -> list[float] | None:
    """``"0.3,0.7"`` → numbers (checked against the directions by the mitigation); None: uniform."""
    if value is None:
        return None
    try:
        return [float(p) for p in value.split(",")]
    except ValueError:
        raise InputError(f"proportions {value!r} must be comma-separated numbers, e.g. '0.5,0.5'") from None


def existing_policy(overwrite: bool, skip_existing: bool) -> str:
    """--overwrite / --skip-existing → what a job does with outputs already there."""
    if overwrite and skip_existing:
        raise InputError("--overwrite and --skip-existing exclude each other; choose one")
    return "overwrite" if overwrite else "skip" if skip_existing else "refuse"


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to generate."),
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs and their JSON sidecars."),
    safety: str = typer.Option(
        None,
        help="SLD preset: off, weak, medium, strong or max (default: medium, or off when --edit, --fair or"
        " --mitigation chooses other guidance).",
    ),
    safety_concept: str = typer.Option(None, help="Text SLD steers away from (default: the paper's)."),
    mitigation: list[str] = typer.Option(None, "--mitigation", help=MITIGATION_HELP),
    negative_prompt: str = typer.Option(None, help="Negative prompt."),
    seed: int = typer.Option(0, help="Seed of the first image; image k uses seed + k."),
    steps: int = typer.Option(50, help="Denoising steps."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale (guidance needs > 1)."),
    num_images: int = typer.Option(1, help=f"Images to generate (at most {MAX_IMAGES:,})."),
    batch_size: int = typer.Option(None, help="Images per pipeline call (default: all at once)."),
    height: int = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: int = typer.Option(None, help="Image width in pixels (default: the model's)."),
    compare: bool = typer.Option(False, help="Also write the unguided image from the same seed, and a side-by-side."),
    overwrite: bool = typer.Option(False, help="Replace images already in --out."),
    skip_existing: bool = typer.Option(False, help="Keep images already in --out; make only the missing ones."),
    refuse_inactive: bool = typer.Option(
        False, "--refuse-inactive", help="Refuse settings under which guidance would not apply (else warn)."
    ),
    strict: bool = typer.Option(False, "--strict", hidden=True, help="Deprecated spelling of --refuse-inactive."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    edit: list[str] = typer.Option(
        None, "--edit", help="SEGA edit: '+concept' adds it, '-concept' removes it. Repeatable."
    ),
    edit_scale: list[float] = typer.Option(
        None, "--edit-scale", help="Edit guidance scale: once for all edits, or once per edit."
    ),
    edit_threshold: list[float] = typer.Option(
        None, "--edit-threshold", help="Edit threshold percentile in [0, 1]: once for all, or per edit."
    ),
    edit_warmup: list[int] = typer.Option(None, "--edit-warmup", help="Edit warm-up steps: once for all, or per edit."),
    fair: str = typer.Option(None, "--fair", help="Fair Diffusion directions, e.g. 'male person,female person'."),
    fair_proportions: str = typer.Option(
        None, "--fair-proportions", help="Target proportions per direction, e.g. '0.5,0.5' (default: uniform)."
    ),
) -> None:
    """Generate images with safety, semantic (--edit) and fair (--fair) guidance.

    Writes PNGs and one JSON sidecar per image.
    """
    from ..guidance.mitigation import Mitigation
    from ..jobs.generate import generate as run

    if safety is None:  # SLD medium guards a plain prompt; a run that asks for other guidance gets only that
        safety = "off" if (edit or fair or mitigation) else "medium"
    existing = existing_policy(overwrite, skip_existing)
    count = check_int("--num-images", num_images, minimum=1, maximum=MAX_IMAGES)
    first = check_seed("--seed", seed, count)
    chosen = Mitigation.build(
        safety=safety,
        safety_concept=safety_concept,
        edits=edit,
        edit_scale=edit_scale,
        edit_threshold=edit_threshold,
        edit_warmup=edit_warmup,
        fair=parse_directions(fair) if fair is not None else None,
        fair_proportions=parse_proportions(fair_proportions),
        fair_seeds=[first + k for k in range(count)],
        methods=mitigation,
        negative_prompt=negative_prompt,
    )
    record = {"safety": chosen.sld_preset or "off"}
    if edit:
        record["edits"] = list(edit)
    if fair:
        record["fair"] = fair
    if mitigation:
        record["mitigations"] = [m.strip().lower() for m in mitigation]
    done = run(
        prompt,
        model=model,
        out=out,
        mitigation=chosen,
        seed=first,
        steps=steps,
        guidance_scale=guidance_scale,
        num_images=count,
        batch_size=batch_size,
        height=height,
        width=width,
        compare=compare,
        existing=existing,
        strict=refuse_inactive or deprecated_strict(strict),
        device=device,
        record=record,
        warn=lambda problem: typer.echo(f"warning: {problem}", err=True),
    )
    if done.written:
        typer.echo(f"wrote {len(done.written)} image(s) to {out}")
    else:
        typer.echo(f"all {count} image(s) already in {out}; nothing to do")
