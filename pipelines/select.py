"""Select stage: keep the records most like a handful of target examples (MONA or a baseline).

Two cached steps, so that a changed decision (`select.count`, `ratio`, `seed`, `top_features`,
`feature_examples`) reuses the language model's and the SAE's work:
  scores  the targets (read on the driver) become the method's prototype in one small step; each record
          file is scored where it is read, in windows of the rows of one input file with the same
          input_row // `select.window`, by the method's models, loaded once per worker; out: the same files
          with `select_score`, for mona `sae_score` and their values of the prototype's features, and the
          prototype file
  decide  the exact global top n without gathering the pool: three passes (small pipelines
          whose results the driver reads; winnow.pipelines.passes) count the pool with a histogram of the top 16
          bits of each score's order-preserving 64-bit key, which finds the bucket holding the n-th score, then
          a histogram of the next 16 bits inside it, then gather the keys of that last bucket; the driver places
          the threshold and the decision pipeline gets it as a constant; each record file is then decided
          where it is read. Ties are broken by a seeded hash of the id (selectors.task_selection.select_top is
          the same order). Out:
            records  the top n records by score, with `select_score` (and `sae_score` for mona)
            removed  `not_selected` ledger rows (stage select) for the others, with their score and the threshold
            summary  method, pool, n, threshold, score quantiles, models and hashes, and for mona the
                     prototype's top SAE features with the records that activate them most
No GroupByKey holds records: both steps read and write record files (typed blocks or pickled records).
Methods are a registry (METHODS) whose names the config accepts (docs/ALGORITHMS.md section 3).
"""

from __future__ import annotations

import hashlib
import posixpath
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.blocks import FEATURES_COLUMN, VECTOR_COLUMN
from winnow.pipelines.cached_rows import CachedRows
from winnow.pipelines.config import WinnowConfig
from winnow.pipelines.ordered_io import table_bytes, write_bytes
from winnow.pipelines.passes import Pass, gather
from winnow.pipelines.records import split_routed
from winnow.pipelines.select_scores import (
    METHODS,
    SelectPlan,
    plan_select,
    read_prototype,
    score_files,
    score_passes,
)
from winnow.pipelines.stage import PlanContext, Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.pipelines.stage_cache import RECORDS, REMOVED
from winnow.pipelines.storage import join
from winnow.pipelines.write import ledger_rows_table, rows_from_table
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


DECISION_KEYS = ("count", "ratio", "seed", "top_features", "feature_examples")


def _scores(plan: SelectPlan):
    def build(pipeline, paths, context: StepContext) -> StepOutput:
        written = score_files(paths, plan, context.directory, context.constants["prototype"],
                              context.constants.get("bm25"), context.drops_vectors, context.compression)
        return StepOutput(None, [], written)
    return build


def _decide(plan: SelectPlan):
    def build(pipeline, paths, context: StepContext) -> StepOutput:
        prototype = read_prototype(context.previous.directory) if METHODS[plan.method].sparse_features else None
        threshold = place_threshold(context.constants, plan)
        files, summary = decide_files(paths, plan, prototype, threshold, context.directory, context.drops_vectors,
                                      context.compression)
        return StepOutput(None, [], [files, summary])
    return build


def _steps(plan: SelectPlan, config: WinnowConfig) -> list[Step]:
    section = config_section(config, "select", exclude=("torch_threads",))
    scores = {k: v for k, v in section.items() if k not in DECISION_KEYS}
    if METHODS[plan.method].seeded_scores:
        scores["seed"] = section["seed"]
    models = {"targets": _text_digest(plan.targets), "model": plan.model_fingerprint, "sae": plan.sae_fingerprint,
              "embed_model": plan.embed_model_fingerprint, "device": plan.device}
    return [
        Step("scores", _scores(plan), {"select": scores}, models, reads_vectors=METHODS[plan.method].reads_vectors,
             reads_files=True, passes=score_passes(plan)),
        Step("decide", _decide(plan), {"select": {k: section[k] for k in DECISION_KEYS}}, reads_files=True,
             passes=decide_passes(plan)),
    ]


def _text_digest(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _plan(context: PlanContext) -> SelectPlan:
    embed = context.plans.get("embed")
    return replace(plan_select(context.config, context.workers, embed.model_path if embed else None,
                               embed.fingerprint if embed else None),
                   expected_records=context.expected_records)


def _check(context) -> list[str]:
    """The summary against the ledger: pool - selected records are `not_selected` by select, and selected is
    the configured count or ratio of the pool."""
    summary = context.manifest["select"]
    if "pool" not in summary:
        return []
    pool, selected = summary["pool"], summary["selected"]
    problems = []
    not_selected = context.rows[("not_selected", "select")]
    if pool - selected != not_selected:
        problems.append(f"selected {selected} of a pool of {pool}, but the ledger has {not_selected} "
                        f"not_selected rows (select)")
    wanted = task_selection.selection_size(pool, summary.get("ratio"), summary.get("count"))
    if selected != wanted:
        problems.append(f"selected {selected}, the config asks for {wanted} of {pool}")
    return problems


STAGE = Stage(
    name="select",
    module=__name__,
    section="select",
    enabled=lambda config: config.select.enabled,
    reads_embeddings=lambda config: config.select.enabled and METHODS[config.select.method].reads_vectors,
    plan=_plan,
    steps=_steps,
    libraries=("torch", "transformers", "sae-lens", "sentence-transformers"),
    manifest=lambda context: {"select": summary_meta(context.files, SUMMARY_DIR)},
    report="winnow.pipelines.report:select_section",
    ledger_stages=("select",),
    check=_check,
)


def _score_of_key(key: int) -> float:
    bits = key ^ (1 << 63) if key >> 63 else key ^ 0xFFFFFFFFFFFFFFFF
    return struct.unpack(">d", struct.pack(">Q", bits))[0]
