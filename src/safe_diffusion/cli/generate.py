"""``safe-diffusion generate``: images with (and, with --compare, without) guidance, each with a JSON sidecar."""

from __future__ import annotations

from pathlib import Path

import typer

from ..common.errors import InputError
from . import app

#: More images than this in one invocation is almost certainly a typo; split larger jobs (or use `eval run`).
MAX_IMAGES = 10_000
#: Classifier-free guidance scales beyond this only saturate the image.
MAX_GUIDANCE_SCALE = 100.0


def parse_safety(value: str) -> str:
    """Normalise a --safety value, or a one-line error listing the valid ones."""
    from ..common.validation import check_safety

    return check_safety("--safety", value)


def check_positive(name: str, value: int) -> None:
    from ..common.validation import check_int

    check_int(name, value, minimum=1)


def check_size(name: str, value: int | None) -> None:
    from ..common.validation import check_image_side

    check_image_side(name, value)


def check_guidance(terms: list, *, steps: int, guidance_scale: float, strict: bool) -> None:
    """Refuse settings under which the terms cannot act at all; warn (with --strict, refuse) when a
    term's warm-up is never left."""
    from ..common.validation import cfg_problem, warmup_problems

    problem = cfg_problem(terms, guidance_scale)
    if problem:  # a "guided" image without guidance is never what was asked for
        raise InputError(problem)
    for problem in warmup_problems(terms, steps):
        if strict:
            raise InputError(problem)
        typer.echo(f"warning: {problem}", err=True)


def safety_terms(safety: str, concept: str | None = None) -> list:
    """The guidance terms a --safety value stands for."""
    from ..guidance import safety_terms as terms_of

    return terms_of(safety, concept)


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
    from ..common.validation import check_float, parse_signed_concept
    from ..guidance import SemanticGuidance

    edits = list(edits or [])
    concepts, reverse = [], []
    for edit in edits:
        concept, remove = parse_signed_concept(edit, f"--edit {edit!r}")
        concepts.append(concept)
        reverse.append(remove)
    n = len(concepts)
    scales = _per_edit("--edit-scale", scales, n)
    thresholds = _per_edit("--edit-threshold", thresholds, n)
    warmups = _per_edit("--edit-warmup", warmups, n)
    if not n:
        return []
    scales = None if scales is None else [check_float("--edit-scale", v, minimum=0.0, maximum=1e4) for v in scales]
    thresholds = None if thresholds is None else [
        check_float("--edit-threshold", t, minimum=0.0, maximum=1.0) for t in thresholds
    ]
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


def side_by_side(left, right, guided: str = "guided"):
    """Two PIL images with a gap between them, captioned "unguided" (left) and `guided` (right)."""
    from ..reports.images import side_by_side as captioned

    return captioned(left, right, ("unguided", guided))


def guided_caption(settings: dict, terms: list, steps: int, guidance_scale: float) -> str:
    """The side-by-side's caption of the guided image: "guided: SLD strong + SEGA +sunglasses" (and
    "— inactive: …" when its guidance never acts in `steps` steps)."""
    from ..guidance.activity import activity_label

    parts = [f"SLD {settings['safety']}"] if settings.get("safety", "off") != "off" else []
    parts += [f"SEGA {' '.join(settings['edits'])}"] if settings.get("edits") else []
    parts += [f"Fair Diffusion ({settings['fair']})"] if settings.get("fair") else []
    return activity_label(f"guided: {' + '.join(parts) or 'no guidance'}", terms, steps, guidance_scale)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to generate."),
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs and their JSON sidecars."),
    safety: str = typer.Option("medium", help="SLD preset: off, weak, medium, strong or max."),
    safety_concept: str = typer.Option(None, help="Text SLD steers away from (default: the paper's)."),
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
    strict: bool = typer.Option(False, help="Refuse settings under which guidance would not apply (else warn)."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
    edit: list[str] = typer.Option(None, "--edit", help="SEGA edit: '+concept' adds it, '-concept' removes it. Repeatable."),
    edit_scale: list[float] = typer.Option(None, "--edit-scale", help="Edit guidance scale: once for all edits, or once per edit."),
    edit_threshold: list[float] = typer.Option(None, "--edit-threshold", help="Edit threshold percentile in [0, 1]: once for all, or per edit."),
    edit_warmup: list[int] = typer.Option(None, "--edit-warmup", help="Edit warm-up steps: once for all, or per edit."),
    fair: str = typer.Option(None, "--fair", help="Fair Diffusion directions, e.g. 'male person,female person'."),
    fair_proportions: str = typer.Option(None, "--fair-proportions", help="Target proportions per direction, e.g. '0.5,0.5' (default: uniform)."),
) -> None:
    """Generate images with safety, semantic (--edit) and fair (--fair) guidance; write PNGs and one JSON sidecar per image."""
    from ..common.validation import check_device, check_float, check_int, check_seed, check_text

    prompt = check_text("the prompt", prompt)
    if negative_prompt is not None:
        negative_prompt = check_text("--negative-prompt", negative_prompt, allow_empty=True)
    if safety_concept is not None:
        safety_concept = check_text("--safety-concept", safety_concept)
    safety = parse_safety(safety)
    steps = check_int("--steps", steps, minimum=1, maximum=1000)
    num_images = check_int("--num-images", num_images, minimum=1, maximum=MAX_IMAGES)
    if batch_size is not None:
        batch_size = check_int("--batch-size", batch_size, minimum=1)
    seed = check_seed("--seed", seed, num_images)
    guidance_scale = check_float("--guidance-scale", guidance_scale, minimum=0.0, maximum=MAX_GUIDANCE_SCALE)
    check_size("--height", height)
    check_size("--width", width)
    if overwrite and skip_existing:
        raise InputError("--overwrite and --skip-existing exclude each other; choose one")
    check_device("--device", device)
    from ..common.loading import check_model_reference

    check_model_reference(model)
    terms = safety_terms(safety, safety_concept)
    terms += edit_terms(edit, edit_scale, edit_threshold, edit_warmup)
    terms += fair_term(fair, fair_proportions, [seed + k for k in range(num_images)])
    check_guidance(terms, steps=steps, guidance_scale=guidance_scale, strict=strict)
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
        batch_size=batch_size,
        existing="overwrite" if overwrite else "skip" if skip_existing else "refuse",
    )


