"""``python -m safe_diffusion.testing DIR [--size small]``: build a random-weight checkpoint folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .stable_diffusion import SIZES, build_checkpoint


def main(argv: list[str] | None = None) -> None:
    """Build a random-weight Stable Diffusion checkpoint folder (tiny, small or bench)."""
    parser = argparse.ArgumentParser(prog="python -m safe_diffusion.testing", description=main.__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.path / "model_index.json").is_file():
        print(f"checkpoint already at {args.path}")
        return
    build_checkpoint(args.path, args.size, args.seed)
    print(f"built a random-weight '{args.size}' checkpoint at {args.path}")


if __name__ == "__main__":
    main()
