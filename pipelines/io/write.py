"""Write stage: the tables of the output's Parquet parts (shards, ledger), built from Arrow tables of rows.

Shards (`shards/part-NNNNN.parquet`) hold the surviving records: columns id, text, source, the provenance
columns input_file and input_row, epoch (which pass over its source this copy is: 0 unless the mix stage
repeats it), then every passed-through input column. Without the mix stage they are in input order
(ordered_io.WriteOrderedFiles); with it, in the mixture's training order (mix.py). The ledger
(`ledger/part-NNNNN.parquet`) has one row per input record (see records.py), in input order. Passed-through
columns get one schema for all shards, decided from the whole output (a column whose values disagree in type
across records is written as JSON text), so every shard reads the same way.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from winnow.pipelines.io.blocks import block_kinds, is_block
from winnow.pipelines.io.cache_files import read_cache_table, table_elements
from winnow.pipelines.io.extra_kinds import arrow_kind, records_kinds
from winnow.pipelines.io.ordered_io import table_bytes
from winnow.pipelines.io.records import LEDGER_SCHEMA
from winnow.pipelines.io.storage import open_file

SHARD_COLUMNS = [
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("input_file", pa.string()),
    ("input_row", pa.int64()),
    ("epoch", pa.int64()),
]
_ARROW_TYPES = {"bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}


def _extra_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if kind == "float64":
        return float(value)
    return value


LEDGER_TALLY_FIELDS = ("fate", "stage", "reason", "source", "origin")


def ledger_tally_key(row: dict[str, Any]) -> str:
    """The ledger files tally rows by fate, stage, reason, source and origin (input or synthetic), tab-joined."""
    origin = "synthetic" if row.get("parent_id") else "input"
    return "\t".join([*(row[field] or "" for field in LEDGER_TALLY_FIELDS[:-1]), origin])


def ledger_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)


# Rows as Arrow tables: every cache file (a typed block or pickled records) is read into one shape, `rows`,
# that the mix and the ordered writers work on without per-record Python.
EXTRA_PREFIX = "extra:"
ROW_COLUMNS = [
    ("file_index", pa.int64()),
    ("input_row", pa.int64()),
    ("variant", pa.int64()),
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("input_file", pa.string()),
    ("epoch", pa.int64()),
    ("note", pa.string()),
    ("cluster", pa.int64()),
    ("dist_to_centroid", pa.float32()),
    ("select_score", pa.float64()),
    ("sae_score", pa.float64()),
    ("parent_id", pa.string()),
]
_RECORD_DEFAULTS = {"variant": 0, "epoch": 0}


def file_extra_kinds(path: str) -> dict[str, set[str]]:
    """{column: value kinds} over one cache file's passed-through columns (what its metadata notes)."""
    with open_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        extra = [name for name in parquet.schema_arrow.names if name.startswith(EXTRA_PREFIX)]
        table = parquet.read(columns=extra if is_block(parquet.schema_arrow) else ["record"])
    if not is_block(table.schema):
        return records_kinds(table_elements(table))
    return block_kinds(table)


def _extra_array(column: pa.ChunkedArray | None, count: int, kind: str) -> pa.Array:
    target = _ARROW_TYPES.get(kind, pa.string())
    if column is None:
        return pa.nulls(count, target)
    if kind != "json" and arrow_kind(column.type) is not None:
        return column.cast(target).combine_chunks() if count else pa.array([], target)
    return pa.array([_extra_value(value, kind) for value in column.to_pylist()], target)


def rows_table(path: str, extra: list[tuple[str, str]]) -> pa.Table:
    """A cache file of records as `rows`: ROW_COLUMNS, then the passed-through columns as `extra:NAME`, each
    already of its output kind (`extra`, from ExtraColumnKinds over the whole output)."""
    return rows_from_table(read_cache_table(path, ("embedding",)), extra)


def rows_from_table(table: pa.Table, extra: list[tuple[str, str]]) -> pa.Table:
    """Some rows of a cache file's table (a typed block or pickled records) as `rows` (see rows_table)."""
    count = table.num_rows
    arrays, names = [], []
    if is_block(table.schema):
        for name, kind in ROW_COLUMNS:
            if name in table.column_names:
                arrays.append(table.column(name).cast(kind).combine_chunks())
            elif name in _RECORD_DEFAULTS:
                arrays.append(pa.array(np.full(count, _RECORD_DEFAULTS[name], dtype=np.int64)))
            else:
                arrays.append(pa.nulls(count, kind))
            names.append(name)
        for column, kind in extra:
            name = EXTRA_PREFIX + column
            arrays.append(_extra_array(table.column(name) if name in table.column_names else None, count, kind))
            names.append(name)
        return pa.table(arrays, names=names)
    records = list(table_elements(table))
    for name, kind in ROW_COLUMNS:
        default = _RECORD_DEFAULTS.get(name)
        arrays.append(pa.array([record.get(name, default) for record in records], kind))
        names.append(name)
    for column, kind in extra:
        arrays.append(pa.array([_extra_value(record["extra"].get(column), kind) for record in records],
                               _ARROW_TYPES.get(kind, pa.string())))
        names.append(EXTRA_PREFIX + column)
    return pa.table(arrays, names=names)


