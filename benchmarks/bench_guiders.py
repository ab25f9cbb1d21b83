"""SafetyGuider / SemanticGuider on the modular SDXL pipeline: time against diffusers' own CFG guider, and
against guide() on the classic SDXL pipeline — measured side by side in one run on a tiny random-weight model.

The modular loop calls the denoiser once per guider batch (prompt, negative, one per needed concept), so
SLD costs 3 calls of batch B per step where CFG costs 2 (floor 3/2) and SEGA(n) 2 + n (floor (2 + n)/2):
the same floors as guide(), which batches the same rows into one call.

    PYTHONPATH=src python benchmarks/bench_guiders.py [--steps 4] [--repeat 3] [--concepts 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings

import torch
from bench_families import best_of  # this folder is on sys.path when a script here runs


def main() -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    from safe_diffusion import (
        SafetyGuidance,
        SafetyGuider,
        SemanticGuidance,
        SemanticGuider,
        guide,
        with_guidance_concepts,
    )
    from safe_diffusion.testing import build_sdxl_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concepts", type=int, default=2, help="n for SEGA(n)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    n = args.concepts
    call = dict(num_inference_steps=args.steps, height=64, width=64, output_type="latent")
    concepts = [f"concept {i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        build_sdxl_checkpoint(folder)
        classic = StableDiffusionXLPipeline.from_pretrained(folder)
        modular = with_guidance_concepts(StableDiffusionXLAutoBlocks()).init_pipeline(folder)
        modular.load_components(torch_dtype=torch.float32)
    classic.set_progress_bar_config(disable=True)
    modular.set_progress_bar_config(disable=True)

    def run_modular(guider):
        def run():
            modular.update_components(guider=guider)
            modular(prompt="a photo", generator=torch.Generator().manual_seed(0), output="latents", **call)

        return run

    def run_classic(*terms):
        def run():
            with guide(classic, *terms):
                classic("a photo", generator=torch.Generator().manual_seed(0), guidance_scale=7.5, **call)

        return run

    sld = dict(warmup_steps=0, concept="a painting")
    times = {
        ("modular", "cfg"): best_of(run_modular(ClassifierFreeGuidance(guidance_scale=7.5)), args.repeat),
        ("modular", "sld"): best_of(run_modular(SafetyGuider.from_preset("max", **sld)), args.repeat),
        ("modular", "sega"): best_of(run_modular(SemanticGuider(concepts=concepts, warmup_steps=0)), args.repeat),
        ("classic", "cfg"): best_of(run_classic(), args.repeat),
        ("classic", "sld"): best_of(run_classic(SafetyGuidance.from_preset("max", **sld)), args.repeat),
        ("classic", "sega"): best_of(run_classic(SemanticGuidance(concepts, warmup_steps=0)), args.repeat),
    }
    print(f"{'pipeline':10} {'SLD/CFG':>8} {'floor':>6} {f'SEGA({n})/CFG':>12} {'floor':>6} {'CFG s':>7}")
    for kind in ("modular", "classic"):
        cfg = times[(kind, "cfg")]
        print(
            f"{kind:10} {times[(kind, 'sld')] / cfg:8.2f} {1.5:6.2f} {times[(kind, 'sega')] / cfg:12.2f} "
            f"{(2 + n) / 2:6.2f} {cfg:7.3f}"
        )
    print(
        f"modular guider / classic guide(): SLD {times[('modular', 'sld')] / times[('classic', 'sld')]:.2f}, "
        f"SEGA({n}) {times[('modular', 'sega')] / times[('classic', 'sega')]:.2f}"
    )


if __name__ == "__main__":
    main()
