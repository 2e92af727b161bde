"""MONA on a shortlist (`select.shortlist`): a cheap scorer ranks the whole pool and only its top
`select.shortlist_multiple` x n records reach the language model and the SAE.

The shortlist is a cached step of its own before `scores`: the cheap method (embedding cosine to the targets'
mean vector, or BM25 against their words) scores every record file and writes `shortlist_score`; the scores
step's passes then place the exact top m = min(pool, multiple x n) of that column (threshold.TopN: the same
rank keys, seeded ties, as the decision), and MONA scores only the rows at or above it. The others get
`select_score` -inf, so the decision never takes them, and a `not_selected` ledger row that says they were
outside the shortlist. The default (no shortlist) scores every record: exact MONA.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import apache_beam as beam

from winnow.pipelines.engine.stage import Step, StepContext, StepOutput
from winnow.pipelines.stages.select.scores import (
    METHODS,
    SHORTLIST_SCORE,
    SelectPlan,
    score_files,
    score_passes,
)
from winnow.pipelines.stages.select.threshold import TopN, rank_key
from winnow.selectors import task_selection


def cheap_plan(plan: SelectPlan) -> SelectPlan:
    """The plan of the shortlist's own method (its models, prototype and scores)."""
    return replace(plan, method=plan.shortlist, shortlist=None)


def shortlist_size(pool: int, plan: SelectPlan) -> int:
    """m = min(pool, multiple x n), n the selection's size."""
    return min(pool, plan.shortlist_multiple * task_selection.selection_size(pool, plan.ratio, plan.count))


def shortlist_top(plan: SelectPlan) -> TopN:
    """The passes of the shortlist's exact top m, over the shortlist step's `shortlist_score`."""
    return TopN("shortlist_",
                lambda records, constants: records | "ShortlistKeys" >> beam.Map(rank_key, plan.seed, SHORTLIST_SCORE),
                lambda pool, constants: shortlist_size(pool, plan))


def _build(plan: SelectPlan):
    cheap = cheap_plan(plan)

    def build(pipeline, paths, context: StepContext) -> StepOutput:
        written = score_files(paths, cheap, context.directory, context.constants["prototype"],
                              context.constants.get("bm25"), context.drops_vectors, context.compression,
                              column=SHORTLIST_SCORE, resume=context.resume)
        return StepOutput(None, [], written)
    return build


def shortlist_step(plan: SelectPlan, targets_digest: str) -> Step:
    """The cached step that writes every record's `shortlist_score` (keyed by the cheap method, the targets
    and, for embedding, the embed model and backend; not by the multiple or the selection size)."""
    cheap = cheap_plan(plan)
    models = {"targets": targets_digest}
    if cheap.method == "embedding":
        models.update(embed_model=plan.embed_model_fingerprint, embed_backend=plan.embed_backend,
                      device=plan.device)
    return Step("shortlist", _build(plan), {"select": {"shortlist": plan.shortlist}}, models,
                reads_vectors=METHODS[cheap.method].reads_vectors, reads_files=True, passes=score_passes(cheap),
                resumes_files=True)


def text_digest(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()
