"""Evaluation: prompt suites, quality metrics (CLIP score, FID, KID) and published reference figures."""
