"""Quality stage: Gopher's heuristic quality and repetition rules (selectors/gopher.py), off by default.

Input: the previous step's record files, each checked where it is read (the rules are per record). Outputs:
  records   the same files, with the records that pass every rule and those of sources outside
            `quality.languages` (the rules assume English), which pass unchecked and are counted
  ledger    `rejected` rows (stage quality) with the rule as reason (its config key, e.g. `min_doc_words`,
            `dup_n_grams.5`) and the measured value and threshold in the detail
  summary   for the manifest: records checked, passed unchecked per source, rejected per rule
A cheap stage: list it before embed (`pipeline: [validate, quality, embed, ...]`) so that the model stages
never see what it removes. Its one step is keyed by the quality section.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.config import QualityConfig
from winnow.pipelines.engine.stage import Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.pipelines.io.blocks import VECTOR_COLUMN
from winnow.pipelines.io.cache_files import RECORDS, REMOVED
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import write_bytes
from winnow.pipelines.io.records import split_routed
from winnow.pipelines.io.storage import join
from winnow.pipelines.io.write import ledger_bytes, ledger_rows_table, rows_from_table
from winnow.selectors.gopher import GopherRules, check

NAME = "quality"
FILES, PART = "files", "part"
SUMMARY_DIR = "_quality_summary"


def rules_from(config: QualityConfig) -> GopherRules:
    values = config.model_dump(exclude={"enabled", "languages"})
    values["stop_words"] = frozenset(values["stop_words"])
    values["top_n_grams"] = tuple(sorted(values["top_n_grams"].items()))
    values["dup_n_grams"] = tuple(sorted(values["dup_n_grams"].items()))
    return GopherRules(**values)


class _CheckFileFn(beam.DoFn):
    """A record file -> the rows that pass (or whose source the rules do not apply to) written back under its
    name, the others' `rejected` ledger rows written into the step's removed rows (routed FILES, metadata), and
    the file's tally (PART: passed and unchecked per source, rejected per rule)."""

    def __init__(self, config: QualityConfig, directory: str, drops_vectors: bool, compression: str):
        self.rules = rules_from(config)
        self.compression = compression
        self.languages = None if config.languages is None else frozenset(config.languages)
        self.directory = directory
        self.drops_vectors = drops_vectors
        self.passed = beam.metrics.Metrics.counter("winnow.quality", "passed")
        self.rejected = beam.metrics.Metrics.counter("winnow.quality", "rejected")
        self.unchecked = beam.metrics.Metrics.counter("winnow.quality", "unchecked_other_language")

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        name = posixpath.basename(path)
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        keep = np.ones(len(rows), dtype=bool)
        tally: dict[str, Counter] = {"passed": Counter(), "unchecked": Counter(), "rejected": Counter()}
        rules, details = [], []
        for index, (source, text) in enumerate(zip(rows.values("source"), rows.values("text"), strict=True)):
            if self.languages is not None and source not in self.languages:
                tally["unchecked"][source] += 1
                continue
            breach = check(text, self.rules)
            if breach is None:
                tally["passed"][source] += 1
                continue
            keep[index] = False
            tally["rejected"][breach.rule] += 1
            rules.append(breach.rule)
            details.append(breach.detail())
        self.passed.inc(sum(tally["passed"].values()))
        self.unchecked.inc(sum(tally["unchecked"].values()))
        self.rejected.inc(len(rules))
        yield FILES, rows.write(self.directory, f"{RECORDS}/{name}", {}, keep=keep, drop=drop,
                                compression=self.compression)
        if rules:
            ledger = ledger_rows_table(rows_from_table(rows.rows_table(~keep), []), NAME, pa.array(rules, pa.string()),
                                       pa.array(details, pa.string()), 0, fate="rejected")
            payload = ledger_bytes(ledger)
            write_bytes(join(self.directory, REMOVED, name), payload)
            yield FILES, {"dir": REMOVED, "file": f"{REMOVED}/{name}", "rows": ledger.num_rows, "bytes": len(payload)}
        if len(rows):
            yield PART, {kind: dict(counts) for kind, counts in tally.items()}


def _summary(tallies: list[dict[str, dict[str, int]]], config: QualityConfig) -> Iterator[dict[str, Any]]:
    """The stage's summary from the files' tallies; none when no record reached the stage."""
    if not tallies:
        return
    tally: dict[str, Counter] = {"passed": Counter(), "unchecked": Counter(), "rejected": Counter()}
    for part in tallies:
        for kind, counts in part.items():
            tally[kind].update(counts)
    rejected = sum(tally["rejected"].values())
    yield {
        "dir": SUMMARY_DIR,
        "languages": config.languages,
        "checked": sum(tally["passed"].values()) + rejected,
        "passed": sum(tally["passed"].values()),
        "rejected": rejected,
        "rejected_by_rule": dict(sorted(tally["rejected"].items())),
        "unchecked_by_source": dict(sorted(tally["unchecked"].items())),
    }


def _filter(pipeline, paths, context: StepContext) -> StepOutput:
    config = context.job.config.quality
    routed = split_routed(
        paths  # stage_run's Create of the files spreads them (a Reshuffle)
        | "Check" >> beam.ParDo(_CheckFileFn(config, context.directory, context.drops_vectors,
                                                 context.compression)),
        "Checked", (FILES, PART))
    summary = routed[PART] | "Tallies" >> beam.combiners.ToList() | "Summary" >> beam.FlatMap(_summary, config)
    return StepOutput(None, [], [routed[FILES], summary])


def report_section(manifest: dict[str, Any], **_) -> str:
    from winnow.pipelines.outputs.report_html import esc, table

    quality = manifest[NAME]
    rows = [[esc(rule), f"{count:,}"] for rule, count in quality["rejected_by_rule"].items()]
    unchecked = [[esc(source), f"{count:,}"] for source, count in quality["unchecked_by_source"].items()]
    return (f"<h2 id='{NAME}'>Quality (Gopher rules)</h2><p>{quality['checked']:,} records checked, "
            f"{quality['rejected']:,} rejected.</p>{table(['rule', 'rejected'], rows) if rows else ''}"
            + (f"<p>Passed unchecked (not in quality.languages):</p>{table(['source', 'records'], unchecked)}"
               if unchecked else ""))


STAGE = Stage(
    name=NAME,
    module=__name__,
    section=NAME,
    enabled=lambda config: config.quality.enabled,
    plan=lambda context: None,
    steps=lambda plan, config: [Step(NAME, _filter, {NAME: config_section(config, NAME)}, reads_files=True)],
    manifest=lambda context: {NAME: summary_meta(context.files, SUMMARY_DIR)},
    report=f"{__name__}:report_section",
    ledger_stages=(NAME,),
)
