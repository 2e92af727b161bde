"""Ordered Parquet output without collecting a collection on one worker.

`AssignPositions` numbers elements 0..n-1 in a global order (e.g. input order): elements are grouped into
blocks of the order key, the block sizes (n / block_rows of them) are turned into offsets in one small
global step, joined back to their blocks, and each block is sorted and numbered from its offset. The join is
a CoGroupByKey rather than a side input: Beam 2.77's DaskRunner re-evaluates side inputs and miscounted them.
`WriteOrderedParquet` cuts the numbered elements into files of `rows_per_file` consecutive positions, named
`part-00000.parquet`, ... so that reading the files in name order gives the global order, and returns each
file's metadata (rows, bytes, SHA-256, a tally of rows by `tally_key`, optional `sums` over its rows) for the
manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from winnow.pipelines import storage

OrderKey = tuple[int, ...]


def block_offsets(block_counts: Iterable[tuple[Any, int]]) -> dict[Any, int]:
    """{block: number of elements in all earlier blocks}, blocks ordered by their key."""
    offsets, running = {}, 0
    for block, count in sorted(block_counts):
        offsets[block] = running
        running += count
    return offsets


class AssignPositions(beam.PTransform):
    """elements -> (position, element), positions dense and in `order_key` order."""

    def __init__(self, order_key: Callable[[Any], OrderKey], block_rows: int = 10_000):
        super().__init__()
        self.order_key = order_key
        self.block_rows = block_rows

    def expand(self, elements):
        order_key, block_rows = self.order_key, self.block_rows
        grouped = (
            elements
            | "Block" >> beam.Map(lambda element: (_block(order_key(element), block_rows), element))
            | "GroupBlocks" >> beam.GroupByKey()
        )
        offsets = (
            grouped
            | "BlockSizes" >> beam.MapTuple(lambda block, members: (None, (block, sum(1 for _ in members))))
            | "AllBlocks" >> beam.GroupByKey()
            | "Offsets" >> beam.FlatMapTuple(lambda _, sizes: block_offsets(sizes).items())
        )

        def number(kv):
            block, joined = kv
            start = next(iter(joined["offset"]))
            for members in joined["members"]:
                for index, element in enumerate(sorted(members, key=order_key)):
                    yield start + index, element

        joined = {"members": grouped, "offset": offsets} | "Join" >> beam.CoGroupByKey()
        return joined | "Number" >> beam.FlatMap(number)


def _block(key: OrderKey, block_rows: int) -> tuple[int, int]:
    return key[0], key[1] // block_rows


def table_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_bytes(path: str, payload: bytes) -> None:
    storage.write_bytes(path, payload)


class WriteFileFn(beam.DoFn):
    """(file number, [(sort key, row), ...]) -> one Parquet file of the rows in sort-key order; its metadata."""

    def __init__(self, directory, relative_dir, to_table, row_group_rows, tally_key, sums=None):
        self.sums = sums or {}
        self.directory = directory
        self.relative_dir = relative_dir
        self.to_table = to_table
        self.row_group_rows = row_group_rows
        self.tally_key = tally_key

    def process(self, element) -> Iterator[dict[str, Any]]:
        file_number, numbered = element
        rows = [row for _, row in sorted(numbered, key=lambda pair: pair[0])]
        table = self.to_table(rows)
        payload = table_bytes(table, self.row_group_rows)
        name = f"part-{file_number:05d}.parquet"
        write_bytes(FileSystems.join(self.directory, self.relative_dir, name), payload)
        tally: dict[str, int] = {}
        for row in rows:
            key = self.tally_key(row)
            tally[key] = tally.get(key, 0) + 1
        meta = {
            "dir": self.relative_dir,
            "file": f"{self.relative_dir}/{name}",
            "index": file_number,
            "rows": table.num_rows,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "tally": dict(sorted(tally.items())),
        }
        for name, value_of in self.sums.items():
            meta[name] = sum(value_of(row) for row in rows)
        yield meta


class WriteOrderedParquet(beam.PTransform):
    """(position, row) -> files DIRECTORY/RELATIVE_DIR/part-NNNNN.parquet; returns their metadata."""

    def __init__(
        self,
        directory: str,
        relative_dir: str,
        rows_per_file: int,
        to_table: Callable[..., pa.Table],
        row_group_rows: int = 5_000,
        tally_key: Callable[[Any], str] = lambda row: row["source"],
        sums: dict[str, Callable[[Any], int]] | None = None,
    ):
        super().__init__()
        self.sums = sums
        self.directory = directory
        self.relative_dir = relative_dir
        self.rows_per_file = rows_per_file
        self.to_table = to_table
        self.row_group_rows = row_group_rows
        self.tally_key = tally_key

    def expand(self, numbered):
        rows_per_file = self.rows_per_file
        metas = (
            numbered
            | "ToFile" >> beam.Map(lambda pair: (pair[0] // rows_per_file, pair))
            | "GroupFile" >> beam.GroupByKey()
            | "Write"
            >> beam.ParDo(
                WriteFileFn(
                    self.directory, self.relative_dir, self.to_table, self.row_group_rows, self.tally_key,
                    self.sums,
                ),
            )
        )
        return metas
