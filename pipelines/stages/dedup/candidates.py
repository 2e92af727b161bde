"""Dedup's first step, `candidates`: what does not depend on the decision, cached.

Each record file is read once: its texts normalised, an exact digest (BLAKE2b-128 of the `dedup.normalise`d
text) and the MinHash band keys of its word n-grams (selectors/minhash.py) computed over the whole file, and its
rows written back unchanged. The digests and band keys are written into a fragment per record file, one row
group per partition of their hash range (io/row_groups.py); each partition is gathered by one task, which sorts
it and links every later record of a run of equal keys to the first (star edges: as many as records, however
large a group). Near pairs are then checked: the shingle sets of the records in a near pair are computed again
where their files are read, and the pair's Jaccard similarity is computed where both meet. The step writes
`pairs/part-P.parquet` (first key, second key, kind exact/near, similarity; pairs appear once, exact pairs
before near ones) for the decision.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.config import DedupConfig
from winnow.pipelines.engine.stage import StepContext, StepOutput
from winnow.pipelines.io import native
from winnow.pipelines.io.blocks import VECTOR_COLUMN
from winnow.pipelines.io.cache_files import RECORDS
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import table_bytes, write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.row_groups import read_groups, write_groups
from winnow.pipelines.io.storage import join
from winnow.selectors import minhash

PAIRS = "pairs"
EXACT, NEAR = 0, 1
PARTITIONS = 16  # hash ranges of the digests and band keys: a task gathers one at a time
FILES, BUCKETS, RANGES = "files", "buckets", "ranges"
BUCKET_SCHEMA = pa.schema([("band", pa.int8()), ("hash_high", pa.uint64()), ("hash_low", pa.uint64()),
                           ("key", pa.int64())])
PAIR_SCHEMA = pa.schema([("first", pa.int64()), ("second", pa.int64()), ("kind", pa.int8()),
                         ("similarity", pa.float32())])
EXACT_BAND = -1  # the band value of the exact digests' rows
FILE_BITS, ROW_BITS, VARIANT_BITS = 20, 36, 7


def record_keys(keys: np.ndarray) -> np.ndarray:
    """(file_index, input_row, variant) rows -> one int64 each, ordered as input order is."""
    if len(keys) and (keys[:, 0].max() >= 1 << FILE_BITS or keys[:, 1].max() >= 1 << ROW_BITS
                      or keys[:, 2].max() >= 1 << VARIANT_BITS or keys.min() < 0):
        raise ValueError(f"dedup: an input position beyond {1 << FILE_BITS} files, {1 << ROW_BITS} rows per file "
                         f"or {1 << VARIANT_BITS} variants per record")
    return (keys[:, 0] << (ROW_BITS + VARIANT_BITS)) | (keys[:, 1] << VARIANT_BITS) | keys[:, 2]


def file_index_of(key: int) -> int:
    return int(key) >> (ROW_BITS + VARIANT_BITS)


def record_texts(rows: CachedRows) -> pa.Array:
    """A record file's texts as one Arrow string array, in its row order."""
    if rows.block:
        return native.one_chunk(rows.table.column("text"))
    return pa.array(rows.values("text"), pa.string())


def exact_digests(texts: pa.Array, normalisation: str) -> np.ndarray:
    """(rows, 2) uint64: BLAKE2b-128 of each normalised text."""
    raw = native.digests(minhash.normalise(texts, normalisation), 16)
    return raw.view(">u8").reshape(-1, 2).astype(np.uint64)


