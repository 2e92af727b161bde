"""Prune's first step, `clusters`: centroids fitted on the fit sample, every record file assigned (its rows gain
`cluster` and `dist_to_centroid`), partitions of clusters written with SemDeDup's pairs inside each cluster
(which do not depend on the order a decision resolves them in), and the centroids file."""

from __future__ import annotations

import io
import posixpath
import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.config import PruneConfig
from winnow.pipelines.engine.embed_model import EmbedHandler, EmbedPlan
from winnow.pipelines.engine.model_stage import acquire_model, model_lock
from winnow.pipelines.engine.passes import Pass
from winnow.pipelines.engine.progress import Progress
from winnow.pipelines.engine.stage import (
    StepContext,
    StepOutput,
)
from winnow.pipelines.io.blocks import VECTOR_COLUMN, vector_matrix
from winnow.pipelines.io.cache_files import RECORDS
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import table_bytes, write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.row_groups import group_runs, read_groups, write_groups
from winnow.pipelines.io.storage import join, read_bytes
from winnow.pipelines.stages.prune.common import (
    CENTROIDS,
    FILES,
    FRAGMENTS,
    MEMBER_SCHEMA,
    MEMBERS,
    PAIRS,
    SmallestRows,
    assign_windows,
    by_cluster,
    file_candidates,
    fit,
    members_table,
    partition_count,
    partition_of,
    sample_bound,
    settings_from,
    smallest_of,
)
from winnow.selectors.pruning import (
    PruneSettings,
)
from winnow.selectors.semdedup import near_pairs


def fit_passes(config: PruneConfig) -> tuple[Pass, Pass]:
    """The step's record files -> the fit sample, in two passes so that the sample's vectors never travel as
    pipeline elements (a 100,000-row sample through combine and gather took ten times its size in memory):
    `fit-keys` finds the sample's rows by (hash, order key), without vectors; `fit` writes each file's rows at or
    under the largest of them to the step's scratch folder and gathers only those files' names and row counts,
    which `read_sample` merges on the driver."""
    n = config.kmeans.fit_sample

    def keys(paths, constants):
        return (paths
                | "KeyCandidates" >> beam.Map(file_candidates, config.seed, n, vectors=False)
                | "KeySample" >> beam.CombineGlobally(SmallestRows(n)))

    def build(paths, constants):
        bound, folder = sample_bound(constants["fit-keys"]), join(constants["scratch"], "fit")
        return (paths
                | "Candidates" >> beam.Map(_write_candidates, config.seed, n, bound, folder)
                | "Parts" >> beam.combiners.ToList())

    return Pass("fit-keys", keys, reads_files=RECORDS), Pass("fit", build, reads_files=RECORDS)


def _write_candidates(path: str, seed: int, n: int, bound, folder: str) -> tuple[str, int]:
    hashes, keys, vectors, count = file_candidates(path, seed, n, bound=bound)
    target = join(folder, posixpath.basename(path) + ".npz")
    buffer = io.BytesIO()
    np.savez(buffer, hashes=hashes, keys=keys, vectors=vectors)
    write_bytes(target, buffer.getvalue())
    return target, count


def read_sample(parts: list[tuple[str, int]], n: int):
    """The fit sample from the files `fit` wrote: the `n` smallest of their rows, and all the rows counted."""
    sample = None
    for target, count in sorted(parts):
        with np.load(io.BytesIO(read_bytes(target))) as arrays:
            sample = smallest_of([sample, (arrays["hashes"], arrays["keys"], arrays["vectors"], count)], n)
    return sample if sample is not None else SmallestRows(n).extract_output(None)


class _AssignFileFn(beam.DoFn):
    """A record file -> the same rows with `cluster` and `dist_to_centroid`, written into this step's records
    (routed FILES), and the rows' (cluster, order key, id, vector) written into one fragment whose row
    groups are partitions of clusters (routed FRAGMENTS, (partition, (fragment, row group)))."""

    def __init__(self, centroids: np.ndarray, directory: str, scratch: str, partitions: int, drops_vectors: bool,
                 compression: str, with_texts: bool = False):
        self.centroids = centroids
        self.with_texts = with_texts
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
        labels, dist = assign_windows(keys, vectors, self.centroids)
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        self.assigned.inc(len(rows))
        self.progress.advance(len(rows))
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        yield FILES, rows.write(self.directory, f"{RECORDS}/{name}", {
            "cluster": pa.array(labels, pa.int64()), "dist_to_centroid": pa.array(dist, pa.float32())}, drop=drop,
            compression=self.compression)
        if len(rows):
            members = members_table(keys, name, rows.ids(), labels, dist, vectors)
            if self.with_texts:  # two-tier SemDeDup embeds the candidates' texts in their partition
                members = members.append_column("text", rows.texts())
            members = by_cluster(members)
            partitions = partition_of(members.column("cluster").to_numpy(), len(self.centroids), self.partitions)
            for ref in write_groups(join(self.scratch, "fragments", name), members, partitions):
                yield FRAGMENTS, ref


