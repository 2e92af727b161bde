"""Select's second step, `decide`: the exact top n of the cached scores. The threshold is placed by passes
(a histogram of score keys, then finer ones inside the boundary bucket, then the last ties broken by a seeded id
hash), so no pass holds the pool; each record file is then kept or marked `not_selected` against it."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipelines.engine.passes import Pass
from winnow.pipelines.io.blocks import FEATURES_COLUMN, VECTOR_COLUMN
from winnow.pipelines.io.cache_files import RECORDS, REMOVED
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.storage import join
from winnow.pipelines.io.write import ledger_bytes, ledger_rows_table, rows_from_table
from winnow.pipelines.stages.select.scores import METHODS, SHORTLIST_SCORE, SelectPlan
from winnow.pipelines.stages.select.shortlist import shortlist_size
from winnow.pipelines.stages.select.threshold import Threshold, TopN, rank_key, selected
from winnow.selectors import task_selection

SUMMARY_DIR = "_select_summary"


SNIPPET_CHARS = 300


def top_features(prototype: np.ndarray, count: int) -> np.ndarray:
    """The prototype's `count` strongest features, strongest first (ties: lower index)."""
    order = np.lexsort((np.arange(len(prototype)), -np.asarray(prototype)))
    return order[: min(count, int(np.count_nonzero(prototype)))]


FILES, SCORES, HITS = "files", "scores", "hits"


def _not_selected_reasons(plan: SelectPlan, scores: np.ndarray, shortlist_scores: np.ndarray | None,
                          wanted: int, shortlisted: int | None) -> tuple[pa.Array, pa.Array]:
    """(reason, detail) of each record left out: below the top n, or (a shortlist's -inf) never scored."""
    method = plan.method
    reasons, details = [], []
    for index, score in enumerate(scores.tolist()):
        if score == -np.inf and shortlist_scores is not None:
            reasons.append(f"outside_shortlist_{plan.shortlist}")
            details.append(f"{plan.shortlist} score {shortlist_scores[index]:.6g} outside the shortlist of the top "
                           f"{shortlisted} ({plan.shortlist_multiple} x {wanted}); not scored by {method}")
        else:
            reasons.append(f"below_threshold_{method}")
            details.append(f"score {score:.6g} below the top {wanted} ({method})")
    return pa.array(reasons, pa.string()), pa.array(details, pa.string())


class _DecideFileFn(beam.DoFn):
    """A scored record file -> its rows at or above the threshold key written into this step's records
    (without `select_features`) and the others' `not_selected` ledger rows into its removed rows (routed
    FILES, file metadata); its scores (SCORES) and, for mona, its values of the reported features (HITS)."""

    def __init__(self, plan: SelectPlan, threshold: tuple | None, pool: int, wanted: int, directory: str,
                 reported: frozenset[int] | None, drops_vectors: bool, compression: str):
        self.plan = plan
        self.pool = pool
        self.compression = compression
        self.threshold = threshold
        self.wanted = wanted
        self.directory = directory
        self.reported = reported
        self.drops_vectors = drops_vectors

    def _not_selected(self, rows: CachedRows, scores: np.ndarray, left: np.ndarray, name: str) -> dict[str, Any]:
        table = rows_from_table(rows.rows_table(left), [])
        shortlist_scores = shortlisted = None
        if self.plan.shortlist is not None:
            shortlist_scores = np.asarray(rows.values(SHORTLIST_SCORE), dtype=np.float64)[left]
            shortlisted = shortlist_size(self.pool, self.plan)
            unscored = pa.array(scores[left] == -np.inf)
            table = table.set_column(table.schema.get_field_index("select_score"), "select_score",
                                     pc.if_else(unscored, None, table.column("select_score")))
        reasons, details = _not_selected_reasons(self.plan, scores[left], shortlist_scores, self.wanted,
                                                 shortlisted)
        ledger = ledger_rows_table(table, "select", reasons, details, 0, fate="not_selected")
        payload = ledger_bytes(ledger)
        write_bytes(join(self.directory, REMOVED, name), payload)
        return {"dir": REMOVED, "file": f"{REMOVED}/{name}", "rows": ledger.num_rows, "bytes": len(payload)}

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        name = posixpath.basename(path)
        rows = CachedRows.read(path, (VECTOR_COLUMN,) if self.drops_vectors else ())
        scores = np.asarray(rows.values("select_score"), dtype=np.float64)
        ids = rows.ids().to_pylist()
        kept = selected(scores, ids, self.threshold, self.plan.seed)
        yield FILES, rows.write(self.directory, f"{RECORDS}/{name}", {}, keep=kept,
                                drop=(FEATURES_COLUMN, SHORTLIST_SCORE, *((VECTOR_COLUMN,) if self.drops_vectors
                                                                          else ())),
                                compression=self.compression)
        if not kept.all():
            yield FILES, self._not_selected(rows, scores, ~kept, name)
        yield SCORES, scores[np.isfinite(scores)].tolist()
        if self.reported is not None:
            texts = rows.values("text")
            for index, features in enumerate(rows.values(FEATURES_COLUMN)):
                for feature, value in (features or {}).items():
                    if feature in self.reported:
                        yield HITS, (feature, (value, ids[index], texts[index][:SNIPPET_CHARS]))


def decision(plan: SelectPlan) -> TopN:
    """The exact top n by `select_score` (ties by a seeded id hash)."""
    return TopN("", lambda records, constants: records | "RankKeys" >> beam.Map(rank_key, plan.seed),
                lambda pool, constants: task_selection.selection_size(pool, plan.ratio, plan.count))


def place_threshold(constants: dict[str, Any], plan: SelectPlan) -> Threshold:
    return decision(plan).place(constants)


def decide_passes(plan: SelectPlan) -> tuple[Pass, ...]:
    return decision(plan).passes()


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
    if "shortlisted" in gathered:
        section["shortlisted"] = gathered["shortlisted"]
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
        | "Decide" >> beam.ParDo(_DecideFileFn(plan, threshold.key, threshold.pool, threshold.wanted, directory,
                                               reported, drops_vectors, compression)),
        "Decided",
        (FILES, SCORES, HITS),
    )
    placed = {"pool": threshold.pool, "wanted": threshold.wanted, "threshold_score": threshold.score}
    if plan.shortlist:
        placed["shortlisted"] = shortlist_size(threshold.pool, plan)
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

