"""Quality stage: Gopher's heuristic quality and repetition rules (selectors/gopher.py), off by default.

Input: records. Outputs:
  records   the records that pass every rule, and the records of sources outside `quality.languages` (the
            rules assume English), which pass unchecked and are counted
  ledger    `rejected` rows (stage quality) with the rule as reason (its config key, e.g. `min_doc_words`,
            `dup_n_grams.5`) and the measured value and threshold in the detail
  summary   for the manifest: records checked, passed unchecked per source, rejected per rule
A cheap stage: list it before embed (`pipeline: [validate, quality, embed, ...]`) so that the model stages
never see what it removes. Its one step is keyed by the quality section.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam

from winnow.pipelines.config import QualityConfig
from winnow.pipelines.records import ledger_row, split_routed
from winnow.pipelines.stage import Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.selectors.gopher import GopherRules, check

NAME = "quality"
KEPT, LEDGER, SUMMARY = "kept", "ledger", "summary"
SUMMARY_DIR = "_quality_summary"


def rules_from(config: QualityConfig) -> GopherRules:
    values = config.model_dump(exclude={"enabled", "languages"})
    values["stop_words"] = frozenset(values["stop_words"])
    values["top_n_grams"] = tuple(sorted(values["top_n_grams"].items()))
    values["dup_n_grams"] = tuple(sorted(values["dup_n_grams"].items()))
    return GopherRules(**values)


class _CheckFn(beam.DoFn):
    def __init__(self, config: QualityConfig):
        self.rules = rules_from(config)
        self.languages = None if config.languages is None else frozenset(config.languages)
        self.passed = beam.metrics.Metrics.counter("winnow.quality", "passed")
        self.rejected = beam.metrics.Metrics.counter("winnow.quality", "rejected")
        self.unchecked = beam.metrics.Metrics.counter("winnow.quality", "unchecked_other_language")

    def process(self, record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        if self.languages is not None and record["source"] not in self.languages:
            self.unchecked.inc()
            yield "part", ("unchecked", record["source"])
            yield KEPT, record
            return
        breach = check(record["text"], self.rules)
        if breach is None:
            self.passed.inc()
            yield "part", ("passed", record["source"])
            yield KEPT, record
            return
        self.rejected.inc()
        yield "part", ("rejected", breach.rule)
        yield LEDGER, ledger_row(record, "rejected", NAME, breach.rule, breach.detail())


def _summary(parts, config: QualityConfig) -> dict[str, Any]:
    tally: dict[str, dict[str, int]] = {"passed": {}, "unchecked": {}, "rejected": {}}
    for kind, name in parts[1]:
        tally[kind][name] = tally[kind].get(name, 0) + 1
    rejected = sum(tally["rejected"].values())
    return {
        "dir": SUMMARY_DIR,
        "languages": config.languages,
        "checked": sum(tally["passed"].values()) + rejected,
        "passed": sum(tally["passed"].values()),
        "rejected": rejected,
        "rejected_by_rule": dict(sorted(tally["rejected"].items())),
        "unchecked_by_source": dict(sorted(tally["unchecked"].items())),
    }


class QualityRecords(beam.PTransform):
    """records -> {kept, ledger, summary} (see the module docstring)."""

    def __init__(self, config: QualityConfig):
        super().__init__()
        self.config = config

    def expand(self, records):
        routed = split_routed(records | "Check" >> beam.ParDo(_CheckFn(self.config)), "Checked",
                              (KEPT, LEDGER, "part"))
        summary = (
            routed["part"]
            | "KeySummary" >> beam.Map(lambda part: (None, part))
            | "GatherSummary" >> beam.GroupByKey()
            | "Summary" >> beam.Map(_summary, self.config)
        )
        return {KEPT: routed[KEPT], LEDGER: routed[LEDGER], SUMMARY: summary}


def _filter(pipeline, records, context: StepContext) -> StepOutput:
    checked = records | "Quality" >> QualityRecords(context.job.config.quality)
    return StepOutput(checked[KEPT], [checked[LEDGER]], [checked[SUMMARY]])


def report_section(manifest: dict[str, Any], **_) -> str:
    from winnow.pipelines.report_html import esc, table

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
    steps=lambda plan, config: [Step(NAME, _filter, {NAME: config_section(config, NAME)})],
    manifest=lambda context: {NAME: summary_meta(context.files, SUMMARY_DIR)},
    report=f"{__name__}:report_section",
    ledger_stages=(NAME,),
)
