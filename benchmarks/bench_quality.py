"""Quality-metric timings per 1,000 images (offline, random weights, real architectures).

    PYTHONPATH=src python benchmarks/bench_quality.py [--images 32] [--batch-size 16] [--device cpu] [--no-vit-l14]

Measured in one run, on the same images (``--images`` random 512x512 PNGs, the size SD 1.x writes):

1. decoding and preparing images plus the random feature extractor (the pipeline around the network:
   PNG decode, crop/resize, batching, persistence of per-image records to a folder);
2. torch-fidelity's InceptionV3 (the FID/KID network, random weights: same cost as the real ones);
3. CLIP score with the ViT-L/14 architecture (random weights; ``--no-vit-l14`` skips it: building it
   takes 1.7 GB of memory and disk) and with the tiny test CLIP (pipeline only);
4. FID and KID from 1,000 precomputed 2048-d features against a 1,000-image reference (float64).

Weights do not change the cost of a forward pass, so (2) and (3) are what the real networks take on
this device. Times are wall-clock after one warm-up batch, with the process's CPU time beside them (on a
shared, loaded machine the CPU time is the steadier figure: wall time ≈ CPU time / cores in use).
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
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def _images(folder: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth noise: compresses like a photograph rather than like white noise
        small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((512, 512), Image.BICUBIC).save(folder / f"{i:05d}.png")


def _vit_l14(path: Path) -> Path:
    """Save a random-weight CLIP with ViT-L/14's architecture (openai/clip-vit-large-patch14's config sizes)."""
    from safe_diffusion.testing import build_clip

    return build_clip(path, size="vit-l14")


def _per_1000(seconds: float, cpu: float, n: int) -> str:
    return f"{seconds / n * 1000:8.1f} s ({cpu / n * 1000:8.1f} CPU-s) per 1,000 images ({n / seconds:6.1f} images/s)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-vit-l14", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from safe_diffusion.evals import quality as q
    from safe_diffusion.evals.quality.images import _device
    from safe_diffusion.testing import RandomFeatureExtractor, build_clip, build_inception_weights

    device = _device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    _images(tmp / "images", args.images)
    prompts = {
        f"{i:05d}.png": f"a photograph of a lighthouse on a cliff at dusk, number {i}" for i in range(args.images)
    }
    items = q.folder_images(tmp / "images", prompts)
    warm = items[: args.batch_size]
    n = len(items)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"device {device}, torch threads {torch.get_num_threads()}, load average {load} on {os.cpu_count()} CPUs")
    print(f"{n} images 512x512, batch {args.batch_size}")

    def timed(label: str, fn) -> float:
        fn(warm)  # warm-up
        t, c = time.perf_counter(), time.process_time()
        fn(items)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        print(f"{label:<44}{_per_1000(seconds, cpu, n)}")
        return seconds

    random_extractor = RandomFeatureExtractor(device=device)
    counter = iter(range(1_000_000))
    timed(
        "decode + prepare + random extractor + records",
        lambda xs: q.image_features(
            xs, random_extractor, batch_size=args.batch_size, records=q.Records.in_folder(tmp / f"rec{next(counter)}")
        ),
    )
    inception = q.InceptionV3Features(build_inception_weights(tmp / "inception.pth"), device=device)
    t_inception = timed(
        "InceptionV3 features (FID/KID)", lambda xs: q.image_features(xs, inception, batch_size=args.batch_size)
    )
    tiny = q.ClipScorer(build_clip(tmp / "clip-tiny"), device=device)
    timed("CLIP score, tiny test CLIP (pipeline only)", lambda xs: q.clip_scores(xs, tiny, batch_size=args.batch_size))
    t_clip = None
    if not args.no_vit_l14:
        big = q.ClipScorer(_vit_l14(tmp / "clip-vit-l14"), device=device)
        t_clip = timed(
            "CLIP score, ViT-L/14 architecture", lambda xs: q.clip_scores(xs, big, batch_size=args.batch_size)
        )
        del big

    rng = np.random.default_rng(0)
    gen = rng.random((1000, 2048), dtype=np.float32)
    ref = q.statistics_from_features(rng.random((1000, 2048), dtype=np.float32) + 0.01, extractor=None, source={})
    t = time.perf_counter()
    q.frechet_distance(gen, ref)
    print(f"{'FID from 1,000 features (2048-d, float64)':<44}{time.perf_counter() - t:8.1f} s")
    t = time.perf_counter()
    q.kernel_distance(gen, ref)
    print(f"{'KID, 100 subsets of 1,000 (float64)':<44}{time.perf_counter() - t:8.1f} s")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if t_clip is not None:
        total = (t_inception + t_clip) / n * 1000
        print(f"\nquality stage (Inception + CLIP ViT-L/14) per 1,000 images on {device}: ~{total:.0f} s")


if __name__ == "__main__":
    main()
