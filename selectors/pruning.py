"""Concept-cluster pruning of an in-memory pool: k-means, SemDeDup, then a strategy's per-cluster quotas.

The single-machine composition of clustering, semdedup and dbp, used by evaluations and benchmarks; the Beam
prune stage composes the same functions per cluster, and a test checks that both decide the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from winnow.selectors import clustering, dbp
from winnow.selectors.names import PRUNE_STRATEGIES
from winnow.selectors.semdedup import hardness_order, semdedup


@dataclass
class PruneSettings:
    strategy: str = "dbp"
    keep_fraction: float = 0.5
    keep: str = "hard"
    seed: int = 0
    tau: float = 0.5
    neighbours: int = 20
    min_per_cluster_frac: float = 0.5
    k: int | None = None
    niter: int = clustering.REFERENCE_NITER
    kmeans_seed: int = clustering.REFERENCE_SEED
    semdedup: bool = True
    eps: float = 0.05
    strict: bool = True
    recluster: bool = False


@dataclass
class ClusterDecision:
    """What happened inside one cluster, indexed like the cluster's members."""

    survivors: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _dbp(sizes, probabilities, total_budget, settings):
    return dbp.dbp_quotas(sizes, probabilities, total_budget, settings.min_per_cluster_frac)[0]


def _ssp(sizes, probabilities, total_budget, settings):
    return dbp.ssp_quotas(sizes, total_budget)


def _random(sizes, probabilities, total_budget, settings):
    return np.random.default_rng(settings.seed).multivariate_hypergeometric(sizes, total_budget)


def _none(sizes, probabilities, total_budget, settings):
    return sizes.copy()


# strategy name -> per-cluster quotas (sizes, DBP probabilities, budget, settings); the config's choices
QUOTAS = {"dbp": _dbp, "ssp": _ssp, "random": _random, "none": _none}
STRATEGIES = tuple(QUOTAS)
UNIFORM_CHOICE = frozenset({"random"})  # strategies that keep a uniform sample of each cluster, whatever `keep`
assert STRATEGIES == PRUNE_STRATEGIES, "every configurable strategy has an implementation"


def within_cluster_order(dist: np.ndarray, keep: str, seed: int, cluster: int) -> np.ndarray:
    """Hardness order of a cluster's members; the random order is seeded per cluster."""
    return hardness_order(dist, keep, seed=(seed * 1_000_003 + cluster) % (2**32))


def dedup_cluster(vectors: np.ndarray, dist: np.ndarray, cluster: int, settings: PruneSettings) -> ClusterDecision:
    order = within_cluster_order(dist, settings.keep, settings.seed, cluster)
    if not settings.semdedup:
        count = len(vectors)
        return ClusterDecision(np.ones(count, bool), np.full(count, -1), np.full(count, -np.inf, np.float32), order)
    keep, duplicate_of, similarity = semdedup(vectors, order, settings.eps, settings.strict)
    return ClusterDecision(keep, duplicate_of, similarity, order)