def near_band_keys(texts: pa.Array, config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows, bands) band keys of the texts' MinHash signatures, and which rows have a signature (a text of
    fewer than `ngram` words has none)."""
    hashes, offsets = minhash.shingles(minhash.normalise(texts, "datatrove"), config.ngram)
    signatures = minhash.signatures(hashes, offsets, config.bands, config.rows, config.seed)
    return minhash.band_keys(signatures, config.bands, config.rows), np.diff(offsets) > 0


def shingle_sets(texts: pa.Array, ngram: int) -> list[np.ndarray]:
    return minhash.shingle_sets(minhash.normalise(texts, "datatrove"), ngram)


def _partition(hashes: np.ndarray) -> np.ndarray:
    return (hashes >> np.uint64(60)).astype(np.int64) * PARTITIONS // 16


class _SignFileFn(beam.DoFn):
    """A record file -> its rows written back unchanged (FILES), its exact digests and band keys written into
    one fragment, a row group per partition (BUCKETS, (partition, (fragment, row group))), and its key range
    (RANGES, (file_index, (path, first key, last key)))."""

    def __init__(self, config: DedupConfig, directory: str, scratch: str, drops_vectors: bool, compression: str):
        self.config = config
        self.directory = directory
        self.scratch = scratch
        self.drops_vectors = drops_vectors
        self.compression = compression
        self.signed = beam.metrics.Metrics.counter("winnow.dedup", "records_signed")

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        name = posixpath.basename(path)
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        yield FILES, rows.write(self.directory, f"{RECORDS}/{name}", {}, drop=drop, compression=self.compression)
        if not len(rows):
            return
        keys = record_keys(rows.keys())
        texts = record_texts(rows)
        parts = []
        if self.config.exact:
            digest = exact_digests(texts, self.config.normalise)
            parts.append((np.full(len(keys), EXACT_BAND, np.int8), digest[:, 0], digest[:, 1], keys))
        if self.config.near:
            bands, signed = near_band_keys(texts, self.config)
            count, width = int(signed.sum()), bands.shape[1]
            parts.append((np.repeat(np.arange(width, dtype=np.int8)[None, :], count, axis=0).reshape(-1),
                          bands[signed].reshape(-1), np.zeros(count * width, np.uint64),
                          np.repeat(keys[signed], width)))
        self.signed.inc(len(keys))
        band, high, low, key = (np.concatenate(column) for column in zip(*parts, strict=True))
        partition = _partition(high)
        order = np.lexsort((key, low, high, band, partition))
        table = pa.Table.from_arrays([pa.array(band[order]), pa.array(high[order]), pa.array(low[order]),
                                      pa.array(key[order])], schema=BUCKET_SCHEMA)
        for ref in write_groups(join(self.scratch, "buckets", name), table, partition[order]):
            yield BUCKETS, ref
        file_index = rows.keys()[:, 0]
        for index in np.unique(file_index).tolist():
            mine = keys[file_index == index]
            yield RANGES, (index, (path, int(mine.min()), int(mine.max())))


def _bucket_pairs(element) -> Iterator[tuple[tuple[int, int], int]]:
    """A partition's digests and band keys -> ((first, second), kind) for every star edge of a run of equal
    (band, hash): exact pairs from the digests, near pairs from the bands."""
    _, refs = element
    table = read_groups(refs, BUCKET_SCHEMA).sort_by([("band", "ascending"), ("hash_high", "ascending"),
                                                       ("hash_low", "ascending"), ("key", "ascending")])
    band = table.column("band").to_numpy()
    high, low = table.column("hash_high").to_numpy(), table.column("hash_low").to_numpy()
    group = np.zeros(len(band), np.int64)
    if len(band):
        group = np.cumsum(np.r_[0, (band[1:] != band[:-1]) | (high[1:] != high[:-1]) | (low[1:] != low[:-1])])
    first, second = minhash.star_edges(group, table.column("key").to_numpy())
    later = np.flatnonzero(np.r_[False, group[1:] == group[:-1]]) if len(group) else np.zeros(0, np.int64)
    is_exact = band[later] == EXACT_BAND
    for a, b, exact in zip(first.tolist(), second.tolist(), is_exact.tolist(), strict=True):
        yield (a, b), EXACT if exact else NEAR


def _strongest_kind(element) -> Iterator[tuple[int, int, int]]:
    """A pair found in several bands or as exact and near: once, exact first."""
    (a, b), kinds = element
    yield a, b, min(kinds)


def _requests(element) -> Iterator[tuple[int, int]]:
    a, b, kind = element
    if kind == NEAR:
        yield file_index_of(a), a
        yield file_index_of(b), b


def _route_requests(element) -> Iterator[tuple[str, list[int]]]:
    """(file_index, {ranges: [(path, first, last)], keys: [key]}) -> (path, keys in that file)."""
    _, joined = element
    keys = np.unique(np.asarray(list(joined["keys"]), dtype=np.int64))
    if not len(keys):
        return
    for path, first, last in sorted(joined["ranges"]):
        inside = keys[(keys >= first) & (keys <= last)]
        if len(inside):
            yield path, inside.tolist()


class _ShinglesFn(beam.DoFn):
    """(path, keys) -> (key, its sorted distinct shingle hashes) for the requested rows of a record file."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def process(self, element) -> Iterator[tuple[int, np.ndarray]]:
        path, wanted = element
        wanted = np.unique(np.concatenate([np.asarray(keys, np.int64) for keys in wanted]))
        rows = CachedRows.read(path, (VECTOR_COLUMN,))
        keys = record_keys(rows.keys())
        positions = np.flatnonzero(np.isin(keys, wanted))
        texts = record_texts(rows).take(pa.array(positions, pa.int64()))
        yield from zip(keys[positions].tolist(), shingle_sets(texts, self.ngram), strict=True)


