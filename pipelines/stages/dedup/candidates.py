"""Dedup's first step, `candidates`: the pairs of records that may be duplicates, with their similarity, cached
apart from the decision. Rows move through files, never through a GroupByKey (io/row_groups.py): a task writes
its rows into a fragment with one row group per partition of a hash range and sends on references; the task of a
partition reads its row groups, sorts them and links every later record of a run of equal keys to the first
(star edges: as many as records, however large a group).

  exact   each record file's digests (BLAKE2b-128 of the `dedup.normalise`d text) -> digest partitions -> exact
          pairs, and per record file the rows that are exact copies of an earlier record
  near    each record file read again with those rows left out (an exact copy is as near to anything as its
          original is); MinHash band keys of its word n-grams (selectors/minhash.py) -> band partitions -> near
          pairs, distinct within a partition
  pairs   exact and near pairs meet by pair partition; a pair found in several bands or as exact and near counts
          once, exact first. Near pairs are checked: the shingle sets of their records are computed again where
          their files are read, and the Jaccard similarity where both meet. Written as `pairs/part-P.parquet`
          (first, second, kind, similarity), sorted.
The step's records are its input's, written back unchanged, each file with `facts/NAME` beside it: every row's
key, id, source and text length (UTF-8 bytes), what the decide step needs of a member without its text.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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

PAIRS, FACTS = "pairs", "facts"
EXACT, NEAR = 0, 1
PARTITIONS = 64  # hash ranges of digests, band keys, pairs and components: a task holds one at a time
FILES, BUCKETS, RANGES, SKIP, EXACT_PAIRS, CHECK = "files", "buckets", "ranges", "skip", "exact_pairs", "check"
DIGEST_SCHEMA = pa.schema([("high", pa.uint64()), ("low", pa.uint64()), ("key", pa.int64()), ("name", pa.string())])
BUCKET_SCHEMA = pa.schema([("band", pa.int8()), ("hash", pa.uint64()), ("key", pa.int64())])
EDGE_SCHEMA = pa.schema([("first", pa.int64()), ("second", pa.int64()), ("kind", pa.int8())])
SKIP_SCHEMA = pa.schema([("name", pa.string()), ("key", pa.int64())])
FACT_SCHEMA = pa.schema([("key", pa.int64()), ("id", pa.string()), ("source", pa.string()), ("bytes", pa.int64())])
PAIR_SCHEMA = pa.schema([("first", pa.int64()), ("second", pa.int64()), ("kind", pa.int8()),
                         ("similarity", pa.float32())])
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


def spread(values: np.ndarray, parts: int = PARTITIONS) -> np.ndarray:
    """A partition (0 .. parts - 1) of each int64 or uint64 value, mixed so that low bits do not decide."""
    mixed = values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def counted(kind: np.ndarray, similarity: np.ndarray, threshold: float | None) -> np.ndarray:
    """Which cached pairs count: the exact ones, and the near ones whose checked Jaccard reaches `threshold`
    (all of them with no threshold)."""
    return (kind == EXACT) | (similarity >= threshold) if threshold is not None else np.ones(len(kind), bool)


def facts_path(records_path: str) -> str:
    """The facts file beside a record file of this step (`DIR/records/NAME` -> `DIR/facts/NAME`)."""
    return posixpath.join(posixpath.dirname(posixpath.dirname(records_path)), FACTS, posixpath.basename(records_path))


def write_facts(rows: CachedRows, keys: np.ndarray, directory: str, name: str) -> dict[str, Any]:
    """Every row's key, id, source and text length in row (= key) order, uncompressed: the decide step reads
    these instead of the record file, whose texts it needs only to apply its decisions."""
    texts = rows.texts()
    if rows.block and "source" in rows.table.column_names:
        sources = rows.table.column("source").combine_chunks().cast(pa.string())
    else:
        sources = pa.array(rows.values("source"), pa.string())
    table = pa.Table.from_arrays([pa.array(keys, pa.int64()), rows.ids().cast(pa.string()),
                                  sources, pc.binary_length(texts).cast(pa.int64())], schema=FACT_SCHEMA)
    payload = table_bytes(table, 65_536, compression="none", dictionary=False)
    write_bytes(join(directory, FACTS, name), payload)
    return {"dir": FACTS, "file": f"{FACTS}/{name}", "rows": table.num_rows, "bytes": len(payload)}


def exact_digests(texts: pa.Array, normalisation: str) -> np.ndarray:
    """(rows, 2) uint64: BLAKE2b-128 of each normalised text."""
    raw = native.digests(minhash.normalise(texts, normalisation), 16)
    return raw.view(">u8").reshape(-1, 2).astype(np.uint64)


def near_band_keys(texts: pa.Array, config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows, bands) band keys of the texts' MinHash signatures, and which rows have a signature (a text of
    fewer than `ngram` words has none)."""
    hashes, offsets = minhash.shingles(minhash.normalise(texts, "datatrove"), config.ngram, config.shingles)
    signatures = minhash.signatures(hashes, offsets, config.bands, config.rows, config.seed)
    return minhash.band_keys(signatures, config.bands, config.rows), np.diff(offsets) > 0


