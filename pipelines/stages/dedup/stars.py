"""Dedup's components as a Beam graph, for pairs too many to join in one process: large-star/small-star rounds.

`dedup.components: graph` (or `auto` above `dedup.driver_pairs` cached pairs) replaces the driver's union-find
with two passes of the decide step (engine/passes.py), whose rows move through scratch files by node partition,
never through a GroupByKey that holds them:
  stars  repeated, one round a pipeline (selectors/star_rounds.py). The first round reads the pairs that count
         (exact, or near with a checked Jaccard >= dedup.threshold) and writes each member's strongest pair by
         input file. A round's large-star groups the edges by node, its small-star by their larger end; the
         rounds end when every component is a star around its smallest key (no unsettled node).
  roots  every centre's members (key, root, size) written by input file, and the keys the report shows.
The decide graph then reads, for each record file, the members of its input files from both: the same rows
as the driver's union-find writes (tests/test_dedup_job.py checks the two agree byte for byte).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.config import DedupConfig
from winnow.pipelines.engine.passes import Pass, gather
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.row_groups import read_groups, write_groups
from winnow.pipelines.io.storage import join, open_file
from winnow.pipelines.stages.dedup.candidates import (
    PAIRS,
    PARTITIONS,
    ROW_BITS,
    VARIANT_BITS,
    counted,
    file_index_of,
    spread,
)
from winnow.selectors import star_rounds

EDGES_PER_PARTITION = 1 << 22
FILE_SHIFT = ROW_BITS + VARIANT_BITS  # a key's input file: key >> FILE_SHIFT
MOST_ROUNDS = 64  # rounds are O(log^2 n); a path of 5,000 nodes settles in 11
STRONGEST, EDGES, UNSETTLED = "strongest", "edges", "unsettled"
MEMBERS, ROOT_REFS, LARGEST_PART = "members", "root_refs", "largest"
EDGE_SCHEMA = pa.schema([("node", pa.int64()), ("other", pa.int64())])
INCIDENT_SCHEMA = pa.schema([*EDGE_SCHEMA, ("kind", pa.int8()), ("similarity", pa.float32())])
STRONGEST_SCHEMA = pa.schema([("key", pa.int64()), ("kind", pa.int8()), ("similarity", pa.float32()),
                              ("other", pa.int64())])
ROOT_SCHEMA = pa.schema([("key", pa.int64()), ("root", pa.int64()), ("size", pa.int64())])


def cached_pairs(previous) -> int:
    """The candidates step's pair rows (before the threshold): the bound `auto` compares."""
    return sum(meta["rows"] for meta in previous.files if meta["dir"] == PAIRS and "step" not in meta)


def uses_graph(config: DedupConfig, previous) -> bool:
    if config.components != "auto":
        return config.components == "graph"
    return previous is not None and cached_pairs(previous) > config.driver_pairs


