"""Dedup's second step, `decide`: the pairs that count, their components, each component's survivor.

The `components` pass reads the cached pairs, keeps the exact ones and the near ones whose checked Jaccard
similarity reaches `dedup.threshold`, and joins them into components on the driver (union-find over the
pairs; every member's key and its component's smallest key, and each member's strongest pair). Those arrays
reach the graph as constants: each record file sends its members' (component, key, id, rule value, source,
snippet) to the component's task, which chooses the survivor by `dedup.keep` (first in input order, the
longest text, or the highest `dedup.keep_column`; ties go to the first in input order) and sends every other
member's decision back to its record file, where the removed rows become `deduplicated` ledger rows.
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
from winnow.pipelines.engine.passes import Pass
from winnow.pipelines.engine.stage import StepContext, StepOutput
from winnow.pipelines.io.blocks import EXTRA_PREFIX, VECTOR_COLUMN
from winnow.pipelines.io.cache_files import RECORDS, REMOVED
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import table_bytes, write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.storage import join, open_file
from winnow.pipelines.io.write import ledger_rows_table, rows_from_table
from winnow.pipelines.stages.dedup.candidates import EXACT, PAIRS, record_keys, record_texts
from winnow.selectors import minhash

NAME = "dedup"
SUMMARY_DIR = "_dedup_summary"
SNIPPET_CHARS = 200
LARGEST = 5
DECIDED, COMPONENT = "decided", "component"


def _read_pairs(path: str, threshold: float | None) -> tuple[np.ndarray, ...]:
    with open_file(path) as handle:
        table = pq.read_table(handle)
    kind, similarity = table.column("kind").to_numpy(), table.column("similarity").to_numpy()
    counts = (kind == EXACT) | (similarity >= threshold) if threshold is not None else np.ones(len(kind), bool)
    return tuple(table.column(name).to_numpy()[counts] for name in ("first", "second", "kind", "similarity"))


def join_components(parts: list[tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
    """The accepted pairs of every pairs file -> {keys: members sorted, roots: their component's smallest key,
    kind, similarity, other: each member's strongest pair (exact first, then the most similar, then the
    first in input order)}."""
    first, second, kind, similarity = (np.concatenate([part[i] for part in parts]) if parts else
                                       np.zeros(0, dtype) for i, dtype in
                                       enumerate((np.int64, np.int64, np.int8, np.float32)))
    keys, roots = minhash.components(first, second)
    ends, others = np.concatenate([first, second]), np.concatenate([second, first])
    kinds, similarities = np.concatenate([kind, kind]), np.concatenate([similarity, similarity])
    order = np.lexsort((others, -similarities, kinds, ends))
    _, best = np.unique(ends[order], return_index=True)
    best = order[best]
    return {"keys": keys, "roots": roots, "kind": kinds[best].astype(np.int8),
            "similarity": similarities[best].astype(np.float32), "other": others[best].astype(np.int64)}


def components_pass(config: DedupConfig) -> Pass:
    def build(paths, constants):
        return (paths
                | "ReadPairs" >> beam.Map(_read_pairs, config.threshold)
                | "AllPairs" >> beam.combiners.ToList()
                | "Components" >> beam.Map(join_components))

    return Pass("components", build, reads_files=PAIRS)


def rule_values(rows: CachedRows, texts: pa.Array, config: DedupConfig) -> np.ndarray:
    """What the survivor rule compares, per row (higher wins; equal values go to the first in input order)."""
    if config.keep == "first":
        return np.zeros(len(rows), np.float64)
    if config.keep == "longest":
        return pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.float64)
    name = config.keep_column
    if rows.block:
        column = EXTRA_PREFIX + name
        values = rows.table.column(column).to_pylist() if column in rows.table.column_names else [None] * len(rows)
    else:
        values = [(record.get("extra") or {}).get(name) for record in rows.records]
    try:
        return np.array([-np.inf if value is None else float(value) for value in values], np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"dedup.keep_column: {name!r} holds a value that is not a number ({error})") from None


class _MembersFn(beam.DoFn):
    """A record file -> (component, member) for each of its rows in a component."""

    def __init__(self, components: dict[str, np.ndarray], config: DedupConfig):
        self.keys, self.roots = components["keys"], components["roots"]
        self.kind, self.similarity, self.other = components["kind"], components["similarity"], components["other"]
        self.config = config

    def process(self, path: str) -> Iterator[tuple[int, tuple]]:
        if not len(self.keys):
            return
        rows = CachedRows.read(path, (VECTOR_COLUMN,))
        if not len(rows):
            return
        keys = record_keys(rows.keys())
        where = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        members = np.flatnonzero(self.keys[where] == keys)
        if not len(members):
            return
        texts = record_texts(rows)
        values = rule_values(rows, texts, self.config)
        ids, sources = rows.ids().to_pylist(), rows.values("source")
        snippets = pc.utf8_slice_codeunits(texts.take(pa.array(members, pa.int64())), 0, SNIPPET_CHARS).to_pylist()
        name = posixpath.basename(path)
        for member, snippet in zip(members.tolist(), snippets, strict=True):
            at = where[member]
            yield int(self.roots[at]), (int(keys[member]), ids[member], float(values[member]), sources[member],
                                        name, snippet, int(self.kind[at]), float(self.similarity[at]),
                                        int(self.other[at]))


def _survivors(element, config: DedupConfig) -> Iterator[tuple[str, Any]]:
    """(component, members) -> the survivor's decision on every other member (DECIDED, (file, decision)) and
    the component's tally (COMPONENT, ...)."""
    root, members = element
    members = sorted(members)  # by key: input order
    survivor = min(members, key=lambda member: (-member[2], member[0]))
    id_of = {member[0]: member[1] for member in members}
    removed: Counter = Counter()
    by_source: Counter = Counter()
    for key, _, _, source, name, _, kind, similarity, other in members:
        if key == survivor[0]:
            continue
        reason = "exact_duplicate" if kind == EXACT else "near_duplicate"
        how = "an exact copy of" if kind == EXACT else f"Jaccard {similarity:.3f} to"
        detail = f"{how} {id_of.get(other, other)} in a component of {len(members)} (survivor by {config.keep})"
        removed[reason] += 1
        by_source[source] += 1
        yield DECIDED, (name, (key, survivor[1], reason, detail))
    yield COMPONENT, (len(members), root, survivor[1], [member[5] for member in members[:3]], dict(removed),
                      dict(by_source))


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
        decisions = sorted(joined["decisions"])
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        keep = np.ones(len(rows), dtype=bool)
        if decisions:
            keys = record_keys(rows.keys())
            decided = np.array([decision[0] for decision in decisions], np.int64)
            order = np.argsort(keys, kind="stable")
            positions = order[np.searchsorted(keys[order], decided)]
            if not np.array_equal(keys[positions], decided):
                raise RuntimeError(f"internal error: dedup decisions on rows that {name} does not hold")
            keep[positions] = False
        yield rows.write(self.directory, f"{RECORDS}/{name}", {}, keep=keep, drop=drop, compression=self.compression)
        if not decisions:
            return
        self.removed.inc(len(decisions))
        removed = np.flatnonzero(~keep)
        by_position = dict(zip(positions.tolist(), decisions, strict=True))
        ordered = [by_position[position] for position in removed.tolist()]
        table = rows_from_table(rows.rows_table(~keep), [])
        ledger = ledger_rows_table(
            table, NAME, pa.array([d[2] for d in ordered], pa.string()), pa.array([d[3] for d in ordered], pa.string()),
            0, "deduplicated", pa.array([d[1] for d in ordered], pa.string()))
        payload = table_bytes(ledger, 65_536)
        write_bytes(join(self.directory, REMOVED, name), payload)
        yield {"dir": REMOVED, "file": f"{REMOVED}/{name}", "rows": ledger.num_rows, "bytes": len(payload)}


