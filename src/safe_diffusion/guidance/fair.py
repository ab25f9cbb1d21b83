"""Fair Diffusion (Friedrich et al., 2023): which edit direction each image gets, as pure functions.

Fair Diffusion shifts an attribute's distribution (e.g. gender per occupation) towards target
proportions by giving each image one SEGA edit direction: that direction is added, every other
direction removed. This module only decides *which* direction an image gets; the guidance itself
is :class:`safe_diffusion.guidance.terms.FairGuidance`.

The rule (documented in docs/guidance.md):

1. Over a run of N images, direction i gets q_i images, the largest-remainder (Hamilton) rounding
   of p_i·N: every direction gets ⌊p_i·N⌋, and the images left over go to the largest fractional
   parts, ties to the lower index. Σ q_i = N exactly.
2. The q_i copies are laid out in a fixed interleaved order (at position k, the direction furthest
   behind its share of the first k+1 positions, ties to the lower index), so short runs are
   balanced too.
3. The image with seed s gets the direction at position s mod N. Its direction is therefore a pure
   function of (seed, proportions, N), and any N consecutive seeds realise the q_i exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

PROPORTION_TOLERANCE = 1e-6


def check_proportions(proportions: Sequence[float], n_directions: int) -> list[float]:
    """Validate target proportions: one per direction, non-negative, summing to 1."""
    props = [float(p) for p in proportions]
    if len(props) != n_directions:
        raise ValueError(f"{len(props)} proportions given for {n_directions} directions")
    if any(p < 0 or math.isnan(p) for p in props):
        raise ValueError(f"proportions must be non-negative, got {props}")
    if abs(sum(props) - 1.0) > PROPORTION_TOLERANCE:
        raise ValueError(f"proportions must sum to 1, got {props} (sum {sum(props):g})")
    return props


def largest_remainder(proportions: Sequence[float], n: int) -> list[int]:
    """Integer counts q_i with Σ q_i = n closest to p_i·n: Hamilton's largest-remainder method, ties to the lower index."""
    if n < 0:
        raise ValueError(f"run length must be non-negative, got {n}")
    # Exact rational arithmetic: 0.1·10 must give 1, not 0.999….
    exact = [Fraction(p).limit_denominator(10**9) * n for p in proportions]
    counts = [math.floor(x) for x in exact]
    left = n - sum(counts)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def assignment_order(proportions: Sequence[float], n: int) -> list[int]:
    """The run's N direction indices in their fixed interleaved order (step 2 of the rule)."""
    quotas = largest_remainder(proportions, n)
    taken = [0] * len(quotas)
    order = []
    for k in range(n):
        open_ = [i for i in range(len(quotas)) if taken[i] < quotas[i]]
        i = max(open_, key=lambda j: (Fraction(quotas[j] * (k + 1), n) - taken[j], -j))
        taken[i] += 1
        order.append(i)
    return order


def minimal_run_length(proportions: Sequence[float], max_denominator: int = 1000) -> int:
    """The shortest run over which the proportions are whole numbers (e.g. 2 for 0.5/0.5, 4 for 0.25/0.75)."""
    n = 1
    for p in proportions:
        n = math.lcm(n, Fraction(p).limit_denominator(max_denominator).denominator)
    return n


def direction_for_seed(seed: int, proportions: Sequence[float], run_length: int) -> int:
    """The direction index of the image with `seed` (step 3 of the rule)."""
    if run_length <= 0:
        raise ValueError(f"run length must be positive, got {run_length}")
    return assignment_order(proportions, run_length)[seed % run_length]


def directions_for_seeds(seeds: Sequence[int], proportions: Sequence[float], run_length: int) -> list[int]:
    """Direction indices for a batch of seeds, image by image."""
    order = assignment_order(proportions, run_length)
    return [order[int(s) % run_length] for s in seeds]
