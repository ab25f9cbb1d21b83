"""Random-weight models for offline tests and demos, built from the command line:

    python -m safe_diffusion.testing DIR [--size small] [--family sd]   a checkpoint folder (--model DIR)
    python -m safe_diffusion.testing clip DIR                          a CLIP folder (--q16-model, --clip-model)

Their outputs are noise: they exercise the plumbing offline, never the quality of a method. A folder
appears complete or not at all (it is built next to DIR and renamed into place).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import FAMILIES
from .stable_diffusion import SIZES, build_checkpoint, build_clip


def _build_atomically(path: Path, build: Callable[[Path], object]) -> None:
    """Build into a hidden sibling of `path`, then rename it into place (no half-built folder on failure).

    A folder that takes no new files is refused before the build; a failed write (a full disk) is an
    OSError naming `path`, however the writing library reports it.
    """
    from safetensors import SafetensorError

    from ..common.outputs import check_writable

    parent = path.absolute().parent
    if parent.exists():
        check_writable(parent, "folder")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    try:
        build(work / "model")
        os.replace(work / "model", path)
    except SafetensorError as exc:  # how safetensors reports a failed write ("... (os error 28)")
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checkpoint(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m safe_diffusion.testing", description="Build a random-weight checkpoint folder."
    )
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="SD 1.x size (default small)")
    parser.add_argument("--family", choices=FAMILIES.names(), default="sd", help="model family (default sd)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.path / "model_index.json").is_file():
        return f"checkpoint already at {args.path}"
    if args.path.exists():
        parser.error(f"{args.path} exists and is not a checkpoint folder")
    if args.family == "sd":
        _build_atomically(args.path, lambda p: build_checkpoint(p, args.size, args.seed))
        return f"built a random-weight '{args.size}' checkpoint at {args.path}"
    _build_atomically(args.path, lambda p: FAMILIES[args.family](p, seed=args.seed))
    return f"built a random-weight {args.family} checkpoint at {args.path}"


def _clip(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m safe_diffusion.testing clip",
        description="Build a random-weight CLIP folder: Q16 and the zero-shot classifier run with it offline;"
        " their verdicts are meaningless (Q16 needs openai/clip-vit-large-patch14).",
    )
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.path / "config.json").is_file():
        return f"CLIP already at {args.path}"
    if args.path.exists():
        parser.error(f"{args.path} exists and is not a CLIP folder")
    _build_atomically(args.path, lambda p: build_clip(p, seed=args.seed))
    return f"wrote a random-weight CLIP to {args.path} (demos only: Q16 needs openai/clip-vit-large-patch14)"


def _quiet() -> None:
    """A builder's output is one line: no transformers notices about optional back-ends, no shard-writing
    bars. Set through the libraries, not the environment: an imported ``main`` (tests, the app) must not
    leave variables behind that every later subprocess inherits."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # "Writing model shards"
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    disable_progress_bars()


def main(argv: list[str] | None = None) -> None:
    """Build what is asked; bad input is one ``error:`` line and exit 2, a failed write one line and exit 1."""
    from ..common.errors import InputError

    _quiet()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "clip":
            print(_clip(argv[1:]))
        else:
            print(_checkpoint(argv[1:] if argv and argv[0] == "checkpoint" else argv))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