def graph_partitions(pairs: int) -> int:
    """Node partitions: one per EDGES_PER_PARTITION edge rows (two per pair), at least 4, at most PARTITIONS."""
    return min(PARTITIONS, max(4, -(-2 * pairs // EDGES_PER_PARTITION)))


def _by_file(table: pa.Table, folder: str, name: str) -> list[tuple[int, tuple[str, int]]]:
    """Rows keyed by `key`, written sorted and grouped by input file: (file index, ref)."""
    if not table.num_rows:
        return []
    table = table.sort_by("key")
    return write_groups(join(folder, name), table, table.column("key").to_numpy() >> np.int64(FILE_SHIFT))


class _IncidentFn(beam.DoFn):
    """A pair file -> its pairs that count, from both ends' sides, written by node partition: (partition, ref)."""

    def __init__(self, threshold: float | None, parts: int, folder: str):
        self.threshold, self.parts, self.folder = threshold, parts, folder

    def process(self, path: str) -> Iterator[tuple[int, tuple[str, int]]]:
        with open_file(path) as handle:
            table = pq.read_table(handle)
        table = table.filter(pa.array(counted(table.column("kind").to_numpy(), table.column("similarity").to_numpy(),
                                              self.threshold)))
        first, second = table.column("first").to_numpy(), table.column("second").to_numpy()
        node, other = star_rounds.both_ways(first, second)
        kind = np.tile(table.column("kind").to_numpy(), 2)
        similarity = np.tile(table.column("similarity").to_numpy(), 2)
        yield from _write_by_node(join(self.folder, posixpath.basename(path)), self.parts,
                                  node=node, other=other, kind=kind, similarity=similarity)


def _write_by_node(path: str, parts: int, **columns: np.ndarray) -> list[tuple[int, tuple[str, int]]]:
    """Columns (`node` first) written by node partition: (partition, ref)."""
    partition = spread(columns["node"], parts)
    order = np.argsort(partition, kind="stable")
    schema = INCIDENT_SCHEMA if "kind" in columns else EDGE_SCHEMA
    table = pa.Table.from_arrays([pa.array(columns[field.name][order], field.type) for field in schema], schema=schema)
    return write_groups(path, table, partition[order])


class _LargeStarFn(beam.DoFn):
    """A node partition's edges -> its unsettled nodes, large-star's edges by their larger end's partition, and
    (in the first round, from the pairs themselves) each member's strongest pair by input file."""

    def __init__(self, parts: int, folder: str, first: bool):
        self.parts, self.folder, self.first = parts, folder, first

    def process(self, element) -> Iterator[tuple[str, Any]]:
        partition, refs = element
        table = read_groups(list(refs), INCIDENT_SCHEMA if self.first else EDGE_SCHEMA)
        node, other = table.column("node").to_numpy(), table.column("other").to_numpy()
        if self.first:
            key, kind, similarity, strongest_other = star_rounds.strongest(
                node, other, table.column("kind").to_numpy(), table.column("similarity").to_numpy())
            strongest = pa.Table.from_arrays([pa.array(key), pa.array(kind), pa.array(similarity),
                                              pa.array(strongest_other)], schema=STRONGEST_SCHEMA)
            for ref in _by_file(strongest, join(self.folder, STRONGEST), f"{partition:05d}"):
                yield STRONGEST, ref
        high, low, unsettled = star_rounds.large_star_round(node, other)
        yield UNSETTLED, unsettled
        for ref in _write_by_node(join(self.folder, "large", f"{partition:05d}"), self.parts, node=high, other=low):
            yield EDGES, ref


class _SmallStarFn(beam.DoFn):
    """A partition of larger ends -> small-star's edges, from both ends' sides, by node partition."""

    def __init__(self, parts: int, folder: str):
        self.parts, self.folder = parts, folder

    def process(self, element) -> Iterator[tuple[int, tuple[str, int]]]:
        partition, refs = element
        table = read_groups(list(refs), EDGE_SCHEMA)
        first, second = star_rounds.small_star(table.column("node").to_numpy(), table.column("other").to_numpy())
        node, other = star_rounds.both_ways(first, second)
        yield from _write_by_node(join(self.folder, "small", f"{partition:05d}"), self.parts, node=node, other=other)


def _grouped(refs: list[tuple[Any, tuple[str, int]]]) -> dict[Any, list[tuple[str, int]]]:
    grouped: dict[Any, list[tuple[str, int]]] = {}
    for group, ref in refs:
        grouped.setdefault(group, []).append(ref)
    return {group: sorted(grouped[group]) for group in sorted(grouped)}


def stars_pass(config: DedupConfig) -> Pass:
    """One large-star/small-star round a run; its result: the round, the node partitions, the edges by
    partition, the strongest pairs by input file (from the first round) and the unsettled nodes it found."""

    def build(pair_paths, constants):
        last = constants.get("stars")
        round_ = last["round"] + 1 if last else 1
        folder = join(constants["scratch"], "stars", f"round-{round_:03d}")
        label = f"Round{round_}"
        if last is None:
            parts = graph_partitions(cached_pairs(constants["previous"]))
            edges = (pair_paths
                     | "Incident" >> beam.ParDo(_IncidentFn(config.threshold, parts, join(folder, "incident")))
                     | "ByNode" >> beam.GroupByKey())
        else:
            parts = last["parts"]
            edges = pair_paths.pipeline | "Edges" >> beam.Create(sorted(last["edges"].items()))
        routed = split_routed(edges | "LargeStar" >> beam.ParDo(_LargeStarFn(parts, folder, last is None)),
                              label, (STRONGEST, EDGES, UNSETTLED))
        small = (routed[EDGES]
                 | "ByLargerEnd" >> beam.GroupByKey()
                 | "SmallStar" >> beam.ParDo(_SmallStarFn(parts, folder)))
        strongest = routed[STRONGEST] if last is None else pair_paths.pipeline | "NoStrongest" >> beam.Create([])
        parts_found = gather({
            "edges": small | "EdgeRefs" >> beam.combiners.ToList(),
            "strongest": strongest | "StrongestRefs" >> beam.combiners.ToList(),
            "unsettled": routed[UNSETTLED] | "Unsettled" >> beam.CombineGlobally(sum),
        })
        return parts_found | "Result" >> beam.Map(lambda found: {
            "round": round_, "parts": parts, "edges": _grouped(found["edges"]),
            "strongest": _grouped(found["strongest"]) if last is None else last["strongest"],
            "unsettled": found["unsettled"]})

    return Pass("stars", build, reads_records=False, reads_files=PAIRS,
                when=lambda previous: uses_graph(config, previous),
                again=lambda value: value["unsettled"] > 0, most=MOST_ROUNDS)


class _RootsFn(beam.DoFn):
    """A node partition's settled edges -> its centres' members (key, root, size) by input file, and its
    largest components (-size, root, the first `shown` keys)."""

    def __init__(self, folder: str, largest: int, shown: int):
        self.folder, self.largest, self.shown = folder, largest, shown

    def process(self, element) -> Iterator[tuple[str, Any]]:
        partition, refs = element
        table = read_groups(list(refs), EDGE_SCHEMA)
        keys, roots, sizes = star_rounds.star_members(table.column("node").to_numpy(),
                                                      table.column("other").to_numpy())
        yield MEMBERS, len(keys)
        members = pa.Table.from_arrays([pa.array(keys), pa.array(roots), pa.array(sizes)], schema=ROOT_SCHEMA)
        for ref in _by_file(members, self.folder, f"{partition:05d}"):
            yield ROOT_REFS, ref
        centres = np.unique(roots)
        size_of = sizes[np.searchsorted(keys, centres)] if len(keys) else sizes
        for root in centres[np.lexsort((centres, -size_of))[:self.largest]].tolist():
            mine = np.sort(keys[roots == root])[:self.shown]
            yield LARGEST_PART, (-int(size_of[np.searchsorted(centres, root)]), root, mine.tolist())


def roots_pass(config: DedupConfig, largest: int, shown: int) -> Pass:
    """The settled stars -> the components the decide graph reads: {graph, roots, strongest (refs by input
    file), members, shown}."""

    def build(pipeline, constants):
        stars = constants["stars"]
        folder = join(constants["scratch"], "roots")
        routed = split_routed(
            pipeline
            | "Edges" >> beam.Create(sorted(stars["edges"].items()))
            | "Roots" >> beam.ParDo(_RootsFn(folder, largest, shown)),
            "Roots", (MEMBERS, ROOT_REFS, LARGEST_PART))
        found = gather({
            "members": routed[MEMBERS] | "Members" >> beam.CombineGlobally(sum),
            "refs": routed[ROOT_REFS] | "MemberRefs" >> beam.combiners.ToList(),
            "largest": routed[LARGEST_PART] | "Largest" >> beam.combiners.ToList(),
        })
        return found | "Result" >> beam.Map(lambda parts: {
            "graph": True, "roots": _grouped(parts["refs"]), "strongest": stars["strongest"],
            "members": parts["members"], "rounds": stars["round"],
            "shown": sorted(key for _, _, keys in sorted(parts["largest"])[:largest] for key in keys)})

    return Pass("roots", build, reads_records=False, when=lambda previous: uses_graph(config, previous))


def file_members(components: dict[str, Any], first_key: int, last_key: int) -> pa.Table:
    """The graph's members (key, root, size, kind, similarity, other) of the input files whose keys run from
    `first_key` to `last_key`, sorted by key."""
    files = range(file_index_of(first_key), file_index_of(last_key) + 1)
    roots = read_groups([ref for index in files for ref in components["roots"].get(index, [])], ROOT_SCHEMA)
    strongest = read_groups([ref for index in files for ref in components["strongest"].get(index, [])],
                            STRONGEST_SCHEMA)
    roots, strongest = roots.sort_by("key"), strongest.sort_by("key")
    if not np.array_equal(roots.column("key").to_numpy(), strongest.column("key").to_numpy()):
        raise RuntimeError("internal error: dedup's graph components and strongest pairs name different members")
    inside = (roots.column("key").to_numpy() >= first_key) & (roots.column("key").to_numpy() <= last_key)
    return pa.Table.from_arrays([*roots.columns, *strongest.columns[1:]],
                                names=[*ROOT_SCHEMA.names, *STRONGEST_SCHEMA.names[1:]]).filter(pa.array(inside))
