"""Select's second step, `decide`: the exact top n of the cached scores. The threshold is placed by passes
(a histogram of score keys, then finer ones inside the boundary bucket, then the last ties broken by a seeded id
hash), so no pass holds the pool; each record file is then kept or marked `not_selected` against it."""

from __future__ import annotations

import posixpath
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.engine.passes import Pass, gather
from winnow.pipelines.io.blocks import FEATURES_COLUMN, VECTOR_COLUMN
from winnow.pipelines.io.cache_files import RECORDS, REMOVED
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import table_bytes, write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.storage import join
from winnow.pipelines.io.write import ledger_rows_table, rows_from_table
from winnow.pipelines.stages.select.scores import (
    METHODS,
    SelectPlan,
)
from winnow.selectors import task_selection

SUMMARY_DIR = "_select_summary"


SNIPPET_CHARS = 300


def top_features(prototype: np.ndarray, count: int) -> np.ndarray:
    """The prototype's `count` strongest features, strongest first (ties: lower index)."""
    order = np.lexsort((np.arange(len(prototype)), -np.asarray(prototype)))
    return order[: min(count, int(np.count_nonzero(prototype)))]


def score_key(score: float) -> int:
    """An unsigned 64-bit integer with the same order as the float64 score."""
    bits = struct.unpack(">Q", struct.pack(">d", score))[0]
    return bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)


def rank_key(record: dict[str, Any], seed: int) -> tuple[int, int, str]:
    return score_key(record["select_score"]), task_selection.tiebreak(seed, record["id"]), record["id"]


class _PrefixCountFn(beam.CombineFn):
    """How many rank keys share each top-`bits` prefix of the score key (at most 2^16 entries)."""

    def __init__(self, shift: int):
        self.shift = shift

    def create_accumulator(self):
        return Counter()

    def add_input(self, accumulator, key):
        accumulator[key[0] >> self.shift] += 1
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = Counter()
        for counts in accumulators:
            merged.update(counts)
        return merged

    def extract_output(self, accumulator):
        return dict(accumulator)


def boundary(counts: dict[int, int], wanted: int) -> tuple[int, int] | None:
    """(prefix holding the `wanted`-th largest key, how many to take from it); None when nothing is wanted."""
    if wanted <= 0:
        return None
    above = 0
    for prefix in sorted(counts, reverse=True):
        if above + counts[prefix] >= wanted:
            return prefix, wanted - above
        above += counts[prefix]
    raise RuntimeError(f"internal error: {wanted} wanted from {above} scored records")


def _wanted(count: int, plan: SelectPlan) -> int:
    return task_selection.selection_size(count, plan.ratio, plan.count)


def _in_bucket(key, level, shift: int):
    return level is not None and key[0] >> shift == level[0]


def _threshold(last: list, level) -> tuple | None:
    """The smallest selected rank key: the level[1]-th largest of the last bucket."""
    if level is None:
        return None
    if len(last) < level[1]:
        raise RuntimeError(f"internal error: {len(last)} keys in the last bucket, {level[1]} wanted")
    return sorted(last, reverse=True)[level[1] - 1]


def score_keys(scores: np.ndarray) -> np.ndarray:
    """score_key of each float64 score, as uint64."""
    bits = np.ascontiguousarray(scores, dtype=np.float64).view(np.uint64)
    negative = (bits >> np.uint64(63)) == np.uint64(1)
    return np.where(negative, bits ^ np.uint64(0xFFFFFFFFFFFFFFFF), bits | np.uint64(1 << 63))


def selected(scores: np.ndarray, ids: list[str], threshold: tuple | None, seed: int) -> np.ndarray:
    """Whether each rank key (score, seeded tiebreak, id) is at or above `threshold`; the tiebreak is hashed
    only for the rows whose score equals the threshold's."""
    kept = np.zeros(len(ids), dtype=bool)
    if threshold is None:
        return kept
    keys = score_keys(scores)
    kept |= keys > np.uint64(threshold[0])
    for index in np.flatnonzero(keys == np.uint64(threshold[0])).tolist():
        kept[index] = (task_selection.tiebreak(seed, ids[index]), ids[index]) >= tuple(threshold[1:])
    return kept