class _NearPairsFn(beam.DoFn):
    """A partition of clusters -> its members (sorted by cluster and input order, with their vectors) and the
    SemDeDup pairs inside each cluster (first < second, positions in that members file, cosine past 1 - eps),
    which do not depend on the order a decision resolves them in."""

    def __init__(self, settings: PruneSettings, directory: str, confirm: EmbedPlan | None = None,
                 candidate_eps: float | None = None):
        self.settings = settings
        self.directory = directory
        self.confirm = confirm
        self.candidate_eps = candidate_eps
        self.busy_ms = beam.metrics.Metrics.distribution("winnow.semdedup", "busy_ms")

    def setup(self):
        self.held = None
        self.handler = EmbedHandler(self.confirm) if self.confirm is not None else None

    def _confirmed(self, members: pa.Table, first: np.ndarray, second: np.ndarray,
                   counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Two tiers: the candidate pairs' rows embedded by the confirming model, the pairs whose cosine there
        passes SemDeDup's threshold kept with that cosine."""
        rows = np.unique(np.r_[first, second])
        counts.update(candidate_pairs=len(first), rows_embedded=len(rows))
        if not len(rows):
            return first, second, np.zeros(0, np.float32)
        if self.held is None:
            self.held = acquire_model(self.handler)
        texts = members.column("text").take(pa.array(rows)).to_pylist()
        with model_lock(self.handler):
            vectors = self.held.value.encode(texts, self.confirm.batch_size)
        at_first, at_second = np.searchsorted(rows, first), np.searchsorted(rows, second)
        cosine = np.einsum("ij,ij->i", vectors[at_first], vectors[at_second]).astype(np.float32)
        threshold = np.float32(1.0 - self.settings.eps)
        passes = cosine > threshold if self.settings.strict else cosine >= threshold
        counts["confirmed_pairs"] = int(passes.sum())
        return first[passes], second[passes], cosine[passes]

    def process(self, element) -> Iterator[dict[str, Any]]:
        partition, refs = element
        members = by_cluster(read_groups(refs, MEMBER_SCHEMA))
        started = time.perf_counter()
        first, second, cosine = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        counts: dict[str, int] = {}
        if self.settings.semdedup:
            vectors = vector_matrix(members.column(VECTOR_COLUMN))
            eps = self.settings.eps if self.confirm is None else self.candidate_eps
            for start, stop in group_runs(members.column("cluster").to_numpy()):
                i, j, value = near_pairs(vectors[start:stop], eps, self.settings.strict)
                first.append(i + start)
                second.append(j + start)
                cosine.append(value)
        first, second, cosine = np.concatenate(first), np.concatenate(second), np.concatenate(cosine)
        if self.confirm is not None:
            first, second, cosine = self._confirmed(members, first, second, counts)
            members = members.drop_columns(["text"])
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        pairs = pa.table({"first": first, "second": second, "cosine": cosine})
        name = f"part-{partition:05d}.parquet"
        for kind, table in ((MEMBERS, members), (PAIRS, pairs)):
            payload = table_bytes(table, 65_536, compression="none", dictionary=False)
            write_bytes(join(self.directory, kind, name), payload)
            yield {"dir": kind, "file": f"{kind}/{name}", "rows": table.num_rows, "bytes": len(payload),
                   "partition": partition, **(counts if kind == PAIRS else {})}


def _write_centroids(centroids: np.ndarray, directory: str) -> dict[str, Any]:
    payload = io.BytesIO()
    np.save(payload, np.asarray(centroids, dtype=np.float32))
    write_bytes(f"{directory}/{CENTROIDS}", payload.getvalue())
    dimension = int(centroids.shape[1]) if centroids.ndim == 2 else 0
    return {"dir": "centroids", "file": CENTROIDS, "rows": int(len(centroids)), "dimension": dimension,
            "bytes": payload.tell()}


def read_centroids(directory: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(join(directory, CENTROIDS))))


def clusters_step(confirm: EmbedPlan | None):
    """The clusters step's graph; with `confirm` (the confirming model's plan), SemDeDup in two tiers."""
    def build(pipeline, paths, context: StepContext) -> StepOutput:
        return build_clusters(pipeline, paths, context, confirm)
    return build


def build_clusters(pipeline, paths, context: StepContext, confirm: EmbedPlan | None = None) -> StepOutput:
    """Centroids fitted on the driver from the fit pass; every record file assigned (its rows gain `cluster`
    and `dist_to_centroid`); partitions of clusters written with their SemDeDup pairs; the centroids file."""
    settings = settings_from(context.job.config.prune)
    confirm = confirm if settings.semdedup else None
    sample = read_sample(context.constants["fit"], context.job.config.prune.kmeans.fit_sample)
    centroids = fit(sample, settings)
    partitions = partition_count(sample[3], len(centroids))
    assigned = split_routed(
        paths  # stage_run's Create of the files spreads them (a Reshuffle)
        | "Assign" >> beam.ParDo(_AssignFileFn(centroids, context.directory, context.scratch, partitions,
                                               context.drops_vectors, context.compression, confirm is not None)),
        "Assigned", (FILES, FRAGMENTS))
    pairs = (
        assigned[FRAGMENTS]
        | "ByPartition" >> beam.GroupByKey()
        | "NearPairs" >> beam.ParDo(_NearPairsFn(settings, context.directory, confirm,
                                                 context.job.config.prune.semdedup.candidate_eps))
    )
    written = (
        pipeline
        | "Centroids" >> beam.Create([None])
        | "WriteCentroids" >> beam.Map(lambda _, c, d: _write_centroids(c, d), centroids, context.directory)
    )
    return StepOutput(None, [], [assigned[FILES], pairs, written])
