"""Read stage: Parquet and JSON Lines files, by glob, on any filesystem Beam supports.

Output: records (see records.py), one per input row, each with either a usable text or a `problem`
(reason, detail) that the validate stage turns into a `rejected` ledger row. Nothing read is dropped.

Files are planned on the driver before the job starts (glob expansion, Parquet footers, the first JSON line),
so that a missing file, an unreadable file or a missing column stops the run with one line naming the file.
Work is split per Parquet row group and per JSON Lines file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from winnow.pipelines.config import InputConfig
from winnow.pipelines.io.storage import worker_filesystems

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class InputError(ValueError):
    """The input cannot be read at all; the message is one line naming the file."""


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading: a Parquet row group or a whole JSON Lines file."""

    path: str  # absolute, for opening on any worker
    file_index: int
    fmt: str
    row_group: int | None = None
    first_row: int = 0
    rows: int | None = None  # known for Parquet row groups (from the footer), not for JSON Lines
    name: str = ""  # as the user's pattern names it (relative stays relative): the records' `input_file`


def detect_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    lower = path.lower()
    if lower.endswith(".parquet") or lower.endswith(".pq"):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise InputError(f"{path}: cannot tell the format from the name; set input.format to parquet or jsonl")


def absolute_uri(path: str) -> str:
    """A local path made absolute on the driver (workers elsewhere do not share its working directory); a URI
    with a scheme (s3://, gs://, ...) as it is."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def error_text(error: BaseException) -> str:
    """The underlying message of an I/O error: Beam's BeamIOError wraps the real one in `exception_details`."""
    details = getattr(error, "exception_details", None)
    if isinstance(details, dict) and details:
        error = next(iter(details.values()))
    return f"{type(error).__name__}: {_short(error)}" if str(error).strip() else type(error).__name__


def expand_paths(pattern: str) -> list[str]:
    pattern = absolute_uri(pattern)
    try:
        results = FileSystems.match([pattern])
    except Exception as error:  # noqa: BLE001 - Beam raises BeamIOError and others for bad patterns
        raise InputError(f"{pattern}: cannot list input files ({error_text(error)})") from None
    paths = sorted(m.path for m in results[0].metadata_list)
    if not paths:
        raise InputError(f"{pattern}: no input files match")
    return paths


def _required_columns(columns: Any) -> list[str]:
    return [name for name in (columns.text, columns.id, columns.source) if name]


def _plan_parquet(path: str, file_index: int, config: InputConfig) -> list[ReadTask]:
    try:
        with FileSystems.open(path) as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable Parquet file ({_short(error)})") from None
    missing = [name for name in _required_columns(config.columns) if name not in schema.names]
    if missing:
        raise InputError(f"{path}: missing column {missing[0]!r} (has: {', '.join(schema.names)})")
    _check_column_types(path, schema, config)
    tasks, first_row = [], 0
    for group in range(metadata.num_row_groups):
        tasks.append(ReadTask(path, file_index, "parquet", group, first_row, metadata.row_group(group).num_rows))
        first_row += metadata.row_group(group).num_rows
    return tasks


def _check_column_types(path: str, schema: pa.Schema, config: InputConfig) -> None:
    """A Parquet column whose declared type can never hold a text (or an id) is a mapping mistake, not bad
    rows: stop with one line rather than reject the whole file row by row."""
    columns = config.columns
    checks = [(columns.text, "text", (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                        pa.types.is_large_binary, pa.types.is_null))]
    if columns.id:
        checks.append((columns.id, "id", (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
                                          pa.types.is_null)))
    if columns.source:
        checks.append((columns.source, "source", (pa.types.is_string, pa.types.is_large_string,
                                                  pa.types.is_null)))
    for name, role, accepted in checks:
        kind = schema.field(name).type
        if not any(test(kind) for test in accepted):
            raise InputError(f"{path}: column {name!r} (input.columns.{role}) is {kind}, not a text column")


def _plan_jsonl(path: str, file_index: int, config: InputConfig) -> list[ReadTask]:
    try:
        with FileSystems.open(path) as handle:
            first = b""
            for line in handle:
                if line.strip():
                    first = line
                    break
    except Exception as error:  # noqa: BLE001
        raise InputError(f"{path}: cannot read ({_short(error)})") from None
    if first:
        try:
            obj = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict):
            missing = [name for name in _required_columns(config.columns) if name not in obj]
            if missing:
                raise InputError(f"{path}: missing column {missing[0]!r} in the first record")
    return [ReadTask(path, file_index, "jsonl")]


