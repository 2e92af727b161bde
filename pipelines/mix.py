"""Mix stage: temperature sampling with a schedule, written as shards in training order.

Input: the records that reach mixing. Outputs (routed pairs, see records.split_routed):
  placed   (shard, (shuffle_key, record with `epoch`)), one per copy of a record in the output
  ledger   one ledger row per input record: `kept` with its number of copies, or `not_selected` (stage mix,
           reason not_sampled) when the mixture leaves it out
  plan     one dict: sources, sizes, the allocation and the schedule's expectation, for the manifest

Distributed as the graph's other steps are: records are grouped into blocks of (source, high bits of a seeded
hash of the id); the block sizes (at most 2^14 per source) are gathered in one small step that computes the
allocation (selectors.mixing) and each block's offset in its source's seeded order; a CoGroupByKey hands
each block its offset and its source's allocation. A record of rank r in a source of n documents fills that
source's slots r, r + n, r + 2n, ... (all documents once before any repeat), and slot j goes to the shard
whose share of the source covers j. Inside a shard rows are ordered by a seeded hash (a shuffle).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from winnow.pipelines.config import MixConfig
from winnow.pipelines.records import ledger_row, seeded_hash, split_routed, token_count
from winnow.selectors import mixing

STAGE = "mix"
PLACED, LEDGER, SUMMARY = "placed", "ledger", "summary"
BLOCK_BITS = 14
SYNTHETIC, REAL = "synthetic", "real"


class _PlanFn(beam.DoFn):
    """All block sizes -> the allocation, each block's place in its source, and the plan for the manifest."""

    def __init__(self, config: MixConfig):
        self.config = config

    def process(self, element) -> Iterator[tuple[str, Any]]:
        blocks = sorted(element[1])
        sizes: dict[str, int] = {}
        tokens: dict[str, int] = {}
        group_of: dict[str, str] = {}
        for (source, _), rows, block_tokens, synthetic in blocks:
            sizes[source] = sizes.get(source, 0) + rows
            tokens[source] = tokens.get(source, 0) + block_tokens
            group_of[source] = SYNTHETIC if synthetic else REAL
        share = self.config.synthetic_share
        grouping = {}
        if share is not None and SYNTHETIC in group_of.values():
            grouping = {"group_of_source": group_of, "group_shares": {REAL: 1.0 - share, SYNTHETIC: share}}
        schedule = [mixing.SchedulePoint(p.at, p.tau) for p in self.config.schedule]
        weights = tokens if self.config.size_by == "tokens" else None
        if self.config.total_tokens:
            mean_tokens = {source: tokens[source] / sizes[source] for source in sizes}
            total = mixing.records_for_tokens(
                self.config.total_tokens, sizes, mean_tokens, schedule, self.config.schedule_kind, weights, **grouping
            )
        else:
            total = self.config.total_records or sum(sizes.values())
        if total == 0:
            yield SUMMARY, {"dir": "_mix_summary", "sources": [], "shards": 0}
            return
        shards = min(self.config.shards, total)
        plan = mixing.plan_mix(
            sizes, schedule, total, shards, self.config.schedule_kind, self.config.max_epochs, weights, **grouping
        )
        column = {source: index for index, source in enumerate(plan.sources)}
        offsets: dict[str, int] = {}
        for block, rows, _, _ in blocks:
            source = block[0]
            index = column[source]
            yield "block", (block, (offsets.get(source, 0), plan.sizes[index], plan.counts[:, index].tolist()))
            offsets[source] = offsets.get(source, 0) + rows
        yield SUMMARY, {
            "dir": "_mix_summary",
            "sources": plan.sources,
            "sizes": plan.sizes,
            "tokens": [tokens[s] for s in plan.sources],
            "shards": shards,
            "total": total,
            "counts": plan.counts.tolist(),
            "expected": plan.expected.tolist(),
            "schedule_expected": plan.schedule_expected.tolist(),
            "shard_taus": plan.shard_taus,
            "groups": grouping.get("group_of_source"),
            "group_shares": grouping.get("group_shares"),
        }


class _PlaceFn(beam.DoFn):
    """A block and its source's allocation -> the copies of its records in shards, and their ledger rows."""

    def __init__(self, seed: int):
        self.seed = seed
        self.placed = beam.metrics.Metrics.counter("winnow.mix", "copies_placed")
        self.left_out = beam.metrics.Metrics.counter("winnow.mix", "records_not_sampled")

    def process(self, element) -> Iterator[tuple[str, Any]]:
        _, joined = element
        infos = list(joined["info"])
        members = [record for group in joined["members"] for record in group]
        if len(infos) != 1:
            raise RuntimeError(f"internal error: block {element[0]} has {len(infos)} allocations")
        offset, size, shard_counts = infos[0]
        cumulative = np.cumsum(shard_counts)
        slots_total = int(cumulative[-1])
        ordered = sorted(members, key=lambda r: (seeded_hash(self.seed, r["id"]), r["id"]))
        for index, record in enumerate(ordered):
            rank = offset + index
            slots = np.arange(rank, slots_total, size)
            shards = np.searchsorted(cumulative, slots, side="right")
            for slot, shard in zip(slots.tolist(), shards.tolist(), strict=True):
                epoch = slot // size
                copy = {**record, "epoch": epoch}
                yield PLACED, (shard, (seeded_hash(self.seed, record["id"], epoch, "shuffle"), copy))
            if len(slots):
                self.placed.inc(len(slots))
                yield LEDGER, ledger_row(record, "kept", "write", None, f"{len(slots)} copies", copies=len(slots))
            else:
                self.left_out.inc()
                yield LEDGER, ledger_row(record, "not_selected", STAGE, "not_sampled",
                                         "the mixture did not draw this record", copies=0)


class MixRecords(beam.PTransform):
    """records -> {placed, ledger, plan} (see the module docstring)."""

    def __init__(self, config: MixConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        seed = self.config.seed
        grouped = (
            records
            | "Block" >> beam.Map(lambda r: ((r["source"], seeded_hash(seed, r["id"]) >> (64 - BLOCK_BITS)), r))
            | "GroupBlocks" >> beam.GroupByKey()
            | "Listed" >> beam.MapTuple(lambda block, members: (block, list(members)))
        )
        planned = split_routed(
            grouped
            | "BlockSizes" >> beam.MapTuple(
                lambda block, members: (None, (block, len(members), sum(token_count(r["text"]) for r in members),
                                               any(r.get("parent_id") for r in members)))
            )
            | "AllBlocks" >> beam.GroupByKey()
            | "Plan" >> beam.ParDo(_PlanFn(self.config)),
            "Planned",
            ("block", SUMMARY),
        )
        placed = split_routed(
            {"members": grouped, "info": planned["block"]}
            | "Join" >> beam.CoGroupByKey()
            | "Place" >> beam.ParDo(_PlaceFn(seed)),
            "Placed",
            (PLACED, LEDGER),
        )
        return {PLACED: placed[PLACED], LEDGER: placed[LEDGER], SUMMARY: planned[SUMMARY]}
