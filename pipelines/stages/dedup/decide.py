"""Dedup's second step, `decide`: the pairs that count, their components, each component's survivor.

The graph's first task reads the cached pairs file by file, keeps the exact ones and the near ones whose checked
Jaccard similarity reaches `dedup.threshold`, and joins them into components (union-find over the pairs held
at once, 21 bytes each, plus about 40 bytes per member: `minhash.component_members`). It writes every member's
key, component (its smallest key), component size and strongest pair, sorted by key, into the step's scratch
folder, and hands on that file's name and the keys of the members the report shows (the first three of each
of the largest components) to every record file. Past `dedup.driver_pairs` cached pairs (or with
`dedup.components: graph`) the step's passes have joined them instead, in large-star/small-star rounds
(stars.py), and the same rows are read from their files. The graph then moves rows through files as prune
does: each record file's facts (written by the candidates step: key, id, source, text length) give the members
in its key range, which are written (id, the rule's value, source) into a fragment by component partition;
each partition chooses every component's survivor by `dedup.keep` (first in input order, the longest text, or
the highest `dedup.keep_column`; ties go to the first in input order) and writes the other members' decisions
by record file; each record file then drops its removed rows, which become `deduplicated` ledger rows.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from winnow.pipelines.config import DedupConfig
from winnow.pipelines.engine.stage import StepContext, StepOutput
from winnow.pipelines.io.blocks import EXTRA_PREFIX, VECTOR_COLUMN, is_block
from winnow.pipelines.io.cache_files import RECORDS, REMOVED
from winnow.pipelines.io.cached_rows import ORDER_COLUMNS, CachedRows
from winnow.pipelines.io.ordered_io import write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.row_groups import read_groups, write_groups
from winnow.pipelines.io.storage import join, open_file, write_parquet
from winnow.pipelines.io.write import ledger_bytes, ledger_rows_table, rows_from_table
from winnow.pipelines.stages.dedup.candidates import (
    EXACT,
    PAIRS,
    PARTITIONS,
    counted,
    facts_path,
    record_keys,
    spread,
)
from winnow.pipelines.stages.dedup.stars import file_members, uses_graph
from winnow.selectors import minhash

NAME = "dedup"
SUMMARY_DIR = "_dedup_summary"
SNIPPET_CHARS = 200
LARGEST, SHOWN = 5, 3
MEMBERS_PER_PARTITION = 131_072
DECIDED, TALLY = "decided", "tally"
COMPONENT_SCHEMA = pa.schema([("key", pa.int64()), ("root", pa.int64()), ("size", pa.int64()), ("kind", pa.int8()),
                              ("similarity", pa.float32()), ("other", pa.int64())])
MEMBER_SCHEMA = pa.schema([*COMPONENT_SCHEMA, ("id", pa.string()), ("value", pa.float64()), ("source", pa.string()),
                           ("name", pa.string()), ("snippet", pa.string())])
DECISION_SCHEMA = pa.schema([("name", pa.string()), ("key", pa.int64()), ("reason", pa.string()),
                             ("detail", pa.string()), ("duplicate_of", pa.string())])


def accepted_pairs(paths: list[str], threshold: float | None) -> tuple[np.ndarray, ...]:
    """(first, second, kind, similarity) of the pairs that count, read file by file into arrays sized by the
    files' row counts (the pages past the accepted rows are never touched): one copy of the pairs in memory."""
    paths = sorted(paths)
    total = 0
    for path in paths:
        with open_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    columns = (np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.int8),
               np.empty(total, np.float32))
    filled = 0
    for path in paths:
        with open_file(path) as handle:
            table = pq.read_table(handle)
        kind, similarity = table.column("kind").to_numpy(), table.column("similarity").to_numpy()
        counts = counted(kind, similarity, threshold)
        taken = int(counts.sum())
        for column, name in zip(columns, ("first", "second", "kind", "similarity"), strict=True):
            column[filled:filled + taken] = table.column(name).to_numpy()[counts]
        filled += taken
        del table
    return tuple(column[:filled] for column in columns)


