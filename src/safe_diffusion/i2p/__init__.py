"""Moved to :mod:`safe_diffusion.evals`; these names stay importable for code written against the I2P-only API."""