FILES, SCORES, HITS = "files", "scores", "hits"


class _DecideFileFn(beam.DoFn):
    """A scored record file -> its rows at or above the threshold key written into this step's records
    (without `select_features`) and the others' `not_selected` ledger rows into its removed rows (routed
    FILES, file metadata); its scores (SCORES) and, for mona, its values of the reported features (HITS)."""

    def __init__(self, plan: SelectPlan, threshold: tuple | None, wanted: int, directory: str,
                 reported: frozenset[int] | None, drops_vectors: bool, compression: str):
        self.plan = plan
        self.compression = compression
        self.threshold = threshold
        self.wanted = wanted
        self.directory = directory
        self.reported = reported
        self.drops_vectors = drops_vectors

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        name = posixpath.basename(path)
        rows = CachedRows.read(path, (VECTOR_COLUMN,) if self.drops_vectors else ())
        scores = np.asarray(rows.values("select_score"), dtype=np.float64)
        ids = rows.ids().to_pylist()
        kept = selected(scores, ids, self.threshold, self.plan.seed)
        yield FILES, rows.write(self.directory, f"{RECORDS}/{name}", {}, keep=kept,
                                drop=(FEATURES_COLUMN, VECTOR_COLUMN) if self.drops_vectors else (FEATURES_COLUMN,),
                                compression=self.compression)
        if not kept.all():
            method = self.plan.method
            details = [f"score {score:.6g} below the top {self.wanted} ({method})" for score in scores[~kept].tolist()]
            ledger = ledger_rows_table(rows_from_table(rows.rows_table(~kept), []), "select",
                                       f"below_threshold_{method}", pa.array(details, pa.string()), 0,
                                       fate="not_selected")
            payload = table_bytes(ledger, 65_536)
            write_bytes(join(self.directory, REMOVED, name), payload)
            yield FILES, {"dir": REMOVED, "file": f"{REMOVED}/{name}", "rows": ledger.num_rows, "bytes": len(payload)}
        yield SCORES, scores.tolist()
        if self.reported is not None:
            texts = rows.values("text")
            for index, features in enumerate(rows.values(FEATURES_COLUMN)):
                for feature, value in (features or {}).items():
                    if feature in self.reported:
                        yield HITS, (feature, (value, ids[index], texts[index][:SNIPPET_CHARS]))


@dataclass(frozen=True)
class Threshold:
    """The decision's constants, placed on the driver from the passes' results."""

    pool: int
    wanted: int
    level1: tuple[int, int] | None
    level2: tuple[int, int] | None = None
    key: tuple | None = None


def _histogram_pass(records, plan: SelectPlan):
    keys = records | "RankKeys" >> beam.Map(rank_key, plan.seed)
    return gather({"pool": keys | "Pool" >> beam.combiners.Count.Globally(),
                   "counts": keys | "Prefix48" >> beam.CombineGlobally(_PrefixCountFn(48))})


def _level1(constants: dict[str, Any], plan: SelectPlan) -> Threshold:
    pool = constants["histogram"]["pool"]
    wanted = _wanted(pool, plan)
    return Threshold(pool, wanted, boundary(constants["histogram"]["counts"], wanted))


def _inner_pass(records, constants: dict[str, Any], plan: SelectPlan):
    level1 = _level1(constants, plan).level1
    return (
        records
        | "RankKeys" >> beam.Map(rank_key, plan.seed)
        | "In48" >> beam.Filter(_in_bucket, level1, 48)
        | "Prefix32" >> beam.CombineGlobally(_PrefixCountFn(32))
    )


def _level2(constants: dict[str, Any], plan: SelectPlan) -> Threshold:
    first = _level1(constants, plan)
    level2 = boundary(constants["inner"], first.level1[1]) if first.level1 else None
    return replace(first, level2=level2)


def _last_pass(records, constants: dict[str, Any], plan: SelectPlan):
    first = _level2(constants, plan)
    return (
        records
        | "RankKeys" >> beam.Map(rank_key, plan.seed)
        | "In48" >> beam.Filter(_in_bucket, first.level1, 48)
        | "In32" >> beam.Filter(_in_bucket, first.level2, 32)
        | "LastBucket" >> beam.combiners.ToList()
    )


