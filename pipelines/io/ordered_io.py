"""Ordered Parquet output without collecting a collection on one worker.

`WriteOrderedFiles` (the ledger, the shards without the mix, the embeddings) moves no rows through a
GroupByKey: its sources are files of rows that carry their input order keys, sorted by them; each output file
is planned from per-block counts and written a chunk of order blocks at a time from the row groups that hold
them. Files are named `part-00000.parquet`, ... so that reading them in name order gives the global order; each
file's metadata (rows, bytes, SHA-256, a tally, optional sums) goes to the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from winnow.pipelines.io import storage


def table_bytes(table: pa.Table, row_group_rows: int, compression: str = "zstd", dictionary: bool = True) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression=compression, use_dictionary=dictionary)
    return sink.getvalue().to_pybytes()


def write_bytes(path: str, payload: bytes) -> None:
    storage.write_bytes(path, payload)


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
        """The rows whose order block is one of `blocks` (sorted; consecutive among this file's blocks, as a
        chunk's are): a slice of the row groups that can hold them where their keys are in order (copying
        them with a filter took a third of a ledger file's time), else those rows filtered."""
        groups = np.flatnonzero((self.high >= blocks[0]) & (self.low <= blocks[-1]))
        if not len(groups):
            return None
        table = self.file.read_row_groups(groups.tolist(), columns=self.columns)
        keys = _order_blocks(table)
        if len(keys) and np.all(keys[1:] >= keys[:-1]):
            start = int(np.searchsorted(keys, blocks[0], side="left"))
            stop = int(np.searchsorted(keys, blocks[-1], side="right"))
            table = table.slice(start, stop - start)
        else:
            table = table.filter(pa.array(np.isin(keys, blocks)))
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


def _ahead(items: Iterator[Any]) -> Iterator[Any]:
    """The items of an iterator, each next one made in a thread while the caller works on the current one: a
    file's task reads and sorts its next chunk while it encodes this one (Arrow does both without the GIL), so
    a job's one ledger file takes the time of its writing, not of its reading and writing."""
    done = object()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(next, items, done)
        while True:
            item = pending.result()
            if item is done:
                return
            pending = pool.submit(next, items, done)
            yield item


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

    def _chunk_rows(self, sources, blocks) -> Iterator[pa.Table]:
        """Each chunk's rows from every source, sorted."""
        for chunk in _chunks(blocks, max(self.chunk_rows, self.row_group_rows)):
            tables = []
            for source, kind, wanted in sources:
                mine = wanted[np.isin(wanted, chunk)]
                found = source.rows(mine) if len(mine) else None
                if found is not None:
                    tables.append(self.to_rows(found, kind))
            yield pa.concat_tables(tables).combine_chunks().sort_by([(name, "ascending") for name in ORDER_KEYS])

    def process(self, task) -> Iterator[dict[str, Any]]:
        number, first, end, position, blocks, parts = task
        sources = [(SortedSource(path, self.columns), kind, np.array(wanted, dtype=np.int64))
                   for path, kind, wanted in parts]
        tally: dict[str, int] = {}
        sums = dict.fromkeys(self.sums, 0)
        try:
            with storage.writing(part_path(self.directory, self.relative_dir, number)) as sink:
                writer, pending = None, None
                for rows in _ahead(self._chunk_rows(sources, blocks)):
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


class PlanOrderedFiles(beam.PTransform):
    """(path, kind) of files whose rows carry ORDER_KEYS, each sorted by them -> one task per output file of
    `rows_per_file` consecutive rows in that order, for `ordered_file_writer`: each source's order-block counts are
    gathered (small) and each output file is planned from them; no GroupByKey holds the rows."""

    def __init__(self, rows_per_file: int):
        super().__init__()
        self.rows_per_file = rows_per_file

    def expand(self, sources):
        rows_per_file = self.rows_per_file
        return (
            sources
            | "Blocks" >> beam.Map(_source_blocks)
            | "AllBlocks" >> beam.GroupByKey()
            | "Plan" >> beam.FlatMapTuple(lambda _, found: plan_ordered_files(found, rows_per_file))
            | "Spread" >> beam.Reshuffle()
        )


def ordered_file_writer(directory: str, relative_dir: str, to_rows, to_output, row_group_rows: int, tally,
                      sums=None, columns=None, chunk_rows: int = 100_000) -> beam.DoFn:
    """The DoFn that writes the tasks of `PlanOrderedFiles` as DIRECTORY/RELATIVE_DIR/part-NNNNN.parquet, a chunk
    of about `chunk_rows` rows at a time, reading only the row groups of its sources that hold the chunk's
    blocks; it yields each file's metadata. `to_rows(table, kind)` turns a source's rows (the columns that
    `columns(names)` picks, all by default) into rows with ORDER_KEYS, `to_output(rows)` makes the file's
    table; `tally(rows)` and `sums` give its metadata."""
    return _WriteOrderedFileFn(directory, relative_dir, to_rows, to_output, row_group_rows, tally, sums or {},
                               columns, chunk_rows)


class WriteOrderedFiles(beam.PTransform):
    """(path, kind) of files whose rows carry ORDER_KEYS, each sorted by them -> DIRECTORY/RELATIVE_DIR/
    part-NNNNN.parquet of `rows_per_file` consecutive rows in that order; returns their metadata
    (`PlanOrderedFiles`, then `ordered_file_writer`'s DoFn, whose arguments the rest are)."""

    def __init__(self, directory: str, relative_dir: str, rows_per_file: int, to_rows, to_output,
                 row_group_rows: int, tally, sums=None, columns=None, chunk_rows: int = 100_000):
        super().__init__()
        self.rows_per_file = rows_per_file
        self.writer = ordered_file_writer(directory, relative_dir, to_rows, to_output, row_group_rows, tally, sums,
                                        columns, chunk_rows)

    def expand(self, sources):
        return sources | "Plan" >> PlanOrderedFiles(self.rows_per_file) | "Write" >> beam.ParDo(self.writer)


class _WriteTasksFn(beam.DoFn):
    """(kind, task) -> what the writer DoFn of that kind yields for the task."""

    def __init__(self, writers: dict[str, beam.DoFn]):
        self.writers = writers

    def process(self, element) -> Iterator[Any]:
        kind, task = element
        yield from self.writers[kind].process(task)


class WriteTasks(beam.PTransform):
    """{kind: PCollection of tasks} -> what `writers[kind]` yields for each, in one stage: a job's output files
    of every kind (shards, the ledger) are written side by side by all workers, so a kind with fewer files
    than workers (the ledger: one file per million records) does not run alone at the end of the job. The
    writers are plain DoFns whose `process` is all they use."""

    def __init__(self, writers: dict[str, beam.DoFn]):
        super().__init__()
        self.writers = writers

    def expand(self, tasks: dict[str, Any]):
        tagged = [tasks[kind] | f"Tag{kind.title()}" >> beam.Map(lambda task, kind=kind: (kind, task))
                  for kind in sorted(tasks)]
        return tagged | "AllTasks" >> beam.Flatten() | "WriteAll" >> beam.ParDo(_WriteTasksFn(self.writers))
