"""Rephrase stage (WRAP): synthetic paraphrases of chosen records, in configured styles, beside the originals.

Input: the previous step's record files (after select). Every file passes through under its name (its rows
are never in a GroupByKey); only the chosen records go on, as units grouped by window. Outputs of
RephraseRecords (routed pairs, see records.split_routed):
  synthetic  new records: id `PARENT#STYLE#SEGMENT`, source `PREFIX:SOURCE` (e.g. `wiki:linux-doc`), with
             provenance (parent_id, segment_index, style, model, generation parameters)
  ledger     `rejected` rows (stage rephrase) for generations the cleaner refused, with the reason
  plan       one dict for the manifest: model, backend, styles, parameters, segments, tokens, acceptance and
             rejection reasons per style, windows generated vs reused from the cache

Records are chosen by `rephrase.sources`, then a seeded hash below `rephrase.fraction`, then (with
`rephrase.max_records`) the records with the smallest hashes. Each is cut into segments of at most
`max_segment_tokens` tokens of the generator's tokenizer; one unit per (segment, style) is generated. Units
are grouped into windows of consecutive input rows per style and generated with the model loaded once per
worker. Every finished window is written to the cache (`.NAME.rephrase-cache/` beside output.path, under a key
of the model, parameters, prompts and cleaning version) before its outputs move on, so a run that is killed
and started again reuses every finished window instead of generating it again.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from winnow.pipelines.engine.model_stage import RunModel
from winnow.pipelines.engine.passes import Pass
from winnow.pipelines.engine.stage import (
    ManifestContext,
    Stage,
    Step,
    StepContext,
    StepOutput,
    config_section,
    summary_meta,
)
from winnow.pipelines.io.blocks import VECTOR_COLUMN
from winnow.pipelines.io.cache_files import RECORDS, WriteCache, table_elements
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.storage import delete_tree
from winnow.pipelines.stages.rephrase.choice import RephrasePlan, SegmentFn, choice_pass, chosen_rows, plan_rephrase
from winnow.pipelines.stages.rephrase.generation import LEDGER, PROGRESS_EVERY_S, SUMMARY, SYNTHETIC, RephraseHandler

SUMMARY_DIR = "_rephrase_summary"


def _summary(parts, plan: RephrasePlan) -> dict[str, Any]:
    styles: dict[str, dict[str, Any]] = {name: {"accepted": 0, "rejected": {}, "new_tokens": 0,
                                                "input_chars": 0, "output_chars": 0} for name, _, _ in plan.styles}
    chosen = 0
    reused = {True: 0, False: 0}
    for kind, value in parts[1]:
        if kind == "chosen":
            chosen = value
            continue
        reused[value[-1]] += 1
        if kind == "accepted":
            entry = styles[value[0]]
            entry["accepted"] += 1
            entry["new_tokens"] += value[1]
            entry["input_chars"] += value[2]
            entry["output_chars"] += value[3]
        else:
            entry = styles[value[0]]
            entry["rejected"][value[1]] = entry["rejected"].get(value[1], 0) + 1
            entry["new_tokens"] += value[2]
    for entry in styles.values():
        entry["rejected"] = dict(sorted(entry["rejected"].items()))
        generated = entry["accepted"] + sum(entry["rejected"].values())
        entry["generated"] = generated
        entry["acceptance"] = round(entry["accepted"] / generated, 4) if generated else None
        entry["length_ratio"] = round(entry.pop("output_chars") / entry["input_chars"], 4) \
            if entry["input_chars"] else None
        entry.pop("input_chars")
    return {"dir": SUMMARY_DIR, **plan.manifest(), "records_chosen": chosen, "segments_generated": reused[False],
            "segments_reused_from_cache": reused[True], "styles_summary": styles}


FILES, CHOSEN = "files", "chosen"


class _PassThroughFn(beam.DoFn):
    """A record file -> the same rows written into this step's records under the same name (routed FILES,
    file metadata), and its chosen records (CHOSEN), which alone go on to be rephrased."""

    def __init__(self, plan: RephrasePlan, bound, directory: str, drops_vectors: bool, compression: str):
        self.plan = plan
        self.compression = compression
        self.bound = bound
        self.directory = directory
        self.drops_vectors = drops_vectors

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        yield FILES, rows.write(self.directory, f"{RECORDS}/{posixpath.basename(path)}", {}, drop=drop,
                                compression=self.compression)
        chosen = chosen_rows(rows, self.plan, self.bound)
        if chosen.any():
            for record in table_elements(rows.rows_table(chosen), drop):
                yield CHOSEN, record


class RephraseRecords(beam.PTransform):
    """chosen records -> {synthetic, ledger, plan} (see the module docstring)."""

    def __init__(self, plan: RephrasePlan, choice: dict[str, Any]):
        super().__init__()
        self.plan = plan
        self.choice = choice

    def expand(self, chosen):
        plan = self.plan
        units = chosen | "Segment" >> beam.ParDo(SegmentFn(plan))
        generated = split_routed(
            units
            | "Windows" >> beam.GroupByKey()
            | "Generate" >> beam.ParDo(RunModel(RephraseHandler(plan, self.choice["units"]), PROGRESS_EVERY_S)),
            "Generated",
            (SYNTHETIC, LEDGER),
        )
        parts = [
            chosen
            | "CountChosen" >> beam.combiners.Count.Globally()
            | "ChosenPart" >> beam.Map(lambda n: ("chosen", n)),
            generated[SYNTHETIC] | "AcceptedPart" >> beam.Map(
                lambda r: ("accepted", (r["extra"]["style"], r["new_tokens"], len(r["segment"]), len(r["text"]),
                                        r["reused"]))),
            generated[LEDGER] | "RejectedPart" >> beam.Map(
                lambda row: ("rejected", (row["id"].split("#")[-2], row["reason"], row["new_tokens"], row["reused"]))),
        ]
        section = (
            parts
            | "SummaryParts" >> beam.Flatten()
            | "KeySummary" >> beam.Map(lambda part: (None, part))
            | "GatherSummary" >> beam.GroupByKey()
            | "Summary" >> beam.Map(_summary, plan)
        )
        synthetic = generated[SYNTHETIC] | "DropWorkFields" >> beam.Map(
            lambda r: {k: v for k, v in r.items() if k not in ("segment", "new_tokens", "reused")})
        return {SYNTHETIC: synthetic, LEDGER: generated[LEDGER], SUMMARY: section}


def _rephrase(plan: RephrasePlan):
    """Every record file passes through under its name; the chosen records are rephrased, and the synthetic
    records written beside them (pickled, `records/synthetic-*`)."""
    def build(pipeline, paths, context: StepContext) -> StepOutput:
        choice = context.constants["choice"]
        read = split_routed(
            paths  # stage_run's Create of the files spreads them (a Reshuffle)
            | "PassThrough" >> beam.ParDo(_PassThroughFn(plan, choice["bound"], context.directory,
                                                         context.drops_vectors, context.compression)),
            "Read", (FILES, CHOSEN))
        rephrased = read[CHOSEN] | "Rephrase" >> RephraseRecords(plan, choice)
        synthetic = rephrased[SYNTHETIC] | "CacheSynthetic" >> WriteCache(context.directory, RECORDS, "synthetic")
        return StepOutput(None, [rephrased[LEDGER]], [read[FILES], synthetic, rephrased[SUMMARY]])
    return build


def _steps(plan: RephrasePlan, config) -> list[Step]:
    settings = config_section(config, "rephrase", exclude=("torch_threads",))
    return [Step("rephrase", _rephrase(plan), {"rephrase": settings},
                 {"model": plan.model_fingerprint, "backend": plan.backend, "device": plan.device},
                 reads_files=True, passes=(Pass("choice", lambda records, constants: choice_pass(records, plan)),))]


def _manifest(context: ManifestContext) -> dict[str, Any]:
    section = summary_meta(context.files, SUMMARY_DIR)
    reused = context.result.reused
    section["stage_reused"] = reused
    if reused and "segments_generated" in section:  # every segment came from the stage cache
        section["segments_reused_from_cache"] += section["segments_generated"]
        section["segments_generated"] = 0
    return {"rephrase": section}


def _forget_windows(plan: RephrasePlan) -> RephrasePlan:
    """--force: the window cache goes too, so every generation is made again."""
    if plan.cache_dir:
        delete_tree(plan.cache_dir)
    return plan


def _check(context) -> list[str]:
    """The summary against the ledger: chosen within max_records, accepted and rejected generations equal to
    the synthetic ledger rows."""
    summary = context.manifest["rephrase"]
    if "styles_summary" not in summary:
        return []
    problems = []
    chosen, bound = summary["records_chosen"], summary.get("max_records")
    if bound is not None and chosen > bound:
        problems.append(f"{chosen} records chosen, max_records is {bound}")
    accepted = sum(style["accepted"] for style in summary["styles_summary"].values())
    rejected = sum(sum(style["rejected"].values()) for style in summary["styles_summary"].values())
    synthetic = sum(rows for (fate, _), rows in context.synthetic.items() if fate != "rejected")
    if accepted != synthetic:
        problems.append(f"{accepted} rephrasings accepted, the ledger has {synthetic} synthetic rows")
    if rejected != context.synthetic[("rejected", "rephrase")]:
        problems.append(f"{rejected} rephrasings rejected, the ledger has "
                        f"{context.synthetic[('rejected', 'rephrase')]}")
    return problems


STAGE = Stage(
    name="rephrase",
    module=__name__,
    section="rephrase",
    enabled=lambda config: config.rephrase.enabled,
    plan=lambda context: plan_rephrase(context.config.rephrase, context.output, context.workers),
    steps=_steps,
    libraries=("torch", "transformers", "vllm"),
    manifest=_manifest,
    report="winnow.pipelines.outputs.report:rephrase_section",
    ledger_stages=("rephrase",),
    on_force=_forget_windows,
    check=_check,
)
