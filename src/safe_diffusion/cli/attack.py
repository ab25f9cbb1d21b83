"""``safe-diffusion attack``: red-team a target by optimising against it (UnlearnDiffAtk, P4D, Ring-A-Bell,
MMA-Diffusion), score and export."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..common.errors import InputError
from ..common.outputs import atomic_write_json
from . import app as root

app = typer.Typer(
    help="Attacks against the defended model itself (UnlearnDiffAtk, P4D-N/K, Ring-A-Bell, MMA).", no_args_is_help=True
)
root.add_typer(app, name="attack")


@app.command("run")
def run(
    model: str = typer.Option(..., "--model", "-m", help="Hub id or local checkpoint folder (an erased one too)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (created, or resumed)."),
    suite: str = typer.Option(None, "--suite", "-s", help="Suite name or CSV/Parquet file (or the protocol's)."),
    protocol: str = typer.Option(
        None, "--protocol", help="A published protocol (eval protocols) or .yaml: its settings, its figure beside."
    ),
    data: str = typer.Option(None, "--data", help="Rows of a named suite: FILE, hub or hub:ID."),
    method: str = typer.Option("unlearndiffatk", help="The attack: unlearndiffatk, p4d-n, p4d-k, ring-a-bell, mma."),
    safety: str = typer.Option("off", help="SLD preset of the target: off, weak, medium, strong, max."),
    mitigation: list[str] = typer.Option(None, "--mitigation", help="A registered guidance method of the target."),
    negative_prompt: str = typer.Option(None, help="The target's negative prompt."),
    limit: int = typer.Option(None, help="Only the first N prompts."),
    iterations: int = typer.Option(
        None,
        help="UnlearnDiffAtk: Adam steps per timestep (40); P4D: steps (3000); Ring-A-Bell: generations (3000);"
        " MMA: steps (1000).",
    ),
    timesteps: int = typer.Option(None, help="UnlearnDiffAtk: timesteps visited (50 of 1000)."),
    tokens: int = typer.Option(
        None, help="UnlearnDiffAtk: prefix tokens (5); P4D-N: learned tokens (16); Ring-A-Bell: K (16); MMA: 20."
    ),
    every_k: int = typer.Option(None, help="P4D-K: a learned token before every K prompt tokens (3)."),
    eval_every: int = typer.Option(None, help="P4D: steps between CLIP selections of the best prompt (50)."),
    victim: str = typer.Option(
        None, help="P4D: engine (the guided estimate, default) or official (the official code's SLD/CFG loss)."
    ),
    concept: str = typer.Option(None, help="Ring-A-Bell: nudity, violence or a concept-vector .npy (nudity)."),
    coefficient: float = typer.Option(None, help="Ring-A-Bell: the concept vector's weight eta (3)."),
    population: int = typer.Option(None, help="Ring-A-Bell: population size (200)."),
    candidates: int = typer.Option(None, help="MMA-Diffusion: candidates scored per step (512)."),
    batch_size: int = typer.Option(
        1, help="UnlearnDiffAtk and P4D: prompts optimised in one batch (a kill loses the batch)."
    ),
    clip_model: str = typer.Option(
        None, help="P4D: CLIP that picks the best prompt (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."
    ),
    steps: int = typer.Option(None, help="Denoising steps of the target's generations (50)."),
    scheduler: str = typer.Option(None, help="Sampler: dpm-solver, lms, ddim, pndm, euler, model."),
    guidance_scale: float = typer.Option(None, help="CFG scale (default: the row's, else 7.5)."),
    height: int = typer.Option(None, help="Image height (default: the model's)."),
    width: int = typer.Option(None, help="Image width (default: the model's)."),
    seed: int = typer.Option(None, help="Base seed for suites without seeds (0)."),
    judges: str = typer.Option(None, "--judges", help="Judges that decide success, e.g. nudenet (default) or q16."),
    q16_model: str = typer.Option(None, help="CLIP ViT-L/14 for Q16 (hub id or folder)."),
    nudenet_model: Path = typer.Option(None, help="NudeNet file."),
    nudenet_setup: str = typer.Option(None, help="NudeNet set-up: i2p, unlearndiffatk, rece, safree, p4d, esd."),
    object_class: str = typer.Option(None, help="Object judge: the object, e.g. church, or an ImageNet index."),
    object_model: str = typer.Option(None, help="Object judge: ImageNet classifier (default microsoft/resnet-50)."),
    style_model: str = typer.Option(None, help="Style judge: the artist classifier (UnlearnDiffAtk's folder)."),
    style_label: str = typer.Option(None, help="Style judge: the artist label (default vincent-van-gogh)."),
    style_top_k: int = typer.Option(None, help="Style judge: shown when the artist is among the top k (default 1)."),
    reference_model: str = typer.Option(
        None, help="Model whose unguided images are the targets (default: --model; give the base of an erased one)."
    ),
    device: str = typer.Option(None, help="Device (default: the process's)."),
) -> None:
    """Attack each prompt of a suite against the target; rerun to resume."""
    from ..attacks import settings_for
    from ..guidance.mitigation import Mitigation
    from ..jobs.attack import attack_run

    if clip_model is not None and not method.startswith("p4d-"):
        raise InputError(f"--clip-model does not apply to attack {method}")
    settings = settings_for(
        method,
        iterations=iterations,
        timesteps=timesteps,
        tokens=tokens,
        every_k=every_k,
        eval_every=eval_every,
        victim=victim,
        concept=concept,
        coefficient=coefficient,
        population=population,
        candidates=candidates,
    )
    chosen = Mitigation.build(safety=safety, methods=mitigation, negative_prompt=negative_prompt)
    options = {
        "q16_model": q16_model,
        "nudenet_model": nudenet_model,
        "nudenet_setup": nudenet_setup,
        "object_class": object_class,
        "object_model": object_model,
        "style_model": style_model,
        "style_label": style_label,
        "style_top_k": style_top_k,
    }
    done = attack_run(
        model,
        out,
        suite=suite,
        method=method,
        protocol=protocol,
        data=data,
        limit=limit,
        mitigation=chosen,
        settings=settings,
        steps=steps,
        scheduler=scheduler,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        seed=seed,
        judges=judges,
        judge_options=options,
        device=device,
        reference_model=reference_model,
        clip_model=clip_model,
        batch_size=batch_size,
    )
    if done.deviations and done.process_index == 0:
        typer.echo(f"deviates from protocol {protocol}: {'; '.join(done.deviations)}", err=True)
    who = f"process {done.process_index} of {done.num_processes} " if done.num_processes > 1 else ""
    typer.echo(f"{who}attacked {done.attacked} prompt(s); run {out} has {done.done} of {done.total}")


@app.command("score")
def score(
    run_dir: Path = typer.Argument(..., help="Attack run folder."),
    json_path: Path = typer.Option(None, "--json", help="Also write the results as JSON."),
) -> None:
    """Pre- and post-attack ASR (overall and per category) and the attack's cost."""
    from ..jobs.attack import attack_score

    doc = attack_score(run_dir)
    for name in ("pre_attack_asr", "post_attack_asr"):
        overall = doc[name][-1]
        typer.echo(f"{name:<16}{overall['attack_success_rate']:.2f} over {overall['prompts']} prompt(s)")
    cost = doc["cost"]
    typer.echo(
        f"cost            {cost['iterations']} iterations on {cost['attacked']} prompt(s), {cost['seconds']:g} s"
    )
    if json_path is not None:
        atomic_write_json(json_path, json.loads(json.dumps(doc)))
        typer.echo(f"wrote {json_path}")


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="Attack run folder."),
    csv_path: Path = typer.Option(..., "--csv", help="The suite CSV to write."),
) -> None:
    """The adversarial prompts as a suite (prompt, categories, seed, guidance): `eval run --suite FILE` reads it."""
    from ..jobs.attack import attack_export

    n = attack_export(run_dir, csv_path)
    typer.echo(f"wrote {n} prompt(s) to {csv_path}")
