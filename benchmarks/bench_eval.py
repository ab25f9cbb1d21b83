"""Evaluation harness benchmarks, ratios measured side by side in one run (CPU or GPU; random weights, offline).

    PYTHONPATH=src python benchmarks/bench_eval.py [--prompts 16] [--steps 10] [--size 64] [--repeats 2]

1. The harness's throughput (``jobs.evaluate``, the library entry point ``eval run`` calls: run config,
   store, model loading, generation in batches of 8 across prompts) vs a naive loop of diffusers' deprecated
   ``StableDiffusionPipelineSafe``, one prompt at a time, model loading included, on the same `bench`
   checkpoint and settings (SLD medium, 1 image per call). Target >= 1.5x.
2. Scoring 47,030 records (the full I2P set, 10 images per prompt), with bootstrap intervals. Target < 2 s.
3. Judging images/s per judge (Q16 on the random test CLIP, so this measures the pipeline, not
   ViT-L/14, which is much slower; NudeNet for real).
4. The run store's journal: records/s appended (fsync per batch of 8, as the runner does) and
   read back, for 47,030 image records.
5. Protocol resolution (issue 19: "adds no measurable time per image"): the run of 1. under ``--protocol
   sld-i2p`` (its settings resolved and every deviation recorded, as ``eval run --protocol`` does) against the
   same run given directly, alternating, best of `--repeats`; and one resolution's time against the seconds
   one image takes. Resolution happens once per run, never per image.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)  # SLD medium warms up for 10
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipelineSafe

    from safe_diffusion.evals import metrics
    from safe_diffusion.evals import suites as data
    from safe_diffusion.jobs.evaluate import evaluate
    from safe_diffusion.testing import build_checkpoint, build_clip

    tmp = Path(tempfile.mkdtemp(prefix="bench-i2p-"))
    ckpt = build_checkpoint(tmp / "bench", "bench")
    prompts = data.load_prompts().prompts[: args.prompts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}; {args.prompts} prompts, {args.steps} steps, {args.size}px, SLD medium")

    # 1. the harness (jobs.evaluate: config, store, model loading, generation) vs a naive loop that also loads;
    # the two alternate `--repeats` times and each keeps its best, so a busy machine slows both alike
    run = dict(
        suite="i2p",
        safety="medium",
        height=args.size,
        width=args.size,
        steps=args.steps,
        images_per_prompt=1,
        batch_size=args.batch_size,
        judges="none",
        device=device,
        progress=False,
    )
    call = dict(
        num_inference_steps=args.steps,
        guidance_scale=7.5,
        height=args.size,
        width=args.size,
        sld_guidance_scale=1000,
        sld_warmup_steps=10,
        sld_threshold=0.01,
        sld_momentum_scale=0.3,
        sld_mom_beta=0.4,
    )

    def load_reference():
        ref = StableDiffusionPipelineSafe.from_pretrained(
            str(ckpt), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        ).to(device)
        ref.set_progress_bar_config(disable=True)
        return ref

    def harness(round_: int) -> float:
        t = time.perf_counter()
        done = evaluate(str(ckpt), tmp / f"run-{round_}", limit=args.prompts, **run)
        return done.written / (time.perf_counter() - t)

    def naive() -> float:
        t = time.perf_counter()
        ref = load_reference()
        for p in prompts:
            ref(p.text, generator=torch.Generator("cpu").manual_seed(p.sd_seed), **call)
        return args.prompts / (time.perf_counter() - t)

    evaluate(str(ckpt), tmp / "warm-up", limit=args.batch_size, **run)  # warm-up (kernels, the hash cache)
    load_reference()(prompts[0].text, generator=torch.Generator("cpu").manual_seed(0), **call)
    ours, theirs = 0.0, 0.0
    for round_ in range(args.repeats):
        ours = max(ours, harness(round_))
        theirs = max(theirs, naive())
    print(
        f"generation, model loading included (best of {args.repeats}): jobs.evaluate {ours:.2f} img/s, naive"
        f" StableDiffusionPipelineSafe loop {theirs:.2f} img/s, ratio {ours / theirs:.2f}x (target >= 1.5x)"
    )

    # 2. scoring 47,030 records
    allp = data.load_prompts().prompts
    texts = [p.text for p in allp for _ in range(10)]
    cats = [",".join(p.categories) for p in allp for _ in range(10)]
    unsafe = np.random.default_rng(0).random(len(texts)) < 0.3
    t = time.perf_counter()
    metrics.score(texts, cats, unsafe)
    print(f"scoring {len(texts)} records with bootstrap intervals: {time.perf_counter() - t:.2f} s (target < 2 s)")

    # 3. classification throughput
    from PIL import Image

    paths = []
    for i in range(32):
        path = tmp / f"img{i}.png"
        Image.fromarray((np.random.default_rng(i).random((512, 512, 3)) * 255).astype("uint8")).save(path)
        paths.append(path)
    from safe_diffusion.judges import load_judges

    for judge in load_judges(
        ["q16", "nudenet"], device=device, options={"q16": {"model": str(build_clip(tmp / "clip"))}}
    ):
        judge.judge(paths[:4])
        t = time.perf_counter()
        judge.judge(paths)
        print(f"judging {judge.name}: {len(paths) / (time.perf_counter() - t):.1f} img/s (512px inputs)")

    # 4. the journal
    from safe_diffusion.records.journal import Journal

    journal = Journal(tmp / "journal")
    rows = [
        (f"{i // 10:05d}-{i % 10:03d}", {"seed": i, "image": f"images/{i}.png", "bytes": 400000, "sha256": "0" * 64})
        for i in range(47030)
    ]
    t = time.perf_counter()
    for i in range(0, len(rows), 8):
        journal.append(("image", k, v) for k, v in rows[i : i + 8])
    append = len(rows) / (time.perf_counter() - t)
    t = time.perf_counter()
    assert len(Journal(tmp / "journal").get("image")) == len(rows)
    print(
        f"journal: append {append:.0f} records/s (fsync per 8), read back 47,030 records in "
        f"{time.perf_counter() - t:.2f} s"
    )

    # 5. protocol resolution, side by side with the same run given directly
    from safe_diffusion.evals.protocols import settings_for

    given = dict(steps=args.steps, height=args.size, width=args.size, images_per_prompt=1, judges="none")
    given["limit"] = args.prompts

    def under_protocol(round_: int) -> float:
        t = time.perf_counter()
        record = settings_for("sld-i2p", **given)["protocol"]
        done = evaluate(str(ckpt), tmp / f"protocol-{round_}", limit=args.prompts, protocol=record, **run)
        return done.written / (time.perf_counter() - t)

    direct, resolved = 0.0, 0.0
    for round_ in range(args.repeats):
        direct = max(direct, harness(100 + round_))
        resolved = max(resolved, under_protocol(round_))
    t = time.perf_counter()
    for _ in range(200):
        settings_for("sld-i2p", **given)
    once = (time.perf_counter() - t) / 200
    print(
        f"protocol resolution (best of {args.repeats}): under --protocol sld-i2p {resolved:.2f} img/s, given directly"
        f" {direct:.2f} img/s, ratio {resolved / direct:.2f}x; one resolution (files read) {once * 1e6:.0f} µs ="
        f" {once * direct * 100:.4f} % of one image's time, once per run"
    )

    # 6. the CUDA generator's noise (--noise cuda, computed on the CPU) side by side with the CPU generator's
    def with_noise(noise: str, round_: int) -> float:
        t = time.perf_counter()
        done = evaluate(str(ckpt), tmp / f"noise-{noise}-{round_}", limit=args.prompts, noise=noise, **run)
        return done.written / (time.perf_counter() - t)

    cpu_noise, cuda_noise = 0.0, 0.0
    for round_ in range(args.repeats):
        cpu_noise = max(cpu_noise, with_noise("cpu", round_))
        cuda_noise = max(cuda_noise, with_noise("cuda", round_))
    from safe_diffusion.common.noise import cuda_randn

    for shape in ((1, 4, 64, 64), (1, 16, 128, 128)):  # an SD 1.x latent of 512 px; SD 3's of 1024 px
        t = time.perf_counter()
        for seed in range(10):
            cuda_randn(seed, shape)
        computed = (time.perf_counter() - t) / 10
        t = time.perf_counter()
        for seed in range(10):
            torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        drawn = (time.perf_counter() - t) / 10
        print(
            f"initial noise {shape}: CUDA generator's, computed {computed * 1e3:.2f} ms; CPU generator {drawn * 1e3:.3f} ms"
        )
    print(
        f"noise (best of {args.repeats}): --noise cuda {cuda_noise:.2f} img/s, --noise cpu {cpu_noise:.2f} img/s,"
        f" ratio {cuda_noise / cpu_noise:.2f}x"
    )


if __name__ == "__main__":
    main()
