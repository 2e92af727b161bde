"""Select stage: keep the records most like a handful of target examples (MONA or a baseline).

Two cached steps, so that a changed decision (`select.count`, `ratio`, `seed`, `top_features`,
`feature_examples`) reuses the language model's and the SAE's work:
  scores  (ScoreRecords) the targets (read on the driver) become the method's prototype in one small step;
          records are scored in windows of `select.window` consecutive input rows by the method's models,
          loaded once per worker (model_stage.RunModel); out: records with `select_score`, for mona
          `sae_score` and their values of the prototype's features, and the prototype file
  decide  (DecideRecords) the exact global top n without gathering the pool: a histogram of the top 16 bits of
          each score's order-preserving 64-bit key finds the bucket holding the n-th score, a second histogram
          the next 16 bits inside it, and only the records of that last bucket meet on one worker to place the
          threshold. Ties are broken by a seeded hash of the id (selectors.task_selection.select_top is the
          same order). Out:
            kept     the top n records by score, with `select_score` (and `sae_score` for mona)
            ledger   `not_selected` rows (stage select) for the others, with their score and the threshold
            summary  method, pool, n, threshold, score quantiles, models and hashes, and for mona the
                     prototype's top SAE features with the records that activate them most
Methods are a registry (METHODS) whose names the config accepts (docs/ALGORITHMS.md section 3).
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import apache_beam as beam
import numpy as np

from winnow.pipelines.config import WinnowConfig
from winnow.pipelines.records import ledger_row, split_routed
from winnow.pipelines.select_scores import METHODS, ScoreRecords, SelectPlan, plan_select, read_prototype
from winnow.pipelines.stage import PlanContext, Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.selectors import task_selection

KEPT, LEDGER, SUMMARY = "kept", "ledger", "summary"
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


class _DecideFn(beam.DoFn):
    def __init__(self, plan: SelectPlan):
        self.plan = plan

    def process(self, record, threshold, wanted) -> Iterator[tuple[str, Any]]:
        key = rank_key(record, self.plan.seed)
        clean = {k: v for k, v in record.items() if k != "select_features"}
        if threshold is not None and key >= tuple(threshold):
            yield KEPT, clean
            return
        detail = f"score {record['select_score']:.6g} below the top {wanted} ({self.plan.method})"
        yield LEDGER, ledger_row(clean, "not_selected", "select", f"below_threshold_{self.plan.method}", detail)


def _feature_hits(record: dict[str, Any], reported: frozenset[int]) -> Iterator[tuple[int, tuple[float, str, str]]]:
    for feature, value in record["select_features"].items():
        if feature in reported:
            yield feature, (value, record["id"], record["text"][:SNIPPET_CHARS])


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


class DecideRecords(beam.PTransform):
    """The decision of selection: scored records -> {kept, ledger, summary}: the exact top n by score (ties by
    a seeded hash), the rest `not_selected`; `prototype` (mona) names the features the summary reports."""

    def __init__(self, plan: SelectPlan, prototype: np.ndarray | None):
        super().__init__()
        self.plan = plan
        self.prototype = prototype

    def expand(self, scored):
        plan, prototype = self.plan, self.prototype
        seed = plan.seed
        keys = scored | "RankKeys" >> beam.Map(rank_key, seed)
        pool = keys | "Pool" >> beam.combiners.Count.Globally()
        wanted = pool | "Wanted" >> beam.Map(_wanted, plan)
        level1 = (
            keys | "Prefix48" >> beam.CombineGlobally(_PrefixCountFn(48))
            | "Bucket48" >> beam.Map(boundary, beam.pvalue.AsSingleton(wanted))
        )
        inside1 = keys | "In48" >> beam.Filter(_in_bucket, beam.pvalue.AsSingleton(level1), 48)
        level2 = (
            inside1 | "Prefix32" >> beam.CombineGlobally(_PrefixCountFn(32))
            | "Bucket32" >> beam.Map(lambda counts, up: boundary(counts, up[1]) if up else None,
                                     beam.pvalue.AsSingleton(level1))
        )
        threshold = (
            inside1
            | "In32" >> beam.Filter(_in_bucket, beam.pvalue.AsSingleton(level2), 32)
            | "LastBucket" >> beam.combiners.ToList()
            | "Threshold" >> beam.Map(
                lambda last, level: _threshold([tuple(k) for k in last], level), beam.pvalue.AsSingleton(level2))
        )
        decided = split_routed(
            scored
            | "Decide" >> beam.ParDo(_DecideFn(plan), beam.pvalue.AsSingleton(threshold),
                                     beam.pvalue.AsSingleton(wanted)),
            "Decided",
            (KEPT, LEDGER),
        )
        parts = [
            pool | "PoolPart" >> beam.Map(lambda n: ("pool", n)),
            wanted | "WantedPart" >> beam.Map(lambda n: ("wanted", n)),
            threshold | "ThresholdPart" >> beam.Map(
                lambda t: ("threshold_score", None if t is None else _score_of_key(t[0]))),
            scored
            | "Scores" >> beam.Map(lambda r: r["select_score"])
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(21)
            | "QuantilePart" >> beam.Map(lambda q: ("quantiles", q)),
        ]
        if METHODS[plan.method].sparse_features:
            reported = frozenset(top_features(prototype, plan.top_features).tolist())
            parts.append(
                scored
                | "FeatureHits" >> beam.FlatMap(_feature_hits, reported)
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
        return {KEPT: decided[KEPT], LEDGER: decided[LEDGER], SUMMARY: section}


DECISION_KEYS = ("count", "ratio", "seed", "top_features", "feature_examples")


def _scores(plan: SelectPlan):
    def build(pipeline, records, context: StepContext) -> StepOutput:
        scored, written = records | "Select" >> ScoreRecords(plan, context.directory)
        return StepOutput(scored, [], written)
    return build


def _decide(plan: SelectPlan):
    def build(pipeline, records, context: StepContext) -> StepOutput:
        prototype = read_prototype(context.previous.directory) if METHODS[plan.method].sparse_features else None
        decided = records | "SelectDecide" >> DecideRecords(plan, prototype)
        return StepOutput(decided[KEPT], [decided[LEDGER]], [decided[SUMMARY]])
    return build


def _steps(plan: SelectPlan, config: WinnowConfig) -> list[Step]:
    section = config_section(config, "select", exclude=("torch_threads",))
    scores = {k: v for k, v in section.items() if k not in DECISION_KEYS}
    if METHODS[plan.method].seeded_scores:
        scores["seed"] = section["seed"]
    models = {"targets": _text_digest(plan.targets), "model": plan.model_fingerprint, "sae": plan.sae_fingerprint,
              "embed_model": plan.embed_model_fingerprint, "device": plan.device}
    return [
        Step("scores", _scores(plan), {"select": scores}, models, reads_vectors=METHODS[plan.method].reads_vectors),
        Step("decide", _decide(plan), {"select": {k: section[k] for k in DECISION_KEYS}}),
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
)


def _score_of_key(key: int) -> float:
    bits = key ^ (1 << 63) if key >> 63 else key ^ 0xFFFFFFFFFFFFFFFF
    return struct.unpack(">d", struct.pack(">Q", bits))[0]
