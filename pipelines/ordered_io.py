"""Ordered Parquet output without collecting a collection on one worker.

`WriteOrderedFiles` (shards without the mix, the ledger) moves no rows through a GroupByKey: its sources are
files of rows that carry their input order keys, and each output file's task reads the order blocks it needs.
The element path below (`AssignPositions`, `WriteOrderedParquet`) is what the embed stage still uses.

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

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
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


def table_bytes(table: pa.Table, row_group_rows: int, compression: str = "zstd", dictionary: bool = True) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression=compression, use_dictionary=dictionary)
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
        tally: dict[str, int] = {}
        for row in rows:
            key = self.tally_key(row)
            tally[key] = tally.get(key, 0) + 1
        sums = {name: sum(value_of(row) for row in rows) for name, value_of in self.sums.items()}
        yield write_table_file(self.directory, self.relative_dir, file_number, self.to_table(rows),
                               self.row_group_rows, tally, sums)


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


ORDER_BLOCK_ROWS = 10_000
ORDER_KEYS = ("file_index", "input_row", "variant")


def _order_blocks(table: pa.Table) -> np.ndarray:
    """Each row's order block: (file_index, input_row // ORDER_BLOCK_ROWS) packed into one int64."""
    files = table.column("file_index").to_numpy().astype(np.int64)
    rows = table.column("input_row").to_numpy().astype(np.int64)
    return (files << 32) | (rows // ORDER_BLOCK_ROWS)


def _source_blocks(source: tuple[str, str]):
    path, kind = source
    with storage.open_file(path) as handle:
        keys = pq.read_table(handle, columns=["file_index", "input_row"])
    blocks, counts = np.unique(_order_blocks(keys), return_counts=True)
    return None, (path, kind, dict(zip(blocks.tolist(), counts.tolist(), strict=True)))


def plan_ordered_files(sources: Iterable[tuple[str, str, dict[int, int]]], rows_per_file: int
                       ) -> Iterator[tuple[int, int, int, int, list[tuple[int, int]],
                                           list[tuple[str, str, list[int]]]]]:
    """Per-source order-block counts -> one task per output file: (file number, first position, end position,
    position of the task's first block, [(block, rows)] of its blocks in order, [(path, kind, blocks to
    take)]). File k holds positions [k * rows_per_file, (k + 1) * rows_per_file) of the global order."""
    sources = sorted(sources)
    totals: dict[int, int] = {}
    for _, _, counts in sources:
        for block, count in counts.items():
            totals[block] = totals.get(block, 0) + count
    ordered = sorted(totals)
    starts = np.cumsum([0] + [totals[block] for block in ordered])
    total = int(starts[-1])
    for number in range(-(-total // rows_per_file)):
        first, end = number * rows_per_file, min(total, (number + 1) * rows_per_file)
        low = int(np.searchsorted(starts, first, side="right")) - 1
        high = int(np.searchsorted(starts, end, side="left"))
        wanted = set(ordered[low:high])
        parts = [(path, kind, sorted(wanted & counts.keys())) for path, kind, counts in sources]
        blocks = [(block, totals[block]) for block in ordered[low:high]]
        yield number, first, end, int(starts[low]), blocks, [part for part in parts if part[2]]


class SortedSource:
    """A file whose rows are sorted by their order keys, open for reading the rows of some order blocks: only
    the row groups whose key statistics can hold them are read (a file without statistics is read whole)."""

    def __init__(self, path: str, columns: Callable[[list[str]], list[str]] | None = None):
        self.handle = storage.open_file(path)
        self.file = pq.ParquetFile(self.handle)
        names = self.file.schema_arrow.names
        self.columns = columns(names) if columns else None
        metadata = self.file.metadata
        leaves = {metadata.schema.column(j).path: j for j in range(metadata.num_columns)}
        self.low, self.high = [], []
        for group in range(metadata.num_row_groups):
            stats = [metadata.row_group(group).column(leaves[name]).statistics for name in ("file_index", "input_row")]
            if any(stat is None or not stat.has_min_max for stat in stats):
                self.low.append(-1)
                self.high.append(np.iinfo(np.int64).max)
                continue
            self.low.append((int(stats[0].min) << 32) | (int(stats[1].min) // ORDER_BLOCK_ROWS))
            self.high.append((int(stats[0].max) << 32) | (int(stats[1].max) // ORDER_BLOCK_ROWS))
        self.low, self.high = np.array(self.low, dtype=np.int64), np.array(self.high, dtype=np.int64)

    def rows(self, blocks: np.ndarray) -> pa.Table | None:
        """The rows whose order block is one of `blocks` (sorted)."""
        groups = np.flatnonzero((self.high >= blocks[0]) & (self.low <= blocks[-1]))
        if not len(groups):
            return None
        table = self.file.read_row_groups(groups.tolist(), columns=self.columns)
        table = table.filter(pa.array(np.isin(_order_blocks(table), blocks)))
        return table if table.num_rows else None

    def close(self) -> None:
        self.handle.close()


def _chunks(blocks: list[tuple[int, int]], chunk_rows: int) -> Iterator[np.ndarray]:
    """Consecutive blocks in groups of at least `chunk_rows` rows (the last may hold fewer)."""
    chunk, rows = [], 0
    for block, count in blocks:
        chunk.append(block)
        rows += count
        if rows >= chunk_rows:
            yield np.array(chunk, dtype=np.int64)
            chunk, rows = [], 0
    if chunk:
        yield np.array(chunk, dtype=np.int64)


class _WriteOrderedFileFn(beam.DoFn):
    """A planned output file, written in chunks of consecutive order blocks: each chunk's rows from every
    source, sorted and cut at the file's positions; row groups are cut at the whole file's positions, so the
    file is the one a single write would give, and memory is one chunk."""

    def __init__(self, directory, relative_dir, to_rows, to_output, row_group_rows, tally, sums, columns,
                 chunk_rows):
        self.directory = directory
        self.relative_dir = relative_dir
        self.to_rows = to_rows
        self.to_output = to_output
        self.row_group_rows = row_group_rows
        self.tally = tally
        self.sums = sums
        self.columns = columns
        self.chunk_rows = chunk_rows

    def process(self, task) -> Iterator[dict[str, Any]]:
        number, first, end, position, blocks, parts = task
        sources = [(SortedSource(path, self.columns), kind, np.array(wanted, dtype=np.int64))
                   for path, kind, wanted in parts]
        tally: dict[str, int] = {}
        sums = dict.fromkeys(self.sums, 0)
        try:
            with storage.writing(part_path(self.directory, self.relative_dir, number)) as sink:
                writer, pending = None, None
                for chunk in _chunks(blocks, max(self.chunk_rows, self.row_group_rows)):
                    tables = []
                    for source, kind, wanted in sources:
                        mine = wanted[np.isin(wanted, chunk)]
                        found = source.rows(mine) if len(mine) else None
                        if found is not None:
                            tables.append(self.to_rows(found, kind))
                    rows = pa.concat_tables(tables).sort_by([(name, "ascending") for name in ORDER_KEYS])
                    low, high = max(first - position, 0), min(end - position, rows.num_rows)
                    position += rows.num_rows
                    if high <= low:
                        continue
                    rows = rows.slice(low, high - low)
                    for key, count in self.tally(rows).items():
                        tally[key] = tally.get(key, 0) + count
                    for name, value_of in self.sums.items():
                        sums[name] += value_of(rows)
                    table = self.to_output(rows)
                    if pending is not None:
                        table = pa.concat_tables([pending, table])
                    last = position >= end
                    cut = table.num_rows if last else table.num_rows - table.num_rows % self.row_group_rows
                    done, pending = table.slice(0, cut), table.slice(cut)
                    if done.num_rows:
                        if writer is None:
                            writer = pq.ParquetWriter(sink, done.schema, compression="zstd")
                        writer.write_table(done, row_group_size=self.row_group_rows)
                    if last:
                        break
                writer.close()
        finally:
            for source, _, _ in sources:
                source.close()
        yield part_meta(self.relative_dir, number, end - first, sink.size, sink.sha256(), tally, sums)


def part_path(directory: str, relative_dir: str, number: int) -> str:
    return FileSystems.join(directory, relative_dir, f"part-{number:05d}.parquet")


def part_meta(relative_dir: str, number: int, rows: int, size: int, sha256: str, tally: dict[str, int],
              sums: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest metadata of `relative_dir/part-NNNNN.parquet`."""
    meta = {
        "dir": relative_dir,
        "file": f"{relative_dir}/part-{number:05d}.parquet",
        "index": number,
        "rows": rows,
        "bytes": size,
        "sha256": sha256,
        "tally": dict(sorted(tally.items())),
    }
    meta.update(sums or {})
    return meta


def write_table_file(directory: str, relative_dir: str, number: int, table: pa.Table, row_group_rows: int,
                     tally: dict[str, int], sums: dict[str, int] | None = None) -> dict[str, Any]:
    """Write `relative_dir/part-NNNNN.parquet`, streamed (its compressed bytes are never held whole); its
    manifest metadata (as WriteFileFn gives it)."""
    with storage.writing(part_path(directory, relative_dir, number)) as sink:
        pq.write_table(table, sink, row_group_size=row_group_rows, compression="zstd")
    return part_meta(relative_dir, number, table.num_rows, sink.size, sink.sha256(), tally, sums)


class WriteOrderedFiles(beam.PTransform):
    """(path, kind) of files whose rows carry ORDER_KEYS, each sorted by them -> DIRECTORY/RELATIVE_DIR/
    part-NNNNN.parquet of `rows_per_file` consecutive rows in that order; returns their metadata. No GroupByKey
    holds the rows: each source's order-block counts are gathered (small), each output file is planned from
    them, and its task reads, a chunk of about `chunk_rows` rows at a time, only the row groups of its
    sources that hold the chunk's blocks. `to_rows(table, kind)` turns a source's rows (the columns that
    `columns(names)` picks, all by default) into rows with ORDER_KEYS, `to_output(rows)` makes the file's
    table; `tally(rows)` and `sums` give its metadata."""

    def __init__(self, directory: str, relative_dir: str, rows_per_file: int, to_rows, to_output,
                 row_group_rows: int, tally, sums=None, columns=None, chunk_rows: int = 100_000):
        super().__init__()
        self.directory = directory
        self.relative_dir = relative_dir
        self.rows_per_file = rows_per_file
        self.to_rows = to_rows
        self.to_output = to_output
        self.row_group_rows = row_group_rows
        self.tally = tally
        self.sums = sums or {}
        self.columns = columns
        self.chunk_rows = chunk_rows

    def expand(self, sources):
        rows_per_file = self.rows_per_file
        return (
            sources
            | "Blocks" >> beam.Map(_source_blocks)
            | "AllBlocks" >> beam.GroupByKey()
            | "Plan" >> beam.FlatMapTuple(lambda _, found: plan_ordered_files(found, rows_per_file))
            | "Spread" >> beam.Reshuffle()
            | "Write" >> beam.ParDo(_WriteOrderedFileFn(
                self.directory, self.relative_dir, self.to_rows, self.to_output, self.row_group_rows,
                self.tally, self.sums, self.columns, self.chunk_rows))
        )
