"""Per family: time of SLD / CFG and SEGA(n) / CFG against the row-count floors, and the engine's
overhead with no terms — measured side by side in one run on tiny random-weight checkpoints.

Floors: in a batched-CFG family SLD adds one row to the two of CFG (3/2) and SEGA with n concepts adds n
((2 + n)/2). In separate-call families (FLUX true CFG, Qwen-Image, Wan) the rows ride with one of the two
calls, so the same row counts apply. The tiny models here are not denoiser-dominated on every family
(text encoders and VAE weigh more than on real checkpoints); read the ratios as an upper bound.

    PYTHONPATH=src python benchmarks/bench_families.py [--families sd,sd3,flux] [--steps 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

CALLS = {
    "sd": dict(height=64, width=64),
    "sdxl": dict(height=64, width=64),
    "sd3": dict(height=64, width=64, max_sequence_length=8, guidance_scale=5.0),
    "flux": dict(height=64, width=64, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt=""),
    "pixart-sigma": dict(
        height=64,
        width=64,
        max_sequence_length=16,
        guidance_scale=4.5,
        use_resolution_binning=False,
        clean_caption=False,
    ),
    "qwen-image": dict(height=64, width=64, true_cfg_scale=4.0, negative_prompt=" "),
    "wan": dict(height=32, width=32, num_frames=5, max_sequence_length=16, guidance_scale=5.0),
}
LOAD = {"sd3": dict(text_encoder_3=None, tokenizer_3=None)}


def best_of(fn, repeat: int) -> float:
    """Seconds of the fastest of `repeat` calls of `fn`, after one warm-up call."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import diffusers

    from safe_diffusion import SafetyGuidance, SemanticGuidance, guide
    from safe_diffusion.testing import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(CALLS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concepts", type=int, default=2, help="n for SEGA(n)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'family':14} {'no-terms':>9} {'SLD/CFG':>8} {'floor':>6} {'SEGA/CFG':>9} {'floor':>6}")
    for name in args.families.split(","):
        with tempfile.TemporaryDirectory() as folder:
            FAMILIES[name](folder)
            pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **LOAD.get(name, {}))
        pipe.set_progress_bar_config(disable=True)
        call = {**CALLS[name], "num_inference_steps": args.steps, "output_type": "latent"}

        def run(*terms, _pipe=pipe, _call=call):
            with guide(_pipe, *terms):
                _pipe("a photo", generator=torch.Generator().manual_seed(0), **_call)

        sld = SafetyGuidance.from_preset("max", concept="a painting")
        sega = SemanticGuidance([f"concept {i}" for i in range(args.concepts)], warmup_steps=0)

        def plain(_pipe=pipe, _call=call):
            _pipe("a photo", generator=torch.Generator().manual_seed(0), **_call)

        t_plain = best_of(plain, args.repeat)
        t_none = best_of(run, args.repeat)
        t_sld = best_of(lambda sld=sld: run(sld), args.repeat)
        t_sega = best_of(lambda sega=sega: run(sega), args.repeat)
        n = args.concepts
        print(
            f"{name:14} {100 * (t_none / t_plain - 1):+8.1f}% {t_sld / t_plain:8.2f} {1.5:6.2f} "
            f"{t_sega / t_plain:9.2f} {(2 + n) / 2:6.2f}"
        )


if __name__ == "__main__":
    main()
