"""Temperature sampling with a schedule over the output, and its exact integer allocation to shards.

Beam-free (docs/ALGORITHMS.md section 5; Li et al. 2025, "Upsample or Upweight?"):
  p_i(tau) = n_i^(1/tau) / sum_j n_j^(1/tau)          tau = 1 proportional, tau -> inf uniform; alpha = 1/tau
A schedule gives tau as a function of the position s in the output (as a fraction of it); the default is the
paper's Cooldown, tau = 5 for the first half then tau = 1. Position s draws source i with p_i(tau(s)).
`allocate` turns that into integers: how many records of each source go into each shard, with every shard's
row count exact and each source's running total within one record of its expected value. `cap_epochs`
(UniMax-style) limits a source to E passes over its documents and hands the surplus to the other sources,
position by position, so that a capped mixture is never a silent deviation from the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SchedulePoint:
    at: float
    tau: float


@dataclass(frozen=True)
class Groups:
    """Sources in groups with fixed shares of every position (e.g. real vs synthetic text, 1:1 as in WRAP):
    temperature sampling runs inside each group. `of_source[i]` names source i's group; a group without data
    hands its share to the others in proportion."""

    of_source: tuple[str, ...]
    shares: dict[str, float]


def sampling_probabilities(sizes: Sequence[float], tau: float, groups: Groups | None = None) -> np.ndarray:
    """p_i(tau) over sources of the given sizes; a source of size 0 gets 0. Computed in log space."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if tau <= 0:
        raise ValueError(f"temperature must be positive, got {tau}")
    if groups is not None:
        names = np.array(groups.of_source)
        present = {g: bool((sizes[names == g] > 0).any()) for g in set(groups.of_source)}
        total_share = sum(groups.shares.get(g, 0.0) for g, here in present.items() if here)
        probabilities = np.zeros_like(sizes)
        if total_share <= 0:
            return sampling_probabilities(sizes, tau)
        for group, here in present.items():
            if here:
                members = names == group
                share = groups.shares.get(group, 0.0) / total_share
                probabilities[members] = share * sampling_probabilities(sizes[members], tau)
        return probabilities
    probabilities = np.zeros_like(sizes)
    present = sizes > 0
    if not present.any():
        return probabilities
    logits = np.log(sizes[present]) / tau
    weights = np.exp(logits - logits.max())
    probabilities[present] = weights / weights.sum()
    return probabilities


def tau_at(schedule: Sequence[SchedulePoint], fraction: float, kind: str = "step") -> float:
    """tau at a fraction of the output. step: the last point at or before it; linear: interpolated."""
    points = sorted(schedule, key=lambda p: p.at)
    if kind == "step":
        current = points[0].tau
        for point in points:
            if point.at <= fraction:
                current = point.tau
        return current
    ats = [p.at for p in points]
    return float(np.interp(fraction, ats, [p.tau for p in points]))


def shard_sizes(total: int, shards: int) -> np.ndarray:
    """Rows per shard: `total` split into `shards` consecutive slices differing by at most one row."""
    bounds = (np.arange(shards + 1, dtype=np.int64) * total) // shards
    return np.diff(bounds)


def expected_counts(
    sizes: Sequence[float],
    schedule: Sequence[SchedulePoint],
    total: int,
    shards: int,
    kind: str = "step",
    steps_per_shard: int = 64,
    groups: Groups | None = None,
) -> np.ndarray:
    """(shards, sources) expected records: the sum over each shard's positions of p(tau(position)).

    Position s (0-based) has tau(s / total). A step schedule is integrated exactly: a shard is cut where tau
    switches and each piece counts its integer positions. A linear schedule takes `steps_per_shard` midpoint
    steps per shard.
    """
    bounds = (np.arange(shards + 1, dtype=np.int64) * total) // shards
    expected = np.zeros((shards, len(sizes)))
    switches = sorted({p.at * total for p in schedule})
    for shard in range(shards):
        start, stop = int(bounds[shard]), int(bounds[shard + 1])
        if kind == "step":
            cuts = [start] + [int(np.ceil(s)) for s in switches if start < s < stop] + [stop]
            pieces = [(b - a, tau_at(schedule, a / total)) for a, b in zip(cuts, cuts[1:], strict=False)]
        else:
            edges = np.linspace(start, stop, steps_per_shard + 1)
            pieces = [
                (b - a, tau_at(schedule, (a + b) / 2 / total, "linear"))
                for a, b in zip(edges, edges[1:], strict=False)
            ]
        for count, tau in pieces:
            if count > 0:
                expected[shard] += count * sampling_probabilities(sizes, tau, groups)
    return expected