def _short(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def input_name(path: str, pattern: str) -> str:
    """How outputs name an input file: relative to the working directory when the pattern was relative, so that
    shards, ledger and cache keys do not depend on where the checkout lies; else the absolute path or URI."""
    if "://" in pattern or os.path.isabs(os.path.expanduser(pattern)):
        return path
    return os.path.relpath(path)


def plan_reads(config: InputConfig) -> tuple[list[str], list[ReadTask]]:
    """Expand the glob and check every file; returns the sorted file names (see `input_name`) and the read
    tasks, which open the absolute paths."""
    paths = expand_paths(config.path)
    names = [input_name(path, config.path) for path in paths]
    tasks: list[ReadTask] = []
    for index, (path, name) in enumerate(zip(paths, names, strict=True)):
        fmt = detect_format(path, config.format)
        plan = _plan_parquet if fmt == "parquet" else _plan_jsonl
        tasks.extend(replace(task, name=name) for task in plan(path, index, config))
    return names, tasks


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _deep_encodable(key: Any, value: Any) -> bool:
    """Whether a column name and its value (nested lists and objects from JSON included) encode as UTF-8."""
    if isinstance(key, str) and not _encodable(key):
        return False
    if isinstance(value, str):
        return _encodable(value)
    if isinstance(value, dict):
        return all(_deep_encodable(k, v) for k, v in value.items())
    if isinstance(value, list):
        return all(_deep_encodable(None, v) for v in value)
    return True


def _printable(name: Any) -> str:
    return str(name).encode("utf-8", "backslashreplace").decode("utf-8")


def _first_surrogate(text: str) -> int:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return -1


def make_record(
    values: dict[str, Any], task: ReadTask, row: int, config: InputConfig, problem: tuple[str, str] | None = None
) -> dict[str, Any]:
    """Map one input row to a record. Id problems and strings Beam could not encode (lone surrogates) are noted
    here, and a record with a problem carries no text or extra columns; the text is judged by the validate
    stage. (Beam encodes elements at any step, if only to sample their size, so an unencodable string must not
    travel even to the rejection.)"""
    columns = config.columns
    if problem is None and columns.text not in values:
        problem = ("missing_text", f"no {columns.text!r} field")
    source = values.get(columns.source) if columns.source else None
    record_id: str | None = None
    if columns.id and values:
        raw_id, id_problem = values.get(columns.id), None
        if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
            id_problem = ("missing_id", f"column {columns.id!r} is null or empty")
        elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
            record_id = str(raw_id)
            if not _encodable(record_id):
                record_id = None
                id_problem = ("invalid_id", f"column {columns.id!r} is not valid UTF-8 (a lone surrogate)")
        else:
            id_problem = ("invalid_id", f"column {columns.id!r} holds a {type(raw_id).__name__}")
        problem = problem or id_problem
    if source is not None and not _encodable(str(source)):
        source = None  # the ledger could not store it; the record is rejected (below) unless already
        problem = problem or ("invalid_source", f"column {columns.source!r} is not valid UTF-8 (a lone surrogate)")
    skip = {columns.text, columns.id, columns.source}
    if problem is None:
        broken = next((k for k, v in values.items() if k not in skip and not _deep_encodable(k, v)), None)
        if broken is not None:
            problem = ("invalid_column", f"column {_printable(broken)!r} is not valid UTF-8 (a lone surrogate)")
    text = values.get(columns.text)
    if problem is None and not _deep_encodable(None, text):
        problem = ("invalid_utf8", f"unpaired surrogate at character {_first_surrogate(text)}") \
            if isinstance(text, str) else ("non_string_text", f"text is a {type(text).__name__}")
    if problem is not None:
        text, extra = None, {}  # a rejected record keeps only what its ledger row needs, all of it encodable
    else:
        extra = {key: value for key, value in values.items() if key not in skip}
    return {
        "id": record_id,
        "text": text,
        "source": config.default_source if source is None else str(source),
        "extra": extra,
        "input_file": task.name or task.path,
        "input_row": row,
        "file_index": task.file_index,
        "problem": problem,
    }


def open_on_worker(path: str):
    """A planned input file, opened on a worker. A file that the driver listed but a worker cannot open (a
    path that only the driver's machine has, missing credentials) stops the run: its rows are not damaged."""
    worker_filesystems()
    try:
        return FileSystems.open(path)
    except Exception as error:  # noqa: BLE001 - each filesystem raises its own errors
        raise InputError(f"{path}: a worker cannot open this input file ({error_text(error)})") from None


def read_row_group(task: ReadTask) -> tuple[pa.Table | None, tuple[str, str] | None]:
    """A planned row group as a table, or the problem that rejects all its rows (a damaged row group)."""
    handle = open_on_worker(task.path)
    try:
        with handle:
            return pq.ParquetFile(handle).read_row_group(task.row_group), None
    except Exception as error:  # noqa: BLE001 - a damaged row group: its rows are rejected, not lost
        return None, ("unreadable_row_group", f"row group {task.row_group}: {_short(error)}")


def broken_records(task: ReadTask, config: InputConfig, problem: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """The records of a row group that could not be read: one rejected record per row."""
    for offset in range(task.rows or 0):
        yield make_record({}, task, task.first_row + offset, config, problem=problem)


def row_record(table: pa.Table, offset: int, task: ReadTask, config: InputConfig) -> dict[str, Any]:
    """One row of a row group as a record; a row that cannot be decoded is a rejected record naming why."""
    row = task.first_row + offset
    try:
        values = table.slice(offset, 1).to_pylist()[0]
    except UnicodeDecodeError as error:
        return make_record({}, task, row, config, problem=("invalid_utf8", f"byte {error.start} of a string column"))
    except Exception as error:  # noqa: BLE001
        return make_record({}, task, row, config, problem=("unreadable_row", _short(error)))
    return make_record(values, task, row, config)


def table_records(table: pa.Table, task: ReadTask, config: InputConfig) -> Iterator[dict[str, Any]]:
    """A row group's rows as records, in order; rows that cannot be decoded are found one by one."""
    try:
        rows = table.to_pylist()
    except Exception:  # noqa: BLE001 - e.g. invalid UTF-8 inside a string column: find the rows
        rows = None
    if rows is not None:
        for offset, values in enumerate(rows):
            yield make_record(values, task, task.first_row + offset, config)
        return
    for offset in range(table.num_rows):
        yield row_record(table, offset, task, config)


def jsonl_records(task: ReadTask, config: InputConfig) -> Iterator[dict[str, Any]]:
    """A JSON Lines file's lines as records; a line that is not a JSON object is a rejected record."""
    with open_on_worker(task.path) as handle:
        for row, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                values = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield make_record({}, task, row, config, problem=("invalid_utf8", f"byte {error.start} of the line"))
                continue
            except json.JSONDecodeError as error:
                yield make_record({}, task, row, config, problem=("invalid_json", error.msg))
                continue
            if not isinstance(values, dict):
                yield make_record({}, task, row, config, problem=("not_an_object", f"a JSON {type(values).__name__}"))
                continue
            yield make_record(values, task, row, config)


def read_column(file: str, column: str, what: str) -> list[Any]:
    """All values of one column of a Parquet or JSON Lines file on any Beam filesystem, read on the driver
    (select targets, SAE training texts); `what` names the file's role in the errors, which name the file."""
    file = absolute_uri(file)
    try:
        with FileSystems.open(file) as handle:
            payload = handle.read()
    except Exception as error:  # noqa: BLE001 - each filesystem raises its own errors
        raise InputError(f"{file}: cannot read {what} ({error_text(error)})") from None
    try:
        if file.lower().endswith((".parquet", ".pq")):
            table = pq.read_table(pa.BufferReader(payload))
            if column not in table.column_names:
                raise InputError(f"{file}: {what} has no column {column!r}")
            return table.column(column).to_pylist()
        return [json.loads(line).get(column) for line in payload.decode("utf-8").splitlines() if line.strip()]
    except InputError:
        raise
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{file}: cannot read {what} ({error_text(error)})") from None


def expected_rows(tasks: list[ReadTask]) -> int | None:
    """Input rows according to the Parquet footers; None when a JSON Lines file makes it unknown."""
    if any(task.rows is None for task in tasks):
        return None
    return sum(task.rows for task in tasks)
