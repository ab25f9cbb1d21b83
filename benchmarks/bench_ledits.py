"""LEDITS++ speed: this library's invert + edit vs diffusers' ``LEditsPPPipelineStableDiffusion``, side by side.

Both run the same inversion and the same two-concept edit with cross-attention ∩ noise masks on a
random "deep" checkpoint (cross-attention at 1/4 of the latent size, as LEDITS++ needs), float32,
CPU, one image; times are each configuration's fastest of interleaved repeats. Target: not slower
than the reference. ``PYTHONPATH=src python benchmarks/bench_ledits.py``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)

CONCEPTS = ["nudity", "blood"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="image side (multiple of 8; the checkpoint's own: 64)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import LEditsPPPipelineStableDiffusion, StableDiffusionPipeline
    from PIL import Image

    from safe_diffusion.editing import LEditsGuidance, edit, invert
    from safe_diffusion.testing import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(f"{tmp}/deep", "deep")
        kwargs = {"safety_checker": None, "requires_safety_checker": False}
        pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
        # Its own copy: the reference replaces the UNet's attention processors and leaves them installed.
        reference = LEditsPPPipelineStableDiffusion.from_pretrained(path, **kwargs)
        reference.set_progress_bar_config(disable=True)
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
        guidance = LEditsGuidance(CONCEPTS, reverse=True)

        def ours():
            inv = invert(pipe, image, num_inversion_steps=args.steps, generator=torch.Generator().manual_seed(0))
            edit(pipe, inv, guidance, output_type="latent")

        def theirs():
            reference.invert(image, num_inversion_steps=args.steps, generator=torch.Generator().manual_seed(0))
            reference(editing_prompt=CONCEPTS, reverse_editing_direction=True, output_type="latent")

        times = {"ours": [], "diffusers": []}
        for fn in (ours, theirs):  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("diffusers", theirs)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        best = {k: min(v) for k, v in times.items()}
        print(f"{args.steps} steps, {len(CONCEPTS)} concepts, {args.size}x{args.size}, {args.threads} thread(s)")
        for name, t in best.items():
            print(f"  {name:10s} {t:7.3f} s (invert + edit)")
        print(f"  ratio ours / diffusers: {best['ours'] / best['diffusers']:.2f}")


if __name__ == "__main__":
    main()