def join_components(first: np.ndarray, second: np.ndarray, kind: np.ndarray, similarity: np.ndarray) -> pa.Table:
    """The accepted pairs -> COMPONENT_SCHEMA rows sorted by key: each member's component (its smallest key),
    the component's size and the member's strongest pair (exact first, then the most similar, then the first
    in input order)."""
    keys, roots, sizes, kinds, similarities, others = minhash.component_members(first, second, kind, similarity)
    return pa.Table.from_arrays([pa.array(keys), pa.array(roots), pa.array(sizes.astype(np.int64)),
                                 pa.array(kinds), pa.array(similarities), pa.array(others)], schema=COMPONENT_SCHEMA)


def _write_components(paths: list[str], threshold: float | None, scratch: str) -> dict[str, Any]:
    table = join_components(*accepted_pairs(paths, threshold))
    path = join(scratch, "components.parquet")
    write_parquet(path, table, 65_536, compression="none", dictionary=False)
    roots = pc.unique(table.column("root")).to_numpy()
    member_roots = table.column("root").to_numpy()
    sizes = np.bincount(np.searchsorted(roots, member_roots), minlength=len(roots))
    largest = roots[np.lexsort((roots, -sizes))[:LARGEST]]
    shown = shown_keys(table.column("key").to_numpy(), member_roots, largest)
    return {"path": path, "members": table.num_rows, "shown": shown}


def shown_keys(keys: np.ndarray, roots: np.ndarray, largest: np.ndarray) -> list[int]:
    """The first SHOWN members (by key) of each of the largest components: the texts the report shows."""
    mine = np.isin(roots, largest)
    keys, roots = keys[mine], roots[mine]
    order = np.lexsort((keys, roots))
    keys, roots = keys[order], roots[order]
    rank = np.arange(len(keys)) - np.searchsorted(roots, roots)
    return sorted(int(key) for key in keys[rank < SHOWN])


def column_values(rows: CachedRows, positions: np.ndarray, name: str) -> np.ndarray:
    """`dedup.keep_column` of the rows at `positions`, as the survivor rule compares it (a missing value loses)."""
    if rows.block:
        column = EXTRA_PREFIX + name
        values = rows.table.column(column).take(pa.array(positions)).to_pylist() \
            if column in rows.table.column_names else [None] * len(positions)
    else:
        values = [(rows.records[position].get("extra") or {}).get(name) for position in positions.tolist()]
    try:
        return np.array([-np.inf if value is None else float(value) for value in values], np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"dedup.keep_column: {name!r} holds a value that is not a number ({error})") from None


def text_rows(path: str) -> CachedRows:
    """A record file's rows with their texts and order alone (a typed block's other columns are not read)."""
    with open_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        if not is_block(parquet.schema_arrow):
            return CachedRows(parquet.read())
        return CachedRows(parquet.read(columns=[name for name in parquet.schema_arrow.names
                                                if name in (*ORDER_COLUMNS, "text")]))


