"""Prune stage: spherical k-means, SemDeDup inside each cluster, then a strategy's per-cluster quotas.

Two cached steps, so that a changed decision (`prune.keep_fraction`, `keep`, `tau`, `strategy`, ...) reuses
the expensive part:
  clusters  (ClusterRecords) centroids fitted on a seeded sample (the records with the smallest seeded id
            hashes, `prune.kmeans.fit_sample` of them, in input order), every record assigned in windows
            (vectorised), and per cluster the SemDeDup pairs (cosine past 1 - eps), which do not depend on the
            order; out: records with `cluster`, `dist_to_centroid` and `near`, and the centroids file
  decide    (PruneRecords) per cluster the SemDeDup pairs resolved in the `prune.keep` order, the quotas from
            the k clusters' statistics and the centroids (read by the driver from the clusters step), the
            first `quota` survivors in that order kept; out:
              kept     records that survive, with `cluster` and `dist_to_centroid`
              ledger   `deduplicated` rows (stage semdedup, with the id of the earlier record it duplicates and
                       their cosine) and `pruned` rows (stage prune, with its cluster's quota)
              summary  k, budget, and per cluster size, survivors, d_intra, d_inter, complexity, quota
With `prune.recluster` (the reference's order) the decision step clusters the SemDeDup survivors afresh before
the quotas; the ledger then gives kept and pruned records their new cluster. No step collects the embeddings on
one worker except the sampled fit. selectors.pruning.prune_pool is the same decision on an in-memory pool; a
test checks the two agree (docs/ALGORITHMS.md section 2).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import apache_beam as beam
import numpy as np

from winnow.pipelines.config import PruneConfig
from winnow.pipelines.ordered_io import write_bytes
from winnow.pipelines.passes import Pass, gather, smallest
from winnow.pipelines.progress import Progress
from winnow.pipelines.records import ledger_row, order_key, seeded_hash, split_routed
from winnow.pipelines.stage import ManifestContext, Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.pipelines.storage import join, read_bytes
from winnow.selectors import clustering
from winnow.selectors.pruning import (
    PruneSettings,
    choice_order,
    cluster_quotas,
    pool_budget,
    within_cluster_order,
)
from winnow.selectors.semdedup import near_pairs, resolve_pairs

KEPT, LEDGER, SUMMARY = "kept", "ledger", "summary"
SUMMARY_DIR = "_prune_summary"
CENTROIDS = "centroids.npy"
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
    def __init__(self, centroids: np.ndarray):
        self.centroids = centroids
        self.busy_ms = beam.metrics.Metrics.distribution("winnow.prune", "busy_ms")
        self.assigned = beam.metrics.Metrics.counter("winnow.prune", "records_assigned")

    def setup(self):
        self.progress = Progress("prune:assign")

    def process(self, window) -> Iterator[dict[str, Any]]:
        started = time.perf_counter()
        records = sorted(window[1], key=order_key)
        labels, dist = clustering.assign(np.stack([r["embedding"] for r in records]), self.centroids)
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        self.assigned.inc(len(records))
        self.progress.advance(len(records))
        for record, label, distance in zip(records, labels.tolist(), dist.tolist(), strict=True):
            yield {**record, "cluster": label, "dist_to_centroid": distance}


class _NearPairsFn(beam.DoFn):
    """One cluster -> its members, each with `near`: the (order key, cosine) of the later members whose cosine
    to it passes SemDeDup's threshold. Order-independent, so the decision step resolves it for any order."""

    def __init__(self, settings: PruneSettings):
        self.settings = settings
        self.busy_ms = beam.metrics.Metrics.distribution("winnow.semdedup", "busy_ms")

    def process(self, element) -> Iterator[dict[str, Any]]:
        started = time.perf_counter()
        _, members = element
        members = sorted(members, key=order_key)
        near: list[list] = [[] for _ in members]
        if self.settings.semdedup:
            first, second, similarity = near_pairs(
                np.stack([m["embedding"] for m in members]), self.settings.eps, self.settings.strict)
            for i, j, value in zip(first.tolist(), second.tolist(), similarity.tolist(), strict=True):
                near[i].append((*order_key(members[j]), value))
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        for member, pairs in zip(members, near, strict=True):
            yield {**member, "near": pairs}


