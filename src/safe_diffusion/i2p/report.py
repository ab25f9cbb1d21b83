"""Moved to :mod:`safe_diffusion.evals.report` (kept for imports of the I2P-only API)."""

from ..evals.report import thumbnail  # noqa: F401
