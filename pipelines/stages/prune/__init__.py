"""Prune stage: spherical k-means, SemDeDup inside each cluster, then a strategy's per-cluster quotas.

Two cached steps, so that a changed decision (`prune.keep_fraction`, `keep`, `tau`, `strategy`, ...) reuses
the expensive part. Both work on record files (typed blocks or pickled records), never on records in a
GroupByKey: rows are shuffled by cluster through files written per record file and read per partition of
clusters (a contiguous range of clusters, about PARTITION_ROWS records), and only file references, counts
and per-cluster statistics cross the graph.
  clusters  fit pass: the records with the smallest seeded id hashes (`prune.kmeans.fit_sample` of them; each
            file's candidates merged as arrays), centroids fitted on the driver in input order. Graph: each
            record file assigned WINDOW input rows at a time (its rows written back with `cluster` and
            `dist_to_centroid`) and its (cluster, order key, id, dist, vector) rows written into a fragment,
            a row group per partition; each partition gathered into `members/part-P.parquet` (sorted by
            cluster and input order, with vectors) and `pairs/part-P.parquet`: SemDeDup's pairs inside each
            cluster (cosine past 1 - eps), which do not depend on the order; the centroids file
  decide    groups pass: per partition, the pairs resolved in each cluster's `prune.keep` order; the dropped
            rows' decisions and the survivors (each cluster's in that order) written to the step's scratch
            folder; the clusters' statistics to the driver, which computes the quotas. Graph: each survivors
            file selected (a cluster's first `quota` survivors, in that order or the strategy's choice order,
            kept); the decisions, written a row group per record file, joined back to each record file:
              records  kept records, with `cluster` and `dist_to_centroid`
              removed  ledger rows: `deduplicated` (stage semdedup, with the id of the earlier record it
                       duplicates and their cosine) and `pruned` (stage prune, with its cluster's quota)
              summary  k, budget, and per cluster size, survivors, d_intra, d_inter, complexity, quota
With `prune.recluster` (the reference's order) a refit pass fits new centroids on the SemDeDup survivors'
sample; the groups pass assigns the survivors to them and regroups them by partition of the new clusters
before the quotas; the ledger then gives kept and pruned records their new cluster. What is held at once: a
record file, a partition, the fit sample (docs/NOTES.md). selectors.pruning.prune_pool is the same decision on
an in-memory pool; a test checks the two agree (docs/ALGORITHMS.md section 2).
"""

from __future__ import annotations

from typing import Any

from winnow.pipelines.engine.embed_model import EmbedPlan
from winnow.pipelines.engine.stage import (
    ManifestContext,
    PlanContext,
    Stage,
    Step,
    config_section,
    summary_meta,
)
from winnow.pipelines.stages.prune.clusters import clusters_step, fit_passes
from winnow.pipelines.stages.prune.common import CONFIRM_COUNTS, PAIRS, SUMMARY_DIR
from winnow.pipelines.stages.prune.decide import build_decide, groups_pass, refit_pass

DECISION_KEYS = ("strategy", "keep_fraction", "keep", "tau", "neighbours", "min_per_cluster_frac", "seed",
                 "recluster")


def _plan(context: PlanContext) -> EmbedPlan | None:
    """The confirming model of two-tier SemDeDup (`prune.semdedup.confirm`): embed.model on that backend,
    exported here on the driver, once."""
    semdedup = context.config.prune.semdedup
    if not (semdedup.enabled and semdedup.confirm != "off"):
        return None
    embed = context.config.embed.model_copy(update={"backend": semdedup.confirm,
                                                     "precision": semdedup.confirm_precision, "device": "cpu"})
    return EmbedPlan.from_config(embed, context.workers)


def _steps(plan: EmbedPlan | None, config) -> list[Step]:
    section = config_section(config, "prune")
    scores = {k: v for k, v in section.items() if k not in DECISION_KEYS or k == "seed"}  # seed: the fit sample
    decision = {k: section[k] for k in DECISION_KEYS}
    prune = config.prune
    refit = (refit_pass(prune),) if prune.recluster else ()
    confirm = {} if plan is None else {"confirm": f"{plan.fingerprint}:{plan.backend}:{plan.precision}",
                                       "max_seq_length": plan.max_seq_length}
    return [
        Step("clusters", clusters_step(plan), {"prune": scores}, confirm, reads_vectors=True, reads_files=True,
             passes=fit_passes(prune)),
        Step("decide", build_decide, {"prune": decision}, reads_files=True, passes=(*refit, groups_pass(prune))),
    ]


def _manifest(context: ManifestContext) -> dict[str, Any]:
    centroids = [f for f in context.files if f["dir"] == "centroids"]
    section = {**summary_meta(context.files, SUMMARY_DIR), "settings": context.job.config.prune.model_dump()}
    if context.plan is not None:
        pairs = [f for f in context.files if f["dir"] == PAIRS]
        section["confirm"] = {"backend": context.plan.backend, "precision": context.plan.precision,
                              "fingerprint": context.plan.fingerprint,
                              **{key: sum(f.get(key, 0) for f in pairs) for key in CONFIRM_COUNTS}}
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
    plan=_plan,
    steps=_steps,
    libraries=("faiss-cpu", "numpy"),
    manifest=_manifest,
    report="winnow.pipelines.outputs.report:prune_section",
    ledger_stages=("semdedup", "prune"),
    check=_check,
)
