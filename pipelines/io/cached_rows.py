"""One stage-cache file's rows as arrays, whichever its kind: a typed block (blocks.py) or pickled records.

Stages that work file by file (prune) read a cache file once, take its order keys, ids and vectors as numpy
arrays, and write it back with columns set (a block gains typed columns; pickled records gain the same fields)
or with fewer rows, under the same name, so that a file's rows never leave the task that read it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from winnow.pipelines.io import native
from winnow.pipelines.io.blocks import VECTOR_COLUMN, is_block, vector_matrix, write_block
from winnow.pipelines.io.cache_files import read_cache_table, table_elements, write_records_file

ORDER_COLUMNS = ("file_index", "input_row", "variant")


def in_input_order(table: pa.Table, columns: list[str]) -> bool:
    """Whether the rows already follow `columns` ascending (as a file written from CachedRows does): a stable
    sort would leave them as they are, so the copy it makes of every column (texts included) is skipped."""
    ordered = np.ones(max(table.num_rows - 1, 0), dtype=bool)
    for name in reversed(columns):
        values = table.column(name).to_numpy()
        step = values[1:].astype(np.int64) - values[:-1].astype(np.int64)
        ordered = (step > 0) | ((step == 0) & ordered)
    return bool(ordered.all())


class CachedRows:
    """A cache file's rows in input order (file_index, input_row, variant)."""

    def __init__(self, table: pa.Table):
        self.block = is_block(table.schema)
        if self.block:
            sort = [(name, "ascending") for name in ORDER_COLUMNS if name in table.column_names]
            if table.num_rows and not in_input_order(table, [name for name, _ in sort]):
                table = table.sort_by(sort)
            self.records: list[dict[str, Any]] | None = None
        else:
            self.records = sorted(table_elements(table),
                                  key=lambda r: (r["file_index"], r["input_row"], r.get("variant", 0)))
        self.table = table

    @classmethod
    def read(cls, path: str, drop: tuple[str, ...] = ()) -> CachedRows:
        return cls(read_cache_table(path, drop))

    def __len__(self) -> int:
        return self.table.num_rows if self.block else len(self.records)

    def keys(self) -> np.ndarray:
        """(rows, 3) int64: each row's file_index, input_row and variant."""
        if self.block:
            columns = [self.table.column(name).to_numpy() if name in self.table.column_names
                       else np.zeros(len(self), dtype=np.int64) for name in ORDER_COLUMNS]
            return np.stack(columns, axis=1).astype(np.int64, copy=False).reshape(len(self), 3)
        return np.array([(r["file_index"], r["input_row"], r.get("variant", 0)) for r in self.records],
                        dtype=np.int64).reshape(len(self), 3)

    def ids(self) -> pa.Array:
        if self.block:
            return self.table.column("id").combine_chunks()
        return pa.array([r["id"] for r in self.records], pa.string())

    def texts(self) -> pa.Array:
        """Every row's text as one Arrow string array, in row order (a block's column uncopied)."""
        if self.block:
            return native.one_chunk(self.table.column("text"))
        return pa.array(self.values("text"), pa.string())

    def values(self, name: str) -> list[Any]:
        """A field of every row as Python values (a map column's as dicts); None where a row lacks it."""
        if self.block:
            if name not in self.table.column_names:
                return [None] * len(self)
            column = self.table.column(name)
            values = column.to_pylist()
            if pa.types.is_map(column.type):
                return [dict(value) if value is not None else None for value in values]
            return values
        return [r.get(name) for r in self.records]

    def vectors(self) -> np.ndarray:
        """(rows, dimension) float32; (rows, 0) for rows without vectors."""
        if self.block:
            if not len(self) or VECTOR_COLUMN not in self.table.column_names:
                return np.zeros((len(self), 0), dtype=np.float32)
            return vector_matrix(self.table.column(VECTOR_COLUMN))
        if not self.records:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([r[VECTOR_COLUMN] for r in self.records]).astype(np.float32, copy=False)

    def rows_table(self, keep: np.ndarray | None = None) -> pa.Table:
        """The file's table (rows in input order), optionally only the rows where `keep` is true: a block, or
        the pickled records' table (which `write.rows_from_table` reads as well)."""
        if self.block:
            return self.table if keep is None else self.table.filter(pa.array(keep))
        table = pa.table({"file_index": self.keys()[:, 0], "input_row": self.keys()[:, 1],
                          "variant": self.keys()[:, 2],
                          "record": pa.array([_pickled(r) for r in self.records], pa.binary())})
        return table if keep is None else table.filter(pa.array(keep))

    def write(self, directory: str, relative: str, columns: dict[str, pa.Array], keep: np.ndarray | None = None,
              drop: tuple[str, ...] = (), compression: str = "zstd") -> dict[str, Any]:
        """Write the rows (those where `keep` is true) with `columns` set (one value per row of the file) and
        the fields in `drop` left out, under `relative` in `directory`; the file's metadata."""
        mask = np.ones(len(self), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
        if self.block:
            table = self.table.filter(pa.array(mask)) if keep is not None else self.table
            for name, values in columns.items():
                values = values.filter(pa.array(mask)) if keep is not None else values
                if name in table.column_names:
                    table = table.set_column(table.column_names.index(name), name, values)
                else:
                    table = table.append_column(name, values)
            table = table.drop_columns([name for name in drop if name in table.column_names])
            return write_block(directory, relative, table, compression)
        values = {name: [dict(v) if v is not None else None for v in column.to_pylist()]
                  if pa.types.is_map(column.type) else column.to_pylist() for name, column in columns.items()}
        rows = []
        for index in np.flatnonzero(mask).tolist():
            record = {k: v for k, v in self.records[index].items() if k not in drop}
            for name, column in values.items():
                record[name] = column[index]
            rows.append(record)
        return write_records_file(directory, relative, rows)


def _pickled(record: dict[str, Any]) -> bytes:
    import pickle

    return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
