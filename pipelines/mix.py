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
Only file names cross the GroupByKey; memory is a cache file, a partition or a shard.
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
from winnow.pipelines.ordered_io import table_bytes, write_table_file
from winnow.pipelines.passes import Pass
from winnow.pipelines.records import seeded_hashes, split_routed, token_counts
from winnow.pipelines.storage import join, open_file, write_bytes
from winnow.pipelines.write import ledger_rows_table, rows_table, shard_output, value_tally
from winnow.selectors import mixing

STAGE = "mix"
SHARDS, LEDGER, SUMMARY = "shards", "ledger", "summary"
BLOCK_BITS = 14
SYNTHETIC, REAL = "synthetic", "real"
PARTITION_ROWS = 200_000
FRAGMENTS = "_mix"


def _hashed_rows(path: str, seed: int, extra: list[tuple[str, str]]) -> pa.Table:
    rows = rows_table(path, extra)
    rows = rows.append_column("hash", pa.array(seeded_hashes(seed, rows.column("id").to_pylist()), pa.uint64()))
    return rows.append_column("tokens", token_counts(rows.column("text")).cast(pa.int64()))


def _block_counts(rows: pa.Table) -> dict[str, tuple[np.ndarray, ...]]:
    """{source: (hash blocks, rows per block, tokens per block, synthetic rows per block)} of some rows."""
    blocks = (rows.column("hash").to_numpy() >> np.uint64(64 - BLOCK_BITS)).astype(np.int64)
    sources = rows.column("source").to_numpy(zero_copy_only=False)
    tokens = rows.column("tokens").to_numpy()
    synthetic = pc.fill_null(pc.not_equal(rows.column("parent_id"), ""), False).to_numpy(zero_copy_only=False)
    counts = {}
    for source in np.unique(sources).tolist():
        mine = sources == source
        found, inverse = np.unique(blocks[mine], return_inverse=True)
        counts[source] = (found, np.bincount(inverse), np.bincount(inverse, weights=tokens[mine]).astype(np.int64),
                          np.bincount(inverse, weights=synthetic[mine]).astype(np.int64))
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
            fragment = join(self.work, FRAGMENTS, f"partition-{partition:05d}", f"part-{index:05d}.parquet")
            _write(fragment, rows.filter(pa.array(partitions == partition)))
            written.append((partition, fragment))
        yield _block_counts(rows), written


def _gathered(parts, bits: int) -> dict[str, Any]:
    fragments: dict[int, list[str]] = {}
    for _, written in parts:
        for partition, fragment in written:
            fragments.setdefault(partition, []).append(fragment)
    return {"bits": bits, "counts": _merge_counts(counts for counts, _ in parts),
            "fragments": {partition: sorted(paths) for partition, paths in sorted(fragments.items())}}


