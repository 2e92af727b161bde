"""The stage cache's files: a step's records and removed ledger rows as typed blocks (blocks.py) or pickled
records, and the list of the files a step wrote. The entries that hold them (keys, reuse, history) are
engine/stage_cache.py's; stages read and write these files themselves, so they live with the record I/O.
  records/part-FFFFF-BBBBB.parquet   pickled records, one file per block of 10,000 input rows (file F, block B)
  records/block-FFFFF-GGGGG.parquet  or typed blocks, one per row group G of input file F (validate; embed
                                     writes the same files with their vectors)
  removed/part-FFFFF-BBBBB.parquet   pickled ledger rows, likewise
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.io.blocks import block_records, is_block
from winnow.pipelines.io.extra_kinds import as_meta, records_kinds
from winnow.pipelines.io.ordered_io import table_bytes
from winnow.pipelines.io.storage import join, open_file, read_json, write_bytes

FILES_META = "_files.json"  # what a pipeline wrote: its last step gathers every file's metadata here
RECORDS, REMOVED = "records", "removed"
BLOCK_ROWS = 10_000
_CACHE_SCHEMA = pa.schema(
    [("file_index", pa.int64()), ("input_row", pa.int64()), ("variant", pa.int64()), ("record", pa.binary())]
)

def write_files_meta(files: list[dict[str, Any]], path: str) -> None:
    write_bytes(path, json.dumps(sorted(files, key=lambda f: (f["dir"], f.get("file", ""))), indent=1).encode())


def read_files_meta(path: str) -> list[dict[str, Any]]:
    return read_json(path)


def _cache_order(element: dict[str, Any]) -> tuple:
    return element["file_index"], element["input_row"], element.get("variant", 0), str(element.get("id"))


def write_records_file(directory: str, relative: str, elements: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Records or ledger rows, in input order, as one file of pickled dicts; its file metadata."""
    ordered = sorted(elements, key=_cache_order)
    table = pa.table(
        [
            pa.array([e["file_index"] for e in ordered], pa.int64()),
            pa.array([e["input_row"] for e in ordered], pa.int64()),
            pa.array([e.get("variant", 0) for e in ordered], pa.int64()),
            pa.array([pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL) for e in ordered], pa.binary()),
        ],
        schema=_CACHE_SCHEMA,
    )
    payload = table_bytes(table, 1_000)
    write_bytes(join(directory, relative), payload)
    return {"dir": relative.split("/", 1)[0], "file": relative, "rows": len(ordered), "bytes": len(payload),
            "extra_kinds": as_meta(records_kinds(ordered))}


class _WriteCacheFileFn(beam.DoFn):
    def __init__(self, directory: str, name: str, stem: str):
        self.directory = directory
        self.name = name
        self.stem = stem

    def process(self, element: tuple[tuple[int, int], Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        (file_index, block), members = element
        yield write_records_file(self.directory, f"{self.name}/{self.stem}-{file_index:05d}-{block:05d}.parquet",
                                 members)


class WriteCache(beam.PTransform):
    """records or ledger rows -> pickled Parquet files DIRECTORY/NAME/STEM-*.parquet, one per block of input
    rows (deterministic names, so a retried bundle overwrites rather than duplicates); returns file metadata.
    A step that also writes record files under their upstream names gives its own a different STEM."""

    def __init__(self, directory: str, name: str, stem: str = "part"):
        super().__init__()
        self.directory = directory
        self.name = name
        self.stem = stem

    def expand(self, elements):
        return (
            elements
            | "Block" >> beam.Map(lambda e: ((e["file_index"], e["input_row"] // BLOCK_ROWS), e))
            | "GroupBlock" >> beam.GroupByKey()
            | "WriteBlock" >> beam.ParDo(_WriteCacheFileFn(self.directory, self.name, self.stem))
        )


def read_cache_table(path: str, drop: tuple[str, ...] = ()) -> pa.Table:
    """A cache file's table; a typed block's columns named in `drop` (e.g. its vectors) are not read."""
    with open_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        if is_block(parquet.schema_arrow) and any(name in names for name in drop):
            return parquet.read(columns=[name for name in names if name not in drop])
        return parquet.read()


def read_cache_groups(path: str, columns: tuple[str, ...]) -> Iterator[pa.Table]:
    """A cache file's table one row group at a time: of a typed block only the `columns` it has (at least one
    table, empty for a file without rows); pickled records whole, in one table."""
    with open_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        if not is_block(parquet.schema_arrow):
            yield parquet.read()
            return
        wanted = [name for name in parquet.schema_arrow.names if name in columns]
        if not parquet.num_row_groups:
            yield parquet.schema_arrow.empty_table().select(wanted)
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, columns=wanted)


def table_elements(table: pa.Table, drop: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The records (or ledger rows) of a cache file's table: a typed block (blocks.py) or pickled dicts."""
    if "fate" in table.column_names:  # typed ledger rows (a stage that writes its removed rows itself)
        yield from table.to_pylist()
        return
    if is_block(table.schema):
        yield from block_records(table, drop)
        return
    for chunk in table.column("record").chunks:
        for value in chunk:
            element = pickle.loads(value.as_py())
            for name in drop:
                element.pop(name, None)
            yield element


def read_cache_file(path: str, drop: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The records (or ledger rows) of a cache file."""
    yield from table_elements(read_cache_table(path, drop), drop)


class ReadCache(beam.PTransform):
    """Cached files -> their records, in parallel over files; `drop` removes fields (e.g. embeddings) that
    later stages no longer need."""

    def __init__(self, paths: list[str], drop: tuple[str, ...] = ()):
        super().__init__()
        self.paths = paths
        self.drop = drop

    def expand(self, pbegin):
        drop = self.drop
        return (
            pbegin
            | "Files" >> beam.Create(self.paths)  # Create spreads its elements (a Reshuffle)
            | "Records" >> beam.FlatMap(read_cache_file, drop)
        )