class _MembersFn(beam.DoFn):
    """A record file -> its rows that belong to a component, written into a fragment by component partition:
    (partition, ref). Ids, sources and text lengths come from the candidates step's facts file; the record file
    itself is read only for a `keep_column` rule or to show the first texts of the largest components."""

    def __init__(self, config: DedupConfig, scratch: str):
        self.config = config
        self.scratch = scratch

    def process(self, element: tuple[str, dict[str, Any]]) -> Iterator[tuple[int, tuple[str, int]]]:
        path, components = element
        if not components["members"]:
            return
        with open_file(facts_path(path)) as handle:
            facts = pq.read_table(handle)
        if not facts.num_rows:
            return
        keys = facts.column("key").to_numpy()
        if components.get("graph"):
            found = file_members(components, int(keys[0]), int(keys[-1]))
        else:
            with open_file(components["path"]) as handle:
                found = pq.read_table(handle, filters=[("key", ">=", int(keys[0])), ("key", "<=", int(keys[-1]))])
        at = np.minimum(np.searchsorted(keys, found.column("key").to_numpy()), len(keys) - 1)
        inside = keys[at] == found.column("key").to_numpy()
        found, positions = found.filter(pa.array(inside)), at[inside]
        if not found.num_rows:
            return
        taken = pa.array(positions, pa.int64())
        shown = np.isin(found.column("key").to_numpy(), np.asarray(components["shown"], np.int64))
        rows = CachedRows.read(path, (VECTOR_COLUMN,)) if self.config.keep == "column" else None
        if self.config.keep == "column":
            values = column_values(rows, positions, self.config.keep_column)
        elif self.config.keep == "longest":
            values = facts.column("bytes").to_numpy()[positions].astype(np.float64)
        else:
            values = np.zeros(len(positions), np.float64)
        snippets = pa.nulls(len(positions), pa.string())
        if shown.any():
            texts = (rows if rows is not None else text_rows(path)).texts()
            texts = texts.take(pa.array(positions[shown], pa.int64()))
            snippets = pc.replace_with_mask(snippets, pa.array(shown), pc.utf8_slice_codeunits(texts, 0, SNIPPET_CHARS))
        name = posixpath.basename(path)
        table = pa.Table.from_arrays([
            *found.columns, facts.column("id").take(taken), pa.array(values), facts.column("source").take(taken),
            pa.repeat(pa.scalar(name, pa.string()), found.num_rows), snippets], schema=MEMBER_SCHEMA)
        partition = spread(table.column("root").to_numpy(), member_partitions(components["members"]))
        order = np.argsort(partition, kind="stable")
        yield from write_groups(join(self.scratch, "members", name), table.take(pa.array(order)), partition[order])


