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

import io
import posixpath
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from winnow.pipelines.blocks import VECTOR_COLUMN, vector_array, vector_matrix
from winnow.pipelines.cached_rows import CachedRows
from winnow.pipelines.config import PruneConfig
from winnow.pipelines.ordered_io import table_bytes, write_bytes
from winnow.pipelines.passes import Pass
from winnow.pipelines.progress import Progress
from winnow.pipelines.records import seeded_hashes, split_routed
from winnow.pipelines.stage import ManifestContext, Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.pipelines.stage_cache import RECORDS, REMOVED
from winnow.pipelines.storage import join, open_file, read_bytes
from winnow.pipelines.write import ledger_rows_table, rows_from_table
from winnow.selectors import clustering
from winnow.selectors.pruning import (
    PruneSettings,
    choice_order,
    cluster_quotas,
    pool_budget,
    within_cluster_order,
)
from winnow.selectors.semdedup import near_pairs, resolve_pairs

SUMMARY_DIR = "_prune_summary"
CENTROIDS = "centroids.npy"
MEMBERS, PAIRS = "members", "pairs"
WINDOW = 4096  # records assigned to the centroids at once (rows of one input file, by input_row // WINDOW)
PARTITION_ROWS = 50_000  # records of a partition of clusters: SemDeDup and the decision hold one at a time
KEPT_FATE, DEDUPLICATED, PRUNED = 0, 1, 2
FILES, FRAGMENTS, DECIDED, GROUPS = "files", "fragments", "decided", "groups"

# A partition's members, sorted by (cluster, file_index, input_row, variant); `block` is the name of the
# record file the row lives in, so that decisions go back to that file.
MEMBER_SCHEMA = pa.schema([("cluster", pa.int64()), ("file_index", pa.int64()), ("input_row", pa.int64()),
                           ("variant", pa.int64()), ("block", pa.string()), ("id", pa.string()),
                           ("dist_to_centroid", pa.float32())])
# What the decision says of each record: kept, deduplicated or pruned (fate), in which cluster, and why.
DECISION_SCHEMA = pa.schema([("block", pa.string()), ("file_index", pa.int64()), ("input_row", pa.int64()),
                             ("variant", pa.int64()), ("fate", pa.int8()), ("cluster", pa.int64()),
                             ("dist_to_centroid", pa.float32()), ("detail", pa.string()),
                             ("duplicate_of", pa.string())])
ORDER = [("file_index", "ascending"), ("input_row", "ascending"), ("variant", "ascending")]


def settings_from(config: PruneConfig) -> PruneSettings:
    return PruneSettings(
        strategy=config.strategy, keep_fraction=config.keep_fraction, keep=config.keep, seed=config.seed,
        tau=config.tau, neighbours=config.neighbours, min_per_cluster_frac=config.min_per_cluster_frac,
        k=config.kmeans.k, niter=config.kmeans.niter, kmeans_seed=config.kmeans.seed,
        semdedup=config.semdedup.enabled, eps=config.semdedup.eps, strict=config.semdedup.strict,
        recluster=config.recluster,
    )


# ---- the fit sample: the `prune.kmeans.fit_sample` rows with the smallest seeded id hashes

Sample = tuple  # (hashes uint64, order keys int64 (n, 3), vectors float32 (n, d), rows counted)


def _smallest(parts: list[Sample | None], n: int) -> Sample | None:
    """The `n` rows of `parts` with the smallest (hash, order key), and the rows the parts counted."""
    parts = [part for part in parts if part is not None]
    if not parts:
        return None
    count = sum(part[3] for part in parts)
    filled = [part for part in parts if len(part[0])]
    if not filled:
        return parts[0][0], parts[0][1], parts[0][2], count
    hashes = np.concatenate([part[0] for part in filled])
    keys = np.concatenate([part[1] for part in filled])
    vectors = np.concatenate([part[2] for part in filled])
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0], hashes))[:n]
    return hashes[order], keys[order], vectors[order], count


class SmallestRows(beam.CombineFn):
    """Candidate rows of each file or partition -> the `n` with the smallest (hash, order key), as arrays."""

    def __init__(self, n: int):
        self.n = n

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, part):
        return _smallest([accumulator, part], self.n)

    def merge_accumulators(self, accumulators):
        return _smallest(list(accumulators), self.n)

    def extract_output(self, accumulator):
        if accumulator is None:
            return np.zeros(0, np.uint64), np.zeros((0, 3), np.int64), np.zeros((0, 0), np.float32), 0
        return accumulator