def image_files(stem: str, compare: bool) -> list[str]:
    """The files `generate` writes for one image."""
    names = [f"{stem}.png", f"{stem}.json"]
    if compare:
        names += [f"{stem}-unguided.png", f"{stem}-unguided.json", f"{stem}-side-by-side.png"]
    return names


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
    batch_size: int | None = None,
    existing: str = "refuse",
) -> list[Path]:
    """Load the model, generate guided (and, with `compare`, unguided) images, write them; returns the PNG paths.

    `existing` says what to do with images already in `out`: ``refuse`` (a one-line error before
    anything loads), ``overwrite``, or ``skip`` (generate only the missing ones; each image depends on
    its seed alone, so the result is that of one uninterrupted run — to the rounding of batched
    arithmetic, as the missing images are batched without the others).
    """
    from ..common.loading import load_pipeline
    from ..common.outputs import atomic_write_json, output_dir, save_image_atomic
    from ..common.progress import ProgressLog
    from ..jobs.compare import generate_guided_images, pipeline_record

    stems = {seed + k: f"{k:04d}-seed{seed + k}" for k in range(num_images)}
    present = [n for st in stems.values() for n in image_files(st, compare) if (Path(out) / n).exists()]
    if present and existing == "refuse":
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        raise InputError(
            f"{Path(out) / present[0]}{more} already exist(s); use --overwrite to replace or --skip-existing to keep them"
        )
    if existing == "skip":
        todo = [s for s, st in stems.items() if not all((Path(out) / n).exists() for n in image_files(st, compare))]
    else:
        todo = list(stems)
    if not todo:
        typer.echo(f"all {num_images} image(s) already in {out}; nothing to do")
        return []
    batch = batch_size or len(todo)

    with output_dir(out) as folder:
        pipe = load_pipeline(model, device=device)
        written = []
        progress = ProgressLog("generate", total=len(todo), unit="images")
        for start in range(0, len(todo), batch):
            seeds = todo[start : start + batch]
            made = generate_guided_images(
                pipe, prompt, seeds, terms, kinds=("guided", "unguided") if compare else ("guided",),
                negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                height=height, width=width,
            )
            guided_images, unguided_images = made.guided, made.unguided
            common = {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "model": model,
                "steps": steps,
                "guidance_scale": guidance_scale,
                **pipeline_record(pipe, guided_images[0]),
                **settings,
            }
            for i, s in enumerate(seeds):
                stem = stems[s]
                for kind, kind_images in made.images.items():
                    name = stem if kind == "guided" else f"{stem}-unguided"
                    png = folder.file(f"{name}.png")
                    save_image_atomic(kind_images[i], png)
                    sidecar = {**common, "image_index": s - seed, "image": png.name, **made.record(i, kind)}
                    atomic_write_json(folder.file(f"{name}.json"), sidecar)
                    written.append(png)
                if unguided_images is not None:
                    png = folder.file(f"{stem}-side-by-side.png")
                    caption = guided_caption(settings, terms, steps, guidance_scale)
                    save_image_atomic(side_by_side(unguided_images[i], guided_images[i], caption), png)
                    written.append(png)
            progress.update(len(seeds))
        progress.close()
    typer.echo(f"wrote {len(written)} image(s) to {out}")
    return written
