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
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipelines import native
from winnow.pipelines.blocks import CORE_COLUMNS, block_records, block_table, id_hashes, write_block
from winnow.pipelines.config import InputConfig
from winnow.pipelines.progress import Progress
from winnow.pipelines.read import (
    ReadTask,
    broken_records,
    expected_rows,
    jsonl_records,
    read_row_group,
    row_record,
    table_records,
)
from winnow.pipelines.records import (
    NOT_WHITESPACE,
    content_id,
    content_ids,
    ledger_row,
    order_key,
    position_id,
    split_routed,
)
from winnow.pipelines.stage import Stage, Step, StepContext, StepOutput, config_section
from winnow.pipelines.stage_cache import REMOVED as REMOVED_DIR
from winnow.pipelines.stage_cache import read_cache_table, write_records_file
from winnow.pipelines.storage import delete_file, join

NAME = "validate"
VALID, REJECTED, CHANGED, SUMMARY = "valid", "rejected", "changed", "summary"
FILES, SHARED, BLOCK, HASHES = "files", "shared", "block", "hashes"
RECORDS_DIR = "records"


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


def check_record(element: dict[str, Any], max_bytes: int, control_characters: str) -> list[tuple[str, Any]]:
    """One read record -> its outcome: (VALID, record) or (REJECTED, ledger row), after (CHANGED, source) when
    control characters were stripped from it."""
    record = {key: value for key, value in element.items() if key != "problem"}  # inputs are immutable
    problem, text = element["problem"], None
    strip = control_characters == "strip"
    routed: list[tuple[str, Any]] = []
    if problem is None:
        text, problem = check_text(record["text"], max_bytes, "keep" if strip else control_characters)
    if problem is None and strip:
        text, escapes, controls = strip_controls(text)
        if escapes or controls:
            record["note"] = f"control characters stripped: {escapes} escape sequences, {controls} other"
            routed.append((CHANGED, record["source"]))
            if not text.strip():
                problem = ("empty_text", f"text is empty or whitespace once {escapes} escape sequences and "
                                         f"{controls} other control characters are stripped")
    if problem is not None:
        if record["id"] is None:
            record["id"] = position_id(record["input_file"], record["input_row"])
        routed.append((REJECTED, ledger_row(record, "rejected", NAME, *problem)))
        return routed
    record["text"] = text
    record["text_hash"] = content_id(text)
    if record["id"] is None:
        record["id"] = record["text_hash"]
    routed.append((VALID, record))
    return routed


