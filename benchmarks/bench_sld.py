"""Time per image: our SLD vs diffusers' deprecated StableDiffusionPipelineSafe vs plain classifier-free guidance.

All configurations run on one random-weight checkpoint whose UNet dominates a step, in one process,
round-robin, so that machine noise hits them alike. Ratios use each configuration's fastest
repeat (noise on a shared machine only ever adds time); medians are printed beside them.
Targets (issue 2): ours / reference <= 1.0; SLD / CFG <= 1.5 (three UNet row blocks instead of two),
and below 1.5 for WEAK, whose safety estimate is provably unused during warm-up.

    python benchmarks/bench_sld.py [--steps 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from safe_diffusion import SafeStableDiffusionPipeline, SafetyConfig  # noqa: E402
from safe_diffusion.testing import build_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, help="existing checkpoint folder (default: build 'bench')")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)

    ckpt = args.checkpoint or build_checkpoint(Path(tempfile.mkdtemp()) / "bench", "bench")
    from diffusers import StableDiffusionPipelineSafe

    ours = SafeStableDiffusionPipeline.from_pretrained(ckpt)
    ref = StableDiffusionPipelineSafe.from_pretrained(
        ckpt, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)

    prompt = "a photograph of a lighthouse at dusk"
    configs = {
        "cfg": (ours, {"sld_guidance_scale": 0}),
        "ours_medium": (ours, dict(SafetyConfig.MEDIUM)),
        "ref_medium": (ref, dict(SafetyConfig.MEDIUM)),
        "ours_weak": (ours, dict(SafetyConfig.WEAK)),
        "ref_weak": (ref, dict(SafetyConfig.WEAK)),
    }
    images, times = {}, {name: [] for name in configs}

    def call(name):
        pipe, kwargs = configs[name]
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        out = pipe(prompt, num_inference_steps=args.steps, generator=g, output_type="np", **kwargs).images
        return time.perf_counter() - start, out

    for name in configs:  # warm-up, and the images for the parity check
        _, images[name] = call(name)
    for _ in range(args.repeats):
        for name in configs:
            times[name].append(call(name)[0])
    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}

    print(f"checkpoint: {ckpt}  steps: {args.steps}  repeats: {args.repeats}  torch threads: {torch.get_num_threads()}")
    for name in configs:
        print(f"  {name:12s} best {best[name]:7.2f} s/image   median {med[name]:7.2f}")
    parity_medium = float(np.abs(images["ours_medium"] - images["ref_medium"]).max())
    parity_weak = float(np.abs(images["ours_weak"] - images["ref_weak"]).max())
    weak_floor = (min(15, args.steps) * 2 + max(args.steps - 15, 0) * 3) / (2 * args.steps)
    rows = [
        ("ours / reference, MEDIUM", best["ours_medium"] / best["ref_medium"], "<= 1.0"),
        ("ours / reference, WEAK", best["ours_weak"] / best["ref_weak"], "<= 1.0"),
        ("SLD MEDIUM / CFG", best["ours_medium"] / best["cfg"], "<= 1.5 (floor 1.5)"),
        ("SLD WEAK / CFG", best["ours_weak"] / best["cfg"], f"< 1.5 (floor {weak_floor:.3f} at {args.steps} steps)"),
        ("reference MEDIUM / CFG", best["ref_medium"] / best["cfg"], "for context"),
    ]
    print("ratios (best time per image):")
    for label, ratio, target in rows:
        print(f"  {label:26s} {ratio:6.3f}   target {target}")
    print(f"parity max |delta| on [0, 1] images: MEDIUM {parity_medium:.2e}, WEAK {parity_weak:.2e} (target <= 1e-4)")


if __name__ == "__main__":
    main()
