"""Records as Arrow blocks: the typed Parquet files that the validate stage writes into the stage cache.

A block is the validated rows of one read task (a Parquet row group), written from the DoFn that read it, so no
GroupByKey ever holds the corpus. Its columns:
  file_index, input_row      input order
  id, text, source, input_file, text_hash, note
  extra:NAME                 every passed-through input column, with its input Arrow type
  embedding, embedding_reused  after the embed stage: the unit float32 vector (a fixed-size list, so a
                             block's vectors are one contiguous float32 buffer) and whether it was reused
  cluster, dist_to_centroid  after the prune stage: the record's cluster and 1 - its cosine to the centroid
  select_score, sae_score    after the select stage (sae_score: MONA); between its steps also
                             select_features, the record's values of the prototype's SAE features, and
                             with a shortlist, shortlist_score
Stages that still work on record dicts read a block as records (`block_records`), and cache files written from
records (pickled dicts, `stage_cache.WriteCache`) are read the same way: `read_cache_file` takes either.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.pipelines.io import native
from winnow.pipelines.io.extra_kinds import arrow_kind, as_meta, value_kind
from winnow.pipelines.io.storage import join, write_parquet

EXTRA_PREFIX = "extra:"
CORE_COLUMNS = [
    ("file_index", pa.int64()),
    ("input_row", pa.int64()),
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("input_file", pa.string()),
    ("text_hash", pa.string()),
    ("note", pa.string()),
]
BLOCK_ROW_GROUP = 5_000
VECTOR_COLUMN, REUSED_COLUMN = "embedding", "embedding_reused"
SCORE_COLUMNS = ("cluster", "dist_to_centroid", "select_score", "sae_score",  # set by prune and select
                 "shortlist_score")  # the select shortlist step's cheap score, between select's steps
FEATURES_COLUMN = "select_features"  # the select scores step's per-record SAE feature values (a map column)


def is_block(schema: pa.Schema) -> bool:
    """A typed block (not a file of pickled records)."""
    return "record" not in schema.names


def block_table(core: dict[str, Any], extras: pa.Table | None) -> pa.Table:
    """A block from its core columns (arrays or lists, see CORE_COLUMNS) and the passed-through columns."""
    arrays = [pa.array(core[name], kind) if not isinstance(core[name], (pa.Array, pa.ChunkedArray))
              else core[name].cast(kind) for name, kind in CORE_COLUMNS]
    names = [name for name, _ in CORE_COLUMNS]
    if extras is not None:
        for name in extras.column_names:
            arrays.append(extras.column(name))
            names.append(EXTRA_PREFIX + name)
    return pa.table(arrays, names=names)


def vector_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """An (n, dim) float32 matrix as an Arrow column of fixed-size lists (no copy of the floats)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def embedded_block(core: dict[str, Any], vectors: np.ndarray, extras: pa.Table | None = None) -> pa.Table:
    """A block as the embed stage leaves it, from its core columns and fresh (not reused) vectors: for benches
    and tests that start a later stage from known vectors without running embed."""
    table = block_table(core, extras).append_column(VECTOR_COLUMN, vector_array(vectors))
    return table.append_column(REUSED_COLUMN, pa.array(np.zeros(len(vectors), dtype=bool)))


def vector_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as an (n, dim) float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)[column.offset * column.type.list_size:]
    return values[: len(column) * column.type.list_size].reshape(len(column), column.type.list_size)


def block_records(table: pa.Table, drop: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """A block's rows as record dicts, as the per-record stages know them (records.py)."""
    vectors = vector_matrix(table.column(VECTOR_COLUMN)) \
        if VECTOR_COLUMN in table.column_names and VECTOR_COLUMN not in drop else None
    columns = {name: table.column(name).to_pylist() for name in table.column_names if name != VECTOR_COLUMN}
    extras = [name for name in table.column_names if name.startswith(EXTRA_PREFIX)]
    for index in range(table.num_rows):
        record = {
            "id": columns["id"][index],
            "text": columns["text"][index],
            "source": columns["source"][index],
            "extra": {name[len(EXTRA_PREFIX):]: columns[name][index] for name in extras},
            "input_file": columns["input_file"][index],
            "input_row": columns["input_row"][index],
            "file_index": columns["file_index"][index],
        }
        if columns["note"][index] is not None:
            record["note"] = columns["note"][index]
        record["text_hash"] = columns["text_hash"][index]
        for name in SCORE_COLUMNS:
            if name in columns and columns[name][index] is not None:
                record[name] = columns[name][index]
        if FEATURES_COLUMN in columns:
            record[FEATURES_COLUMN] = dict(columns[FEATURES_COLUMN][index] or ())
        if vectors is not None:
            record[VECTOR_COLUMN] = vectors[index].copy()  # writable, as the stages have always had it
            record[REUSED_COLUMN] = columns[REUSED_COLUMN][index]
        for name in drop:
            record.pop(name, None)
        yield record


def block_compression(cached: bool) -> str:
    """Blocks kept in the stage cache are zstd; a run without the cache (`output.cache: false`) writes them
    plain: each is read once, by the next step of the same job, and deleted with the job (zstd blocks of the
    tiled Debian corpus took 5x as long to write and 2x to read, for 3.5x less disk)."""
    return "zstd" if cached else "none"


def write_block(directory: str, relative: str, table: pa.Table, compression: str = "zstd") -> dict[str, Any]:
    """Write a block (deterministic name: a retried bundle overwrites it); its file metadata. `compression`:
    see `block_compression`."""
    # texts and ids repeat too little to pay for dictionaries
    size = write_parquet(join(directory, relative), table, BLOCK_ROW_GROUP, compression, dictionary=False)
    return {"dir": relative.split("/", 1)[0], "file": relative, "rows": table.num_rows, "bytes": size,
            "extra_kinds": as_meta(block_kinds(table))}


def block_kinds(table: pa.Table) -> dict[str, set[str]]:
    """{column: value kinds} of a block's passed-through columns: its column types say them, unless a column is
    all null (no kind: it fits any) or of a type without a kind of its own (each value's). A block without
    rows has none: its columns carry no value."""
    kinds: dict[str, set[str]] = {}
    if not table.num_rows:
        return kinds
    for name in table.column_names:
        if not name.startswith(EXTRA_PREFIX):
            continue
        column = table.column(name)
        found = kinds.setdefault(name[len(EXTRA_PREFIX):], set())
        if column.null_count == len(column):
            continue
        kind = arrow_kind(column.type)
        if kind is not None:
            found.add(kind)
        else:
            found.update(value_kind(value) for value in column.to_pylist() if value is not None)
    return kinds


def id_hashes(ids: pa.Array | list[str]) -> np.ndarray:
    """64-bit BLAKE2b of each id (little-endian): duplicate candidates are found on these, then confirmed on
    the ids."""
    ids = native.one_chunk(ids)
    ids = ids.cast(pa.string()) if isinstance(ids, pa.Array) else pa.array(ids, pa.string())
    return native.digest_integers(ids, "little") if len(ids) else np.zeros(0, dtype=np.uint64)