def _candidates(keys: np.ndarray, ids: pa.Array, vectors: np.ndarray, seed: int, n: int) -> Sample:
    hashes = seeded_hashes(seed, ids, "fit")
    return _smallest([(hashes, keys, vectors, len(keys))], n)


def _file_candidates(path: str, seed: int, n: int) -> Sample:
    rows = CachedRows.read(path)
    return _candidates(rows.keys(), rows.ids(), rows.vectors(), seed, n)


def fit(sample: Sample, settings: PruneSettings) -> np.ndarray:
    """Centroids from the fit sample, fitted in input order; k defaults to about sqrt(rows counted)."""
    _, keys, vectors, count = sample
    if not count or not len(keys):
        return np.zeros((0, 0), dtype=np.float32)
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
    k = settings.k or clustering.default_k(count)
    return clustering.fit_centroids(vectors[order], k, settings.niter, settings.kmeans_seed)


def fit_pass(config: PruneConfig) -> Pass:
    """The step's record files -> (the fit sample, how many records)."""
    def build(paths, constants):
        return (paths
                | "Candidates" >> beam.Map(_file_candidates, config.seed, config.kmeans.fit_sample)
                | "Sample" >> beam.CombineGlobally(SmallestRows(config.kmeans.fit_sample)))

    return Pass("fit", build, reads_files=RECORDS)


# ---- files of row groups: rows shuffled through files, each group of rows one row group

