"""The denoiser alone: seconds per row at batch 2, 3, 4, 5 on a random-weight SD 1.5 U-Net at 512 px, side by
side in one run (round-robin, best of --repeats). Guidance adds rows to the denoiser's batch (SLD one, SEGA one
per concept); this says whether a row costs the same at every batch on the device, which the row-count floors
of benchmarks/realsize.py assume.

    PYTHONPATH=src python benchmarks/bench_rows.py [--device cpu|cuda] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from safe_diffusion.testing.realsize import build_real_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="The shrunken model (a smoke test).")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    unet = build_real_pipeline("sd15", dtype=torch.float32, device=args.device, tiny=args.tiny).unet
    side = int(unet.config.sample_size)
    context = torch.randn(1, 77, int(unet.config.cross_attention_dim), device=args.device)
    seconds: dict[int, float] = {}
    for _ in range(args.repeats):
        for batch in (2, 3, 4, 5):
            x = torch.randn(batch, 4, side, side, device=args.device)
            start = time.perf_counter()
            unet(x, 500, encoder_hidden_states=context.expand(batch, -1, -1))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[batch] = min(seconds.get(batch, float("inf")), time.perf_counter() - start)
    print(
        f"SD 1.5 U-Net at {side * 8} px on {args.device}, torch threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    print(f"{'batch':>6} {'s/call':>8} {'s/row vs batch 2':>17}")
    for batch, s in seconds.items():
        print(f"{batch:>6} {s:>8.2f} {s / batch / (seconds[2] / 2):>17.2f}")


if __name__ == "__main__":
    main()
