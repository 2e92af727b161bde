"""Rows shuffled through files: a task writes its rows grouped (a partition, a record file) as one Parquet row group
per group, sends on (group, (file, row group)) references, and the task that gathers a group reads only its row
groups. What crosses a Beam shuffle is the references, never the rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.io.ordered_io import write_bytes
from winnow.pipelines.io.storage import open_file


def group_runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal adjacent values."""
    if not len(values):
        return []
    bounds = np.flatnonzero(np.r_[True, values[1:] != values[:-1], True])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def write_groups(path: str, table: pa.Table, groups) -> list[tuple[Any, tuple[str, int]]]:
    """Write `table` (rows of a group adjacent) with one row group per group: (group, (path, row group))."""
    groups = groups.to_numpy(zero_copy_only=False) if isinstance(groups, (pa.Array, pa.ChunkedArray)) else groups
    runs = group_runs(groups)
    if not runs:
        return []
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="none", use_dictionary=False) as writer:
        for start, stop in runs:
            writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
    write_bytes(path, sink.getvalue().to_pybytes())
    return [(groups[start].item() if isinstance(groups[start], np.generic) else groups[start], (path, index))
            for index, (start, _) in enumerate(runs)]


def read_groups(refs, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    tables = []
    by_path: dict[str, list[int]] = {}
    for path, group in refs:
        by_path.setdefault(path, []).append(group)
    for path in sorted(by_path):
        with open_file(path) as handle:
            tables.append(pq.ParquetFile(handle).read_row_groups(sorted(by_path[path]), columns=columns))
    if not tables:
        return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)
