"""The fairness job: attribute proportions per prompt, before and after Fair Diffusion (``safe-diffusion fairness``).

For every prompt (e.g. an occupation in a template), N images are generated from the same seeds
without and with :class:`~safe_diffusion.guidance.FairGuidance`; a zero-shot CLIP classifier
("a photo of a {direction}") labels each image, and the proportions are written as a CSV table, a bar
plot and a JSON record of the whole run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common.devices import check_device
from ..common.errors import InputError
from ..common.loading import check_model_reference, load_pipeline
from ..common.outputs import atomic_write_bytes, atomic_write_json, library_versions, output_dir, save_image_atomic
from ..common.progress import ProgressLog
from ..common.validation import check_float, check_image_side, check_int, check_seed, read_lines
from ..guidance import describe_terms
from ..guidance.fair import largest_remainder
from ..guidance.mitigation import fair_terms
from ..judges.attributes import DEFAULT_MODEL as DEFAULT_CLIP
from ..judges.attributes import ZeroShotClassifier, check_clip_reference
from ..reports.fairness import plot_proportions
from . import check_terms_act
from .compare import generate_guided_images
from .generate import MAX_GUIDANCE_SCALE, MAX_IMAGES, MAX_STEPS, check_guidance

DEFAULT_TEMPLATE = "A photo of the face of a {}"


def read_prompts(path: str | Path, template: str) -> list[str]:
    """One subject per line (blank lines and # comments skipped), put into `template` at ``{}``."""
    if "{}" not in template:
        raise InputError(f"template {template!r} must contain {{}} where the subject goes")
    subjects = read_lines(path, "prompts file", empty="has no prompts")
    return [template.replace("{}", s, 1) for s in subjects]


def check_earlier_run(out: Path, settings: dict) -> None:
    """Refuse, before any work, a folder that holds files of another run: a fairness run made with other
    settings (rerunning the same settings makes the same files again), or files that are not a fairness run's."""
    record = out / "fairness.json"
    if record.is_file():
        try:
            earlier = json.loads(record.read_text())
        except (OSError, ValueError):
            earlier = {}
        changed = sorted(k for k, v in settings.items() if k in earlier and earlier[k] != v)
        missing = sorted(k for k in settings if k not in earlier and k not in ("height", "width", "save_images"))
        if changed or missing:
            what = ", ".join(changed or missing)
            raise InputError(
                f"{str(out)!r} holds a fairness run with other settings ({what}); use a new --out to keep both"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise InputError(f"--out {str(out)!r} is not empty and holds no fairness run; use a new or empty folder")


@dataclass
class Fairness:
    """What :func:`fairness` measured: one row per (prompt, direction), as fairness.csv holds them."""

    out: Path
    prompts: list[str]
    rows: list[dict]

    @property
    def moved(self) -> int:
        """How many proportions moved towards their target."""
        return sum(
            abs(r["after_proportion"] - r["target"]) < abs(r["before_proportion"] - r["target"]) for r in self.rows
        )


def fairness(
    *,
    model: str,
    prompts: str | Path,
    directions: Sequence[str],
    out: str | Path,
    proportions: Sequence[float] | None = None,
    images_per_prompt: int = 8,
    clip_model: str = DEFAULT_CLIP,
    template: str = DEFAULT_TEMPLATE,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    save_images: bool = True,
    strict: bool = False,
    device: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> Fairness:
    """Measure attribute proportions per prompt of the file `prompts` with and without Fair Diffusion along
    `directions` (target `proportions`, default uniform); write fairness.csv, fairness.png, fairness.json
    and (with `save_images`) every image to the folder `out`. Every bad value is one InputError line."""
    n = check_int("--images-per-prompt", images_per_prompt, minimum=1, maximum=MAX_IMAGES)
    steps = check_int("--steps", steps, minimum=1, maximum=MAX_STEPS)
    seed = check_seed("--seed", seed, n)
    guidance_scale = check_float("--guidance-scale", guidance_scale, minimum=0.0, maximum=MAX_GUIDANCE_SCALE)
    height = check_image_side("--height", height)
    width = check_image_side("--width", width)
    check_device("--device", device)
    seeds = [seed + k for k in range(n)]
    (term,) = fair_terms(list(directions), proportions, seeds)
    prompt_list = read_prompts(prompts, template)
    check_model_reference(model)
    check_clip_reference(clip_model)
    check_guidance([term], steps=steps, guidance_scale=guidance_scale, strict=strict, warn=warn)
    directions, proportions = term.directions, term.proportions
    settings = {
        "model": model,
        "clip_model": clip_model,
        "prompts": prompt_list,
        "directions": list(directions),
        "proportions": list(proportions),
        "images_per_prompt": n,
        "seeds": list(seeds),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "save_images": save_images,
    }
    check_earlier_run(Path(out), settings)
    with output_dir(Path(out)) as folder:
        classify = ZeroShotClassifier(clip_model, directions, "cpu")
        pipe = load_pipeline(model, device=device)
        check_terms_act(pipe, [term], guidance_scale, None, "fairness")
        pipe.set_progress_bar_config(disable=True)
        classify.model.to(pipe.device)
        classify.device = pipe.device
        quotas = largest_remainder(proportions, n)
        rows, labels = [], []
        progress = ProgressLog("fairness", len(prompt_list), unit="prompts")
        for pi, prompt in enumerate(prompt_list):
            counts = {}
            made = generate_guided_images(
                pipe,
                prompt,
                seeds,
                [term],
                kinds=("unguided", "guided"),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
            )
            for kind, made_kind in (("before", "unguided"), ("after", "guided")):
                images = made.images[made_kind]
                predicted = classify(images)
                counts[kind] = [predicted.count(i) for i in range(len(directions))]
                for k, (s, image, label) in enumerate(zip(seeds, images, predicted)):
                    name = f"{pi:03d}-{kind}-seed{s}.png"
                    if save_images:
                        save_image_atomic(image, folder.file(name))
                    labels.append(
                        {
                            "prompt": prompt,
                            "kind": kind,
                            "seed": s,
                            "image": name if save_images else None,
                            "predicted": directions[label],
                            "assigned": made.fair_direction(k) if kind == "after" else None,
                        }
                    )
            for i, d in enumerate(directions):
                rows.append(
                    {
                        "prompt": prompt,
                        "direction": d,
                        "target": proportions[i],
                        "assigned_count": quotas[i],
                        "before_count": counts["before"][i],
                        "before_proportion": counts["before"][i] / n,
                        "after_count": counts["after"][i],
                        "after_proportion": counts["after"][i] / n,
                        "images": n,
                    }
                )
            progress.update(1)
        progress.close()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(folder.file("fairness.csv"), buf.getvalue().encode())
        plot_proportions(rows, directions, folder.file("fairness.png"))
        atomic_write_json(
            folder.file("fairness.json"),
            {
                **settings,
                "classifier_texts": classify.texts,
                "guidance": describe_terms([term]),
                "images": labels,
                "versions": library_versions(),
            },
        )
    return Fairness(out=Path(out), prompts=prompt_list, rows=rows)
