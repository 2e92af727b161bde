"""Mix stage: temperature sampling with a schedule, written as shards in training order.

Input: the cache files of the records that reach mixing. Output: the shards (`shards/part-NNNNN.parquet`, one
row per copy of a record, in a seeded shuffle), the ledger rows of every input record (`kept` with its number of
copies, or `not_selected`, stage mix, reason not_sampled, when the mixture leaves it out) and a summary for the
manifest (sources, sizes, the allocation and the schedule's expectation).

A record of rank r in its source of n documents (its place in the source's order by a seeded hash of the id)
fills that source's slots r, r + n, r + 2n, ... (all documents once before any repeat), and slot j goes to the
shard whose share of the source covers j; inside a shard rows are ordered by a seeded hash (a shuffle).

Records move as Arrow tables through files, never through a GroupByKey:
1. a pass writes each cache file's rows into one fragment per hash partition (a range of hash blocks) and
   counts each source's records, tokens and synthetic records per block of the hash's top BLOCK_BITS bits
   (small), from which the driver computes the allocation (selectors.mixing) and each block's offset;
2. each partition is read alone, sorted by (source, hash, id), ranked from its offsets, and its copies are
   written into one fragment per shard, its ledger rows into one fragment;
3. each shard is its fragments, sorted by the shuffle key.
Only file names (and each shard fragment's first key per batch) cross the GroupByKey; memory is a cache file,
a partition or a shard's key range. The partition and shard fragments are Arrow IPC files (nothing to encode
or decode), the ledger fragments plain Parquet (ordered_io finds order-key ranges by row group statistics).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from winnow.pipelines.config import MixConfig
from winnow.pipelines.engine.passes import Pass
from winnow.pipelines.io.ordered_io import ORDER_KEYS, part_meta, part_path
from winnow.pipelines.io.records import seeded_hashes, split_routed, token_counts
from winnow.pipelines.io.storage import join, read_arrow, reading_arrow, write_arrow, write_parquet, writing
from winnow.pipelines.io.write import ledger_rows_table, rows_table, shard_output, value_tally
from winnow.selectors import mixing

STAGE = "mix"
SHARDS, LEDGER, SUMMARY = "shards", "ledger", "summary"
BLOCK_BITS = 14
SYNTHETIC, REAL = "synthetic", "real"
PARTITION_ROWS = 200_000
PARTITION_BATCH_ROWS = 65_536
SHARD_CHUNK_ROWS = 50_000  # a shard is written this many rows at a time
LEDGER_ROW_GROUP = 2_048  # ledger fragments are read by input-order ranges, each spanning the whole input
FRAGMENT_BATCH_ROWS = 1_024  # shard fragments are read by key range: a range takes about this many rows of each
FRAGMENTS = "_mix"


def _hashed_rows(path: str, seed: int, extra: list[tuple[str, str]]) -> pa.Table:
    rows = rows_table(path, extra)
    rows = rows.append_column("hash", pa.array(seeded_hashes(seed, rows.column("id")), pa.uint64()))
    return rows.append_column("tokens", token_counts(rows.column("text")).cast(pa.int64()))


def _block_counts(rows: pa.Table) -> dict[str, tuple[np.ndarray, ...]]:
    """{source: (hash blocks, rows per block, tokens per block, synthetic rows per block)} of some rows: one
    bincount over (source, block) for each, not a sort per source."""
    if not rows.num_rows:
        return {}
    blocks = (rows.column("hash").to_numpy() >> np.uint64(64 - BLOCK_BITS)).astype(np.int64)
    encoded = pc.dictionary_encode(rows.column("source")).combine_chunks()
    names = encoded.dictionary.to_pylist()
    keys = (encoded.indices.to_numpy().astype(np.int64) << BLOCK_BITS) | blocks
    size = len(names) << BLOCK_BITS
    synthetic = pc.fill_null(pc.not_equal(rows.column("parent_id"), ""), False).to_numpy(zero_copy_only=False)
    found = [np.bincount(keys, minlength=size).reshape(len(names), -1),
             np.bincount(keys, weights=rows.column("tokens").to_numpy(), minlength=size).reshape(len(names), -1),
             np.bincount(keys, weights=synthetic, minlength=size).reshape(len(names), -1)]
    counts = {}
    for index, source in sorted(enumerate(names), key=lambda pair: pair[1]):
        present = np.flatnonzero(found[0][index])
        counts[source] = (present, *(values[index][present].astype(np.int64) for values in found))
    return counts


def _merge_counts(parts) -> dict[str, tuple[np.ndarray, ...]]:
    """Per-file counts -> per source: (blocks, rows, tokens, synthetic rows), blocks ascending."""
    gathered: dict[str, list] = {}
    for part in parts:
        for source, arrays in part.items():
            gathered.setdefault(source, []).append(arrays)
    merged = {}
    for source in sorted(gathered):
        blocks = np.concatenate([a[0] for a in gathered[source]])
        found, inverse = np.unique(blocks, return_inverse=True)
        merged[source] = (found, *(np.bincount(inverse, weights=np.concatenate([a[i] for a in gathered[source]]),
                                               minlength=len(found)).astype(np.int64) for i in (1, 2, 3)))
    return merged


def partition_bits(records: int) -> int:
    """Hash partitions of about PARTITION_ROWS records (a power of two, at most 2^BLOCK_BITS)."""
    return min(BLOCK_BITS, max(0, int(np.ceil(np.log2(max(1.0, records / PARTITION_ROWS))))))


class _PartitionFn(beam.DoFn):
    """(index, cache file) -> its rows, hashed, written as one fragment per hash partition; yields the file's
    per-block counts and its [(partition, fragment)]."""

    def __init__(self, work: str, seed: int, bits: int):
        self.work = work
        self.seed = seed
        self.bits = bits

    def process(self, element, extra) -> Iterator[tuple[dict[str, Any], list[tuple[int, str]]]]:
        index, path = element
        rows = _hashed_rows(path, self.seed, extra)
        partitions = (rows.column("hash").to_numpy() >> np.uint64(64 - self.bits)).astype(np.int64) \
            if self.bits else np.zeros(rows.num_rows, dtype=np.int64)
        written = []
        for partition in np.unique(partitions).tolist():
            fragment = join(self.work, FRAGMENTS, f"partition-{partition:05d}", f"part-{index:05d}.arrow")
            write_arrow(fragment, rows.filter(pa.array(partitions == partition)), PARTITION_BATCH_ROWS)
            written.append((partition, fragment))
        yield _block_counts(rows), written


class _GatherPartitions(beam.CombineFn):
    """Each file's (per-block counts, [(partition, fragment)]) -> {counts: merged per source, fragments: by
    partition}. Counts are merged as they arrive, so what is held is one merged count per (source, hash block),
    at most 2^BLOCK_BITS per source, not one per file."""

    def create_accumulator(self):
        return {}, []

    def add_input(self, accumulator, element):
        counts, fragments = accumulator
        file_counts, written = element
        return _merge_counts([counts, file_counts]), fragments + written

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        return (_merge_counts([counts for counts, _ in accumulators]),
                [pair for _, written in accumulators for pair in written])

    def extract_output(self, accumulator):
        counts, written = accumulator
        fragments: dict[int, list[str]] = {}
        for partition, fragment in written:
            fragments.setdefault(partition, []).append(fragment)
        return {"counts": counts,
                "fragments": {partition: sorted(paths) for partition, paths in sorted(fragments.items())}}


def partition_pass(config: MixConfig, paths: list[str], work: str, records: int, extra: list[tuple[str, str]]
                   ) -> Pass:
    """The final records' cache files -> fragments per hash partition (under WORK/_mix) and, per source and
    hash block, records, tokens and synthetic records; `extra` is the shards' schema of passed-through columns."""
    seed, bits = config.seed, partition_bits(records)

    def build(pipeline, constants):
        return (
            pipeline
            | "Files" >> beam.Create(list(enumerate(paths)))  # Create spreads its elements (a Reshuffle)
            | "Partition" >> beam.ParDo(_PartitionFn(work, seed, bits), extra)
            | "Partitions" >> beam.CombineGlobally(_GatherPartitions())
            | "WithBits" >> beam.Map(lambda gathered: {**gathered, "bits": bits})
        )

    return Pass("mix_partitions", build, reads_records=False)