def cap_epochs(expected: np.ndarray, sizes: Sequence[int], max_epochs: float | None) -> np.ndarray:
    """Limit each source to `max_epochs` passes over its documents (UniMax-style).

    A source over its cap is scaled down evenly over the shards and, in each shard, what it gives up goes to
    the sources still under their caps in proportion to their share there; repeated until no cap binds.
    Raises ValueError when the output is larger than all sources can fill.
    """
    if max_epochs is None:
        return expected
    sizes = np.asarray(sizes, dtype=np.float64)
    capacity = max_epochs * sizes
    if expected.sum() > capacity.sum() + 1e-6:
        raise ValueError(
            f"the output ({expected.sum():.0f} records) exceeds max_epochs x the sources ({capacity.sum():.0f})"
        )
    capped = expected.copy()
    saturated = np.zeros(len(sizes), dtype=bool)
    for _ in range(len(sizes) + 1):
        totals = capped.sum(axis=0)
        over = (totals > capacity + 1e-9) & ~saturated
        if not over.any():
            break
        scale = np.where(over, capacity / np.where(totals > 0, totals, 1), 1.0)
        freed = (capped * (1 - scale)).sum(axis=1)
        capped *= scale
        saturated |= over
        open_share = np.where(saturated, 0.0, capped)
        open_totals = open_share.sum(axis=1, keepdims=True)
        fallback = np.where(saturated, 0.0, capacity - capped.sum(axis=0))
        weights = np.where(open_totals > 0, open_share / np.where(open_totals > 0, open_totals, 1),
                           fallback / max(fallback.sum(), 1e-12))
        capped += freed[:, None] * weights
    return capped


def allocate(expected: np.ndarray) -> np.ndarray:
    """Integer (shards, sources) counts from expected ones.

    Each shard's row sums to the rounded sum of its expected row (exact when that is an integer, as it is for
    `expected_counts`); each source's running total stays within one record of its expected running total
    (the remainder is carried to the next shard, the largest remainders get the spare rows).
    """
    counts = np.zeros(expected.shape, dtype=np.int64)
    carry = np.zeros(expected.shape[1])
    for shard, row in enumerate(expected):
        target = row + carry
        base = np.floor(target + 1e-9).clip(min=0)
        spare = int(round(row.sum())) - int(base.sum())
        if spare > 0:
            order = np.lexsort((np.arange(len(target)), -(target - base)))
            base[order[:spare]] += 1
        elif spare < 0:
            order = np.lexsort((np.arange(len(target)), target - base))
            order = [i for i in order if base[i] > 0][:-spare]
            base[order] -= 1
        counts[shard] = base.astype(np.int64)
        carry = target - counts[shard]
    return counts


@dataclass(frozen=True)
class MixPlan:
    """Everything the mix stage needs to place records, and the manifest to explain it."""

    sources: list[str]
    sizes: list[int]
    counts: np.ndarray
    expected: np.ndarray
    schedule_expected: np.ndarray
    shard_taus: list[list[tuple[float, float]]]

    def shard_of_slot(self, source_index: int, slots: np.ndarray) -> np.ndarray:
        """The shard of each slot (0-based occurrence) of a source: shards take its slots in order."""
        cumulative = np.cumsum(self.counts[:, source_index])
        return np.searchsorted(cumulative, slots, side="right")


