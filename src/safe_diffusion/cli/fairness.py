"""``safe-diffusion fairness``: attribute proportions per prompt, before and after Fair Diffusion.

For every prompt (e.g. an occupation in a template), N images are generated from the same seeds
without and with :class:`~safe_diffusion.guidance.FairGuidance`; a zero-shot CLIP classifier
("a photo of a {direction}") labels each image, and the proportions are written as a CSV table and
a bar plot.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import typer

from ..common.errors import InputError
from ..judges.attributes import DEFAULT_MODEL as DEFAULT_CLIP
from ..judges.attributes import ZeroShotClassifier, check_clip_reference
from ..reports.fairness import plot_proportions
from . import app
from .generate import (
    MAX_GUIDANCE_SCALE,
    MAX_IMAGES,
    check_guidance,
    check_size,
    parse_directions,
    parse_proportions,
)

DEFAULT_TEMPLATE = "A photo of the face of a {}"


def read_prompts(path: Path, template: str) -> list[str]:
    """One subject per line (blank lines and # comments skipped), put into `template` at ``{}``."""
    if "{}" not in template:
        raise InputError(f"template {template!r} must contain {{}} where the subject goes")
    from ..common.validation import read_lines

    subjects = read_lines(path, "prompts file", empty="has no prompts")
    return [template.replace("{}", s, 1) for s in subjects]


@app.command()
def fairness(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local diffusers checkpoint folder."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file, one subject (e.g. an occupation) per line."),
    directions: str = typer.Option(..., "--directions", help="Comma-separated attribute directions, e.g. 'male person,female person'."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the table, the plot and the images."),
    proportions: str = typer.Option(None, help="Target proportions per direction, e.g. '0.5,0.5' (default: uniform)."),
    images_per_prompt: int = typer.Option(8, "--images-per-prompt", help="Images per prompt, with and without guidance."),
    clip_model: str = typer.Option(DEFAULT_CLIP, "--clip-model", help="transformers CLIP model for the zero-shot classifier."),
    template: str = typer.Option(DEFAULT_TEMPLATE, help="Prompt template; {} is replaced by each line of --prompts."),
    steps: int = typer.Option(50, help="Denoising steps."),
    seed: int = typer.Option(0, help="Seed of each prompt's first image; image k uses seed + k."),
    guidance_scale: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    height: int = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: int = typer.Option(None, help="Image width in pixels (default: the model's)."),
    save_images: bool = typer.Option(True, help="Also write every image as PNG."),
    strict: bool = typer.Option(False, help="Refuse settings under which guidance would not apply (else warn)."),
    device: str = typer.Option(None, help="Device (default: cuda if available, else cpu)."),
) -> None:
    """Measure attribute proportions per prompt with and without Fair Diffusion; write fairness.csv and fairness.png."""
    dirs = parse_directions(directions)
    props = parse_proportions(proportions, len(dirs))
    from ..common.validation import check_device, check_float, check_int, check_seed
    from ..guidance import FairGuidance

    images_per_prompt = check_int("--images-per-prompt", images_per_prompt, minimum=1, maximum=MAX_IMAGES)
    steps = check_int("--steps", steps, minimum=1, maximum=1000)
    seed = check_seed("--seed", seed, images_per_prompt)
    guidance_scale = check_float("--guidance-scale", guidance_scale, minimum=0.0, maximum=MAX_GUIDANCE_SCALE)
    check_size("--height", height)
    check_size("--width", width)
    check_device("--device", device)
    prompt_list = read_prompts(prompts, template)
    from ..common.loading import check_model_reference

    check_model_reference(model)
    check_clip_reference(clip_model)
    check_guidance([FairGuidance(dirs, props)], steps=steps, guidance_scale=guidance_scale, strict=strict)
    rows = measure(
        prompt_list, model=model, directions=dirs, proportions=props, out=out, n=images_per_prompt,
        clip_model=clip_model, steps=steps, seed=seed, guidance_scale=guidance_scale, height=height, width=width,
        save_images=save_images, device=device,
    )
    moved = sum(abs(r["after_proportion"] - r["target"]) < abs(r["before_proportion"] - r["target"]) for r in rows)
    typer.echo(f"wrote fairness.csv and fairness.png for {len(prompt_list)} prompt(s) to {out} "
               f"({moved} of {len(rows)} proportions moved towards their target)")


def measure(prompt_list, *, model, directions, proportions, out, n, clip_model, steps, seed, guidance_scale,
            height, width, save_images, device) -> list[dict]:
    """Generate, classify and write the table, plot and run record; returns the table's rows."""
    from ..common.loading import load_pipeline
    from ..common.outputs import atomic_write_bytes, atomic_write_json, library_versions, output_dir, save_image_atomic
    from ..common.progress import ProgressLog
    from ..guidance import FairGuidance, describe_terms
    from ..guidance.fair import largest_remainder
    from ..jobs.compare import generate_guided_images

    with output_dir(out) as folder:
        classify = ZeroShotClassifier(clip_model, directions, "cpu")
        pipe = load_pipeline(model, device=device)
        pipe.set_progress_bar_config(disable=True)
        classify.model.to(pipe.device)
        classify.device = pipe.device
        seeds = [seed + k for k in range(n)]
        term = FairGuidance(directions, proportions, run_length=n).for_seeds(seeds)
        quotas = largest_remainder(proportions, n)
        rows, labels = [], []
        progress = ProgressLog("fairness", len(prompt_list), unit="prompts")
        for pi, prompt in enumerate(prompt_list):
            counts = {}
            made = generate_guided_images(pipe, prompt, seeds, [term], kinds=("unguided", "guided"),
                                          num_inference_steps=steps, guidance_scale=guidance_scale,
                                          height=height, width=width)
            for kind, made_kind in (("before", "unguided"), ("after", "guided")):
                images = made.images[made_kind]
                predicted = classify(images)
                counts[kind] = [predicted.count(i) for i in range(len(directions))]
                for k, (s, image, label) in enumerate(zip(seeds, images, predicted)):
                    name = f"{pi:03d}-{kind}-seed{s}.png"
                    if save_images:
                        save_image_atomic(image, folder.file(name))
                    labels.append({"prompt": prompt, "kind": kind, "seed": s, "image": name if save_images else None,
                                   "predicted": directions[label],
                                   "assigned": made.fair_direction(k) if kind == "after" else None})
            for i, d in enumerate(directions):
                rows.append({
                    "prompt": prompt, "direction": d, "target": proportions[i], "assigned_count": quotas[i],
                    "before_count": counts["before"][i], "before_proportion": counts["before"][i] / n,
                    "after_count": counts["after"][i], "after_proportion": counts["after"][i] / n, "images": n,
                })
            progress.update(1)
        progress.close()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(folder.file("fairness.csv"), buf.getvalue().encode())
        plot_proportions(rows, directions, folder.file("fairness.png"))
        atomic_write_json(folder.file("fairness.json"), {
            "model": model, "clip_model": clip_model, "classifier_texts": classify.texts, "prompts": prompt_list,
            "directions": directions, "proportions": proportions, "images_per_prompt": n, "seeds": seeds,
            "steps": steps, "guidance_scale": guidance_scale, "guidance": describe_terms([term]),
            "images": labels, "versions": library_versions(),
        })
    return rows
