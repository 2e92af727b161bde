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

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.config import InputConfig
from winnow.pipelines.engine.progress import Progress
from winnow.pipelines.engine.stage import Stage, Step, StepContext, StepOutput, config_section
from winnow.pipelines.io.blocks import block_records, id_hashes, write_block
from winnow.pipelines.io.cache_files import REMOVED as REMOVED_DIR
from winnow.pipelines.io.cache_files import read_cache_table, write_records_file
from winnow.pipelines.io.read import (
    ReadTask,
    expected_rows,
)
from winnow.pipelines.io.records import (
    split_routed,
)
from winnow.pipelines.io.storage import delete_file, join
from winnow.pipelines.stages.validate.checks import CHANGED, NAME, REJECTED, VALID, check_task, first_of_duplicates

FILES, SHARED, BLOCK, HASHES = "files", "shared", "block", "hashes"


RECORDS_DIR = "records"


SUMMARY_DIR = "_validate_summary"


HASH_RANGE_BITS = 4  # the id hashes meet in 16 ranges: a GroupByKey element holds a sixteenth of them


def _hash_ranges(hashes: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Id hashes, sorted and cut into the ranges of their top HASH_RANGE_BITS bits."""
    hashes = np.sort(hashes)
    ranges = 1 << HASH_RANGE_BITS
    bounds = np.searchsorted(hashes, np.arange(ranges + 1, dtype=np.uint64) << np.uint64(64 - HASH_RANGE_BITS))
    bounds[-1] = len(hashes)  # the last bound overflows to 0: the end
    for index in range(ranges):
        if bounds[index + 1] > bounds[index]:
            yield index, hashes[bounds[index]:bounds[index + 1]]


def _shared_in_range(element: tuple[int, Iterable[tuple[str, np.ndarray]]]) -> Iterator[tuple[str, np.ndarray]]:
    """(range, [(task, its kept rows' id hashes in the range)]) -> (task, its hashes that occur more than once
    in the range) for every task that has any: the rows whose id another row may share."""
    parts = list(element[1])
    hashes = np.sort(np.concatenate([hashes for _, hashes in parts]))
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if not len(repeated):
        return
    for task, mine in parts:
        shared = mine[np.isin(mine, repeated)]
        if len(shared):
            yield task, shared


class _ValidateTaskFn(beam.DoFn):
    """A read task -> its block written to the cache (routed BLOCK: (task, file metadata)), its kept rows' id
    hashes by range (HASHES), its JSON Lines records (SHARED: they always meet in the GroupByKey by id), its
    rejected rows' file (FILES) and per-source counts of changed records (CHANGED)."""

    def __init__(self, config: InputConfig, max_bytes: int, control_characters: str, directory: str,
                 total: int | None, compression: str):
        self.config = config
        self.compression = compression
        self.max_bytes = max_bytes
        self.control_characters = control_characters
        self.directory = directory
        self.total = total
        self.rows = beam.metrics.Metrics.counter("winnow.read", "rows")
        self.stripped = beam.metrics.Metrics.counter("winnow.validate", "control_characters_stripped")
        self.valid = beam.metrics.Metrics.counter("winnow.validate", "valid")
        self.rejected = beam.metrics.Metrics.counter("winnow.validate", "rejected")

    def setup(self):
        self.progress = Progress("read", self.total)

    def process(self, task: ReadTask) -> Iterator[tuple[str, Any]]:
        checked = check_task(task, self.config, self.max_bytes, self.control_characters)
        name = f"{task.file_index:05d}-{task.row_group or 0:05d}"
        kept, records = checked.kept, checked.kept_records
        ids = [] if kept is None else [kept.column("id")]
        if kept is not None and kept.num_rows:
            yield BLOCK, (name, write_block(self.directory, f"{RECORDS_DIR}/block-{name}.parquet", kept,
                                            self.compression))
        if records:
            ids.append(pa.array([record["id"] for record in records], pa.string()))
        for record in records:
            yield SHARED, (record["id"], record)
        for index, hashes in _hash_ranges(np.concatenate([np.zeros(0, np.uint64), *map(id_hashes, ids)])):
            yield HASHES, (index, (name, hashes))
        if checked.rejected:
            yield FILES, write_records_file(self.directory, f"{REMOVED_DIR}/block-{name}.parquet", checked.rejected)
        if checked.changed:
            yield CHANGED, checked.changed
        valid = (checked.kept.num_rows if checked.kept is not None else 0) + len(checked.kept_records)
        count = valid + len(checked.rejected)
        self.rows.inc(count)
        self.valid.inc(valid)
        self.rejected.inc(len(checked.rejected))
        self.stripped.inc(sum(checked.changed.values()))
        self.progress.advance(count)


class _SettleBlockFn(beam.DoFn):
    """(task, {block: its block's metadata, shared: its id hashes that other rows share}) -> the block's
    metadata (FILES); a block with shared ids is written again without those rows, which go to the GroupByKey
    by id (SHARED). Duplicate ids are rare: most blocks are written once and never read here."""

    def __init__(self, directory: str, compression: str):
        self.directory = directory
        self.compression = compression

    def process(self, element) -> Iterator[tuple[str, Any]]:
        _, joined = element
        blocks, shared = list(joined[BLOCK]), list(joined[SHARED])
        if not blocks:  # a JSON Lines task: its records went to the GroupByKey already
            return
        (meta,) = blocks
        if not shared:
            yield FILES, meta
            return
        path = join(self.directory, meta["file"])
        table = read_cache_table(path)
        hit = np.isin(id_hashes(table.column("id")), np.concatenate(shared))
        for record in block_records(table.filter(hit)):
            yield SHARED, (record["id"], record)
        if hit.all():
            delete_file(path)
        else:
            yield FILES, write_block(self.directory, meta["file"], table.filter(~hit), self.compression)


class _DeduplicateIdsFn(beam.DoFn):
    def __init__(self):
        self.duplicates = beam.metrics.Metrics.counter("winnow.validate", "duplicate_id")
        self.valid = beam.metrics.Metrics.counter("winnow.validate", "valid")

    def process(self, element: tuple[str, Iterable[dict[str, Any]]]) -> Iterator[Any]:
        first, rejected = first_of_duplicates(element[1])
        yield VALID, first
        for row in rejected:
            self.duplicates.inc()
            self.valid.dec()
            yield REJECTED, row


def _summary(changed, control_characters: str) -> dict[str, Any]:
    by_source: dict[str, int] = {}
    for counts in changed[1]:
        for source, count in counts.items():
            by_source[source] = by_source.get(source, 0) + count
    return {"dir": SUMMARY_DIR, "control_characters": control_characters,
            "changed_by_source": dict(sorted(by_source.items()))}


def _manifest(context) -> dict[str, Any]:
    found = [f for f in context.files if f["dir"] == SUMMARY_DIR]
    section = {k: v for k, v in found[0].items() if k != "dir"} if found else {"changed_by_source": {}}
    section["control_characters"] = context.job.config.validate_.control_characters
    return {NAME: section}


def _read_and_validate(pipeline, records, context: StepContext) -> StepOutput:
    """Read tasks are validated and written as blocks where they are read. Their id hashes meet by hash range
    (8 bytes a row); only rows whose id another row may share are taken out of their block again and meet in a
    GroupByKey by id, where the first in input order is kept. No value computed from the data is broadcast
    (winnow.pipelines.engine.passes): the shared hashes reach their blocks through a CoGroupByKey by task."""
    job = context.job
    config = job.config
    validate = config.validate_
    routed = (
        pipeline
        | "Tasks" >> beam.Create(job.tasks)  # Create spreads its elements (a Reshuffle)
        | "Validate" >> beam.ParDo(_ValidateTaskFn(
            config.input, validate.max_text_bytes, validate.control_characters, context.directory,
            expected_rows(job.tasks), context.compression))
    )
    parts = split_routed(routed, "Validated", (BLOCK, HASHES, FILES, SHARED, CHANGED))
    shared = parts[HASHES] | "HashesByRange" >> beam.GroupByKey() | "SharedInRange" >> beam.FlatMap(_shared_in_range)
    settled = split_routed(
        {BLOCK: parts[BLOCK], SHARED: shared}
        | "ByTask" >> beam.CoGroupByKey()
        | "Settle" >> beam.ParDo(_SettleBlockFn(context.directory, context.compression)),
        "Settled",
        (FILES, SHARED),
    )
    unique = split_routed(
        (parts[SHARED], settled[SHARED])
        | "AllShared" >> beam.Flatten()
        | "GroupById" >> beam.GroupByKey()
        | "FirstOfId" >> beam.ParDo(_DeduplicateIdsFn()),
        "Unique",
        (VALID, REJECTED),
    )
    summary = (
        parts[CHANGED]
        | "KeyChanged" >> beam.Map(lambda counts: (None, counts))
        | "GatherChanged" >> beam.GroupByKey()
        | "Summary" >> beam.Map(_summary, validate.control_characters)
    )
    return StepOutput(unique[VALID], [unique[REJECTED]], [parts[FILES], settled[FILES], summary])


def _steps(plan, config) -> list[Step]:
    settings = {"input": config_section(config, "input"), "validate": config_section(config, "validate_"),
                "inputs": plan["files"]}
    return [Step(NAME, _read_and_validate, settings, reads_input=True)]


def _input_files(context) -> list[dict[str, Any]]:
    from winnow.pipelines.engine.stage_cache import input_fingerprint

    return {"files": input_fingerprint(context.input_paths), "tasks": context.tasks}


STAGE = Stage(
    name=NAME,
    module=__name__,
    section="validate",
    enabled=lambda config: True,
    plan=_input_files,
    steps=_steps,
    libraries=("apache-beam", "pyarrow"),
    manifest=_manifest,
    report="winnow.pipelines.outputs.report:validate_section",
    ledger_stages=(NAME,),
)