def shard_taus(schedule: Sequence[SchedulePoint], total: int, shards: int, kind: str) -> list[list[tuple]]:
    """Per shard, [(fraction where a tau starts, tau), ...] as seen by its positions."""
    bounds = (np.arange(shards + 1, dtype=np.int64) * total) // shards
    result = []
    for shard in range(shards):
        start, stop = int(bounds[shard]), int(bounds[shard + 1])
        if kind == "linear":
            result.append([(start / total, tau_at(schedule, start / total, kind)),
                           (stop / total, tau_at(schedule, max(stop - 1, start) / total, kind))])
            continue
        pieces = [(start / total, tau_at(schedule, start / total))]
        for point in sorted(schedule, key=lambda p: p.at):
            if start < point.at * total < stop and point.tau != pieces[-1][1]:
                pieces.append((point.at, point.tau))
        result.append(pieces)
    return result


def _groups(sources, group_of_source, group_shares) -> Groups | None:
    if not group_of_source or not group_shares:
        return None
    return Groups(tuple(group_of_source.get(s, "") for s in sources), dict(group_shares))


def plan_mix(
    sizes_by_source: dict[str, int],
    schedule: Sequence[SchedulePoint],
    total: int,
    shards: int,
    kind: str = "step",
    max_epochs: float | None = None,
    weights_by_source: dict[str, float] | None = None,
    group_of_source: dict[str, str] | None = None,
    group_shares: dict[str, float] | None = None,
) -> MixPlan:
    """The allocation for sources of the given sizes (records); `weights_by_source` (e.g. token counts)
    replaces the sizes in p(tau) when the mixture is defined over tokens; `group_of_source` and
    `group_shares` fix each group's share of every position (see Groups)."""
    sources = sorted(sizes_by_source)
    groups = _groups(sources, group_of_source, group_shares)
    sizes = [int(sizes_by_source[s]) for s in sources]
    weights = [float((weights_by_source or sizes_by_source)[s]) for s in sources]
    if total <= 0 or shards <= 0:
        raise ValueError("the output needs at least one record and one shard")
    if shards > total:
        raise ValueError(f"{shards} shards for {total} records: some shards would be empty")
    schedule_expected = expected_counts(weights, schedule, total, shards, kind, groups=groups)
    expected = cap_epochs(schedule_expected, sizes, max_epochs)
    return MixPlan(sources, sizes, allocate(expected), expected, schedule_expected,
                   shard_taus(schedule, total, shards, kind))


def records_for_tokens(
    budget_tokens: int,
    sizes_by_source: dict[str, int],
    mean_tokens_by_source: dict[str, float],
    schedule: Sequence[SchedulePoint],
    kind: str = "step",
    weights_by_source: dict[str, float] | None = None,
    group_of_source: dict[str, str] | None = None,
    group_shares: dict[str, float] | None = None,
) -> int:
    """The smallest output size in records whose expected token count under the schedule reaches the budget.

    Expected tokens of an output of T records = sum over positions and sources of p_i(tau) x mean tokens of i;
    it grows with T, so T is found by bisection (evaluated on one shard, which integrates the schedule exactly).
    """
    sources = sorted(sizes_by_source)
    groups = _groups(sources, group_of_source, group_shares)
    weights = [float((weights_by_source or sizes_by_source)[s]) for s in sources]
    mean = np.array([mean_tokens_by_source[s] for s in sources])
    if budget_tokens <= 0 or not (mean > 0).any():
        raise ValueError("a token budget needs a positive budget and sources with tokens")

    def tokens(total: int) -> float:
        return float(expected_counts(weights, schedule, total, 1, kind, groups=groups)[0] @ mean)

    low, high = 1, 1
    while tokens(high) < budget_tokens:
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        if tokens(middle) >= budget_tokens:
            high = middle
        else:
            low = middle + 1
    return low