def partition_pass(config: MixConfig, paths: list[str], work: str, records: int) -> Pass:
    """The final records' cache files -> fragments per hash partition (under WORK/_mix) and, per source and
    hash block, records, tokens and synthetic records. Uses the `extra_kinds` pass's schema."""
    seed, bits = config.seed, partition_bits(records)

    def build(pipeline, constants):
        return (
            pipeline
            | "Files" >> beam.Create(list(enumerate(paths)))
            | "Spread" >> beam.Reshuffle()
            | "Partition" >> beam.ParDo(_PartitionFn(work, seed, bits), constants["extra_kinds"])
            | "All" >> beam.combiners.ToList()
            | "Gathered" >> beam.Map(_gathered, bits)
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


def _read(path: str) -> pa.Table:
    with open_file(path) as handle:
        return pq.read_table(handle)


def _write(path: str, table: pa.Table) -> None:
    """A fragment: read once, soon, by the same job; without dictionaries it is written in half the time."""
    write_bytes(path, table_bytes(table, 65_536, dictionary=False))


class _PlaceFn(beam.DoFn):
    """A hash partition -> its records ranked in their sources, their copies written into one fragment per
    shard, their ledger rows into one fragment; routed (SHARDS, (shard, fragment)) and (LEDGER, fragment)."""

    def __init__(self, work: str, seed: int, placement: dict[str, Any]):
        self.work = work
        self.seed = seed
        self.placement = placement
        self.placed = beam.metrics.Metrics.counter("winnow.mix", "copies_placed")
        self.left_out = beam.metrics.Metrics.counter("winnow.mix", "records_not_sampled")

    def process(self, element) -> Iterator[tuple[str, Any]]:
        partition, fragments = element
        rows = pa.concat_tables([_read(path) for path in sorted(fragments)])
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
        by_shard = np.argsort(shard_of_copy, kind="stable")  # one take, then a slice per shard
        placed = rows.take(pa.array(order[owner[by_shard]], pa.int64()))
        epochs = epochs[by_shard]
        placed = placed.set_column(placed.schema.get_field_index("epoch"), "epoch", pa.array(epochs, pa.int64()))
        shuffle = seeded_hashes(self.seed, placed.column("id").to_pylist(),
                                [f"{epoch}\0shuffle" for epoch in epochs.tolist()])
        placed = placed.append_column("shuffle", pa.array(shuffle, pa.uint64()))
        shard_of_copy = shard_of_copy[by_shard]
        shards, first = np.unique(shard_of_copy, return_index=True)
        for shard, start, stop in zip(shards.tolist(), first.tolist(), [*first[1:].tolist(), len(shard_of_copy)],
                                      strict=True):
            fragment = join(self.work, FRAGMENTS, f"shard-{shard:05d}", f"part-{partition:05d}.parquet")
            _write(fragment, placed.slice(start, stop - start))
            yield SHARDS, (shard, fragment)
        copies = copies[np.argsort(order)]  # back in the rows' own order for their ledger rows
        kept = copies > 0
        detail = pa.array([f"{count} copies" if count else "the mixture did not draw this record"
                           for count in copies.tolist()], pa.string())
        ledger = ledger_rows_table(
            rows, pa.array(np.where(kept, "write", STAGE)), pa.array(np.where(kept, None, "not_sampled")),
            detail, copies)
        fragment = join(self.work, FRAGMENTS, "ledger", f"part-{partition:05d}.parquet")
        _write(fragment, ledger)
        self.placed.inc(int(copies.sum()))
        self.left_out.inc(int((~kept).sum()))
        yield LEDGER, fragment


class _WriteShardFn(beam.DoFn):
    def __init__(self, work: str, extra, row_group_rows: int):
        self.work = work
        self.extra = extra
        self.row_group_rows = row_group_rows

    def process(self, element) -> Iterator[dict[str, Any]]:
        shard, fragments = element
        rows = pa.concat_tables([_read(path) for path in sorted(fragments)]).sort_by("shuffle")
        yield write_table_file(self.work, "shards", shard, shard_output(rows, self.extra), self.row_group_rows,
                               value_tally(rows.column("source")), {"tokens": int(pc.sum(rows.column("tokens"))
                                                                                   .as_py() or 0)})


class MixFiles(beam.PTransform):
    """The hash partitions' fragments (`partition_pass`) -> {shards: shard file metadata, ledger: ledger
    fragment files}, placed by the allocation from `plan`."""

    def __init__(self, config: MixConfig, work: str, fragments: dict[int, list[str]], extra,
                 placement: dict[str, Any], row_group_rows: int):
        super().__init__()
        self.config = config
        self.work = work
        self.fragments = fragments
        self.extra = extra
        self.placement = placement
        self.row_group_rows = row_group_rows

    def expand(self, pbegin):
        if not self.placement:
            return {SHARDS: pbegin | "NoShards" >> beam.Create([]), LEDGER: pbegin | "NoFragments" >> beam.Create([])}
        placed = split_routed(
            pbegin
            | "Partitions" >> beam.Create(sorted(self.fragments.items()))
            | "Spread" >> beam.Reshuffle()
            | "Place" >> beam.ParDo(_PlaceFn(self.work, self.config.seed, self.placement)),
            "Placed",
            (SHARDS, LEDGER),
        )
        shards = (
            placed[SHARDS]
            | "ByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShardFn(self.work, self.extra, self.row_group_rows))
        )
        return {SHARDS: shards, LEDGER: placed[LEDGER]}