def member_partitions(members: int) -> int:
    """Component partitions for `members` records in components: one per MEMBERS_PER_PARTITION, at most
    PARTITIONS. Fewer fragments to open than the candidates step's PARTITIONS when the members are few."""
    return min(PARTITIONS, max(1, -(-members // MEMBERS_PER_PARTITION)))


def _size_bands(sizes: np.ndarray) -> Counter:
    """Components per size band: 2, 3-4, 5-8, 9-16, ..."""
    tops, counts = np.unique(2 ** np.ceil(np.log2(np.maximum(sizes, 2))).astype(np.int64), return_counts=True)
    return Counter({("2" if top == 2 else f"{top // 2 + 1}-{top}"): count
                    for top, count in zip(tops.tolist(), counts.tolist(), strict=True)})


def _counts(values: pa.Array | pa.ChunkedArray) -> Counter:
    counts = pc.value_counts(values)
    return Counter(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)))


class _SurvivorsFn(beam.DoFn):
    """A component partition -> every component's survivor; the other members' decisions written by record
    file (DECIDED, (file name, ref)), and the partition's tally (TALLY, ...)."""

    def __init__(self, config: DedupConfig, scratch: str):
        self.config = config
        self.scratch = scratch

    def process(self, element) -> Iterator[tuple[str, Any]]:
        partition, refs = element
        members = read_groups(refs, MEMBER_SCHEMA)
        value = members.column("value").to_numpy()
        members = members.append_column("rank", pa.array(-value)).sort_by(
            [("root", "ascending"), ("rank", "ascending"), ("key", "ascending")])
        roots = members.column("root").to_numpy()
        starts = np.flatnonzero(np.r_[True, roots[1:] != roots[:-1]])
        run = np.cumsum(np.r_[0, roots[1:] != roots[:-1]]) if len(roots) else np.zeros(0, np.int64)
        survivor = np.zeros(len(roots), dtype=bool)
        survivor[starts] = True
        ids = members.column("id").combine_chunks()
        keys = members.column("key").to_numpy()
        by_key = np.argsort(keys, kind="stable")
        other_at = by_key[np.searchsorted(keys[by_key], members.column("other").to_numpy())]
        gone = np.flatnonzero(~survivor)  # the decisions: strings are built for the removed members only
        taken = pa.array(gone, pa.int64())
        removed = members.select(["name", "key", "kind", "similarity", "size"]).take(taken)
        exact = pc.equal(removed.column("kind"), EXACT)
        how = pc.if_else(exact, "an exact copy of ", pc.binary_join_element_wise(
            "Jaccard ", pc.cast(pc.round(removed.column("similarity"), 3), pa.string()), " to ", ""))
        detail = pc.binary_join_element_wise(how, ids.take(pa.array(other_at[gone], pa.int64())),
                                             " in a component of ", pc.cast(removed.column("size"), pa.string()),
                                             f" (survivor by {self.config.keep})", "")
        decisions = pa.Table.from_arrays([
            removed.column("name"), removed.column("key"), pc.if_else(exact, "exact_duplicate", "near_duplicate"),
            detail, ids.take(pa.array(starts[run][gone], pa.int64()))], schema=DECISION_SCHEMA)
        names = pc.dictionary_encode(removed.column("name").combine_chunks())
        name_rank = np.argsort(np.argsort(names.dictionary.to_numpy(zero_copy_only=False), kind="stable"))
        order = np.lexsort((keys[gone], name_rank[names.indices.to_numpy()])) if len(gone) else gone
        decisions = decisions.take(pa.array(order, pa.int64()))
        for ref in write_groups(join(self.scratch, "decided", f"{partition:05d}"), decisions,
                                decisions.column("name").to_numpy(zero_copy_only=False)):
            yield DECIDED, ref
        yield TALLY, self._tally(members, starts, survivor)

    @staticmethod
    def _tally(members: pa.Table, starts: np.ndarray, survivor: np.ndarray) -> dict[str, Any]:
        sizes = members.column("size").to_numpy()[starts]
        removed = members.filter(pa.array(~survivor))
        survivors = members.take(pa.array(starts, pa.int64()))
        shown = members.filter(pc.is_valid(members.column("snippet"))).sort_by([("root", "ascending"),
                                                                                ("key", "ascending")])
        largest = []
        for root in pc.unique(shown.column("root")).to_pylist():
            mine = shown.filter(pc.equal(shown.column("root"), root))
            first = survivors.filter(pc.equal(survivors.column("root"), root))
            largest.append((-mine.column("size")[0].as_py(), root, first.column("id")[0].as_py(),
                            mine.column("snippet").to_pylist()[:SHOWN]))
        reasons = pc.if_else(pc.equal(removed.column("kind"), EXACT), "exact_duplicate", "near_duplicate")
        return {"components": len(starts), "members": members.num_rows, "sizes": _size_bands(sizes),
                "removed": _counts(reasons), "by_source": _counts(removed.column("source")),
                "largest": sorted(largest)[:LARGEST]}


class _ApplyFn(beam.DoFn):
    """A record file and the decisions on its rows -> its kept rows, and its removed rows' ledger rows."""

    def __init__(self, directory: str, drops_vectors: bool, compression: str):
        self.directory = directory
        self.drops_vectors = drops_vectors
        self.compression = compression
        self.removed = beam.metrics.Metrics.counter("winnow.dedup", "records_removed")

    def process(self, element) -> Iterator[dict[str, Any]]:
        name, joined = element
        (path,) = joined["file"]
        decisions = read_groups(list(joined["decisions"]), DECISION_SCHEMA).sort_by("key")
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        keep = np.ones(len(rows), dtype=bool)
        if decisions.num_rows:
            keys = record_keys(rows.keys())  # ascending: CachedRows holds its rows in input order
            decided = decisions.column("key").to_numpy()
            at = np.minimum(np.searchsorted(keys, decided), len(keys) - 1)
            if not np.array_equal(keys[at], decided) or np.any(at[1:] == at[:-1]):
                raise RuntimeError(f"internal error: dedup decisions on rows that {name} does not hold")
            keep[at] = False
        yield rows.write(self.directory, f"{RECORDS}/{name}", {}, keep=keep, drop=drop, compression=self.compression)
        if not decisions.num_rows:
            return
        self.removed.inc(decisions.num_rows)
        table = rows_from_table(rows.rows_table(~keep), [])
        ledger = ledger_rows_table(table, NAME, decisions.column("reason"), decisions.column("detail"), 0,
                                   "deduplicated", decisions.column("duplicate_of"))
        payload = ledger_bytes(ledger)
        write_bytes(join(self.directory, REMOVED, name), payload)
        yield {"dir": REMOVED, "file": f"{REMOVED}/{name}", "rows": ledger.num_rows, "bytes": len(payload)}


class _TallyFn(beam.CombineFn):
    """The partitions' tallies -> one: removed per reason and source, component sizes, the largest components."""

    def create_accumulator(self):
        return {"components": 0, "members": 0, "sizes": Counter(), "removed": Counter(), "by_source": Counter(),
                "largest": []}

    def add_input(self, tally, part):
        return self.merge_accumulators([tally, part])

    def merge_accumulators(self, tallies):
        merged = self.create_accumulator()
        for tally in tallies:
            for field in ("components", "members"):
                merged[field] += tally[field]
            for field in ("sizes", "removed", "by_source"):
                merged[field].update(tally[field])
            merged["largest"] = sorted(merged["largest"] + list(tally["largest"]))[:LARGEST]
        return merged

    def extract_output(self, tally):
        return tally


def _joined(config: DedupConfig, context: StepContext) -> str:
    """How the components were joined, for the summary: on the driver, or in the graph's rounds."""
    if uses_graph(config, context.previous):
        return f"graph ({context.constants['roots']['rounds']} large-star/small-star rounds)"
    return "driver (union-find)"


def _summary(tally: dict[str, Any], count: int, config: DedupConfig, joined: str) -> dict[str, Any]:
    bands = sorted(tally["sizes"].items(), key=lambda item: int(item[0].split("-")[0]))
    return {
        "dir": SUMMARY_DIR, "records": count, "components": tally["components"],
        "records_in_components": tally["members"], "removed": sum(tally["removed"].values()),
        "removed_by_reason": dict(sorted(tally["removed"].items())),
        "removed_by_source": dict(sorted(tally["by_source"].items())),
        "component_sizes": dict(bands),
        "largest": [{"size": -size, "survivor": survivor, "texts": snippets}
                    for size, _, survivor, snippets in tally["largest"]],
        "keep": config.keep, "threshold": config.threshold, "joined": joined,
    }


def _with_components(pipeline, context: StepContext, config: DedupConfig):
    """(record file, components) for every record file of the step: the graph's from its passes, or the
    driver's, joined in this pipeline (one pipeline fewer to start)."""
    records = context.previous.paths(RECORDS)
    if uses_graph(config, context.previous):
        found = pipeline | "GraphComponents" >> beam.Create([context.constants["roots"]])
    else:
        found = (pipeline
                 | "PairFiles" >> beam.Create([sorted(context.previous.paths(PAIRS))])
                 | "Components" >> beam.Map(_write_components, config.threshold, context.scratch))
    return (found
            | "ToRecordFiles" >> beam.FlatMap(lambda components: [(path, components) for path in records])
            | "SpreadRecordFiles" >> beam.Reshuffle())


def build_decide(pipeline, paths, context: StepContext) -> StepOutput:
    config = context.job.config.dedup
    routed = split_routed(
        _with_components(pipeline, context, config)
        | "Members" >> beam.ParDo(_MembersFn(config, context.scratch))
        | "ByComponentPartition" >> beam.GroupByKey()
        | "Survivors" >> beam.ParDo(_SurvivorsFn(config, context.scratch)),
        "Chosen", (DECIDED, TALLY))
    files = paths | "ByName" >> beam.Map(lambda path: (posixpath.basename(path), path))
    written = (
        {"file": files, "decisions": routed[DECIDED]}
        | "JoinDecisions" >> beam.CoGroupByKey()
        | "Apply" >> beam.ParDo(_ApplyFn(context.directory, context.drops_vectors, context.compression))
    )
    summary = (
        routed[TALLY]
        | "Tally" >> beam.CombineGlobally(_TallyFn())
        | "Summary" >> beam.Map(_summary, context.previous.records, config, _joined(config, context))
    )
    return StepOutput(None, [], [written, summary])
