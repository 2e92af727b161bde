"""Density-Based Pruning quotas and the baselines beside it (Abbas et al. 2024; docs/ALGORITHMS.md section 2).

Beam-free; the inputs are small per-cluster statistics, so this runs in one place whatever the data size.
  d_intra(c) = mean over members of (1 - cos(x, c))
  d_inter(c) = mean over the l nearest OTHER centroids of (1 - <c, c'>)      l = 20 by default
  C_c = d_inter(c) * d_intra(c), NaN (clusters of 1-2 items) -> the mean of the others
  P = softmax(C / tau), tau = 0.5;  budget N = round(keep_fraction * n)
  quotas: min ||x - N P||^2  s.t.  sum x = N,  lb_c <= x_c <= |c|,  lb_c = min(floor(N / k * min_frac), |c| - 1)
solved exactly by water-filling, x_c = clip(N P_c + lambda, lb_c, |c|) with lambda found by bisection, then
rounded to integers that sum to N (largest remainders).
"""

from __future__ import annotations

import numpy as np

from winnow.selectors.threads import one_thread


def budget(keep_fraction: float, total: int) -> int:
    """Records kept: round(keep_fraction * total) (the reference's --prune-ratio is this kept fraction)."""
    if not 0 <= keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be within [0, 1], got {keep_fraction}")
    return int(round(keep_fraction * total))


def intra_distance(sizes: np.ndarray, distance_sums: np.ndarray) -> np.ndarray:
    """d_intra per cluster from the sum of member distances; NaN for an empty cluster."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return np.divide(distance_sums, sizes, out=np.full(len(sizes), np.nan), where=sizes > 0)


def inter_distance(centroids: np.ndarray, neighbours: int = 20) -> np.ndarray:
    """d_inter per centroid: mean of 1 - <c, c'> over its `neighbours` nearest other centroids (NaN if k=1)."""
    centroids = np.asarray(centroids, dtype=np.float64)
    k = len(centroids)
    if k < 2:
        return np.full(k, np.nan)
    with one_thread():
        distances = 1.0 - centroids @ centroids.T
    np.fill_diagonal(distances, np.inf)
    nearest = np.sort(distances, axis=1)[:, : min(neighbours, k - 1)]
    return nearest.mean(axis=1)


def complexity(d_intra: np.ndarray, d_inter: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """C = d_inter * d_intra; clusters of 1-2 items (and other NaNs) get the mean of the others."""
    values = np.asarray(d_inter, dtype=np.float64) * np.asarray(d_intra, dtype=np.float64)
    values = np.where(np.asarray(sizes) <= 2, np.nan, values)
    valid = ~np.isnan(values)
    fill = values[valid].mean() if valid.any() else 0.0
    return np.where(valid, values, fill)


def softmax(values: np.ndarray, tau: float = 0.5) -> np.ndarray:
    scaled = np.asarray(values, dtype=np.float64) / tau
    weights = np.exp(scaled - scaled.max())
    return weights / weights.sum()


def lower_bounds(sizes: np.ndarray, total_budget: int, min_frac: float = 0.5) -> np.ndarray:
    sizes = np.asarray(sizes, dtype=np.int64)
    per_cluster = int(np.floor(total_budget / len(sizes) * min_frac))
    return np.clip(np.minimum(per_cluster, sizes - 1), 0, None)


def water_fill(target: np.ndarray, lower: np.ndarray, upper: np.ndarray, total: float) -> np.ndarray:
    """The exact minimiser of ||x - target||^2 with sum x = total and lower <= x <= upper:
    x = clip(target + lambda, lower, upper), lambda found by bisection."""
    target, lower, upper = (np.asarray(a, dtype=np.float64) for a in (target, lower, upper))
    if lower.sum() > total + 1e-9 or upper.sum() < total - 1e-9:
        raise ValueError(f"no allocation of {total} between the bounds ({lower.sum()}..{upper.sum()})")
    low = float((lower - target).min()) - 1.0
    high = float((upper - target).max()) + 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if np.clip(target + middle, lower, upper).sum() < total:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return np.clip(target + (low + high) / 2, lower, upper)


def round_to_total(values: np.ndarray, total: int, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Integers within [lower, upper] that sum to `total`, each the floor or ceiling of its value: the floors,
    then one more for the largest fractional parts (ties by index)."""
    floors = np.clip(np.floor(values + 1e-9), lower, upper).astype(np.int64)
    spare = total - int(floors.sum())
    room = floors < upper
    fractions = np.where(room, values - floors, -np.inf)
    order = np.lexsort((np.arange(len(values)), -fractions))
    if spare < 0 or spare > int(room.sum()):
        raise ValueError(f"cannot round to {total} within the bounds")
    floors[order[:spare]] += 1
    return floors


def dbp_quotas(
    sizes: np.ndarray, probabilities: np.ndarray, total_budget: int, min_frac: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(integer quotas summing to the budget, the exact continuous solution) for clusters of `sizes`."""
    sizes = np.asarray(sizes, dtype=np.int64)
    lower = lower_bounds(sizes, total_budget, min_frac)
    exact = water_fill(total_budget * np.asarray(probabilities), lower, sizes, total_budget)
    return round_to_total(exact, total_budget, lower, sizes), exact


def ssp_quotas(sizes: np.ndarray, total_budget: int) -> np.ndarray:
    """Self-supervised-prototype baseline: the same fraction of every cluster, rounded to the budget."""
    sizes = np.asarray(sizes, dtype=np.int64)
    share = sizes * (total_budget / max(int(sizes.sum()), 1))
    return round_to_total(share, total_budget, np.zeros(len(sizes), dtype=np.int64), sizes)


def random_keep(count: int, total_budget: int, seed: int = 0) -> np.ndarray:
    """The random baseline: a seeded uniform sample of `total_budget` of `count` records (a bool mask)."""
    keep = np.zeros(count, dtype=bool)
    keep[np.random.default_rng(seed).choice(count, size=total_budget, replace=False)] = True
    return keep
