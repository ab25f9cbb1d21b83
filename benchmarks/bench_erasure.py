"""Erasure cost: UCE edit time for 1, 10 and 100 concepts, RECE's extra epochs, and ESD steps per second.

UCE is timed two ways in the same process on the same model: ours (texts encoded in batches, every
concept and layer in one d×d float64 solve, one product per layer) and a per-concept / per-layer loop
shaped like the official script (one ``encode_prompt`` per text, eq. 7's sums accumulated concept by
concept for each layer, one float32 inverse per layer). The ratio is the speed-up; the time is split
into encoding the texts and editing the weights. ESD steps/s is reported for the paper's 50 DDIM steps
and for 10. Runs on a random "bench" checkpoint: ``PYTHONPATH=src python benchmarks/bench_erasure.py``
(``--device cuda`` and ``--size sd15`` on a GPU machine time an SD-1.5-sized random UNet).
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


WORDS = ["red", "violent", "ancient", "blurry", "famous", "wet", "glowing", "tiny", "angry", "golden"]
NOUNS = ["painter", "weapon", "castle", "crowd", "dog", "statue", "car", "forest", "singer", "mask"]


def concepts(n: int) -> list[str]:
    """n distinct concepts with distinct final words, like a list of artists or objects."""
    return [f"{WORDS[i % 10]} {NOUNS[i // 10 % 10]} {i}" for i in range(n)]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def official_style_uce(pipe, erase, guide, preserve, lamb=0.5, se=1.0, sp=1.0):
    """The official script's structure (our own code): per-text encoding, per-layer and per-concept sums."""
    from safe_diffusion.erasure.common import cross_attention_projections

    device = pipe.unet.device
    modules = list(cross_attention_projections(pipe.unet).values())
    originals = [m.weight.detach().clone() for m in modules]
    emb = {}
    for text in dict.fromkeys([*erase, *guide, *preserve]):
        e = pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)[
            0
        ]
        idx = (
            pipe.tokenizer(
                text,
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )["attention_mask"].sum()
            - 2
        )
        emb[text] = e[:, idx, :]
    outputs = {t: [o @ emb[t].T for o in originals] for t in dict.fromkeys([*guide, *preserve])}
    t_edit = time.perf_counter()
    for k, (module, w) in enumerate(zip(modules, originals)):
        mat1 = lamb * w
        mat2 = lamb * torch.eye(w.shape[1], device=device)
        for e, g in zip(erase, guide):
            c = emb[e].T
            mat1 = mat1 + se * (outputs[g][k] @ c.T)
            mat2 = mat2 + se * (c @ c.T)
        for p in preserve:
            c = emb[p].T
            mat1 = mat1 + sp * (outputs[p][k] @ c.T)
            mat2 = mat2 + sp * (c @ c.T)
        module.weight.data = mat1 @ torch.inverse(mat2.float())
    return time.perf_counter() - t_edit


def time_uce(pipe, n, device, repeats):
    from safe_diffusion.erasure.closed_form import apply_uce
    from safe_diffusion.erasure.common import concept_embeddings, cross_attention_projections
    from safe_diffusion.erasure.uce import uce_edit_matrix

    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    erase, guide, preserve = concepts(n), [""] * n, ["a photo", "a landscape"]
    texts = list(dict.fromkeys([*erase, *guide, *preserve]))
    best = {"ours": float("inf"), "encode": float("inf"), "edit": float("inf"), "loop": float("inf")}
    for _ in range(repeats):
        pipe.unet.load_state_dict(state)
        sync(device)
        t = time.perf_counter()
        apply_uce(pipe, erase, guide, preserve)
        sync(device)
        best["ours"] = min(best["ours"], time.perf_counter() - t)
        ours = {k: m.weight.detach().clone() for k, m in cross_attention_projections(pipe.unet).items()}
        # the two parts of ours, timed directly: encoding the texts, then the solve and the products
        t = time.perf_counter()
        table = dict(zip(texts, concept_embeddings(pipe, texts).double()))
        sync(device)
        best["encode"] = min(best["encode"], time.perf_counter() - t)
        pipe.unet.load_state_dict(state)
        sync(device)
        t = time.perf_counter()
        transform = uce_edit_matrix(
            torch.stack([table[x] for x in erase]),
            torch.stack([table[x] for x in guide]),
            torch.stack([table[x] for x in preserve]),
        )
        for m in cross_attention_projections(pipe.unet).values():
            m.weight.data = m.weight.detach() @ transform.to(m.weight.dtype)
        sync(device)
        best["edit"] = min(best["edit"], time.perf_counter() - t)
        pipe.unet.load_state_dict(state)
        sync(device)
        t = time.perf_counter()
        edit = official_style_uce(pipe, erase, guide, preserve)
        sync(device)
        total = time.perf_counter() - t
        if total < best["loop"]:
            best["loop"], best["loop_edit"] = total, edit
        ref = {k: m.weight.detach() for k, m in cross_attention_projections(pipe.unet).items()}
        best["max_rel_diff"] = max(float((ours[k] - ref[k]).norm() / ref[k].norm()) for k in ours)
    pipe.unet.load_state_dict(state)
    return best


