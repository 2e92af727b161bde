"""Write stage: the output directory's Parquet parts (shards, ledger, embeddings) in a stable order.

Shards (`shards/part-NNNNN.parquet`) hold the surviving records: columns id, text, source, the provenance
columns input_file and input_row, epoch (which pass over its source this copy is: 0 unless the mix stage
repeats it), then every passed-through input column. Without the mix stage they are in input order; with it,
in the mixture's training order (WriteMixedShards). The ledger (`ledger/part-NNNNN.parquet`) has one row per
input record (see records.py), in input order. Passed-through columns get one schema for all shards, decided
from the whole output (a column whose values disagree in type across records is written as JSON text), so every
shard reads the same way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import pyarrow as pa

from winnow.pipelines.ordered_io import AssignPositions, WriteFileFn, WriteOrderedParquet
from winnow.pipelines.records import LEDGER_SCHEMA, order_key, token_count

SHARD_COLUMNS = [
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("input_file", pa.string()),
    ("input_row", pa.int64()),
    ("epoch", pa.int64()),
]
_SCALAR_TYPES = {bool: "bool", int: "int64", float: "float64", str: "string"}
_ARROW_TYPES = {"bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}


def value_kind(value: Any) -> str | None:
    """The column kind a passed-through value asks for; None for a null, which fits any column."""
    if value is None:
        return None
    return _SCALAR_TYPES.get(type(value), "json")


class ExtraColumnKinds(beam.CombineFn):
    """{column: set of value kinds} over all records' passed-through columns."""

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, record):
        for column, value in record["extra"].items():
            kinds = accumulator.setdefault(column, set())
            kind = value_kind(value)
            if kind:
                kinds.add(kind)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged: dict[str, set] = {}
        for accumulator in accumulators:
            for column, kinds in accumulator.items():
                merged.setdefault(column, set()).update(kinds)
        return merged

    def extract_output(self, accumulator):
        return extra_schema(accumulator)


def extra_schema(kinds: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Column kinds -> [(column, arrow kind)] in name order: one scalar kind keeps its type (int with float
    widens to float), anything else is JSON text."""
    schema = []
    for column in sorted(kinds):
        found = kinds[column]
        if found <= {"int64", "float64"} and found:
            kind = "float64" if "float64" in found else "int64"
        elif len(found) == 1 and found != {"json"}:
            kind = next(iter(found))
        else:
            kind = "json" if found else "string"
        schema.append((column, kind))
    return schema


def _extra_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if kind == "float64":
        return float(value)
    return value


def shard_table(records: list[dict[str, Any]], extra: list[tuple[str, str]]) -> pa.Table:
    taken = {name for name, _ in SHARD_COLUMNS}
    columns = {name: [r.get(name, 0) if name == "epoch" else r[name] for r in records] for name, _ in SHARD_COLUMNS}
    fields = list(SHARD_COLUMNS)
    for column, kind in extra:
        name = column if column not in taken else f"input_{column}"
        columns[name] = [_extra_value(r["extra"].get(column), kind) for r in records]
        fields.append((name, _ARROW_TYPES.get(kind, pa.string())))
    schema = pa.schema(fields)
    return pa.Table.from_pydict(columns, schema=schema)


LEDGER_TALLY_FIELDS = ("fate", "stage", "reason", "source", "origin")


def ledger_tally_key(row: dict[str, Any]) -> str:
    """The ledger files tally rows by fate, stage, reason, source and origin (input or synthetic), tab-joined."""
    origin = "synthetic" if row.get("parent_id") else "input"
    return "\t".join([*(row[field] or "" for field in LEDGER_TALLY_FIELDS[:-1]), origin])


def ledger_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)


class WriteShards(beam.PTransform):
    """kept records -> OUT/shards/part-NNNNN.parquet in input order; returns the files' metadata. `extra` is
    the passed-through columns' schema (ExtraColumnKinds over the kept records, computed by a pass)."""

    def __init__(self, directory: str, shard_rows: int, row_group_rows: int, extra: list[tuple[str, str]]):
        super().__init__()
        self.directory = directory
        self.shard_rows = shard_rows
        self.row_group_rows = row_group_rows
        self.extra = extra

    def expand(self, records):
        return (
            records
            | "Order" >> AssignPositions(order_key)
            | "Files"
            >> WriteOrderedParquet(
                self.directory,
                "shards",
                self.shard_rows,
                functools.partial(shard_table, extra=self.extra),
                self.row_group_rows,
            )
        )


class WriteMixedShards(beam.PTransform):
    """(shard, (shuffle_key, record)) -> OUT/shards/part-NNNNN.parquet, rows in shuffle-key order."""

    def __init__(self, directory: str, row_group_rows: int, extra: list[tuple[str, str]]):
        super().__init__()
        self.directory = directory
        self.row_group_rows = row_group_rows
        self.extra = extra

    def expand(self, placed):
        return (
            placed
            | "GroupShard" >> beam.GroupByKey()
            | "Write"
            >> beam.ParDo(
                WriteFileFn(
                    self.directory, "shards", functools.partial(shard_table, extra=self.extra),
                    self.row_group_rows, lambda row: row["source"],
                    {"tokens": lambda row: token_count(row["text"])},
                ),
            )
        )


class WriteLedger(beam.PTransform):
    """ledger rows of every input record -> OUT/ledger/part-NNNNN.parquet in input order."""

    def __init__(self, directory: str, ledger_rows: int, row_group_rows: int):
        super().__init__()
        self.directory = directory
        self.ledger_rows = ledger_rows
        self.row_group_rows = row_group_rows

    def expand(self, rows: Iterable[dict[str, Any]]):
        return (
            rows
            | "Order" >> AssignPositions(order_key)
            | "Files"
            >> WriteOrderedParquet(
                self.directory,
                "ledger",
                self.ledger_rows,
                ledger_table,
                self.row_group_rows,
                tally_key=ledger_tally_key,
                sums={"copies": lambda row: row["copies"]},
            )
        )
