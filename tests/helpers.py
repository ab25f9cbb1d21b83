"""Helpers shared by test modules (fixtures live in conftest.py)."""


def run_cli(*args: str) -> int:
    """Run the console entry point in-process and return its exit status."""
    from safe_diffusion.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


#: Parity with a reference implementation is measured in float64. In float32, rounding differences of
#: ~1e-7 (which differ between CPUs: vector widths, FMA, BLAS kernels) flip single elements across
#: SEGA's percentile and SLD's threshold λ, and those discontinuities amplify them past 1e-4, so a
#: float32 parity test passes on one CPU and fails on another. In float64 the same computations agree
#: to 0.0; PARITY_TOL leaves room only for float64 rounding.
PARITY_TOL = 1e-6


def load_float64(cls, path, **kwargs):
    """``cls.from_pretrained(path)`` in float64, without a safety checker, progress bar off."""
    import torch

    pipe = cls.from_pretrained(
        path, torch_dtype=torch.float64, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
