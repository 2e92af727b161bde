"""Select stage: keep the records most like a handful of target examples (MONA or a baseline).

Two cached steps, so that a changed decision (`select.count`, `ratio`, `seed`, `top_features`,
`feature_examples`) reuses the language model's and the SAE's work:
  scores  the targets (read on the driver) become the method's prototype in one small step; each record
          file is scored where it is read, in windows of the rows of one input file with the same
          input_row // `select.window`, by the method's models, loaded once per worker; out: the same files
          with `select_score`, for mona `sae_score` and their values of the prototype's features, and the
          prototype file
  decide  the exact global top n without gathering the pool: three passes (small pipelines
          whose results the driver reads; winnow.pipelines.engine.passes) count the pool with a histogram of the top 16
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

from dataclasses import replace

from winnow.pipelines.config import WinnowConfig
from winnow.pipelines.engine.stage import (
    PlanContext,
    Stage,
    Step,
    StepContext,
    StepOutput,
    config_section,
    summary_meta,
)
from winnow.pipelines.stages.select.decide import SUMMARY_DIR, decide_files, decide_passes, place_threshold
from winnow.pipelines.stages.select.scores import (
    METHODS,
    SelectPlan,
    plan_select,
    read_prototype,
    score_files,
    score_passes,
)
from winnow.pipelines.stages.select.shortlist import shortlist_step, shortlist_top, text_digest
from winnow.selectors import task_selection

DECISION_KEYS = ("count", "ratio", "seed", "top_features", "feature_examples")


def _scores(plan: SelectPlan):
    def build(pipeline, paths, context: StepContext) -> StepOutput:
        shortlist = shortlist_top(plan).place(context.constants).key if plan.shortlist else None
        written = score_files(paths, plan, context.directory, context.constants["prototype"],
                              context.constants.get("bm25"), context.drops_vectors, context.compression,
                              shortlist=shortlist, resume=context.resume)
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
    passes = score_passes(plan)
    if plan.shortlist:  # the shortlist's size follows the selection's, and its ties the seed
        scores.update({k: section[k] for k in ("count", "ratio", "seed")})
        passes += shortlist_top(plan).passes()
    else:  # keys of runs without a shortlist stay as they were
        scores = {k: v for k, v in scores.items() if not k.startswith("shortlist")}
    targets = text_digest(plan.targets)
    models = {"targets": targets, "model": plan.model_fingerprint, "sae": plan.sae_fingerprint,
              "embed_model": plan.embed_model_fingerprint, "device": plan.device}
    if plan.embed_backend != "torch":  # keys of torch runs stay as they were
        models["embed_backend"] = plan.embed_backend
    steps = [shortlist_step(plan, targets)] if plan.shortlist else []
    return [
        *steps,
        Step("scores", _scores(plan), {"select": scores}, models, reads_vectors=METHODS[plan.method].reads_vectors,
             reads_files=True, passes=passes, resumes_files=True),
        Step("decide", _decide(plan), {"select": {k: section[k] for k in DECISION_KEYS}}, reads_files=True,
             passes=decide_passes(plan)),
    ]


def _plan(context: PlanContext) -> SelectPlan:
    embed = context.plans.get("embed")
    return replace(plan_select(context.config, context.workers,
                               embed.model_folder if embed else None,
                               embed.fingerprint if embed else None, embed.backend if embed else "torch"),
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
    reads_embeddings=lambda config: config.select.enabled and (METHODS[config.select.method].reads_vectors
                                                                or config.select.shortlist == "embedding"),
    plan=_plan,
    steps=_steps,
    libraries=("torch", "transformers", "sae-lens", "sentence-transformers"),
    manifest=lambda context: {"select": summary_meta(context.files, SUMMARY_DIR)},
    report="winnow.pipelines.outputs.report:select_section",
    ledger_stages=("select",),
    check=_check,
)
