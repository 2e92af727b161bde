"""Validate stage: records that cannot be trained on are taken out, each with a reason in the ledger.

Input: records from the read stage. Outputs (tagged):
  valid      records with a UTF-8 `text` (str), a unique `id` (given or content hash) and a `text_hash`
  rejected   ledger rows, fate `rejected`, stage `validate`, with a `reason` code and a human `detail`

With `validate.control_characters: strip`, ANSI/VT100 escape sequences and other C0 controls are removed
instead (the record goes on with the note `control characters stripped: N escape sequences, M other`, which
its ledger row carries as detail; the manifest counts the records changed per source).

Reason codes: invalid_json, not_an_object, invalid_utf8, unreadable_row_group, unreadable_row, missing_text,
null_text, non_string_text, empty_text, control_characters, text_too_long, missing_id, invalid_id,
invalid_source, invalid_column, duplicate_id. Of records sharing an id the first in input order is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from winnow.pipelines.read import ReadRecords
from winnow.pipelines.records import content_id, ledger_row, order_key, position_id, split_routed
from winnow.pipelines.stage import Stage, Step, StepContext, StepOutput, config_section

NAME = "validate"
VALID, REJECTED, CHANGED, SUMMARY = "valid", "rejected", "changed", "summary"


CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")  # C0 and DEL; tab, newlines, \v and \f are text
# ANSI / VT100 escape sequences: CSI (ESC [ parameters, final byte: colours such as ESC[31m, cursor moves), OSC
# (ESC ] ... ended by BEL or ESC \\, e.g. terminal titles and hyperlinks) and the other ESC sequences (ESC, any
# intermediate bytes, a final byte: ESC ( B, ESC 7, ESC M)
ESCAPE_SEQUENCES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]")
SUMMARY_DIR = "_validate_summary"


def strip_controls(text: str) -> tuple[str, int, int]:
    """(text without ANSI/VT100 escape sequences, then without any C0 control or DEL left; escape sequences
    removed; other control characters removed)."""
    text, escapes = ESCAPE_SEQUENCES.subn("", text)
    text, controls = CONTROL_CHARACTERS.subn("", text)
    return text, escapes, controls


def check_text(value: Any, max_bytes: int, control_characters: str = "reject"
               ) -> tuple[str | None, tuple[str, str] | None]:
    """(text, None) for a usable text, else (None, (reason, detail))."""
    if value is None:
        return None, ("null_text", "text is null")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            return None, ("invalid_utf8", f"undecodable byte at offset {error.start}")
    if not isinstance(value, str):
        return None, ("non_string_text", f"text is a {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        return None, ("invalid_utf8", f"unpaired surrogate at character {error.start}")
    if not value.strip():
        return None, ("empty_text", "text is empty or whitespace")
    if size > max_bytes:
        return None, ("text_too_long", f"{size} bytes > validate.max_text_bytes={max_bytes}")
    if control_characters == "reject":
        found = CONTROL_CHARACTERS.search(value)
        if found is not None:
            return None, ("control_characters", f"U+{ord(found.group()):04X} at character {found.start()}")
    return value, None


class _CheckRecordFn(beam.DoFn):
    def __init__(self, max_bytes: int, control_characters: str):
        self.max_bytes = max_bytes
        self.control_characters = control_characters
        self.stripped = beam.metrics.Metrics.counter("winnow.validate", "control_characters_stripped")
        self.valid = beam.metrics.Metrics.counter("winnow.validate", "valid")
        self.rejected = beam.metrics.Metrics.counter("winnow.validate", "rejected")

    def process(self, element: dict[str, Any]) -> Iterator[Any]:
        record = {key: value for key, value in element.items() if key != "problem"}  # inputs are immutable
        problem, text = element["problem"], None
        strip = self.control_characters == "strip"
        if problem is None:
            text, problem = check_text(record["text"], self.max_bytes, "keep" if strip else self.control_characters)
        if problem is None and strip:
            text, escapes, controls = strip_controls(text)
            if escapes or controls:
                self.stripped.inc()
                record["note"] = f"control characters stripped: {escapes} escape sequences, {controls} other"
                yield CHANGED, record["source"]
                if not text.strip():
                    problem = ("empty_text", f"text is empty or whitespace once {escapes} escape sequences and "
                                             f"{controls} other control characters are stripped")
        if problem is not None:
            if record["id"] is None:
                record["id"] = position_id(record["input_file"], record["input_row"])
            self.rejected.inc()
            yield REJECTED, ledger_row(record, "rejected", NAME, *problem)
            return
        record["text"] = text
        record["text_hash"] = content_id(text)
        if record["id"] is None:
            record["id"] = record["text_hash"]
        self.valid.inc()
        yield VALID, record


def first_of_duplicates(
    records: Iterable[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Of records sharing an id, the first in input order survives; the others are ledger rows."""
    ordered = sorted(records, key=order_key)
    first, rest = ordered[0], ordered[1:]
    where = position_id(first["input_file"], first["input_row"])
    return first, [ledger_row(r, "rejected", NAME, "duplicate_id", f"same id as {where}") for r in rest]