def first_of_duplicates(
    records: Iterable[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Of records sharing an id, the first in input order survives; the others are ledger rows."""
    ordered = sorted(records, key=order_key)
    first, rest = ordered[0], ordered[1:]
    where = position_id(first["input_file"], first["input_row"])
    return first, [ledger_row(r, "rejected", NAME, "duplicate_id", f"same id as {where}") for r in rest]


@dataclass
class CheckedBlock:
    """A read task after validation: its valid rows as a block (blocks.py), or as record dicts for a JSON Lines
    file; the ledger rows of its rejected rows; records changed (control characters stripped) per source."""

    kept: pa.Table | None
    kept_records: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    changed: dict[str, int]


def _is_text_type(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _plain_rows(table: pa.Table, config: InputConfig, max_bytes: int, control_characters: str) -> np.ndarray | None:
    """Rows that validation passes unchanged, found with Arrow compute: a non-null text of at most `max_bytes`
    with a character that is not whitespace and (unless control characters are kept) none of them, and a usable
    id. None when no row can be judged so (a text column that is not a string, invalid UTF-8 anywhere). Every
    other row goes through `check_record`, which gives its exact reason."""
    columns = config.columns
    text = table.column(columns.text)
    if not _is_text_type(text.type):
        return None
    try:
        table.validate(full=True)
    except pa.ArrowInvalid:
        return None
    has_text, has_control = native.text_flags(text)
    plain = pc.and_(pa.array(has_text), pc.less_equal(pc.binary_length(text), max_bytes))
    if control_characters != "keep":
        plain = pc.and_(plain, pa.array(~has_control))
    if columns.id:
        ids = table.column(columns.id)
        if pa.types.is_integer(ids.type):
            plain = pc.and_(plain, pc.is_valid(ids))
        elif _is_text_type(ids.type):
            plain = pc.and_(plain, pc.match_substring_regex(ids, NOT_WHITESPACE))
        else:
            return np.zeros(table.num_rows, dtype=bool)
    return pc.fill_null(plain, False).to_numpy(zero_copy_only=False)


def _extras(table: pa.Table, config: InputConfig) -> pa.Table:
    skip = {config.columns.text, config.columns.id, config.columns.source}
    return table.select([name for name in table.column_names if name not in skip])


def check_block(table: pa.Table, task: ReadTask, config: InputConfig, max_bytes: int,
                control_characters: str) -> CheckedBlock:
    """Validate a row group: vectorised for the rows that pass unchanged, `check_record` for the others."""
    plain = _plain_rows(table, config, max_bytes, control_characters)
    slow = np.arange(table.num_rows) if plain is None else np.flatnonzero(~plain)
    if plain is None:
        slow_records = enumerate(table_records(table, task, config))
    else:
        slow_records = ((int(offset), row_record(table, int(offset), task, config)) for offset in slow)
    slow_kept, rejected, changed = check_records(slow_records, max_bytes, control_characters)
    parts = []
    if plain is not None and plain.any():
        parts.append(_plain_block(table, np.flatnonzero(plain), task, config))
    if slow_kept:
        parts.append(_records_block(table, slow_kept, config))
    if not parts:
        kept = None
    elif len(parts) == 1:
        kept = parts[0]
    else:
        kept = pa.concat_tables(parts).sort_by("input_row")
    return CheckedBlock(kept, [], rejected, changed)


def _plain_block(table: pa.Table, offsets: np.ndarray, task: ReadTask, config: InputConfig) -> pa.Table:
    columns = config.columns
    rows = table if len(offsets) == table.num_rows else table.take(offsets)
    texts = rows.column(columns.text).cast(pa.string())
    hashes = content_ids(texts)
    count = rows.num_rows
    if columns.source:
        source = pc.fill_null(rows.column(columns.source).cast(pa.string()), config.default_source)
    else:
        source = pa.repeat(pa.scalar(config.default_source, pa.string()), count)
    return block_table({
        "file_index": np.full(count, task.file_index, dtype=np.int64),
        "input_row": offsets.astype(np.int64) + task.first_row,
        "id": rows.column(columns.id).cast(pa.string()) if columns.id else hashes,
        "text": texts,
        "source": source,
        "input_file": pa.repeat(pa.scalar(task.name or task.path, pa.string()), count),
        "text_hash": hashes,
        "note": pa.nulls(count, pa.string()),
    }, _extras(rows, config))


def _records_block(table: pa.Table, kept: list[tuple[int, dict[str, Any]]], config: InputConfig) -> pa.Table:
    records = [record for _, record in kept]
    core = {name: [record.get(name) for record in records] for name, _ in CORE_COLUMNS}
    extras = _extras(table.take(np.array([offset for offset, _ in kept], dtype=np.int64)), config)
    return block_table(core, extras)


def check_task(task: ReadTask, config: InputConfig, max_bytes: int, control_characters: str) -> CheckedBlock:
    """Read and validate one read task: a Parquet row group as a block, a JSON Lines file as records."""
    if task.fmt == "parquet":
        table, problem = read_row_group(task)
        if table is not None:
            return check_block(table, task, config, max_bytes, control_characters)
        records = broken_records(task, config, problem)
    else:
        records = jsonl_records(task, config)
    kept, rejected, changed = check_records(enumerate(records), max_bytes, control_characters)
    return CheckedBlock(None, [record for _, record in kept], rejected, changed)


def check_records(numbered: Iterable[tuple[int, dict[str, Any]]], max_bytes: int, control_characters: str
                  ) -> tuple[list[tuple[int, dict[str, Any]]], list[dict[str, Any]], dict[str, int]]:
    """(offset, read record) pairs -> the valid ones with their offsets, the ledger rows of the rejected ones,
    and records changed (control characters stripped) per source: the per-record path."""
    kept, rejected, changed = [], [], {}
    for offset, record in numbered:
        for route, value in check_record(record, max_bytes, control_characters):
            if route == VALID:
                kept.append((offset, value))
            elif route == REJECTED:
                rejected.append(value)
            else:
                changed[value] = changed.get(value, 0) + 1
    return kept, rejected, changed


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
    (winnow.pipelines.passes): the shared hashes reach their blocks through a CoGroupByKey by task."""
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
    from winnow.pipelines.stage_cache import input_fingerprint

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
    report="winnow.pipelines.report:validate_section",
    ledger_stages=(NAME,),
)