def _first_halves(element) -> Iterator[tuple[int, tuple[tuple[int, int], np.ndarray]]]:
    """(a, {pairs: [(a, b)], shingles: [A]}) -> (b, ((a, b), A)) for each of a's pairs."""
    _, joined = element
    shingles = list(joined["shingles"])
    for a, b in joined["pairs"]:
        yield b, ((a, b), shingles[0] if shingles else np.zeros(0, np.uint64))


def _checked(element) -> Iterator[tuple[int, int, int, float]]:
    """(b, {halves: [((a, b), A)], shingles: [B]}) -> (a, b, NEAR, Jaccard(A, B))."""
    _, joined = element
    shingles = list(joined["shingles"])
    mine = shingles[0] if shingles else np.zeros(0, np.uint64)
    for (a, b), theirs in joined["halves"]:
        yield a, b, NEAR, minhash.jaccard(theirs, mine)


class _WritePairsFn(beam.DoFn):
    def __init__(self, directory: str):
        self.directory = directory

    def process(self, element) -> Iterator[dict[str, Any]]:
        partition, pairs = element
        pairs = sorted(pairs)
        columns = list(zip(*pairs, strict=True)) if pairs else [[], [], [], []]
        table = pa.Table.from_arrays([pa.array(columns[0], pa.int64()), pa.array(columns[1], pa.int64()),
                                      pa.array(columns[2], pa.int8()), pa.array(columns[3], pa.float32())],
                                     schema=PAIR_SCHEMA)
        name = f"{PAIRS}/part-{partition:05d}.parquet"
        payload = table_bytes(table, 65_536, compression="none", dictionary=False)
        write_bytes(join(self.directory, name), payload)
        yield {"dir": PAIRS, "file": name, "rows": table.num_rows, "bytes": len(payload)}


def build_candidates(pipeline, paths, context: StepContext) -> StepOutput:
    config = context.job.config.dedup
    signed = split_routed(
        paths | "Sign" >> beam.ParDo(_SignFileFn(config, context.directory, context.scratch,
                                                 context.drops_vectors, context.compression)),
        "Signed", (FILES, BUCKETS, RANGES))
    pairs = (
        signed[BUCKETS]
        | "ByPartition" >> beam.GroupByKey()
        | "BucketPairs" >> beam.FlatMap(_bucket_pairs)
        | "SamePair" >> beam.GroupByKey()
        | "Once" >> beam.FlatMap(_strongest_kind)
    )
    exact = pairs | "Exact" >> beam.Filter(lambda pair: pair[2] == EXACT) | \
        "ExactSimilarity" >> beam.Map(lambda pair: (*pair, 1.0))
    near = pairs | "Near" >> beam.Filter(lambda pair: pair[2] == NEAR)
    requested = (
        {"ranges": signed[RANGES], "keys": near | "Requests" >> beam.FlatMap(_requests)}
        | "RequestsByInputFile" >> beam.CoGroupByKey()
        | "RequestsByFile" >> beam.FlatMap(_route_requests)
        | "ByFile" >> beam.GroupByKey()
    )
    shingles = requested | "Shingles" >> beam.ParDo(_ShinglesFn(config.ngram))
    halves = (
        {"pairs": near | "ByFirst" >> beam.Map(lambda pair: (pair[0], (pair[0], pair[1]))), "shingles": shingles}
        | "JoinFirst" >> beam.CoGroupByKey()
        | "FirstHalves" >> beam.FlatMap(_first_halves)
    )
    checked = (
        {"halves": halves, "shingles": shingles}
        | "JoinSecond" >> beam.CoGroupByKey()
        | "Jaccard" >> beam.FlatMap(_checked)
    )
    written = (
        (exact, checked)
        | "AllPairs" >> beam.Flatten()
        | "PairPartition" >> beam.Map(lambda pair: (int(pair[0]) % PARTITIONS, pair))
        | "PairsByPartition" >> beam.GroupByKey()
        | "WritePairs" >> beam.ParDo(_WritePairsFn(context.directory))
    )
    return StepOutput(None, [], [signed[FILES], written])