def time_esd(pipe, ddim_steps, steps, device):
    from safe_diffusion.erasure.training import ESDTrainer

    trainer = ESDTrainer(pipe, "esd-x", ["nudity"], ddim_steps=ddim_steps, lr=1e-5)
    trainer.train_step(0)  # warm-up
    sync(device)
    t = time.perf_counter()
    for k in range(1, steps + 1):
        trainer.train_step(k)
    sync(device)
    return steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="bench", help="bench (random, small) or sd15 (an SD-1.5-sized random UNet)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--esd-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-esd", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safe_diffusion.common.loading import load_pipeline
    from safe_diffusion.testing import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if args.size == "sd15":
            from safe_diffusion.testing import SIZES

            SIZES["sd15"] = dict(
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                sample_size=64,
                cross_attention_dim=768,
                text_layers=12,
            )
        path = build_checkpoint(f"{tmp}/model", args.size)
        pipe = load_pipeline(str(path), device=args.device, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    from safe_diffusion.erasure.common import cross_attention_projections

    n_proj = len(cross_attention_projections(pipe.unet))
    d = pipe.unet.config.cross_attention_dim
    print(
        f"model: {args.size}, {n_proj} cross-attention projections, d = {d}, device {args.device}, "
        f"{args.threads} threads"
    )
    time_uce(pipe, 2, args.device, 1)  # warm-up: allocator, kernels, tokenizer caches
    print("UCE edit time, seconds (best of repeats): total, then its parts: encoding the texts, editing the weights")
    print(
        f"{'concepts':>8} | {'ours':>7} | {'encode':>7} | {'edit':>7} | {'loop':>7} | {'encode':>7} | {'edit':>7} | "
        f"{'speed-up':>8} | {'edit x':>7} | {'loop vs exact':>13}"
    )
    for n in (1, 10, 100):
        r = time_uce(pipe, n, args.device, args.repeats)
        print(
            f"{n:>8} | {r['ours']:7.3f} | {r['encode']:7.3f} | {r['edit']:7.3f} | {r['loop']:7.3f} | "
            f"{r['loop'] - r['loop_edit']:7.3f} | {r['loop_edit']:7.3f} | "
            f"{r['loop'] / r['ours']:7.1f}x | {r['loop_edit'] / r['edit']:6.1f}x | {r['max_rel_diff']:13.1e}"
        )
    print("loop: per-text encoding and a per-layer, per-concept float32 loop shaped like the official script;")
    print("loop vs exact: max relative difference of its weights from ours (float64 solve)")

    from safe_diffusion.erasure.closed_form import apply_rece

    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for n in (1, 10):
        t = time.perf_counter()
        apply_rece(pipe, concepts(n), epochs=3)
        sync(args.device)
        print(f"RECE (UCE + 3 epochs), {n} concept(s): {time.perf_counter() - t:.3f} s")
        pipe.unet.load_state_dict(state)

    for ddim in () if args.skip_esd else (50, 10):
        pipe.unet.load_state_dict(state)
        rate = time_esd(pipe, ddim, args.esd_steps, args.device)
        print(f"ESD-x, {ddim} DDIM steps to sample x_t: {rate:.3f} steps/s ({1 / rate:.2f} s/step)")


if __name__ == "__main__":
    main()
