"""Rows shuffled through files: a task writes its rows grouped (a partition, a record file) as one Arrow IPC record
batch per group, sends on (group, (file, batch)) references, and the task that gathers a group reads only its
batches. What crosses a Beam shuffle is the references, never the rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from winnow.pipelines.io.ordered_io import write_bytes
from winnow.pipelines.io.storage import open_file


def group_runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal adjacent values."""
    if not len(values):
        return []
    bounds = np.flatnonzero(np.r_[True, values[1:] != values[:-1], True])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def write_groups(path: str, table: pa.Table, groups) -> list[tuple[Any, tuple[str, int]]]:
    """Write `table` (rows of a group adjacent) as an Arrow IPC file of one record batch per group:
    (group, (path, batch)). IPC, not Parquet: a scratch fragment is written once and read once, and IPC does
    both without encoding (3-4x faster than uncompressed Parquet here)."""
    groups = groups.to_numpy(zero_copy_only=False) if isinstance(groups, (pa.Array, pa.ChunkedArray)) else groups
    runs = group_runs(groups)
    if not runs:
        return []
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        for start, stop in runs:
            part = table.slice(start, stop - start)
            writer.write_batch(pa.RecordBatch.from_arrays([column.combine_chunks() for column in part.columns],
                                                          schema=table.schema))
    write_bytes(path, sink.getvalue().to_pybytes())
    return [(groups[start].item() if isinstance(groups[start], np.generic) else groups[start], (path, index))
            for index, (start, _) in enumerate(runs)]


def read_groups(refs, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """The rows of the groups `refs` names, file by file in path order, each file's groups in batch order."""
    batches = []
    by_path: dict[str, list[int]] = {}
    for path, group in refs:
        by_path.setdefault(path, []).append(group)
    for path in sorted(by_path):
        with open_file(path) as handle:
            reader = pa.ipc.open_file(handle)
            batches += [reader.get_batch(index) for index in sorted(by_path[path])]
    table = pa.Table.from_batches(batches) if batches else schema.empty_table()
    return table if columns is None else table.select(columns)
