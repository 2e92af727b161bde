"""The kinds of the passed-through input columns, which decide the shards' schema for them.

Every writer of a record file notes the kinds of its rows' passed-through values in the file's metadata
(`extra_kinds`, in the stage entry), so the output's schema is a merge of small dicts on the driver, not a pass
that reads every file again (a Beam pipeline of its own, 0.3 s of every job).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa

_SCALAR_TYPES = {bool: "bool", int: "int64", float: "float64", str: "string"}


def value_kind(value: Any) -> str | None:
    """The column kind a passed-through value asks for; None for a null, which fits any column."""
    if value is None:
        return None
    return _SCALAR_TYPES.get(type(value), "json")


def arrow_kind(kind: pa.DataType) -> str | None:
    """The value kind every non-null value of an Arrow column has, when its type says it; None otherwise."""
    if pa.types.is_integer(kind):
        return "int64"
    if pa.types.is_floating(kind) and not pa.types.is_float16(kind):
        return "float64"
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    return None


def records_kinds(records: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """{column: value kinds} over records' passed-through values (`extra`)."""
    kinds: dict[str, set[str]] = {}
    for record in records:
        for column, value in record.get("extra", {}).items():
            found = kinds.setdefault(column, set())
            kind = value_kind(value)
            if kind:
                found.add(kind)
    return kinds


def merge_kinds(parts: Iterable[dict[str, Iterable[str]]]) -> dict[str, set[str]]:
    merged: dict[str, set[str]] = {}
    for part in parts:
        for column, kinds in part.items():
            merged.setdefault(column, set()).update(kinds)
    return merged


def as_meta(kinds: dict[str, set[str]]) -> dict[str, list[str]]:
    """Kinds as file metadata (JSON)."""
    return {column: sorted(found) for column, found in sorted(kinds.items())}


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