def shard_output(rows: pa.Table, extra: list[tuple[str, str]]) -> pa.Table:
    """`rows` -> a shard's table: SHARD_COLUMNS, then the passed-through columns (renamed `input_NAME` when
    they clash with one of ours), as `shard_table` builds it from records."""
    taken = {name for name, _ in SHARD_COLUMNS}
    arrays = [rows.column(name) for name, _ in SHARD_COLUMNS]
    fields = list(SHARD_COLUMNS)
    for column, kind in extra:
        name = column if column not in taken else f"input_{column}"
        arrays.append(rows.column(EXTRA_PREFIX + column))
        fields.append((name, _ARROW_TYPES.get(kind, pa.string())))
    return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                                schema=pa.schema(fields))


LEDGER_DICTIONARY = ("source", "fate", "stage", "reason", "input_file", "duplicate_of", "parent_id")
LEDGER_KEYS = ("file_index", "variant")  # with the ledger's input_row, the order of its rows


def ledger_rows_table(rows: pa.Table, stage, reason, detail, copies, fate=None, duplicate_of=None) -> pa.Table:
    """The ledger rows (LEDGER_SCHEMA, then the order keys) of `rows` that a stage decided on: `stage`,
    `reason`, `detail`, `copies`, `fate` and `duplicate_of` are scalars or arrays; without a `fate`, `kept`
    (`synthetic` for a record with a parent) where copies > 0, else `not_selected`; a null detail is the
    record's note, as in ledger_row."""
    count = rows.num_rows
    copies = pa.array(np.broadcast_to(np.asarray(copies, dtype=np.int64), (count,)))
    if fate is None:
        synthetic = pc.fill_null(pc.not_equal(rows.column("parent_id"), ""), False)
        fate = pc.if_else(pc.greater(copies, 0), pc.if_else(synthetic, "synthetic", "kept"), "not_selected")

    def column(value, kind):
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            return value
        return pa.repeat(pa.scalar(value, kind), count)

    fate = column(fate, pa.string())
    details = column(detail, pa.string())
    details = pc.coalesce(details, rows.column("note"))
    values = {
        "id": rows.column("id"), "source": rows.column("source"), "fate": fate,
        "stage": column(stage, pa.string()), "reason": column(reason, pa.string()), "detail": details,
        "input_file": rows.column("input_file"), "input_row": rows.column("input_row"), "copies": copies,
        "cluster": rows.column("cluster"), "dist_to_centroid": rows.column("dist_to_centroid"),
        "duplicate_of": column(duplicate_of, pa.string()), "select_score": rows.column("select_score"),
        "sae_score": rows.column("sae_score"), "parent_id": rows.column("parent_id"),
    }
    arrays = [values[field.name] for field in LEDGER_SCHEMA]
    arrays += [rows.column(name) for name in LEDGER_KEYS]
    schema = pa.schema([*LEDGER_SCHEMA, *((name, pa.int64()) for name in LEDGER_KEYS)])
    return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                                schema=schema)


def ledger_bytes(ledger: pa.Table) -> bytes:
    """A stage's ledger rows as one zstd Parquet file, dictionary-encoded only where values repeat: ids and
    details rarely do, and trying costs a hash per value before Parquet falls back (a fifth of the write)."""
    return table_bytes(ledger, 65_536, dictionary=[name for name in LEDGER_DICTIONARY if name in ledger.column_names])


def ledger_tally(table: pa.Table) -> dict[str, int]:
    """`ledger_tally_key` counts over a ledger table."""
    parent = table.column("parent_id")
    origin = pc.if_else(pc.fill_null(pc.not_equal(parent, ""), False), "synthetic", "input")
    parts = [pc.fill_null(table.column(name), "") for name in LEDGER_TALLY_FIELDS[:-1]]
    return value_tally(pc.binary_join_element_wise(*parts, origin, "\t"))


def value_tally(values) -> dict[str, int]:
    counts = pc.value_counts(values)
    return dict(sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)))
