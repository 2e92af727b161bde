"""Validate's judgement of a read task: the rows that pass unchanged found with Arrow compute and written as a
block, every other row judged one by one (`check_record`) with the reason it is rejected; the first of records
sharing an id. The stage's graph (duplicate ids across tasks, the summary) is in __init__.py."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipelines.config import InputConfig
from winnow.pipelines.io import native
from winnow.pipelines.io.blocks import CORE_COLUMNS, block_table
from winnow.pipelines.io.read import (
    ReadTask,
    broken_records,
    jsonl_records,
    read_row_group,
    row_record,
    table_records,
)
from winnow.pipelines.io.records import (
    NOT_WHITESPACE,
    content_id,
    content_ids,
    ledger_row,
    order_key,
    position_id,
)
from winnow.pipelines.io.text_checks import check_text, strip_controls

NAME = "validate"


VALID, REJECTED, CHANGED, SUMMARY = "valid", "rejected", "changed", "summary"


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
