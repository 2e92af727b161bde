"""Prune stage: spherical k-means, SemDeDup inside each cluster, then a strategy's per-cluster quotas.

Input: records with `embedding`. Outputs (routed pairs, see records.split_routed):
  kept     records that survive, with `cluster` and `dist_to_centroid`
  ledger   rows for the records taken out: `deduplicated` (stage semdedup, with the id of the earlier record
           it duplicates and their cosine) or `pruned` (stage prune, with its cluster's quota)
  plan     one dict for the manifest: k, budget, and per cluster size, survivors, d_intra, d_inter, complexity,
           quota

Wiring for a distributed run (ALGORITHMS.md section 2): the centroids are fitted on one worker from a seeded
sample (the records with the smallest seeded id hashes, `prune.kmeans.fit_sample` of them, in input order) and
broadcast as a side input; records are assigned in windows (vectorised); a GroupByKey on cluster runs
SemDeDup and yields per-cluster statistics; the quotas are computed from those k statistics in one small step
and joined back to their clusters, where the first `quota` survivors in hardness order are kept. With
`prune.recluster` (the reference's order) the SemDeDup survivors are clustered afresh, the same way, before
the quotas; the ledger then gives kept and pruned records their new cluster. No step
collects the embeddings on one worker except the sampled fit. selectors.pruning.prune_pool is the same
decision on an in-memory pool; a test checks the two agree.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import apache_beam as beam
import numpy as np

from winnow.pipelines.config import PruneConfig
from winnow.pipelines.mix import seeded_hash
from winnow.pipelines.progress import Progress
from winnow.pipelines.records import ledger_row, order_key, split_routed
from winnow.selectors import clustering
from winnow.selectors.pruning import PruneSettings, cluster_quotas, dedup_cluster, pool_budget

KEPT, LEDGER, PLAN = "kept", "ledger", "plan"
WINDOW = 4096


def settings_from(config: PruneConfig) -> PruneSettings:
    return PruneSettings(
        strategy=config.strategy, keep_fraction=config.keep_fraction, keep=config.keep, seed=config.seed,
        tau=config.tau, neighbours=config.neighbours, min_per_cluster_frac=config.min_per_cluster_frac,
        k=config.kmeans.k, niter=config.kmeans.niter, kmeans_seed=config.kmeans.seed,
        semdedup=config.semdedup.enabled, eps=config.semdedup.eps, strict=config.semdedup.strict,
        recluster=config.recluster,
    )


def fit(sample: list, count: int, settings: PruneSettings) -> np.ndarray:
    """Centroids from the sampled (hash, order key, vector) triples, fitted in input order."""
    unique = {entry[1]: entry[2] for entry in sample}
    if not unique:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = np.stack([unique[key] for key in sorted(unique)])
    k = settings.k or clustering.default_k(count)
    return clustering.fit_centroids(vectors, k, settings.niter, settings.kmeans_seed)


class _AssignFn(beam.DoFn):
    def __init__(self):
        self.busy_ms = beam.metrics.Metrics.distribution("winnow.prune", "busy_ms")
        self.assigned = beam.metrics.Metrics.counter("winnow.prune", "records_assigned")

    def setup(self):
        self.progress = Progress("prune:assign")

    def process(self, window, centroids) -> Iterator[dict[str, Any]]:
        started = time.perf_counter()
        records = sorted(window[1], key=order_key)
        labels, dist = clustering.assign(np.stack([r["embedding"] for r in records]), centroids)
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        self.assigned.inc(len(records))
        self.progress.advance(len(records))
        for record, label, distance in zip(records, labels.tolist(), dist.tolist(), strict=True):
            yield {**record, "cluster": label, "dist_to_centroid": distance}


class _DedupFn(beam.DoFn):
    def __init__(self, settings: PruneSettings):
        self.settings = settings
        self.busy_ms = beam.metrics.Metrics.distribution("winnow.semdedup", "busy_ms")

    def process(self, element) -> Iterator[tuple[str, Any]]:
        started = time.perf_counter()
        cluster, members = element
        members = sorted(members, key=order_key)
        vectors = np.stack([m["embedding"] for m in members])
        dist = np.array([m["dist_to_centroid"] for m in members], dtype=np.float32)
        decision = dedup_cluster(vectors, dist, cluster, self.settings)
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        for index in np.flatnonzero(~decision.survivors).tolist():
            record, earlier = members[index], members[int(decision.duplicate_of[index])]
            detail = f"cosine {float(decision.similarity[index]):.4f} to {earlier['id']} (cluster {cluster})"
            yield LEDGER, ledger_row(record, "deduplicated", "semdedup", "semantic_duplicate", detail,
                                     duplicate_of=earlier["id"])
        ordered = [members[i] for i in decision.order.tolist() if decision.survivors[i]]
        yield "stats", (cluster, len(ordered), float(sum(m["dist_to_centroid"] for m in ordered)), len(members))
        yield "survivors", (cluster, ordered)


class _QuotaFn(beam.DoFn):
    def __init__(self, settings: PruneSettings):
        self.settings = settings

    def process(self, element, centroids, count) -> Iterator[tuple[str, Any]]:
        k = len(centroids)
        sizes, distance_sums, before = np.zeros(k, np.int64), np.zeros(k), np.zeros(k, np.int64)
        for cluster, size, distance_sum, members in element[1]:
            sizes[cluster], distance_sums[cluster], before[cluster] = size, distance_sum, members
        total_budget = pool_budget(self.settings, count, int(sizes.sum()))
        stats = cluster_quotas(sizes, distance_sums, centroids, total_budget, self.settings)
        for cluster in range(k):
            yield "quota", (cluster, int(stats["quota"][cluster]))
        yield PLAN, {
            "dir": "_prune_plan",
            "k": k,
            "records": count,
            "survivors": int(sizes.sum()),
            "budget": total_budget,
            "clusters": [
                {"cluster": c, "members": int(before[c]), "survivors": int(sizes[c]),
                 "d_intra": _number(stats["d_intra"][c]), "d_inter": _number(stats["d_inter"][c]),
                 "complexity": _number(stats["complexity"][c]), "quota": int(stats["quota"][c])}
                for c in range(k)
            ],
        }


def _number(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


class _SelectFn(beam.DoFn):
    def __init__(self, strategy: str):
        self.strategy = strategy

    def process(self, element) -> Iterator[tuple[str, Any]]:
        cluster, joined = element
        quotas = list(joined["quota"])
        for survivors in joined["survivors"]:
            if len(quotas) != 1:
                raise RuntimeError(f"internal error: cluster {cluster} has {len(quotas)} quotas")
            quota = quotas[0]
            for rank, record in enumerate(survivors):
                if rank < quota:
                    yield KEPT, record
                else:
                    detail = f"cluster {cluster} keeps {quota} of {len(survivors)}; rank {rank}"
                    yield LEDGER, ledger_row(record, "pruned", "prune", self.strategy, detail)


class PruneRecords(beam.PTransform):
    """records with embeddings -> {kept, ledger, plan} (see the module docstring)."""

    def __init__(self, config: PruneConfig):
        super().__init__()
        self.config = config
        self.settings = settings_from(config)

    def _cluster(self, records, settings: PruneSettings, step: str):
        """Fit centroids on a seeded sample, assign in windows, group by cluster and run SemDeDup (or, with
        semdedup off, only order each cluster): (centroids, count, routed ledger/stats/survivors)."""
        seed = self.config.seed
        sample = (
            records
            | f"{step}SampleKey"
            >> beam.Map(lambda r: (seeded_hash(seed, r["id"], "fit"), order_key(r), r["embedding"]))
            | f"{step}Sample"
            >> beam.combiners.Top.Smallest(self.config.kmeans.fit_sample, key=lambda e: (e[0], e[1]))
        )
        count = records | f"{step}Count" >> beam.combiners.Count.Globally()
        centroids = sample | f"{step}Fit" >> beam.Map(fit, beam.pvalue.AsSingleton(count), settings)
        assigned = (
            records
            | f"{step}WindowKey" >> beam.Map(lambda r: ((r["file_index"], r["input_row"] // WINDOW), r))
            | f"{step}Windows" >> beam.GroupByKey()
            | f"{step}Assign" >> beam.ParDo(_AssignFn(), beam.pvalue.AsSingleton(centroids))
        )
        grouped = split_routed(
            assigned
            | f"{step}KeyByCluster" >> beam.Map(lambda r: (r["cluster"], r))
            | f"{step}Clusters" >> beam.GroupByKey()
            | f"{step}SemDeDup" >> beam.ParDo(_DedupFn(settings)),
            f"{step}Dedup",
            (LEDGER, "stats", "survivors"),
        )
        return centroids, count, grouped

    def expand(self, records):
        settings = self.settings
        centroids, count, deduped = self._cluster(records, settings, "")
        clustered = deduped
        if settings.recluster:
            survivors = deduped["survivors"] | "Survivors" >> beam.FlatMap(lambda kv: kv[1])
            centroids, _, clustered = self._cluster(survivors, replace(settings, semdedup=False), "Recluster")
        planned = split_routed(
            clustered["stats"]
            | "AllStats" >> beam.Map(lambda stats: (None, stats))
            | "GatherStats" >> beam.GroupByKey()
            | "Quotas"
            >> beam.ParDo(_QuotaFn(settings), beam.pvalue.AsSingleton(centroids), beam.pvalue.AsSingleton(count)),
            "Planned",
            ("quota", PLAN),
        )
        selected = split_routed(
            {"survivors": clustered["survivors"], "quota": planned["quota"]}
            | "JoinQuotas" >> beam.CoGroupByKey()
            | "Select" >> beam.ParDo(_SelectFn(self.config.strategy)),
            "Selected",
            (KEPT, LEDGER),
        )
        ledger = (deduped[LEDGER], selected[LEDGER]) | "PruneLedger" >> beam.Flatten()
        return {KEPT: selected[KEPT], LEDGER: ledger, PLAN: planned[PLAN]}
