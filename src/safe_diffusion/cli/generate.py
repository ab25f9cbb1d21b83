"""``safe-diffusion generate``: images with (and, with --compare, without) guidance, each with a JSON sidecar."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import InputError
from . import app

SAFETY_CHOICES = ("off", "weak", "medium", "strong", "max")


def parse_safety(value: str) -> str:
    """Normalise a --safety value, or a one-line error listing the valid ones."""
    key = value.strip().lower()
    if key not in SAFETY_CHOICES:
        raise InputError(f"unknown safety preset {value!r}; choose one of: {', '.join(SAFETY_CHOICES)}")
    return key


def check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value}")


def check_size(name: str, value: int | None) -> None:
    if value is None:
        return
    if value <= 0 or value % 8:
        raise InputError(f"{name} must be a positive multiple of 8, got {value}")


def safety_terms(safety: str, concept: str | None = None) -> list:
    """The guidance terms a --safety value stands for."""
    from ..guidance import DEFAULT_SAFETY_CONCEPT, SafetyGuidance

    if safety == "off":
        return []
    return [SafetyGuidance.from_preset(safety, concept=concept or DEFAULT_SAFETY_CONCEPT)]


def _per_edit(name: str, values: list | None, n: int) -> list | None:
    """One value for all edits, one per edit, or None (the default); anything else is a one-line error."""
    values = list(values or [])
    if not values:
        return None
    if n == 0:
        raise InputError(f"{name} given without any --edit")
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InputError(f"{len(values)} {name} values for {n} edit(s); give one for all edits or one per edit")
    return values


def edit_terms(
    edits: list[str] | None,
    scales: list[float] | None = None,
    thresholds: list[float] | None = None,
    warmups: list[int] | None = None,
) -> list:
    """The SEGA term for ``--edit +concept`` (add) / ``--edit -concept`` (remove) and their per-edit options."""
    from ..guidance import SemanticGuidance

    edits = list(edits or [])
    concepts, reverse = [], []
    for edit in edits:
        text = edit.strip()
        if len(text) < 2 or text[0] not in "+-" or not text[1:].strip():
            raise InputError(f"edit {edit!r} must start with + (add the concept) or - (remove it), e.g. '+sunglasses'")
        concepts.append(text[1:].strip())
        reverse.append(text[0] == "-")
    n = len(concepts)
    scales = _per_edit("--edit-scale", scales, n)
    thresholds = _per_edit("--edit-threshold", thresholds, n)
    warmups = _per_edit("--edit-warmup", warmups, n)
    if not n:
        return []
    for t in thresholds or []:
        if not 0.0 <= t <= 1.0:
            raise InputError(f"--edit-threshold must be a percentile in [0, 1], got {t}")
    for w in warmups or []:
        if w < 0:
            raise InputError(f"--edit-warmup must be non-negative, got {w}")
    kwargs = {"reverse": reverse}
    if scales is not None:
        kwargs["scale"] = scales
    if thresholds is not None:
        kwargs["threshold"] = thresholds
    if warmups is not None:
        kwargs["warmup_steps"] = warmups
    return [SemanticGuidance(concepts, **kwargs)]


def parse_directions(value: str) -> list[str]:
    """``"male person,female person"`` → two directions; at least two, distinct, non-empty."""
    directions = [d.strip() for d in value.split(",")]
    if len(directions) < 2 or any(not d for d in directions):
        raise InputError(f"directions {value!r} must be two or more comma-separated texts, e.g. 'male person,female person'")
    if len(set(directions)) != len(directions):
        raise InputError(f"directions {value!r} repeat a direction")
    return directions


def parse_proportions(value: str | None, n: int) -> list[float]:
    """``"0.3,0.7"`` → target proportions, one per direction, summing to 1 (default: uniform)."""
    from ..guidance.fair import check_proportions

    if value is None:
        return [1.0 / n] * n
    try:
        props = [float(p) for p in value.split(",")]
    except ValueError:
        raise InputError(f"proportions {value!r} must be comma-separated numbers, e.g. '0.5,0.5'") from None
    try:
        return check_proportions(props, n)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def fair_term(directions: str | None, proportions: str | None, seeds: list[int]) -> list:
    """The Fair Diffusion term for ``--fair``, bound to the images' seeds; the run is the images generated."""
    from ..guidance import FairGuidance

    if directions is None:
        if proportions is not None:
            raise InputError("--fair-proportions given without --fair")
        return []
    dirs = parse_directions(directions)
    props = parse_proportions(proportions, len(dirs))
    return [FairGuidance(dirs, props, run_length=len(seeds)).for_seeds(seeds)]


def describe_terms(terms: list) -> list[dict]:
    """JSON-ready settings of guidance terms, for sidecars and run records."""
    import dataclasses

    import torch

    described = []
    for term in terms:
        fields = {}
        for f in dataclasses.fields(term):
            if not f.init:
                continue
            value = getattr(term, f.name)
            if isinstance(value, torch.Tensor) or (
                isinstance(value, list) and any(isinstance(v, torch.Tensor) for v in value)
            ):
                value = "<embeddings>"
            fields[f.name] = value
        described.append({"type": type(term).__name__, **fields})
    return described