class _DeduplicateIdsFn(beam.DoFn):
    def __init__(self):
        self.duplicates = beam.metrics.Metrics.counter("winnow.validate", "duplicate_id")

    def process(self, element: tuple[str, Iterable[dict[str, Any]]]) -> Iterator[Any]:
        first, rejected = first_of_duplicates(element[1])
        yield VALID, first
        for row in rejected:
            self.duplicates.inc()
            yield REJECTED, row


class ValidateRecords(beam.PTransform):
    """records -> {valid: records, rejected: ledger rows}."""

    def __init__(self, max_text_bytes: int, control_characters: str = "reject"):
        super().__init__()
        self.max_text_bytes = max_text_bytes
        self.control_characters = control_characters

    def expand(self, records):
        check = _CheckRecordFn(self.max_text_bytes, self.control_characters)
        checked = split_routed(records | "Check" >> beam.ParDo(check), "Checked", (VALID, REJECTED, CHANGED))
        unique = split_routed(
            checked[VALID]
            | "KeyById" >> beam.Map(lambda record: (record["id"], record))
            | "GroupById" >> beam.GroupByKey()
            | "FirstOfId" >> beam.ParDo(_DeduplicateIdsFn()),
            "Unique",
            (VALID, REJECTED),
        )
        rejected = (checked[REJECTED], unique[REJECTED]) | "AllRejected" >> beam.Flatten()
        summary = (
            checked[CHANGED]
            | "KeyChanged" >> beam.Map(lambda source: (None, source))
            | "GatherChanged" >> beam.GroupByKey()
            | "Summary" >> beam.Map(_summary, self.control_characters)
        )
        return {VALID: unique[VALID], REJECTED: rejected, SUMMARY: summary}


def _summary(changed, control_characters: str) -> dict[str, Any]:
    by_source: dict[str, int] = {}
    for source in changed[1]:
        by_source[source] = by_source.get(source, 0) + 1
    return {"dir": SUMMARY_DIR, "control_characters": control_characters,
            "changed_by_source": dict(sorted(by_source.items()))}


def _manifest(context) -> dict[str, Any]:
    found = [f for f in context.files if f["dir"] == SUMMARY_DIR]
    section = {k: v for k, v in found[0].items() if k != "dir"} if found else {"changed_by_source": {}}
    section["control_characters"] = context.job.config.validate_.control_characters
    return {NAME: section}


def _read_and_validate(pipeline, records, context: StepContext) -> StepOutput:
    config = context.job.config
    records = pipeline | "Read" >> ReadRecords(config.input, context.job.tasks, context.job.beam_args)
    checked = records | "Validate" >> ValidateRecords(
        config.validate_.max_text_bytes, config.validate_.control_characters)
    return StepOutput(checked[VALID], [checked[REJECTED]], [checked[SUMMARY]])


def _steps(plan, config) -> list[Step]:
    settings = {"input": config_section(config, "input"), "validate": config_section(config, "validate_"),
                "inputs": plan}
    return [Step(NAME, _read_and_validate, settings, reads_input=True)]


def _input_files(context) -> list[dict[str, Any]]:
    from winnow.pipelines.stage_cache import input_fingerprint

    return input_fingerprint(context.input_paths)


STAGE = Stage(
    name=NAME,
    module=__name__,
    section="validate",
    enabled=lambda config: True,
    plan=_input_files,
    steps=_steps,
    libraries=("apache-beam", "pyarrow"),
    manifest=_manifest,
    report="winnow.pipelines.report:validate_section",
    ledger_stages=(NAME,),
)