class _DedupFn(beam.DoFn):
    """One cluster's members with their `near` pairs -> SemDeDup's decision in the cluster's hardness order:
    ledger rows of the duplicates, the cluster's statistics and its survivors in order."""

    def __init__(self, settings: PruneSettings):
        self.settings = settings

    def process(self, element) -> Iterator[tuple[str, Any]]:
        cluster, members = element
        members = sorted(members, key=order_key)
        index = {order_key(m): i for i, m in enumerate(members)}
        dist = np.array([m["dist_to_centroid"] for m in members], dtype=np.float32)
        order = within_cluster_order(dist, self.settings.keep, self.settings.seed, cluster)
        pairs = [(i, index[tuple(p[:3])], p[3]) for i, m in enumerate(members) for p in m.get("near", ())]
        first = np.array([pair[0] for pair in pairs], dtype=np.int64)
        second = np.array([pair[1] for pair in pairs], dtype=np.int64)
        cosine = np.array([pair[2] for pair in pairs], dtype=np.float32)
        survivors, duplicate_of, similarity = resolve_pairs(len(members), order, first, second, cosine)
        for i in np.flatnonzero(~survivors).tolist():
            record, earlier = members[i], members[int(duplicate_of[i])]
            detail = f"cosine {float(similarity[i]):.4f} to {earlier['id']} (cluster {cluster})"
            yield LEDGER, ledger_row(record, "deduplicated", "semdedup", "semantic_duplicate", detail,
                                     duplicate_of=earlier["id"])
        ordered = [_without_pairs(members[i]) for i in order.tolist() if survivors[i]]
        yield "stats", (cluster, len(ordered), float(sum(m["dist_to_centroid"] for m in ordered)), len(members))
        yield "survivors", (cluster, ordered)


def _without_pairs(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "near"}