def side_by_side(left, right):
    """Two PIL images next to each other, unguided on the left."""
    from PIL import Image

    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to generate."),
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs and their JSON sidecars."),
    safety: str = typer.Option("medium", help="Safe Latent Diffusion preset: off, weak, medium, strong or max."),
    safety_concept: str = typer.Option(None, help="Text SLD steers away from (default: the paper's concept)."),
    negative_prompt: str = typer.Option(None, help="Negative prompt."),
    seed: int = typer.Option(0, help="Seed of the first image; image k uses seed + k."),
    steps: int = typer.Option(50, help="Denoising steps."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale (guidance needs > 1)."),
    num_images: int = typer.Option(1, help="Images to generate."),
    height: int = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: int = typer.Option(None, help="Image width in pixels (default: the model's)."),
    compare: bool = typer.Option(False, help="Also write the unguided image from the same seed, and a side-by-side."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    edit: list[str] = typer.Option(None, "--edit", help="SEGA edit: '+concept' adds it, '-concept' removes it. Repeatable."),
    edit_scale: list[float] = typer.Option(None, "--edit-scale", help="Edit guidance scale: once for all edits, or once per edit."),
    edit_threshold: list[float] = typer.Option(None, "--edit-threshold", help="Edit threshold percentile in [0, 1]: once for all, or per edit."),
    edit_warmup: list[int] = typer.Option(None, "--edit-warmup", help="Edit warm-up steps: once for all, or per edit."),
    fair: str = typer.Option(None, "--fair", help="Fair Diffusion directions, e.g. 'male person,female person'."),
    fair_proportions: str = typer.Option(None, "--fair-proportions", help="Target proportions per direction, e.g. '0.5,0.5' (default: uniform)."),
) -> None:
    """Generate images with safety, semantic (--edit) and fair (--fair) guidance; write PNGs and one JSON sidecar per image."""
    safety = parse_safety(safety)
    check_positive("--steps", steps)
    check_positive("--num-images", num_images)
    check_size("--height", height)
    check_size("--width", width)
    if not prompt.strip():
        raise InputError("the prompt is empty")
    from ..loading import check_model_reference

    check_model_reference(model)
    terms = safety_terms(safety, safety_concept)
    terms += edit_terms(edit, edit_scale, edit_threshold, edit_warmup)
    terms += fair_term(fair, fair_proportions, [seed + k for k in range(num_images)])
    settings = {"safety": safety}
    if edit:
        settings["edits"] = list(edit)
    if fair:
        settings["fair"] = fair
    generate_images(
        prompt,
        model=model,
        out=out,
        terms=terms,
        settings=settings,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        num_images=num_images,
        height=height,
        width=width,
        compare=compare,
        device=device,
    )


def generate_images(
    prompt: str,
    *,
    model: str,
    out: Path,
    terms: list,
    settings: dict,
    negative_prompt: str | None,
    seed: int,
    steps: int,
    guidance_scale: float,
    num_images: int,
    height: int | None,
    width: int | None,
    compare: bool,
    device: str | None,
) -> list[Path]:
    """Load the model, generate guided (and, with `compare`, unguided) images, write them; returns the PNG paths."""
    import torch

    from ..loading import load_pipeline
    from ..outputs import atomic_write_json, library_versions, output_dir, save_image_atomic
    from ..pipelines import guide

    with output_dir(out) as folder:
        pipe = load_pipeline(model, device=device)
        seeds = [seed + k for k in range(num_images)]

        def run(guided: bool):
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            call = dict(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images,
                generator=generators,
                height=height,
                width=width,
            )
            with guide(pipe, *(terms if guided else [])):
                return pipe(**call).images

        guided_images = run(True)
        unguided_images = run(False) if compare else None

        common = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "model": model,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": guided_images[0].height,
            "width": guided_images[0].width,
            "scheduler": type(pipe.scheduler).__name__,
            "pipeline": type(pipe).__name__,
            **settings,
            "versions": library_versions(),
        }
        written = []
        for k, s in enumerate(seeds):
            stem = f"{k:04d}-seed{s}"
            images = {"guided": guided_images[k]}
            if unguided_images is not None:
                images["unguided"] = unguided_images[k]
            for kind, image in images.items():
                name = stem if kind == "guided" else f"{stem}-unguided"
                png = folder.file(f"{name}.png")
                save_image_atomic(image, png)
                applied = terms if kind == "guided" else []
                sidecar = {**common, "seed": s, "image_index": k, "image": png.name, "guidance": describe_terms(applied)}
                for term in applied:
                    if hasattr(term, "assignments"):  # Fair Diffusion: the direction this image was given
                        sidecar["fair_direction"] = term.directions[term.assignments()[k]]
                atomic_write_json(folder.file(f"{name}.json"), sidecar)
                written.append(png)
            if unguided_images is not None:
                png = folder.file(f"{stem}-side-by-side.png")
                save_image_atomic(side_by_side(unguided_images[k], guided_images[k]), png)
                written.append(png)
    typer.echo(f"wrote {len(written)} image(s) to {out}")
    return written