def _runs_of(*columns: np.ndarray) -> np.ndarray:
    """Rows sorted by `columns` -> a group number per row, new where any column changes."""
    if not len(columns[0]):
        return np.zeros(0, np.int64)
    change = np.zeros(len(columns[0]) - 1, dtype=bool)
    for column in columns:
        change |= column[1:] != column[:-1]
    return np.cumsum(np.r_[0, change])


def _write_edges(path: str, first: np.ndarray, second: np.ndarray, kind: int) -> list[tuple[int, tuple[str, int]]]:
    partition = spread(first)
    order = np.lexsort((second, first, partition))
    table = pa.Table.from_arrays([pa.array(first[order]), pa.array(second[order]),
                                  pa.array(np.full(len(first), kind, np.int8))], schema=EDGE_SCHEMA)
    return write_groups(path, table, partition[order])


class _DigestFileFn(beam.DoFn):
    """A record file -> its exact digests written into a fragment by digest partition: (partition, ref)."""

    def __init__(self, normalisation: str, scratch: str):
        self.normalisation = normalisation
        self.scratch = scratch

    def process(self, path: str) -> Iterator[tuple[int, tuple[str, int]]]:
        rows = CachedRows.read(path, (VECTOR_COLUMN,))
        if not len(rows):
            return
        name = posixpath.basename(path)
        keys = record_keys(rows.keys())
        digest = exact_digests(rows.texts(), self.normalisation)
        partition = spread(digest[:, 0])
        order = np.lexsort((keys, digest[:, 1], digest[:, 0], partition))
        table = pa.Table.from_arrays([pa.array(digest[order, 0]), pa.array(digest[order, 1]),
                                      pa.array(keys[order]), pa.repeat(pa.scalar(name, pa.string()), len(keys))],
                                     schema=DIGEST_SCHEMA)
        yield from write_groups(join(self.scratch, "digests", name), table, partition[order])


class _ExactFn(beam.DoFn):
    """A digest partition -> exact pairs (EXACT_PAIRS, (pair partition, ref)) and, per record file, its rows that
    copy an earlier record (SKIP, (file name, ref))."""

    def __init__(self, scratch: str):
        self.scratch = scratch

    def process(self, element) -> Iterator[tuple[str, Any]]:
        partition, refs = element
        table = read_groups(refs, DIGEST_SCHEMA).sort_by([("high", "ascending"), ("low", "ascending"),
                                                          ("key", "ascending")])
        group = _runs_of(table.column("high").to_numpy(), table.column("low").to_numpy())
        first, second = minhash.star_edges(group, table.column("key").to_numpy())
        if not len(first):
            return
        later = np.r_[False, group[1:] == group[:-1]]
        for ref in _write_edges(join(self.scratch, "exact-pairs", f"{partition:05d}"), first, second, EXACT):
            yield EXACT_PAIRS, ref
        copies = table.filter(pa.array(later)).select(["name", "key"]).sort_by([("name", "ascending"),
                                                                                ("key", "ascending")])
        for ref in write_groups(join(self.scratch, "copies", f"{partition:05d}"), copies,
                                copies.column("name").to_numpy(zero_copy_only=False)):
            yield SKIP, ref


class _SignFileFn(beam.DoFn):
    """(file name, {file: [path], skip: refs}) -> the file's rows written back unchanged and its facts (FILES),
    the band keys of its rows that are not exact copies written into a fragment by band partition (BUCKETS,
    (partition, ref)), and its key range per input file (RANGES, (file_index, (path, first key, last key)))."""

    def __init__(self, config: DedupConfig, directory: str, scratch: str, drops_vectors: bool, compression: str):
        self.config = config
        self.directory = directory
        self.scratch = scratch
        self.drops_vectors = drops_vectors
        self.compression = compression
        self.signed = beam.metrics.Metrics.counter("winnow.dedup", "records_signed")

    def process(self, element) -> Iterator[tuple[str, Any]]:
        name, joined = element
        (path,) = joined["file"]
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        yield FILES, rows.write(self.directory, f"{RECORDS}/{name}", {}, drop=drop, compression=self.compression)
        keys = record_keys(rows.keys())
        yield FILES, write_facts(rows, keys, self.directory, name)
        if not len(rows):
            return
        file_index = rows.keys()[:, 0]
        for index in np.unique(file_index).tolist():
            mine = keys[file_index == index]
            yield RANGES, (index, (path, int(mine.min()), int(mine.max())))
        if not self.config.near:
            return
        copies = read_groups(list(joined["skip"]), SKIP_SCHEMA).column("key").to_numpy()
        wanted = ~np.isin(keys, copies)
        bands, signed = near_band_keys(rows.texts().filter(pa.array(wanted)), self.config)
        keys = keys[wanted][signed]
        bands = bands[signed]
        self.signed.inc(len(keys))
        width = bands.shape[1]
        band = np.tile(np.arange(width, dtype=np.int8), len(keys))
        hashes, members = bands.reshape(-1), np.repeat(keys, width)
        partition = spread(hashes)
        order = np.lexsort((members, hashes, band, partition))
        table = pa.Table.from_arrays([pa.array(band[order]), pa.array(hashes[order]), pa.array(members[order])],
                                     schema=BUCKET_SCHEMA)
        for ref in write_groups(join(self.scratch, "buckets", name), table, partition[order]):
            yield BUCKETS, ref