def plan(config: MixConfig, counts: dict[str, tuple[np.ndarray, ...]], bits: int
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The allocation from the per-block counts: (summary for the manifest, placement constants: per source
    its size, cumulative shard counts and the offset of each of the 2^bits hash partitions)."""
    sizes = {source: int(found[1].sum()) for source, found in counts.items()}
    tokens = {source: int(found[2].sum()) for source, found in counts.items()}
    # as the block-by-block plan always did: the group of a source is that of its last block
    group_of = {source: SYNTHETIC if found[3][-1] > 0 else REAL for source, found in counts.items()}
    share = config.synthetic_share
    grouping = {}
    if share is not None and SYNTHETIC in group_of.values():
        grouping = {"group_of_source": group_of, "group_shares": {REAL: 1.0 - share, SYNTHETIC: share}}
    schedule = [mixing.SchedulePoint(p.at, p.tau) for p in config.schedule]
    weights = tokens if config.size_by == "tokens" else None
    if config.total_tokens:
        mean_tokens = {source: tokens[source] / sizes[source] for source in sizes}
        total = mixing.records_for_tokens(
            config.total_tokens, sizes, mean_tokens, schedule, config.schedule_kind, weights, **grouping
        )
    else:
        total = config.total_records or sum(sizes.values())
    if total == 0:
        return {"dir": "_mix_summary", "sources": [], "shards": 0}, {}
    shards = min(config.shards, total)
    mix = mixing.plan_mix(sizes, schedule, total, shards, config.schedule_kind, config.max_epochs, weights,
                          **grouping)
    placement = {"shards": shards, "sources": {}}
    for index, source in enumerate(mix.sources):
        found = counts[source]
        partitions = found[0] >> (BLOCK_BITS - bits)
        before = np.zeros(1 << bits, dtype=np.int64)
        np.add.at(before, partitions, found[1])
        placement["sources"][source] = {
            "size": mix.sizes[index],
            "cumulative": np.cumsum(mix.counts[:, index]).astype(np.int64),
            "offsets": np.concatenate([[0], np.cumsum(before)[:-1]]).astype(np.int64),
        }
    summary = {
        "dir": "_mix_summary",
        "sources": mix.sources,
        "sizes": mix.sizes,
        "tokens": [tokens[s] for s in mix.sources],
        "shards": shards,
        "total": total,
        "counts": mix.counts.tolist(),
        "expected": mix.expected.tolist(),
        "schedule_expected": mix.schedule_expected.tolist(),
        "shard_taus": mix.shard_taus,
        "groups": grouping.get("group_of_source"),
        "group_shares": grouping.get("group_shares"),
    }
    return summary, placement


def _write(path: str, table: pa.Table, row_group_rows: int) -> None:
    """A ledger fragment: read by order-key ranges (ordered_io), soon, by the same job, so Parquet (whose row
    group statistics find the ranges) without compression or dictionaries (zstd took 7x as long to write and
    3x to read, for a third of the disk)."""
    write_parquet(path, table, row_group_rows, compression="none", dictionary=False)


class _PlaceFn(beam.DoFn):
    """A hash partition -> its records ranked in their sources, their copies written into one fragment per
    shard, their ledger rows into one fragment; routed (SHARDS, (shard, (fragment, rows, first shuffle key of
    each batch))) and (LEDGER, fragment)."""

    def __init__(self, work: str, seed: int, placement: dict[str, Any]):
        self.work = work
        self.seed = seed
        self.placement = placement
        self.placed = beam.metrics.Metrics.counter("winnow.mix", "copies_placed")
        self.left_out = beam.metrics.Metrics.counter("winnow.mix", "records_not_sampled")

    def process(self, element) -> Iterator[tuple[str, Any]]:
        partition, fragments = element
        # one chunk per column: Table.take over the fragments' chunks took 3x as long as over one chunk
        rows = pa.concat_tables([read_arrow(path) for path in sorted(fragments)]).combine_chunks()
        order = pc.sort_indices(rows.select(["source", "hash", "id"]), sort_keys=[
            ("source", "ascending"), ("hash", "ascending"), ("id", "ascending")]).to_numpy()
        sources = rows.column("source").take(order).to_numpy(zero_copy_only=False)
        count = rows.num_rows
        ranks = np.zeros(count, dtype=np.int64)  # in the sorted order, as are sizes and totals
        sizes = np.ones(count, dtype=np.int64)
        totals = np.zeros(count, dtype=np.int64)
        starts = np.flatnonzero(np.r_[True, sources[1:] != sources[:-1]]) if count else []
        bounds = [*list(starts), count]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            info = self.placement["sources"][sources[start]]
            ranks[start:stop] = info["offsets"][partition] + np.arange(stop - start)
            sizes[start:stop] = info["size"]
            totals[start:stop] = info["cumulative"][-1]
        copies = np.maximum(0, -(-(totals - ranks) // sizes))
        owner = np.repeat(np.arange(count), copies)
        epochs = np.arange(len(owner)) - np.repeat(np.cumsum(copies) - copies, copies)
        slots = ranks[owner] + epochs * sizes[owner]
        shard_of_copy = np.zeros(len(owner), dtype=np.int64)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            mine = (owner >= start) & (owner < stop)
            cumulative = self.placement["sources"][sources[start]]["cumulative"]
            shard_of_copy[mine] = np.searchsorted(cumulative, slots[mine], side="right")
        epoch_suffix = pc.binary_join_element_wise(pa.array(epochs).cast(pa.string()), "shuffle", "\0")
        shuffle = seeded_hashes(self.seed, rows.column("id").take(pa.array(order[owner])), epoch_suffix)
        by_shard = np.lexsort((shuffle, shard_of_copy))  # by shard, each sorted by its shuffle key: one take
        placed = rows.take(pa.array(order[owner[by_shard]], pa.int64()))
        placed = placed.set_column(placed.schema.get_field_index("epoch"), "epoch",
                                   pa.array(epochs[by_shard], pa.int64()))
        shuffle, shard_of_copy = shuffle[by_shard], shard_of_copy[by_shard]
        placed = placed.append_column("shuffle", pa.array(shuffle, pa.uint64()))
        shards, first = np.unique(shard_of_copy, return_index=True)
        for shard, start, stop in zip(shards.tolist(), first.tolist(), [*first[1:].tolist(), len(shard_of_copy)],
                                      strict=True):
            fragment = join(self.work, FRAGMENTS, f"shard-{shard:05d}", f"part-{partition:05d}.arrow")
            write_arrow(fragment, placed.slice(start, stop - start), FRAGMENT_BATCH_ROWS)
            yield SHARDS, (shard, (fragment, stop - start, shuffle[start:stop:FRAGMENT_BATCH_ROWS]))
        copies = copies[np.argsort(order)]  # back in the rows' own order for their ledger rows
        kept = copies > 0
        detail = pc.if_else(pa.array(kept), pc.binary_join_element_wise(pa.array(copies).cast(pa.string()),
                                                                        " copies", ""),
                            "the mixture did not draw this record")
        ledger = ledger_rows_table(
            rows, pa.array(np.where(kept, "write", STAGE)), pa.array(np.where(kept, None, "not_sampled")),
            detail, copies)
        fragment = join(self.work, FRAGMENTS, "ledger", f"part-{partition:05d}.parquet")
        ledger = ledger.sort_by([(name, "ascending") for name in ORDER_KEYS])  # read by order block ranges
        _write(fragment, ledger, LEDGER_ROW_GROUP)
        self.placed.inc(int(copies.sum()))
        self.left_out.inc(int((~kept).sum()))
        yield LEDGER, fragment


class _SortedFragment:
    """A shard fragment (Arrow IPC, record batches of FRAGMENT_BATCH_ROWS rows) sorted by its shuffle key, open
    for reading the rows of a key range; `first_keys` is each batch's first key, from the placement."""

    def __init__(self, path: str, rows: int, first_keys: np.ndarray):
        self.opened = reading_arrow(path)
        self.reader = self.opened.__enter__()
        self.count = rows
        self.first_keys = first_keys

    def rows(self, low: int, high: int | None) -> pa.Table | None:
        """Rows whose key is in [low, high) (high None: to the end)."""
        first = max(0, int(np.searchsorted(self.first_keys, np.uint64(low), side="left")) - 1)
        end = len(self.first_keys) if high is None else \
            int(np.searchsorted(self.first_keys, np.uint64(high), side="left"))
        if end <= first:
            return None
        table = pa.Table.from_batches([self.reader.get_batch(index) for index in range(first, end)])
        keys = table.column("shuffle").to_numpy()
        start = int(np.searchsorted(keys, np.uint64(low), side="left"))
        stop = len(keys) if high is None else int(np.searchsorted(keys, np.uint64(high), side="left"))
        return table.slice(start, stop - start) if stop > start else None

    def close(self) -> None:
        self.opened.__exit__(None, None, None)


class _WriteShardFn(beam.DoFn):
    """A shard's fragments (each sorted by the shuffle key) -> the shard, written in key ranges of about
    SHARD_CHUNK_ROWS rows: memory is one range, not the shard. Row groups are cut every `row_group_rows` rows
    of the whole shard, as one write of the sorted table would cut them, so the file is the same."""

    def __init__(self, work: str, extra, row_group_rows: int):
        self.work = work
        self.extra = extra
        self.row_group_rows = row_group_rows

    def process(self, element) -> Iterator[dict[str, Any]]:
        shard, paths = element
        fragments = [_SortedFragment(*found) for found in sorted(paths, key=lambda found: found[0])]
        try:
            total = sum(fragment.count for fragment in fragments)
            ranges = max(1, -(-total // SHARD_CHUNK_ROWS))
            bounds = [(index << 64) // ranges for index in range(ranges)] + [None]
            with writing(part_path(self.work, "shards", shard)) as sink:
                writer, pending, tally, tokens = None, None, {}, 0
                for index in range(ranges):
                    parts = [part for part in (f.rows(bounds[index], bounds[index + 1]) for f in fragments)
                             if part is not None]
                    if pending is not None:
                        parts.insert(0, pending)
                    if not parts:
                        continue
                    chunk = pa.concat_tables(parts).combine_chunks().sort_by("shuffle")
                    last = index == ranges - 1
                    cut = chunk.num_rows if last else chunk.num_rows - chunk.num_rows % self.row_group_rows
                    done, pending = chunk.slice(0, cut), chunk.slice(cut)
                    if done.num_rows:
                        table = shard_output(done, self.extra)
                        if writer is None:
                            writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
                        writer.write_table(table, row_group_size=self.row_group_rows)
                        for source, count in value_tally(done.column("source")).items():
                            tally[source] = tally.get(source, 0) + count
                        tokens += int(pc.sum(done.column("tokens")).as_py() or 0)
                writer.close()
        finally:
            for fragment in fragments:
                fragment.close()
        yield part_meta("shards", shard, total, sink.size, sink.sha256(), tally, {"tokens": tokens})


def shard_writer(work: str, extra, row_group_rows: int) -> beam.DoFn:
    """The DoFn that writes a shard task of `MixFiles` ((shard, its fragments)) as WORK/shards/part-NNNNN.parquet
    and yields its metadata."""
    return _WriteShardFn(work, extra, row_group_rows)


class MixFiles(beam.PTransform):
    """The hash partitions' fragments (`partition_pass`) -> {shards: one task per shard (its number and
    fragments) for `shard_writer`, ledger: ledger fragment files}, placed by the allocation from `plan`."""

    def __init__(self, config: MixConfig, work: str, fragments: dict[int, list[str]], placement: dict[str, Any]):
        super().__init__()
        self.config = config
        self.work = work
        self.fragments = fragments
        self.placement = placement

    def expand(self, pbegin):
        if not self.placement:
            return {SHARDS: pbegin | "NoShards" >> beam.Create([]), LEDGER: pbegin | "NoFragments" >> beam.Create([])}
        placed = split_routed(
            pbegin
            | "Partitions" >> beam.Create(sorted(self.fragments.items()))  # spread by Create's Reshuffle
            | "Place" >> beam.ParDo(_PlaceFn(self.work, self.config.seed, self.placement)),
            "Placed",
            (SHARDS, LEDGER),
        )
        return {SHARDS: placed[SHARDS] | "ByShard" >> beam.GroupByKey(), LEDGER: placed[LEDGER]}
