"""Prune's second step, `decide`: SemDeDup's pairs resolved in each cluster's `prune.keep` order, the strategy's
quotas from the clusters' statistics, each cluster's first `quota` survivors kept, and the decisions joined back
to every record file (kept records, `deduplicated` and `pruned` ledger rows)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from winnow.pipelines.config import PruneConfig
from winnow.pipelines.engine.passes import Pass
from winnow.pipelines.engine.stage import (
    StepContext,
    StepOutput,
)
from winnow.pipelines.io.blocks import VECTOR_COLUMN, vector_matrix
from winnow.pipelines.io.cache_files import RECORDS, REMOVED
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import table_bytes, write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.row_groups import group_runs, read_groups, write_groups
from winnow.pipelines.io.storage import join, open_file
from winnow.pipelines.io.write import ledger_bytes, ledger_rows_table, rows_from_table
from winnow.pipelines.stages.prune.clusters import read_centroids
from winnow.pipelines.stages.prune.common import (
    DECIDED,
    DECISION_SCHEMA,
    DEDUPLICATED,
    FRAGMENTS,
    GROUPS,
    KEPT_FATE,
    MEMBER_SCHEMA,
    MEMBERS,
    ORDER,
    PAIRS,
    PRUNED,
    SUMMARY_DIR,
    Sample,
    SmallestRows,
    assign_windows,
    by_cluster,
    candidates,
    fit,
    partition_count,
    partition_of,
    settings_from,
)
from winnow.selectors.pruning import (
    PruneSettings,
    choice_order,
    cluster_quotas,
    pool_budget,
    within_cluster_order,
)
from winnow.selectors.semdedup import resolve_pairs


def _pairs_path(members_path: str) -> str:
    folder = posixpath.dirname(posixpath.dirname(members_path))
    return join(folder, PAIRS, posixpath.basename(members_path))


def _read_partition(path: str, with_vectors: bool) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """A partition's members (with their vectors or not) and its pairs (first, second, cosine), by first."""
    with open_file(path) as handle:
        members = pq.read_table(handle, columns=None if with_vectors else MEMBER_SCHEMA.names)
    with open_file(_pairs_path(path)) as handle:
        pairs = pq.read_table(handle)
    first, second = pairs.column("first").to_numpy(), pairs.column("second").to_numpy()
    order = np.argsort(first, kind="stable")
    return members, first[order], second[order], pairs.column("cosine").to_numpy()[order]


