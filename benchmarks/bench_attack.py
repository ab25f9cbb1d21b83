"""The denoiser attacks' iterations per second (UnlearnDiffAtk, P4D): the official loop's structure (one prompt at
a time, batch 1) against prompts optimised in one batch, side by side in one run, on a random-weight checkpoint.

One "prompt-iteration" is one optimiser step of one prompt: for UnlearnDiffAtk a noise draw, a token draw, the
text encoder and the victim's denoiser forward and backward (``TextGrad``); for P4D a noise and timestep draw,
the projection, the text encoder, the unconstrained model's forward and the victim's forward and backward
(``optimize``, without its CLIP selection every 50 steps, which generates images and is the same either way).
The official loops do them one prompt at a time; here a batch of B prompts shares each text-encoder and
denoiser call (each prompt keeps its own variables, draws, timestep and loss; tests/test_attacks.py and
tests/test_attack_methods.py check that a batch equals each prompt alone). The ratio is what the batch buys at
an equal number of prompts; on these tiny models per-call overhead dominates, so the ratio is an upper bound
for CPUs and the absolute figures mean nothing: measure them on a GPU with a real checkpoint
(``--checkpoint FOLDER``) or SD 1.5's architecture with random weights (``--size real``, built in memory on the
device, float32 as the official code; ``--shrink`` runs that path on shrunken models, for testing).

    PYTHONPATH=src python benchmarks/bench_attack.py [--method unlearndiffatk|p4d] [--family sd15|sdxl|sd3]
        [--size tiny|small|real] [--batch 1,4,8] [--iterations 10]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch


def _attack(method: str, pipe, chunk: list[str], x0, gens, iterations: int):
    """The attack of `chunk`, and one optimiser step of it."""
    if method == "p4d":
        from safe_diffusion.attacks.p4d import P4D, Settings, unconstrained_of
        from safe_diffusion.attacks.unlearndiffatk import victim_of

        attack = P4D(pipe, victim_of(pipe), unconstrained_of(pipe, chunk), chunk, x0, Settings(), generator=gens)
        return attack.step
    from safe_diffusion.attacks.unlearndiffatk import Settings, UnlearnDiffAtk, victim_of

    settings = Settings(tokens=5, iterations=iterations, timesteps=1)
    attack = UnlearnDiffAtk(pipe, victim_of(pipe), chunk, x0, settings, generator=gens)
    return lambda: attack.step(attack.timesteps[0])


def _rate(method: str, pipe, prompts: list[str], batch: int, iterations: int) -> float:
    """Prompt-iterations per second for `prompts`, optimised `batch` at a time."""
    steps = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        chunk = prompts[first : first + batch]
        x0 = torch.randn(
            len(chunk), pipe.latent_channels, *pipe.latent_hw, generator=torch.Generator().manual_seed(first)
        )
        gens = [torch.Generator().manual_seed(first + i) for i in range(len(chunk))]
        step = _attack(method, pipe, chunk, x0.to(pipe.device), gens, iterations)
        for _ in range(iterations):
            step()
        steps += iterations * len(chunk)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="unlearndiffatk", choices=["unlearndiffatk", "p4d"])
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl", "sd3"])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "real"])
    parser.add_argument("--shrink", action="store_true", help="with --size real: the same builder, shrunken")
    parser.add_argument("--checkpoint", default=None, help="A real SD 1.x folder instead of a random-weight one.")
    parser.add_argument("--batch", default="1,4,8")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size == "real" and args.checkpoint is None:
        from safe_diffusion.testing.realsize import build_real_pipeline

        real = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd35-medium"}[args.family]
        pipe = build_real_pipeline(real, dtype=torch.float32, device=device, tiny=args.shrink)
    elif args.family != "sd15" and args.checkpoint is None:  # the tiny test checkpoints of the other families
        from safe_diffusion.common.loading import load_pipeline
        from safe_diffusion.testing import FAMILIES

        if args.size != "tiny":
            parser.error(f"--family {args.family} is built --size tiny or real")
        with tempfile.TemporaryDirectory() as folder:
            pipe = load_pipeline(FAMILIES[args.family](folder), device=device, dtype=torch.float32)
    else:
        with tempfile.TemporaryDirectory() as folder:
            if args.checkpoint is None:
                from safe_diffusion.testing import build_checkpoint

                build_checkpoint(folder, args.size)
            pipe = StableDiffusionPipeline.from_pretrained(args.checkpoint or folder, safety_checker=None)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    side = int(denoiser.config.sample_size)
    pipe.latent_hw, pipe.latent_channels = (side, side), int(denoiser.config.in_channels)
    words = ["a cat", "a dog on a beach", "a red car", "a house at night", "two people", "a bowl of fruit"]
    prompts = [words[i % len(words)] for i in range(args.prompts)]
    batches = [int(b) for b in args.batch.split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else device
    architecture = {"sd15": "SD 1.5", "sdxl": "SDXL", "sd3": "SD 3.5 medium"}[args.family]
    size = args.checkpoint or (
        f"{args.size} ({architecture} architecture, random weights, float32)"
        if args.size == "real"
        else f"{args.size} {args.family}"
    )
    print(
        f"{'P4D-N' if args.method == 'p4d' else 'UnlearnDiffAtk'} on {size}{' shrunk' if args.shrink else ''} ({name}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}): "
        f"{args.prompts} prompts x {args.iterations} iterations, best of {args.repeat}"
    )
    print(f"{'batch':>6} {'prompt-iterations/s':>20} {'vs official loop (batch 1)':>27}")
    rates = {}
    for b in [1, *[b for b in batches if b != 1]]:
        rates[b] = max(_rate(args.method, pipe, prompts, b, args.iterations) for _ in range(args.repeat))
        print(f"{b:>6} {rates[b]:>20.2f} {rates[b] / rates[1]:>26.2f}x")


if __name__ == "__main__":
    main()
