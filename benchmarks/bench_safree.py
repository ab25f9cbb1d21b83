"""Per family: time per image of SAFREE / plain CFG and SAFREE / SLD, measured side by side in one run on
tiny random-weight checkpoints (SD 1.x, SDXL, SD 3 with T5).

SAFREE adds no denoiser rows (its filtered embedding replaces the prompt's rows); its cost is per call:
encoding the concepts, the concepts as negative prompt, and the prompt once per token with that token
masked. SLD adds one row per step. With latent re-attention SAFREE adds one row block while its filter is
active and two FFTs per up-block resnet. On these tiny models text encoding weighs far more against the
denoiser than on real checkpoints, so the per-call part is an upper bound; re-run on a real model.

    PYTHONPATH=src python benchmarks/bench_safree.py [--families sd,sdxl,sd3] [--steps 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch
from bench_families import best_of

CALLS = {
    "sd": dict(height=64, width=64),
    "sdxl": dict(height=64, width=64),
    "sd3": dict(height=64, width=64, max_sequence_length=16, guidance_scale=7.0),
}


def _build(name: str, folder: str):
    from safe_diffusion.testing import FAMILIES, build_sd3_checkpoint

    if name == "sd3":
        return build_sd3_checkpoint(folder, t5=True)  # SAFREE reads SD 3's toxic subspace from T5
    return FAMILIES[name](folder)


def main() -> None:
    import diffusers

    from safe_diffusion import SafetyGuidance, SafreeGuidance, guide

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(CALLS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    print(f"steps {args.steps}, best of {args.repeat}, torch threads {torch.get_num_threads()}; seconds per image")
    print(f"{'family':8} {'CFG':>7} {'SLD':>7} {'SAFREE':>7} {'+LRA':>7} {'SAFREE/CFG':>11} {'SAFREE/SLD':>11} "
          f"{'+LRA/CFG':>9} {'SAFREE+SLD/SLD':>15}")  # fmt: skip
    for name in args.families.split(","):
        with tempfile.TemporaryDirectory() as folder:
            _build(name, folder)
            pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        call = {**CALLS[name], "num_inference_steps": args.steps, "output_type": "latent"}

        def run(*terms, _pipe=pipe, _call=call):
            with guide(_pipe, *terms):
                _pipe("a photo of a person on a beach", generator=torch.Generator().manual_seed(0), **_call)

        sld = SafetyGuidance.from_preset("max")  # no warm-up: its row is evaluated at every step
        safree = SafreeGuidance(self_validation=False)  # filtered at every step: the costliest schedule
        configs = {"cfg": (), "sld": (sld,), "safree": (safree,), "both": (safree, sld)}
        if name != "sd3":  # re-attention acts on UNet up blocks
            configs["lra"] = (SafreeGuidance(self_validation=False, re_attention=True),)
        t = {key: best_of(lambda terms=terms: run(*terms), args.repeat) for key, terms in configs.items()}
        lra = f"{t['lra']:7.3f}" if "lra" in t else f"{'—':>7}"
        lra_ratio = f"{t['lra'] / t['cfg']:9.2f}" if "lra" in t else f"{'—':>9}"
        print(f"{name:8} {t['cfg']:7.3f} {t['sld']:7.3f} {t['safree']:7.3f} {lra} {t['safree'] / t['cfg']:11.2f} "
              f"{t['safree'] / t['sld']:11.2f} {lra_ratio} {t['both'] / t['sld']:15.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