def place_threshold(constants: dict[str, Any], plan: SelectPlan) -> Threshold:
    """The smallest selected rank key, from the three passes' results."""
    second = _level2(constants, plan)
    return replace(second, key=_threshold([tuple(k) for k in constants["last"]], second.level2))


def decide_passes(plan: SelectPlan) -> tuple[Pass, ...]:
    return (
        Pass("histogram", lambda records, constants: _histogram_pass(records, plan)),
        Pass("inner", lambda records, constants: _inner_pass(records, constants, plan)),
        Pass("last", lambda records, constants: _last_pass(records, constants, plan)),
    )


def _build_summary(parts, plan: SelectPlan, prototype: np.ndarray | None) -> dict[str, Any]:
    gathered: dict[str, Any] = {"features": {}}
    for name, value in parts[1]:
        if name == "feature":
            gathered["features"][value[0]] = value[1]
        else:
            gathered[name] = value
    pool, wanted = gathered["pool"], gathered["wanted"]
    section = {
        "dir": SUMMARY_DIR,
        **plan.manifest(),
        "pool": pool,
        "selected": wanted,
        "threshold_score": gathered.get("threshold_score"),
        "score_quantiles": [round(float(q), 6) for q in gathered.get("quantiles") or []],
    }
    if METHODS[plan.method].sparse_features:
        section["prototype_top_features"] = [
            {
                "feature": int(feature),
                "prototype_value": round(float(prototype[feature]), 6),
                "top_records": [
                    {"id": record_id, "value": round(value, 6), "text": text}
                    for value, record_id, text in gathered["features"].get(int(feature), [])
                ],
            }
            for feature in top_features(prototype, plan.top_features).tolist()
        ]
    return section


def decide_files(paths, plan: SelectPlan, prototype: np.ndarray | None, threshold: Threshold, directory: str,
                 drops_vectors: bool = False, compression: str = "zstd"):
    """The decision of selection: scored record files -> (metadata of the kept records' and the removed rows'
    files, the summary): the exact top n by score (ties by a seeded hash), the rest `not_selected`;
    `prototype` (mona) names the features the summary reports."""
    reported = frozenset(top_features(prototype, plan.top_features).tolist()) \
        if METHODS[plan.method].sparse_features else None
    decided = split_routed(
        paths  # stage_run's Create of the files spreads them (a Reshuffle)
        | "Decide" >> beam.ParDo(_DecideFileFn(plan, threshold.key, threshold.wanted, directory, reported,
                                               drops_vectors, compression)),
        "Decided",
        (FILES, SCORES, HITS),
    )
    placed = {"pool": threshold.pool, "wanted": threshold.wanted,
              "threshold_score": None if threshold.key is None else _score_of_key(threshold.key[0])}
    parts = [
        paths.pipeline | "Placed" >> beam.Create(sorted(placed.items())),
        decided[SCORES]
        | "Scores" >> beam.FlatMap(lambda scores: scores)
        | "Quantiles" >> beam.ApproximateQuantiles.Globally(21)
        | "QuantilePart" >> beam.Map(lambda q: ("quantiles", q)),
    ]
    if reported is not None:
        parts.append(
            decided[HITS]
            | "TopPerFeature" >> beam.combiners.Top.PerKey(max(1, plan.feature_examples))
            | "FeaturePart" >> beam.Map(lambda kv: ("feature", kv))
        )
    section = (
        parts
        | "SummaryParts" >> beam.Flatten()
        | "KeySummary" >> beam.Map(lambda part: (None, part))
        | "GatherSummary" >> beam.GroupByKey()
        | "Summary" >> beam.Map(_build_summary, plan, prototype)
    )
    return decided[FILES], section


def _score_of_key(key: int) -> float:
    bits = key ^ (1 << 63) if key >> 63 else key ^ 0xFFFFFFFFFFFFFFFF
    return struct.unpack(">d", struct.pack(">Q", bits))[0]