def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal adjacent values."""
    if not len(values):
        return []
    bounds = np.flatnonzero(np.r_[True, values[1:] != values[:-1], True])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def _write_groups(path: str, table: pa.Table, groups) -> list[tuple[Any, tuple[str, int]]]:
    """Write `table` (rows of a group adjacent) with one row group per group: (group, (path, row group))."""
    groups = groups.to_numpy(zero_copy_only=False) if isinstance(groups, (pa.Array, pa.ChunkedArray)) else groups
    runs = _runs(groups)
    if not runs:
        return []
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="none", use_dictionary=False) as writer:
        for start, stop in runs:
            writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
    write_bytes(path, sink.getvalue().to_pybytes())
    return [(groups[start].item() if isinstance(groups[start], np.generic) else groups[start], (path, index))
            for index, (start, _) in enumerate(runs)]


def _read_groups(refs, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    tables = []
    by_path: dict[str, list[int]] = {}
    for path, group in refs:
        by_path.setdefault(path, []).append(group)
    for path in sorted(by_path):
        with open_file(path) as handle:
            tables.append(pq.ParquetFile(handle).read_row_groups(sorted(by_path[path]), columns=columns))
    if not tables:
        return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


def _by_cluster(table: pa.Table) -> pa.Table:
    return table.sort_by([("cluster", "ascending"), *ORDER])


def _partition_of(clusters: np.ndarray, k: int, partitions: int) -> np.ndarray:
    """Contiguous ranges of clusters, one per partition."""
    return clusters * partitions // max(k, 1)


def _partitions(count: int, k: int) -> int:
    return max(1, min(k, -(-count // PARTITION_ROWS)))


def _members_table(keys: np.ndarray, block: str, ids: pa.Array, labels: np.ndarray, dist: np.ndarray,
                   vectors: np.ndarray | None) -> pa.Table:
    columns = [pa.array(labels, pa.int64()), pa.array(keys[:, 0]), pa.array(keys[:, 1]), pa.array(keys[:, 2]),
               pa.array([block] * len(keys), pa.string()), ids, pa.array(dist, pa.float32())]
    table = pa.Table.from_arrays(columns, schema=MEMBER_SCHEMA)
    if vectors is not None:
        table = table.append_column(VECTOR_COLUMN, vector_array(vectors))
    return table


def _assign_windows(keys: np.ndarray, vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid and 1 - cosine, assigned WINDOW input rows at a time (rows in input order)."""
    labels, dist = np.zeros(len(keys), np.int64), np.zeros(len(keys), np.float32)
    for start, stop in _runs(keys[:, 0] * (1 << 40) + keys[:, 1] // WINDOW):
        labels[start:stop], dist[start:stop] = clustering.assign(vectors[start:stop], centroids)
    return labels, dist


# ---- step 1, clusters: assign every record, SemDeDup's pairs inside each cluster

class _AssignFileFn(beam.DoFn):
    """A record file -> the same rows with `cluster` and `dist_to_centroid`, written into this step's records
    (routed FILES), and the rows' (cluster, order key, id, vector) written into one fragment whose row
    groups are partitions of clusters (routed FRAGMENTS, (partition, (fragment, row group)))."""

    def __init__(self, centroids: np.ndarray, directory: str, scratch: str, partitions: int, drops_vectors: bool,
                 compression: str):
        self.centroids = centroids
        self.compression = compression
        self.directory = directory
        self.scratch = scratch
        self.partitions = partitions
        self.drops_vectors = drops_vectors
        self.busy_ms = beam.metrics.Metrics.distribution("winnow.prune", "busy_ms")
        self.assigned = beam.metrics.Metrics.counter("winnow.prune", "records_assigned")

    def setup(self):
        self.progress = Progress("prune:assign")

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        name = posixpath.basename(path)
        rows = CachedRows.read(path)
        keys, vectors = rows.keys(), rows.vectors()
        started = time.perf_counter()
        labels, dist = _assign_windows(keys, vectors, self.centroids)
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        self.assigned.inc(len(rows))
        self.progress.advance(len(rows))
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        yield FILES, rows.write(self.directory, f"{RECORDS}/{name}", {
            "cluster": pa.array(labels, pa.int64()), "dist_to_centroid": pa.array(dist, pa.float32())}, drop=drop,
            compression=self.compression)
        if len(rows):
            members = _by_cluster(_members_table(keys, name, rows.ids(), labels, dist, vectors))
            partitions = _partition_of(members.column("cluster").to_numpy(), len(self.centroids), self.partitions)
            for ref in _write_groups(join(self.scratch, "fragments", name), members, partitions):
                yield FRAGMENTS, ref


class _NearPairsFn(beam.DoFn):
    """A partition of clusters -> its members (sorted by cluster and input order, with their vectors) and the
    SemDeDup pairs inside each cluster (first < second, positions in that members file, cosine past 1 - eps),
    which do not depend on the order a decision resolves them in."""

    def __init__(self, settings: PruneSettings, directory: str):
        self.settings = settings
        self.directory = directory
        self.busy_ms = beam.metrics.Metrics.distribution("winnow.semdedup", "busy_ms")

    def process(self, element) -> Iterator[dict[str, Any]]:
        partition, refs = element
        members = _by_cluster(_read_groups(refs, MEMBER_SCHEMA))
        started = time.perf_counter()
        first, second, cosine = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        if self.settings.semdedup:
            vectors = vector_matrix(members.column(VECTOR_COLUMN))
            for start, stop in _runs(members.column("cluster").to_numpy()):
                i, j, value = near_pairs(vectors[start:stop], self.settings.eps, self.settings.strict)
                first.append(i + start)
                second.append(j + start)
                cosine.append(value)
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        pairs = pa.table({"first": np.concatenate(first), "second": np.concatenate(second),
                          "cosine": np.concatenate(cosine)})
        name = f"part-{partition:05d}.parquet"
        for kind, table in ((MEMBERS, members), (PAIRS, pairs)):
            payload = table_bytes(table, 65_536, compression="none", dictionary=False)
            write_bytes(join(self.directory, kind, name), payload)
            yield {"dir": kind, "file": f"{kind}/{name}", "rows": table.num_rows, "bytes": len(payload),
                   "partition": partition}


def _write_centroids(centroids: np.ndarray, directory: str) -> dict[str, Any]:
    payload = io.BytesIO()
    np.save(payload, np.asarray(centroids, dtype=np.float32))
    write_bytes(f"{directory}/{CENTROIDS}", payload.getvalue())
    dimension = int(centroids.shape[1]) if centroids.ndim == 2 else 0
    return {"dir": "centroids", "file": CENTROIDS, "rows": int(len(centroids)), "dimension": dimension,
            "bytes": payload.tell()}


def read_centroids(directory: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(join(directory, CENTROIDS))))


