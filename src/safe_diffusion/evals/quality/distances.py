"""FID (Heusel et al., NeurIPS 2017) and KID (Bińkowski et al., ICLR 2018) of features against a reference.

Computed by torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` in float64 on
features extracted (and recorded) beforehand; KID is the unbiased MMD² with the kernel ``(x·y/d + 1)³``,
averaged over random subsets.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ...common.errors import InputError
from .fidelity import load_torchmetrics
from .reference import ReferenceStatistics

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_DEGREE = 3


def _passthrough(dim: int):
    """The 'feature extractor' handed to torchmetrics: features were extracted (and persisted) beforehand."""
    import torch

    class Precomputed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_features = dim

        def forward(self, x):
            return x

    return Precomputed()


def frechet_distance(features: np.ndarray, reference: ReferenceStatistics) -> float:
    """FID of `features` against `reference`, by torchmetrics' ``FrechetInceptionDistance`` (float64).

    The reference side of the metric's state is set from (mu, sigma, count): sum = n·mu and
    sum of outer products = (n−1)·sigma + n·mu·muᵀ, from which the metric recovers mu and sigma.
    """
    import torch

    load_torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    feats = np.asarray(features, dtype=np.float64)
    dim = len(reference.mu)
    if feats.ndim != 2 or feats.shape[1] != dim:
        raise InputError(f"features are {feats.shape}, the reference is {dim}-dimensional")
    if len(feats) < 2:
        raise InputError(f"FID needs at least 2 images (found {len(feats)})")
    n = reference.count if reference.count and reference.count >= 2 else 2
    metric = FrechetInceptionDistance(feature=_passthrough(dim), reset_real_features=False, sync_on_compute=False)
    mu = torch.from_numpy(reference.mu.astype(np.float64))
    sigma = torch.from_numpy(reference.sigma.astype(np.float64))
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)
    metric.update(torch.from_numpy(feats), real=False)
    return float(metric.compute())


def kernel_distance(
    features: np.ndarray,
    reference: ReferenceStatistics,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, Any] | None:
    """KID (mean and std over `subsets` random subsets) by torchmetrics' ``KernelInceptionDistance`` (float64).

    The subset size is ``min(subset_size, images, reference images)``; subsets are drawn with torch's
    generator seeded with `seed` (the global generator's state is restored). None when the reference
    has no features (statistics files without them) or fewer than 2 images are on either side.
    """
    import torch

    if reference.features is None:
        return None
    feats = np.asarray(features, dtype=np.float64)
    size = min(int(subset_size), len(feats), len(reference.features))
    if size < 2:
        return None
    load_torchmetrics()
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saves all extracted features in buffer": expected here
        metric = KernelInceptionDistance(
            feature=_passthrough(feats.shape[1]),
            subsets=int(subsets),
            subset_size=size,
            degree=KID_DEGREE,
            reset_real_features=False,
            sync_on_compute=False,
        )
    metric.update(torch.from_numpy(np.asarray(reference.features, dtype=np.float64)), real=True)
    metric.update(torch.from_numpy(feats), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "subsets": int(subsets), "subset_size": size, "seed": seed}