class _NearFn(beam.DoFn):
    """A band partition -> its distinct near pairs, written by pair partition: (pair partition, ref)."""

    def __init__(self, scratch: str):
        self.scratch = scratch

    def process(self, element) -> Iterator[tuple[int, tuple[str, int]]]:
        partition, refs = element
        table = read_groups(refs, BUCKET_SCHEMA).sort_by([("band", "ascending"), ("hash", "ascending"),
                                                          ("key", "ascending")])
        group = _runs_of(table.column("band").to_numpy(), table.column("hash").to_numpy())
        first, second = minhash.star_edges(group, table.column("key").to_numpy())
        if not len(first):
            return
        pairs = np.unique(np.stack([first, second], axis=1), axis=0)
        yield from _write_edges(join(self.scratch, "near-pairs", f"{partition:05d}"), pairs[:, 0], pairs[:, 1], NEAR)


def _distinct_pairs(element) -> Iterator[tuple[str, Any]]:
    """A pair partition's exact and near pairs -> each pair once, exact first: the exact ones as arrays
    (EXACT_PAIRS, (partition, (first, second))), each near one to be checked (CHECK, (first, second))."""
    partition, refs = element
    table = read_groups(refs, EDGE_SCHEMA)
    first, second, kind = (table.column(name).to_numpy() for name in ("first", "second", "kind"))
    order = np.lexsort((kind, second, first))
    first, second, kind = first[order], second[order], kind[order]
    once = np.r_[True, (first[1:] != first[:-1]) | (second[1:] != second[:-1])] if len(first) else np.zeros(0, bool)
    first, second, kind = first[once], second[once], kind[once]
    exact = kind == EXACT
    yield EXACT_PAIRS, (partition, (first[exact], second[exact]))
    for a, b in zip(first[~exact].tolist(), second[~exact].tolist(), strict=True):
        yield CHECK, (a, b)


def _requests(pair: tuple[int, int]) -> Iterator[tuple[int, int]]:
    for key in pair:
        yield file_index_of(key), key


def _route_requests(element) -> Iterator[tuple[str, list[int]]]:
    """(file_index, {ranges: [(path, first, last)], keys: [key]}) -> (path, the requested keys it holds)."""
    _, joined = element
    keys = np.unique(np.asarray(list(joined["keys"]), dtype=np.int64))
    if not len(keys):
        return
    for path, first, last in sorted(joined["ranges"]):
        inside = keys[(keys >= first) & (keys <= last)]
        if len(inside):
            yield path, inside.tolist()


class _ShinglesFn(beam.DoFn):
    """(path, [keys]) -> (key, its sorted distinct shingle hashes) for the requested rows of a record file."""

    def __init__(self, ngram: int, kind: str):
        self.ngram, self.kind = ngram, kind

    def process(self, element) -> Iterator[tuple[int, np.ndarray]]:
        path, wanted = element
        wanted = np.unique(np.concatenate([np.asarray(keys, np.int64) for keys in wanted]))
        rows = CachedRows.read(path, (VECTOR_COLUMN,))
        keys = record_keys(rows.keys())
        positions = np.flatnonzero(np.isin(keys, wanted))
        texts = minhash.normalise(rows.texts().take(pa.array(positions, pa.int64())), "datatrove")
        yield from zip(keys[positions].tolist(), minhash.shingle_sets(texts, self.ngram, self.kind), strict=True)


def _first_halves(element) -> Iterator[tuple[int, tuple[tuple[int, int], np.ndarray]]]:
    """(a, {pairs: [(a, b)], shingles: [A]}) -> (b, ((a, b), A)) for each of a's pairs."""
    _, joined = element
    shingles = list(joined["shingles"])
    for a, b in joined["pairs"]:
        yield b, ((a, b), shingles[0] if shingles else np.zeros(0, np.uint64))


