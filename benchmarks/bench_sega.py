"""SEGA's cost: n edit concepts vs plain classifier-free guidance, and vs diffusers' reference pipeline.

Each step of plain CFG evaluates the UNet on 2 rows (unconditional, prompt); SEGA with n concepts
needs 2 + n, so the floor of the time ratio is (2 + n) / 2 — reached when the rows are one batched
UNet call and the guidance math is free. Target: no more than 5 % above the floor, and not slower
than the reference ``SemanticStableDiffusionPipeline``. Runs on a random "bench" checkpoint, CPU,
a few steps, one image: ``PYTHONPATH=src python benchmarks/bench_sega.py``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)

CONCEPTS = ["sunglasses", "a beard", "a red hat"]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import SemanticStableDiffusionPipeline as Reference

    from safe_diffusion import SemanticStableDiffusionPipeline
    from safe_diffusion.testing import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(f"{tmp}/bench", "bench")
        kw = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ours = SemanticStableDiffusionPipeline.from_pretrained(path, **kw)
        ref = Reference.from_pretrained(path, **kw)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    call = dict(prompt="a photo of a man", num_inference_steps=args.steps, output_type="latent")

    def run(pipe, n):
        edit = dict(editing_prompt=CONCEPTS[:n], edit_warmup_steps=0) if n else {}
        return lambda: pipe(generator=torch.Generator().manual_seed(0), **call, **edit)

    with torch.inference_mode():
        plain = best_time(run(ours, 0), args.repeats)
        print(
            f"plain CFG: {plain * 1000:.0f} ms for {args.steps} steps "
            f"({args.threads} threads, 64x64, {args.repeats} repeats, best of)"
        )
        print(f"{'n':>2} {'floor':>6} {'ours/CFG':>9} {'vs floor':>9} {'ref/CFG':>8} {'ours/ref':>9}")
        for n in (1, 2, 3):
            t_ours = best_time(run(ours, n), args.repeats)
            t_ref = best_time(run(ref, n), args.repeats)
            floor = (2 + n) / 2
            print(
                f"{n:>2} {floor:>6.2f} {t_ours / plain:>9.3f} {t_ours / plain / floor - 1:>+9.1%} "
                f"{t_ref / plain:>8.3f} {t_ours / t_ref:>9.3f}"
            )


if __name__ == "__main__":
    main()