def _dedup(members: pa.Table, first: np.ndarray, second: np.ndarray, cosine: np.ndarray,
           settings: PruneSettings) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup resolved in each cluster's `keep` order: per cluster its survivors in that order (positions
    in `members`), and the dropped rows with the earlier row each duplicates and their cosine."""
    dist = members.column("dist_to_centroid").to_numpy()
    clusters = members.column("cluster").to_numpy()
    survivors, dropped, earlier, similarity = [], [], [], []
    for start, stop in group_runs(clusters):
        order = within_cluster_order(dist[start:stop], settings.keep, settings.seed, int(clusters[start]))
        low, high = np.searchsorted(first, [start, stop])
        keep, duplicate_of, cosine_to = resolve_pairs(stop - start, order, first[low:high] - start,
                                                      second[low:high] - start, cosine[low:high])
        gone = np.flatnonzero(~keep)
        dropped.append(gone + start)
        earlier.append(np.asarray(duplicate_of)[gone].astype(np.int64) + start)
        similarity.append(np.asarray(cosine_to)[gone])
        survivors.append(order[keep[order]] + start)
    if not survivors:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return survivors, np.concatenate(dropped), np.concatenate(earlier), np.concatenate(similarity)


def _decisions(rows: pa.Table, fate: int, details: list[str | None] | None = None,
               duplicate_of: pa.Array | None = None) -> pa.Table:
    """Decision rows (DECISION_SCHEMA) for `rows` (members or survivors: block, order keys, cluster, dist)."""
    count = rows.num_rows
    return pa.Table.from_arrays([
        rows.column("block"), rows.column("file_index"), rows.column("input_row"), rows.column("variant"),
        pa.array(np.full(count, fate, np.int8)), rows.column("cluster"), rows.column("dist_to_centroid"),
        pa.array(details if details is not None else [None] * count, pa.string()),
        duplicate_of if duplicate_of is not None else pa.nulls(count, pa.string()),
    ], schema=DECISION_SCHEMA)


def write_decisions(path: str, decisions: pa.Table) -> list[tuple[str, tuple[str, int]]]:
    """Decisions sorted by record file and input order, one row group per record file: (block, ref)."""
    decisions = decisions.sort_by([("block", "ascending"), *ORDER])
    return write_groups(path, decisions, decisions.column("block").combine_chunks())


def _dedup_decisions(members: pa.Table, dropped, earlier, similarity) -> pa.Table:
    ids = members.column("id").combine_chunks()
    earlier_ids = ids.take(pa.array(earlier, pa.int64()))
    clusters = members.column("cluster").to_numpy()[dropped].tolist()
    details = [f"cosine {float(value):.4f} to {other} (cluster {cluster})"
               for value, other, cluster in zip(similarity.tolist(), earlier_ids.to_pylist(), clusters, strict=True)]
    return _decisions(members.take(pa.array(dropped, pa.int64())), DEDUPLICATED, details, earlier_ids)


def _survivor_rows(members: pa.Table, survivors: list[np.ndarray]) -> pa.Table:
    positions = np.concatenate(survivors) if survivors else np.zeros(0, np.int64)
    return members.take(pa.array(positions, pa.int64()))


def _cluster_stats(ordered: pa.Table, before: dict[int, int]) -> list[tuple[int, int, float, int]]:
    """(cluster, survivors, sum of their dist_to_centroid in the cluster's order, members before SemDeDup)
    of each cluster of `ordered` (survivors, each cluster's adjacent and in its `keep` order)."""
    clusters = ordered.column("cluster").to_numpy()
    dist = ordered.column("dist_to_centroid").to_numpy()
    stats = []
    for start, stop in group_runs(clusters):
        cluster = int(clusters[start])
        stats.append((cluster, stop - start, float(sum(dist[start:stop].tolist())), before[cluster]))
    return stats


def _survivor_candidates(path: str, settings: PruneSettings, n: int) -> Sample:
    """A partition -> the fit-sample candidates of its SemDeDup survivors (for `prune.recluster`)."""
    members, first, second, cosine = _read_partition(path, with_vectors=True)
    survivors = np.sort(np.concatenate(_dedup(members, first, second, cosine, settings)[0] or [np.zeros(0, int)]))
    chosen = members.take(pa.array(survivors, pa.int64()))
    keys = np.stack([chosen.column(name).to_numpy() for name in ("file_index", "input_row", "variant")], axis=1)
    vectors = vector_matrix(chosen.column(VECTOR_COLUMN)) if len(survivors) else np.zeros((0, 0), np.float32)
    return candidates(keys.reshape(len(survivors), 3), chosen.column("id").combine_chunks(), vectors,
                       settings.seed, n)


def refit_pass(config: PruneConfig) -> Pass:
    """`prune.recluster`: the clusters step's partitions -> the fit sample of the SemDeDup survivors."""
    settings = settings_from(config)

    def build(paths, constants):
        return (paths
                | "Candidates" >> beam.Map(_survivor_candidates, settings, config.kmeans.fit_sample)
                | "Sample" >> beam.CombineGlobally(SmallestRows(config.kmeans.fit_sample)))

    return Pass("refit", build, reads_files=MEMBERS)


class _GroupFn(beam.DoFn):
    """A partition of the clusters step -> SemDeDup resolved: the decisions on the dropped rows written into
    the scratch folder (DECIDED, (block, ref)); the survivors, each cluster's in its `keep` order, written
    there too, with the clusters' statistics (GROUPS, (file, stats)). With `recluster_centroids` the
    survivors are assigned to those instead, and written into fragments by partition of the new clusters
    (FRAGMENTS, (partition, ref)), which `_RegroupFn` orders."""

    def __init__(self, settings: PruneSettings, scratch: str, recluster_centroids: np.ndarray | None = None,
                 new_partitions: int = 1):
        self.settings = settings
        self.scratch = scratch
        self.recluster_centroids = recluster_centroids
        self.new_partitions = new_partitions

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        name = posixpath.basename(path)
        members, first, second, cosine = _read_partition(path, self.recluster_centroids is not None)
        survivors, dropped, earlier, similarity = _dedup(members, first, second, cosine, self.settings)
        for ref in write_decisions(join(self.scratch, "deduplicated", name),
                                    _dedup_decisions(members, dropped, earlier, similarity)):
            yield DECIDED, ref
        if self.recluster_centroids is None:
            ordered = _survivor_rows(members, survivors)
            clusters = members.column("cluster").to_numpy()
            before = {int(clusters[start]): stop - start for start, stop in group_runs(clusters)}
            yield from _write_survivors(join(self.scratch, "survivors", name), ordered, before)
            return
        chosen = members.take(pa.array(np.sort(np.concatenate(survivors)) if survivors else [], pa.int64()))
        if not chosen.num_rows:
            return
        keys = np.stack([chosen.column(name).to_numpy() for name in ("file_index", "input_row", "variant")], axis=1)
        labels, dist = assign_windows(keys, vector_matrix(chosen.column(VECTOR_COLUMN)), self.recluster_centroids)
        chosen = chosen.select(MEMBER_SCHEMA.names)
        chosen = chosen.set_column(0, "cluster", pa.array(labels, pa.int64()))
        chosen = by_cluster(chosen.set_column(6, "dist_to_centroid", pa.array(dist, pa.float32())))
        partitions = partition_of(chosen.column("cluster").to_numpy(), len(self.recluster_centroids),
                                   self.new_partitions)
        for ref in write_groups(join(self.scratch, "reassigned", name), chosen, partitions):
            yield FRAGMENTS, ref


def _write_survivors(path: str, ordered: pa.Table, before: dict[int, int]) -> Iterator[tuple[str, Any]]:
    if ordered.num_rows:
        write_bytes(path, table_bytes(ordered, 65_536, compression="none", dictionary=False))
    yield GROUPS, (path if ordered.num_rows else None, _cluster_stats(ordered, before))


class _RegroupFn(beam.DoFn):
    """`prune.recluster`: a partition of the new clusters -> its survivors, each cluster's in its `keep`
    order, written into the scratch folder with the clusters' statistics (GROUPS, (file, stats))."""

    def __init__(self, settings: PruneSettings, scratch: str):
        self.settings = settings
        self.scratch = scratch

    def process(self, element) -> Iterator[tuple[str, Any]]:
        partition, refs = element
        members = by_cluster(read_groups(refs, MEMBER_SCHEMA))
        dist = members.column("dist_to_centroid").to_numpy()
        clusters = members.column("cluster").to_numpy()
        ordered, before = [], {}
        for start, stop in group_runs(clusters):
            cluster = int(clusters[start])
            ordered.append(within_cluster_order(dist[start:stop], self.settings.keep, self.settings.seed, cluster)
                           + start)
            before[cluster] = stop - start
        yield from _write_survivors(join(self.scratch, "survivors", f"new-{partition:05d}.parquet"),
                                    _survivor_rows(members, ordered), before)


def _gather_groups(parts: list[tuple[str, Any]]) -> dict[str, Any]:
    groups, stats, decided = [], [], []
    for kind, value in parts:
        if kind == GROUPS:
            path, cluster_stats = value
            stats += cluster_stats
            if path is not None:
                groups.append(path)
        else:
            decided.append(value)
    return {"groups": sorted(groups), "stats": sorted(stats), "decided": sorted(decided)}


def groups_pass(config: PruneConfig) -> Pass:
    """The clusters step's partitions -> SemDeDup resolved (see _GroupFn): {groups: survivors files, stats:
    per cluster (cluster, survivors, dist sum, members), decided: (block, ref) of the dropped rows'
    decisions}. The files are in the step's scratch folder, read by its graph."""
    settings = settings_from(config)

    def build(paths, constants):
        scratch = constants["scratch"]
        refit = constants.get("refit")
        recluster = fit(refit, settings) if refit is not None else None
        new_partitions = partition_count(refit[3], len(recluster)) if recluster is not None else 1
        grouped = paths | "Dedup" >> beam.ParDo(_GroupFn(settings, scratch, recluster, new_partitions))
        if recluster is not None:
            routed = split_routed(grouped, "Deduped", (DECIDED, FRAGMENTS))
            regrouped = (routed[FRAGMENTS]
                         | "ByNewPartition" >> beam.GroupByKey()
                         | "Regroup" >> beam.ParDo(_RegroupFn(settings, scratch)))
            dropped = routed[DECIDED] | "TagDecided" >> beam.Map(lambda ref: (DECIDED, ref))
            grouped = (regrouped, dropped) | "AllGroups" >> beam.Flatten()
        return grouped | "AllParts" >> beam.combiners.ToList() | "Merge" >> beam.Map(_gather_groups)

    return Pass("groups", build, reads_files=MEMBERS)


def _quotas(stats: list[tuple[int, int, float, int]], count: int, centroids: np.ndarray,
            settings: PruneSettings) -> tuple[dict[int, int], dict[str, Any] | None]:
    """Each cluster's quota and the stage summary, from the clusters' statistics (no summary without any)."""
    if not stats:
        return {}, None
    k = len(centroids)
    sizes, distance_sums, before = np.zeros(k, np.int64), np.zeros(k), np.zeros(k, np.int64)
    for cluster, size, distance_sum, members in stats:
        sizes[cluster], distance_sums[cluster], before[cluster] = size, distance_sum, members
    total_budget = pool_budget(settings, count, int(sizes.sum()))
    quota = cluster_quotas(sizes, distance_sums, centroids, total_budget, settings)
    summary = {
        "dir": SUMMARY_DIR, "k": k, "records": count, "survivors": int(sizes.sum()), "budget": total_budget,
        "clusters": [
            {"cluster": c, "members": int(before[c]), "survivors": int(sizes[c]),
             "d_intra": _number(quota["d_intra"][c]), "d_inter": _number(quota["d_inter"][c]),
             "complexity": _number(quota["complexity"][c]), "quota": int(quota["quota"][c])}
            for c in range(k)
        ],
    }
    return {c: int(quota["quota"][c]) for c in range(k)}, summary


def _number(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


class _SelectFn(beam.DoFn):
    """A survivors file -> each cluster's first `quota` survivors kept (in the `keep` order, or the strategy's
    choice order), the rest pruned: decisions written by record file, (block, ref) of each."""

    def __init__(self, settings: PruneSettings, quotas: dict[int, int], scratch: str):
        self.settings = settings
        self.quotas = quotas
        self.scratch = scratch

    def process(self, path: str) -> Iterator[tuple[str, tuple[str, int]]]:
        with open_file(path) as handle:
            ordered = pq.read_table(handle)
        clusters = ordered.column("cluster").to_numpy()
        taken, fates, details = [], [], []
        for start, stop in group_runs(clusters):
            cluster, count = int(clusters[start]), stop - start
            quota = self.quotas[cluster]
            choice = choice_order(count, self.settings, cluster)
            taken.append(start + (np.arange(count) if choice is None else choice))
            fates.append(np.where(np.arange(count) < quota, KEPT_FATE, PRUNED).astype(np.int8))
            details += [None] * min(quota, count) + [
                f"cluster {cluster} keeps {quota} of {count}; rank {rank}" for rank in range(quota, count)]
        if not taken:
            return
        decisions = _decisions(ordered.take(pa.array(np.concatenate(taken), pa.int64())), KEPT_FATE, details)
        decisions = decisions.set_column(4, "fate", pa.array(np.concatenate(fates), pa.int8()))
        yield from write_decisions(join(self.scratch, "selected", posixpath.basename(path)), decisions)


class _JoinFn(beam.DoFn):
    """A record file and the decisions on its rows -> its kept rows (with their cluster and dist_to_centroid)
    written into this step's records, its removed rows' ledger rows into this step's removed rows."""

    def __init__(self, directory: str, strategy: str, drops_vectors: bool, compression: str):
        self.directory = directory
        self.compression = compression
        self.strategy = strategy
        self.drops_vectors = drops_vectors

    def process(self, element) -> Iterator[dict[str, Any]]:
        name, joined = element
        (path,) = joined["file"]
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        decisions = read_groups(joined["decisions"], DECISION_SCHEMA).sort_by(ORDER)
        keys = rows.keys()
        decided = np.stack([decisions.column(c).to_numpy() for c, _ in ORDER], axis=1).reshape(-1, 3)
        if decided.shape != keys.shape or not np.array_equal(decided, keys):
            raise RuntimeError(f"internal error: {name} has {len(keys)} records but {len(decided)} prune decisions")
        fate = decisions.column("fate").to_numpy()
        cluster = decisions.column("cluster").combine_chunks()
        dist = decisions.column("dist_to_centroid").combine_chunks()
        kept = fate == KEPT_FATE
        yield rows.write(self.directory, f"{RECORDS}/{name}", {"cluster": cluster, "dist_to_centroid": dist},
                         keep=kept, drop=drop, compression=self.compression)
        if kept.all():
            return
        removed = pa.array(~kept)
        table = rows_from_table(rows.rows_table(~kept), [])
        table = table.set_column(table.column_names.index("cluster"), "cluster", cluster.filter(removed))
        table = table.set_column(table.column_names.index("dist_to_centroid"), "dist_to_centroid",
                                 dist.filter(removed))
        semdedup = pc.equal(decisions.column("fate").filter(removed), DEDUPLICATED)
        ledger = ledger_rows_table(
            table, pc.if_else(semdedup, "semdedup", "prune"), pc.if_else(semdedup, "semantic_duplicate", self.strategy),
            decisions.column("detail").filter(removed), 0, pc.if_else(semdedup, "deduplicated", "pruned"),
            decisions.column("duplicate_of").filter(removed))
        payload = ledger_bytes(ledger)
        write_bytes(join(self.directory, REMOVED, name), payload)
        yield {"dir": REMOVED, "file": f"{REMOVED}/{name}", "rows": ledger.num_rows, "bytes": len(payload)}


def build_decide(pipeline, paths, context: StepContext) -> StepOutput:
    """Quotas from the groups pass's statistics (driver); each survivors file selected; each record file
    joined with the decisions on its rows."""
    config = context.job.config.prune
    settings = settings_from(config)
    refit = context.constants.get("refit")
    centroids = fit(refit, settings) if refit is not None else read_centroids(context.previous.directory)
    groups = context.constants["groups"]
    quotas, summary = _quotas(groups["stats"], context.previous.records, centroids, settings)
    selected = (
        pipeline
        | "Survivors" >> beam.Create(groups["groups"])
        | "SpreadSurvivors" >> beam.Reshuffle()
        | "Select" >> beam.ParDo(_SelectFn(settings, quotas, context.scratch))
    )
    decided = pipeline | "Deduplicated" >> beam.Create(groups["decided"])
    decisions = (selected, decided) | "Decisions" >> beam.Flatten()
    files = paths | "ByName" >> beam.Map(lambda path: (posixpath.basename(path), path))
    written = (
        {"file": files, "decisions": decisions}
        | "JoinDecisions" >> beam.CoGroupByKey()
        | "Apply" >> beam.ParDo(_JoinFn(context.directory, config.strategy, context.drops_vectors,
                                                 context.compression))
    )
    metadata = [written]
    if summary is not None:
        metadata.append(pipeline | "Summary" >> beam.Create([summary]))
    return StepOutput(None, [], metadata)