def _checked(element) -> Iterator[tuple[int, tuple[int, int, float]]]:
    """(b, {halves: [((a, b), A)], shingles: [B]}) -> (pair partition, (a, b, Jaccard(A, B)))."""
    _, joined = element
    shingles = list(joined["shingles"])
    mine = shingles[0] if shingles else np.zeros(0, np.uint64)
    for (a, b), theirs in joined["halves"]:
        yield int(spread(np.array([a]))[0]), (a, b, minhash.jaccard(theirs, mine))


class _WritePairsFn(beam.DoFn):
    def __init__(self, directory: str):
        self.directory = directory

    def process(self, element) -> Iterator[dict[str, Any]]:
        partition, joined = element
        exact = list(joined["exact"])
        checked = sorted(joined["checked"])
        first = [part[0] for part in exact] + [np.array([pair[0] for pair in checked], np.int64)]
        second = [part[1] for part in exact] + [np.array([pair[1] for pair in checked], np.int64)]
        count = sum(len(part) for part in first[:-1])
        similarity = np.r_[np.ones(count, np.float32), np.array([pair[2] for pair in checked], np.float32)]
        kind = np.r_[np.full(count, EXACT, np.int8), np.full(len(checked), NEAR, np.int8)]
        table = pa.Table.from_arrays([pa.array(np.concatenate(first).astype(np.int64)),
                                      pa.array(np.concatenate(second).astype(np.int64)), pa.array(kind),
                                      pa.array(similarity)], schema=PAIR_SCHEMA)
        table = table.sort_by([("first", "ascending"), ("second", "ascending")])
        name = f"{PAIRS}/part-{partition:05d}.parquet"
        payload = table_bytes(table, 65_536, compression="none", dictionary=False)
        write_bytes(join(self.directory, name), payload)
        yield {"dir": PAIRS, "file": name, "rows": table.num_rows, "bytes": len(payload)}


def build_candidates(pipeline, paths, context: StepContext) -> StepOutput:
    config = context.job.config.dedup
    scratch = context.scratch
    files = paths | "ByName" >> beam.Map(lambda path: (posixpath.basename(path), path))
    pair_refs = []
    if not config.exact:
        skip = pipeline | "NoCopies" >> beam.Create([])
    else:
        exact = split_routed(
            paths
            | "Digests" >> beam.ParDo(_DigestFileFn(config.normalise, scratch))
            | "ByDigestPartition" >> beam.GroupByKey()
            | "ExactPairs" >> beam.ParDo(_ExactFn(scratch)),
            "Exact", (EXACT_PAIRS, SKIP))
        pair_refs.append(exact[EXACT_PAIRS])
        skip = exact[SKIP]
    signed = split_routed(
        {"file": files, "skip": skip}
        | "CopiesByFile" >> beam.CoGroupByKey()
        | "Sign" >> beam.ParDo(_SignFileFn(config, context.directory, scratch, context.drops_vectors,
                                           context.compression)),
        "Signed", (FILES, BUCKETS, RANGES))
    pair_refs.append(signed[BUCKETS] | "ByBandPartition" >> beam.GroupByKey()
                     | "NearPairs" >> beam.ParDo(_NearFn(scratch)))
    pairs = split_routed(
        tuple(pair_refs)
        | "AllPairRefs" >> beam.Flatten()
        | "ByPairPartition" >> beam.GroupByKey()
        | "Distinct" >> beam.FlatMap(_distinct_pairs),
        "Pairs", (EXACT_PAIRS, CHECK))
    near = pairs[CHECK]
    shingles = (
        {"ranges": signed[RANGES], "keys": near | "Requests" >> beam.FlatMap(_requests)}
        | "RequestsByInputFile" >> beam.CoGroupByKey()
        | "RequestsByFile" >> beam.FlatMap(_route_requests)
        | "ByFile" >> beam.GroupByKey()
        | "Shingles" >> beam.ParDo(_ShinglesFn(config.ngram, config.shingles))
    )
    halves = (
        {"pairs": near | "ByFirst" >> beam.Map(lambda pair: (pair[0], pair)), "shingles": shingles}
        | "JoinFirst" >> beam.CoGroupByKey()
        | "FirstHalves" >> beam.FlatMap(_first_halves)
    )
    checked = (
        {"halves": halves, "shingles": shingles}
        | "JoinSecond" >> beam.CoGroupByKey()
        | "Jaccard" >> beam.FlatMap(_checked)
    )
    written = (
        {"exact": pairs[EXACT_PAIRS], "checked": checked}
        | "PairsByPartition" >> beam.CoGroupByKey()
        | "WritePairs" >> beam.ParDo(_WritePairsFn(context.directory))
    )
    return StepOutput(None, [], [signed[FILES], written])