def _clusters(pipeline, paths, context: StepContext) -> StepOutput:
    """Centroids fitted on the driver from the fit pass; every record file assigned (its rows gain `cluster`
    and `dist_to_centroid`); partitions of clusters written with their SemDeDup pairs; the centroids file."""
    settings = settings_from(context.job.config.prune)
    sample = context.constants["fit"]
    centroids = fit(sample, settings)
    partitions = _partitions(sample[3], len(centroids))
    assigned = split_routed(
        paths  # stage_run's Create of the files spreads them (a Reshuffle)
        | "Assign" >> beam.ParDo(_AssignFileFn(centroids, context.directory, context.scratch, partitions,
                                               context.drops_vectors, context.compression)),
        "Assigned", (FILES, FRAGMENTS))
    pairs = (
        assigned[FRAGMENTS]
        | "ByPartition" >> beam.GroupByKey()
        | "NearPairs" >> beam.ParDo(_NearPairsFn(settings, context.directory))
    )
    written = (
        pipeline
        | "Centroids" >> beam.Create([None])
        | "WriteCentroids" >> beam.Map(lambda _, c, d: _write_centroids(c, d), centroids, context.directory)
    )
    return StepOutput(None, [], [assigned[FILES], pairs, written])


# ---- step 2, decide: SemDeDup resolved in the `keep` order, quotas, the first `quota` survivors kept

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
    for start, stop in _runs(clusters):
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


def _write_decisions(path: str, decisions: pa.Table) -> list[tuple[str, tuple[str, int]]]:
    """Decisions sorted by record file and input order, one row group per record file: (block, ref)."""
    decisions = decisions.sort_by([("block", "ascending"), *ORDER])
    return _write_groups(path, decisions, decisions.column("block").combine_chunks())


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
    for start, stop in _runs(clusters):
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
    return _candidates(keys.reshape(len(survivors), 3), chosen.column("id").combine_chunks(), vectors,
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
        for ref in _write_decisions(join(self.scratch, "deduplicated", name),
                                    _dedup_decisions(members, dropped, earlier, similarity)):
            yield DECIDED, ref
        if self.recluster_centroids is None:
            ordered = _survivor_rows(members, survivors)
            clusters = members.column("cluster").to_numpy()
            before = {int(clusters[start]): stop - start for start, stop in _runs(clusters)}
            yield from _write_survivors(join(self.scratch, "survivors", name), ordered, before)
            return
        chosen = members.take(pa.array(np.sort(np.concatenate(survivors)) if survivors else [], pa.int64()))
        if not chosen.num_rows:
            return
        keys = np.stack([chosen.column(name).to_numpy() for name in ("file_index", "input_row", "variant")], axis=1)
        labels, dist = _assign_windows(keys, vector_matrix(chosen.column(VECTOR_COLUMN)), self.recluster_centroids)
        chosen = chosen.select(MEMBER_SCHEMA.names)
        chosen = chosen.set_column(0, "cluster", pa.array(labels, pa.int64()))
        chosen = _by_cluster(chosen.set_column(6, "dist_to_centroid", pa.array(dist, pa.float32())))
        partitions = _partition_of(chosen.column("cluster").to_numpy(), len(self.recluster_centroids),
                                   self.new_partitions)
        for ref in _write_groups(join(self.scratch, "reassigned", name), chosen, partitions):
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
        members = _by_cluster(_read_groups(refs, MEMBER_SCHEMA))
        dist = members.column("dist_to_centroid").to_numpy()
        clusters = members.column("cluster").to_numpy()
        ordered, before = [], {}
        for start, stop in _runs(clusters):
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
        new_partitions = _partitions(refit[3], len(recluster)) if recluster is not None else 1
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
        for start, stop in _runs(clusters):
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
        yield from _write_decisions(join(self.scratch, "selected", posixpath.basename(path)), decisions)


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
        decisions = _read_groups(joined["decisions"], DECISION_SCHEMA).sort_by(ORDER)
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
        payload = table_bytes(ledger, 65_536)
        write_bytes(join(self.directory, REMOVED, name), payload)
        yield {"dir": REMOVED, "file": f"{REMOVED}/{name}", "rows": ledger.num_rows, "bytes": len(payload)}


def _decide(pipeline, paths, context: StepContext) -> StepOutput:
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


DECISION_KEYS = ("strategy", "keep_fraction", "keep", "tau", "neighbours", "min_per_cluster_frac", "seed",
                 "recluster")


def _steps(plan, config) -> list[Step]:
    section = config_section(config, "prune")
    scores = {k: v for k, v in section.items() if k not in DECISION_KEYS or k == "seed"}  # seed: the fit sample
    decision = {k: section[k] for k in DECISION_KEYS}
    prune = config.prune
    refit = (refit_pass(prune),) if prune.recluster else ()
    return [
        Step("clusters", _clusters, {"prune": scores}, reads_vectors=True, reads_files=True,
             passes=(fit_pass(prune),)),
        Step("decide", _decide, {"prune": decision}, reads_files=True, passes=(*refit, groups_pass(prune))),
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