class _TallyFn(beam.CombineFn):
    """Components -> the stage's summary: removed per reason and source, the distribution of component sizes,
    the largest components with a few texts."""

    def create_accumulator(self):
        return {"components": 0, "members": 0, "sizes": Counter(), "removed": Counter(), "by_source": Counter(),
                "largest": []}

    def add_input(self, tally, component):
        size, root, survivor, snippets, removed, by_source = component
        tally["components"] += 1
        tally["members"] += size
        tally["sizes"][_size_band(size)] += 1
        tally["removed"].update(removed)
        tally["by_source"].update(by_source)
        tally["largest"] = sorted([*tally["largest"], (-size, root, survivor, snippets)])[:LARGEST]
        return tally

    def merge_accumulators(self, tallies):
        merged = self.create_accumulator()
        for tally in tallies:
            for field in ("components", "members"):
                merged[field] += tally[field]
            for field in ("sizes", "removed", "by_source"):
                merged[field].update(tally[field])
            merged["largest"] = sorted(merged["largest"] + tally["largest"])[:LARGEST]
        return merged

    def extract_output(self, tally):
        return tally


def _size_band(size: int) -> str:
    """2, 3-4, 5-8, 9-16, ...: a component size's band."""
    if size <= 2:
        return "2"
    low, high = 3, 4
    while size > high:
        low, high = high + 1, high * 2
    return f"{low}-{high}"


def _summary(tally: dict[str, Any], count: int, config: DedupConfig) -> dict[str, Any]:
    bands = sorted(tally["sizes"].items(), key=lambda item: int(item[0].split("-")[0]))
    return {
        "dir": SUMMARY_DIR, "records": count, "components": tally["components"],
        "records_in_components": tally["members"], "removed": sum(tally["removed"].values()),
        "removed_by_reason": dict(sorted(tally["removed"].items())),
        "removed_by_source": dict(sorted(tally["by_source"].items())),
        "component_sizes": dict(bands),
        "largest": [{"size": -size, "survivor": survivor, "texts": snippets}
                    for size, _, survivor, snippets in tally["largest"]],
        "keep": config.keep, "threshold": config.threshold,
    }


def build_decide(pipeline, paths, context: StepContext) -> StepOutput:
    config = context.job.config.dedup
    components = context.constants["components"]
    routed = split_routed(
        paths
        | "Members" >> beam.ParDo(_MembersFn(components, config))
        | "ByComponent" >> beam.GroupByKey()
        | "Survivors" >> beam.FlatMap(_survivors, config),
        "Chosen", (DECIDED, COMPONENT))
    files = paths | "ByName" >> beam.Map(lambda path: (posixpath.basename(path), path))
    written = (
        {"file": files, "decisions": routed[DECIDED]}
        | "JoinDecisions" >> beam.CoGroupByKey()
        | "Apply" >> beam.ParDo(_ApplyFn(context.directory, context.drops_vectors, context.compression))
    )
    summary = (
        routed[COMPONENT]
        | "Tally" >> beam.CombineGlobally(_TallyFn())
        | "Summary" >> beam.Map(_summary, context.previous.records, config)
    )
    return StepOutput(None, [], [written, summary])