class _QuotaFn(beam.DoFn):
    def __init__(self, settings: PruneSettings, count: int, centroids: np.ndarray):
        self.settings = settings
        self.count = count
        self.centroids = centroids

    def process(self, element) -> Iterator[tuple[str, Any]]:
        centroids = self.centroids
        count = self.count
        k = len(centroids)
        sizes, distance_sums, before = np.zeros(k, np.int64), np.zeros(k), np.zeros(k, np.int64)
        for cluster, size, distance_sum, members in element[1]:
            sizes[cluster], distance_sums[cluster], before[cluster] = size, distance_sum, members
        total_budget = pool_budget(self.settings, count, int(sizes.sum()))
        stats = cluster_quotas(sizes, distance_sums, centroids, total_budget, self.settings)
        for cluster in range(k):
            yield "quota", (cluster, int(stats["quota"][cluster]))
        yield SUMMARY, {
            "dir": SUMMARY_DIR,
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
    def __init__(self, settings: PruneSettings):
        self.settings = settings
        self.strategy = settings.strategy

    def process(self, element) -> Iterator[tuple[str, Any]]:
        cluster, joined = element
        quotas = list(joined["quota"])
        for survivors in joined["survivors"]:
            if len(quotas) != 1:
                raise RuntimeError(f"internal error: cluster {cluster} has {len(quotas)} quotas")
            quota = quotas[0]
            choice = choice_order(len(survivors), self.settings, cluster)
            if choice is not None:
                survivors = [survivors[i] for i in choice.tolist()]
            for rank, record in enumerate(survivors):
                if rank < quota:
                    yield KEPT, record
                else:
                    detail = f"cluster {cluster} keeps {quota} of {len(survivors)}; rank {rank}"
                    yield LEDGER, ledger_row(record, "pruned", "prune", self.strategy, detail)


def fit_sample(records, config: PruneConfig, step: str = ""):
    """A pass's graph: records -> {"sample": the `prune.kmeans.fit_sample` records with the smallest seeded id
    hashes as (hash, order key, vector), "count": how many records}."""
    seed = config.seed
    sample = (
        records
        | f"{step}SampleKey" >> beam.Map(lambda r: (seeded_hash(seed, r["id"], "fit"), order_key(r), r["embedding"]))
    )
    sample = smallest(sample, config.kmeans.fit_sample, f"{step}Sample", key=lambda e: (e[0], e[1]))
    count = records | f"{step}Count" >> beam.combiners.Count.Globally()
    return gather({"sample": sample, "count": count}, f"{step}FitSample")


def fit_pass_result(value: dict[str, Any], settings: PruneSettings) -> np.ndarray:
    return fit(value["sample"], value["count"], settings)


def _assign(records, centroids: np.ndarray, step: str):
    """Every record with `cluster` and `dist_to_centroid` (its nearest centroid), in windows."""
    return (
        records
        | f"{step}WindowKey" >> beam.Map(lambda r: ((r["file_index"], r["input_row"] // WINDOW), r))
        | f"{step}Windows" >> beam.GroupByKey()
        | f"{step}Assign" >> beam.ParDo(_AssignFn(centroids))
    )


def _write_centroids(centroids: np.ndarray, directory: str) -> dict[str, Any]:
    payload = io.BytesIO()
    np.save(payload, np.asarray(centroids, dtype=np.float32))
    write_bytes(f"{directory}/{CENTROIDS}", payload.getvalue())
    dimension = int(centroids.shape[1]) if centroids.ndim == 2 else 0
    return {"dir": "centroids", "file": CENTROIDS, "rows": int(len(centroids)), "dimension": dimension,
            "bytes": payload.tell()}


def read_centroids(directory: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(join(directory, CENTROIDS))))


class ClusterRecords(beam.PTransform):
    """The scores of pruning: records with embeddings and the `centroids` fitted on the driver (from the
    `fit_sample` pass) -> the same records with `cluster`, `dist_to_centroid` and `near` (their SemDeDup pairs
    inside the cluster), and the centroids written to DIRECTORY."""

    def __init__(self, config: PruneConfig, directory: str, centroids: np.ndarray):
        super().__init__()
        self.config = config
        self.directory = directory
        self.centroids = centroids

    def expand(self, records):
        settings = settings_from(self.config)
        scored = (
            _assign(records, self.centroids, "")
            | "KeyByCluster" >> beam.Map(lambda r: (r["cluster"], r))
            | "Clusters" >> beam.GroupByKey()
            | "NearPairs" >> beam.ParDo(_NearPairsFn(settings))
        )
        written = (
            records.pipeline
            | "Centroids" >> beam.Create([None])
            | "WriteCentroids" >> beam.Map(lambda _, c, d: _write_centroids(c, d), self.centroids, self.directory)
        )
        return scored, written


def _dedup(records, settings: PruneSettings, step: str):
    return split_routed(
        records
        | f"{step}KeyByCluster" >> beam.Map(lambda r: (r["cluster"], r))
        | f"{step}Clusters" >> beam.GroupByKey()
        | f"{step}SemDeDup" >> beam.ParDo(_DedupFn(settings)),
        f"{step}Dedup",
        (LEDGER, "stats", "survivors"),
    )


def _survivors(deduped):
    return deduped["survivors"] | "Survivors" >> beam.FlatMap(lambda kv: kv[1])


def refit_sample(records, config: PruneConfig):
    """A pass's graph for `prune.recluster`: the fit sample and count of the SemDeDup survivors."""
    return fit_sample(_survivors(_dedup(records, settings_from(config), "")), config, "Recluster")


class PruneRecords(beam.PTransform):
    """The decision of pruning: clustered records (from ClusterRecords, `count` of them; its `centroids`) ->
    {kept, ledger, summary}: SemDeDup resolved in the `prune.keep` order, the strategy's quotas, the first
    `quota` survivors of each cluster in that order. With `prune.recluster`, `recluster_centroids` are those
    fitted on the survivors (the `refit_sample` pass)."""

    def __init__(self, config: PruneConfig, count: int, centroids: np.ndarray,
                 recluster_centroids: np.ndarray | None = None):
        super().__init__()
        self.config = config
        self.count = count
        self.centroids = centroids
        self.recluster_centroids = recluster_centroids

    def expand(self, records):
        settings = settings_from(self.config)
        deduped = clustered = _dedup(records, settings, "")
        quotas = _QuotaFn(settings, self.count, self.centroids)
        if settings.recluster:
            assigned = _assign(_survivors(deduped), self.recluster_centroids, "Recluster")
            clustered = _dedup(assigned, replace(settings, semdedup=False), "Recluster")
            quotas = _QuotaFn(settings, self.count, self.recluster_centroids)
        planned = split_routed(
            clustered["stats"]
            | "AllStats" >> beam.Map(lambda stats: (None, stats))
            | "GatherStats" >> beam.GroupByKey()
            | "Quotas" >> beam.ParDo(quotas),
            "Planned",
            ("quota", SUMMARY),
        )
        selected = split_routed(
            {"survivors": clustered["survivors"], "quota": planned["quota"]}
            | "JoinQuotas" >> beam.CoGroupByKey()
            | "Select" >> beam.ParDo(_SelectFn(settings)),
            "Selected",
            (KEPT, LEDGER),
        )
        ledger = (deduped[LEDGER], selected[LEDGER]) | "PruneLedger" >> beam.Flatten()
        return {KEPT: selected[KEPT], LEDGER: ledger, SUMMARY: planned[SUMMARY]}


DECISION_KEYS = ("strategy", "keep_fraction", "keep", "tau", "neighbours", "min_per_cluster_frac", "seed",
                 "recluster")


def _clusters(pipeline, records, context: StepContext) -> StepOutput:
    config = context.job.config.prune
    centroids = fit_pass_result(context.constants["fit"], settings_from(config))
    scored, centroids_file = records | "Prune" >> ClusterRecords(config, context.directory, centroids)
    return StepOutput(scored, [], [centroids_file])


def _decide(pipeline, records, context: StepContext) -> StepOutput:
    config = context.job.config.prune
    previous = context.previous
    refit = context.constants.get("refit")
    recluster = fit_pass_result(refit, settings_from(config)) if refit is not None else None
    pruned = records | "PruneDecide" >> PruneRecords(config, previous.records, read_centroids(previous.directory),
                                                     recluster)
    return StepOutput(pruned[KEPT], [pruned[LEDGER]], [pruned[SUMMARY]])


def _steps(plan, config) -> list[Step]:
    section = config_section(config, "prune")
    scores = {k: v for k, v in section.items() if k not in DECISION_KEYS or k == "seed"}  # seed: the fit sample
    decision = {k: section[k] for k in DECISION_KEYS}
    prune = config.prune
    fit_pass = Pass("fit", lambda records, constants: fit_sample(records, prune), reads_vectors=True)
    refit = (Pass("refit", lambda records, constants: refit_sample(records, prune), reads_vectors=True),) \
        if prune.recluster else ()
    return [
        Step("clusters", _clusters, {"prune": scores}, reads_vectors=True, passes=(fit_pass,)),
        Step("decide", _decide, {"prune": decision}, reads_vectors=prune.recluster, passes=refit),
    ]


def _manifest(context: ManifestContext) -> dict[str, Any]:
    centroids = [f for f in context.files if f["dir"] == "centroids"]
    section = {**summary_meta(context.files, SUMMARY_DIR), "settings": context.job.config.prune.model_dump()}
    if centroids:
        section["centroids"] = {"k": centroids[0]["rows"], "dimension": centroids[0].get("dimension")}
    return {"prune": section}


def _check(context) -> list[str]:
    """The summary against the ledger: deduplicated == records - survivors, pruned == survivors - quotas, each
    quota within its cluster, k clusters of centroids with the embeddings' dimension."""
    summary, rows = context.manifest["prune"], context.rows
    if "clusters" not in summary:
        return []
    problems = []
    records, survivors, clusters = summary["records"], summary["survivors"], summary["clusters"]
    quotas = sum(c["quota"] for c in clusters)
    if records - survivors != rows[("deduplicated", "semdedup")]:
        problems.append(f"{records} records and {survivors} survivors, but the ledger has "
                        f"{rows[('deduplicated', 'semdedup')]} deduplicated rows")
    if survivors - quotas != rows[("pruned", "prune")]:
        problems.append(f"{survivors} survivors and quotas summing to {quotas}, but the ledger has "
                        f"{rows[('pruned', 'prune')]} pruned rows")
    if sum(c["survivors"] for c in clusters) != survivors:
        problems.append(f"cluster survivors sum to {sum(c['survivors'] for c in clusters)}, not {survivors}")
    over = [c["cluster"] for c in clusters if c["quota"] > c["survivors"]]
    if over:
        problems.append(f"cluster {over[0]} has a quota above its survivors")
    if records and (summary["k"] < 1 or len(clusters) != summary["k"]):
        problems.append(f"k {summary['k']} with {len(clusters)} clusters listed")
    centroids = summary.get("centroids")
    if records and centroids is not None:
        dimension = context.embedding_dimension()
        if centroids["k"] < 1 or not centroids["dimension"] or \
                (dimension is not None and centroids["dimension"] != dimension):
            problems.append(f"centroids {centroids['k']} x {centroids['dimension']}, embeddings of dimension "
                            f"{dimension}")
    return problems


STAGE = Stage(
    name="prune",
    module=__name__,
    section="prune",
    enabled=lambda config: config.prune.enabled,
    reads_embeddings=lambda config: config.prune.enabled,
    plan=lambda context: None,
    steps=_steps,
    libraries=("faiss-cpu", "numpy"),
    manifest=_manifest,
    report="winnow.pipelines.report:prune_section",
    ledger_stages=("semdedup", "prune"),
    check=_check,
)