def cluster_quotas(
    sizes: np.ndarray, distance_sums: np.ndarray, centroids: np.ndarray, total_budget: int, settings: PruneSettings
) -> dict[str, np.ndarray]:
    """Per-cluster statistics and quotas for the strategy (sizes and distances of the SemDeDup survivors)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    d_intra = dbp.intra_distance(sizes, distance_sums)
    d_inter = dbp.inter_distance(centroids, settings.neighbours)
    complexity = dbp.complexity(d_intra, d_inter, sizes)
    probabilities = dbp.softmax(complexity, settings.tau)
    if settings.strategy not in QUOTAS:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {settings.strategy!r}")
    quotas = QUOTAS[settings.strategy](sizes, probabilities, total_budget, settings)
    return {"size": sizes, "d_intra": d_intra, "d_inter": d_inter, "complexity": complexity,
            "probability": probabilities, "quota": np.asarray(quotas, dtype=np.int64)}


def choice_order(count: int, settings: PruneSettings, cluster: int) -> np.ndarray | None:
    """The order in which a cluster's `count` survivors (listed in the `keep` order) are taken: None (that
    order), or for the random strategy a seeded permutation, so that it keeps a uniform sample whatever
    `prune.keep` says (the `keep` order still decides SemDeDup's survivors)."""
    if settings.strategy not in UNIFORM_CHOICE:
        return None
    return np.random.default_rng([settings.seed % 2**32, cluster, 0x5EED]).permutation(count)


def select_in_cluster(order: np.ndarray, survivors: np.ndarray, quota: int, choice: np.ndarray | None = None
                      ) -> np.ndarray:
    """Kept mask: the first `quota` survivors in the cluster's order (`prune.keep`), or in `choice` (positions
    into that list of survivors; see choice_order)."""
    kept = np.zeros(len(survivors), dtype=bool)
    ranked = [i for i in order if survivors[i]]
    if choice is not None:
        ranked = [ranked[i] for i in choice]
    kept[ranked[:quota]] = True
    return kept


def pool_budget(settings: PruneSettings, entering: int, survivors: int) -> int:
    """Records kept: keep_fraction of the records entering the stage (before SemDeDup), at most the survivors;
    strategy none keeps every survivor."""
    if settings.strategy == "none":
        return survivors
    return min(dbp.budget(settings.keep_fraction, entering), survivors)


def _fit_and_assign(vectors: np.ndarray, settings: PruneSettings, fit_sample: int | None):
    count = len(vectors)
    k = settings.k or clustering.default_k(count)
    sample = vectors
    if fit_sample and fit_sample < count:
        sample = vectors[np.sort(np.random.default_rng(settings.kmeans_seed).choice(count, fit_sample, replace=False))]
    centroids = clustering.fit_centroids(sample, k, settings.niter, settings.kmeans_seed)
    labels, dist = clustering.assign(vectors, centroids)
    members_of = [np.flatnonzero(labels == c) for c in range(len(centroids))]
    return centroids, labels, dist, members_of


def prune_pool(vectors: np.ndarray, settings: PruneSettings, fit_sample: int | None = None) -> dict[str, np.ndarray]:
    """Decide every record of an in-memory pool: labels, dist, deduplicated, duplicate_of, kept."""
    vectors = np.asarray(vectors, dtype=np.float32)
    count = len(vectors)
    centroids, labels, dist, members_of = _fit_and_assign(vectors, settings, fit_sample)
    deduplicated = np.zeros(count, dtype=bool)
    duplicate_of = np.full(count, -1, dtype=np.int64)
    decisions = []
    for cluster, members in enumerate(members_of):
        decision = dedup_cluster(vectors[members], dist[members], cluster, settings)
        deduplicated[members] = ~decision.survivors
        duplicate_of[members] = np.where(decision.duplicate_of >= 0, members[decision.duplicate_of], -1)
        duplicate_of[members[decision.survivors]] = -1
        decisions.append(decision)
    if settings.recluster:
        survivors = np.flatnonzero(~deduplicated)
        centroids, new_labels, new_dist, new_members = _fit_and_assign(vectors[survivors], settings, fit_sample)
        labels[survivors], dist[survivors] = new_labels, new_dist
        members_of = [survivors[m] for m in new_members]
        no_dedup = replace(settings, semdedup=False)
        decisions = [dedup_cluster(vectors[m], dist[m], c, no_dedup) for c, m in enumerate(members_of)]
    sizes = np.array([int(d.survivors.sum()) for d in decisions])
    distance_sums = np.array([float(dist[m][d.survivors].sum()) for m, d in zip(members_of, decisions, strict=True)])
    total_budget = pool_budget(settings, count, int(sizes.sum()))
    stats = cluster_quotas(sizes, distance_sums, centroids, total_budget, settings)
    kept = np.zeros(count, dtype=bool)
    for cluster, (members, decision) in enumerate(zip(members_of, decisions, strict=True)):
        choice = choice_order(int(decision.survivors.sum()), settings, cluster)
        kept[members] = select_in_cluster(decision.order, decision.survivors, int(stats["quota"][cluster]), choice)
    return {"labels": labels, "dist": dist, "deduplicated": deduplicated, "duplicate_of": duplicate_of,
            "kept": kept, "centroids": centroids, **{f"cluster_{key}": value for key, value in stats.items()}}
