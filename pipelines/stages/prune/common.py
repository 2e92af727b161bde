"""What both prune steps use: the schemas of partition members and decisions, the fit sample (the records with the
smallest seeded id hashes) and the fit, partitions of clusters, assignment to the centroids."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.config import PruneConfig
from winnow.pipelines.io.blocks import VECTOR_COLUMN, vector_array
from winnow.pipelines.io.cache_files import read_cache_groups
from winnow.pipelines.io.cached_rows import ORDER_COLUMNS, CachedRows
from winnow.pipelines.io.records import seeded_hashes
from winnow.pipelines.io.row_groups import group_runs
from winnow.selectors import clustering
from winnow.selectors.pruning import (
    PruneSettings,
)

SUMMARY_DIR = "_prune_summary"


CENTROIDS = "centroids.npy"


MEMBERS, PAIRS = "members", "pairs"
CONFIRM_COUNTS = ("candidate_pairs", "rows_embedded", "confirmed_pairs")  # two-tier SemDeDup, per pairs file


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


Sample = tuple  # (hashes uint64, order keys int64 (n, 3), vectors float32 (n, d), rows counted)


def smallest_of(parts: list[Sample | None], n: int) -> Sample | None:
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
        return smallest_of([accumulator, part], self.n)

    def merge_accumulators(self, accumulators):
        return smallest_of(list(accumulators), self.n)

    def extract_output(self, accumulator):
        if accumulator is None:
            return np.zeros(0, np.uint64), np.zeros((0, 3), np.int64), np.zeros((0, 0), np.float32), 0
        return accumulator


def candidates(keys: np.ndarray, ids: pa.Array, vectors: np.ndarray, seed: int, n: int) -> Sample:
    hashes = seeded_hashes(seed, ids, "fit")
    return smallest_of([(hashes, keys, vectors, len(keys))], n)


def sample_bound(sample: Sample) -> tuple[int, int, int, int] | None:
    """The largest (hash, order key) of a sample (its last row), or None for an empty one."""
    hashes, keys = sample[0], sample[1]
    if not len(hashes):
        return None
    return int(hashes[-1]), int(keys[-1, 0]), int(keys[-1, 1]), int(keys[-1, 2])


def _at_most(hashes: np.ndarray, keys: np.ndarray, bound: tuple[int, int, int, int]) -> np.ndarray:
    """Rows whose (hash, order key) is at most `bound`, compared as `smallest_of` orders them."""
    less, equal = np.zeros(len(hashes), dtype=bool), np.ones(len(hashes), dtype=bool)
    columns = (hashes, keys[:, 0], keys[:, 1], keys[:, 2])
    for column, value in zip(columns, (np.uint64(bound[0]), *bound[1:]), strict=True):
        less |= equal & (column < value)
        equal &= column == value
    return less | equal


def file_candidates(path: str, seed: int, n: int, vectors: bool = True,
                    bound: tuple[int, int, int, int] | None = None) -> Sample:
    """A record file's candidates for the fit sample (its `n` smallest rows by (hash, order key), and its row
    count), read a row group at a time and without the texts; without `vectors`, only their hashes and keys.
    With `bound`, only the rows at or under it: the fit pass sends the vectors of the sample's own rows, not
    a whole file's (a file's vectors through the pipeline took several times their size)."""
    columns = (*ORDER_COLUMNS, "id", VECTOR_COLUMN) if vectors else (*ORDER_COLUMNS, "id")
    sample = None
    for table in read_cache_groups(path, columns):
        rows = CachedRows(table)
        keys, hashes = rows.keys(), seeded_hashes(seed, rows.ids(), "fit")
        chosen = np.arange(len(rows)) if bound is None else np.flatnonzero(_at_most(hashes, keys, bound))
        matrix = rows.vectors()[chosen] if vectors else np.zeros((len(chosen), 0), dtype=np.float32)
        sample = smallest_of([sample, (hashes[chosen], keys[chosen], matrix, len(rows))], n)
    return sample


def fit(sample: Sample, settings: PruneSettings) -> np.ndarray:
    """Centroids from the fit sample, fitted in input order; k defaults to about sqrt(rows counted)."""
    _, keys, vectors, count = sample
    if not count or not len(keys):
        return np.zeros((0, 0), dtype=np.float32)
    order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
    k = settings.k or clustering.default_k(count)
    return clustering.fit_centroids(vectors[order], k, settings.niter, settings.kmeans_seed)


def by_cluster(table: pa.Table) -> pa.Table:
    return table.sort_by([("cluster", "ascending"), *ORDER])


def partition_of(clusters: np.ndarray, k: int, partitions: int) -> np.ndarray:
    """Contiguous ranges of clusters, one per partition."""
    return clusters * partitions // max(k, 1)


def partition_count(count: int, k: int) -> int:
    return max(1, min(k, -(-count // PARTITION_ROWS)))


def members_table(keys: np.ndarray, block: str, ids: pa.Array, labels: np.ndarray, dist: np.ndarray,
                   vectors: np.ndarray | None) -> pa.Table:
    columns = [pa.array(labels, pa.int64()), pa.array(keys[:, 0]), pa.array(keys[:, 1]), pa.array(keys[:, 2]),
               pa.array([block] * len(keys), pa.string()), ids, pa.array(dist, pa.float32())]
    table = pa.Table.from_arrays(columns, schema=MEMBER_SCHEMA)
    if vectors is not None:
        table = table.append_column(VECTOR_COLUMN, vector_array(vectors))
    return table


def assign_windows(keys: np.ndarray, vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid and 1 - cosine, assigned WINDOW input rows at a time (rows in input order)."""
    labels, dist = np.zeros(len(keys), np.int64), np.zeros(len(keys), np.float32)
    for start, stop in group_runs(keys[:, 0] * (1 << 40) + keys[:, 1] // WINDOW):
        labels[start:stop], dist[start:stop] = clustering.assign(vectors[start:stop], centroids)
    return labels, dist
