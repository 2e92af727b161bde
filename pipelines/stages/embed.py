"""Embed stage: sentence embeddings, the model loaded once per worker and fed a window of texts at a time.

Input: valid records (`id`, `text`, `text_hash`, ...). Output: the same records with `embedding` (a unit
float32 vector) and `embedding_reused` (whether it came from the previous run's embeddings).

The stage works on the cache's record files, not on records: one task per file (a block of the validate stage, or
a file of pickled records) reads it, embeds its texts window by window and writes the same rows with the vectors
as a fixed-size-list column (blocks.py) into this stage's cache; no GroupByKey holds records or vectors. A window
is the rows of a file with the same `input_row // embed.window` (a window cut by a file boundary is embedded as
two); every backend (`embed.backend`: torch, onnx fp32/int8, openvino fp32/int8, static; selectors/backends.py)
sorts a window by length before cutting batches of `embed.batch_size`, which keeps padding low.
`embeddings/part-*.parquet` (id, text_hash, embedding, in input order) are cut from the written files by
`WriteOrderedFiles` in a second step, `embeddings`, once the model is let go (stage_run releases a step's models
when its pipeline is done): at int8 OpenVINO holds 2 GiB, and writing the output in the same pipeline put it
on top of that. The stage's records stay where the first step wrote them, in the cache entry's `embed/` folder.

When the previous run's embeddings exist for the same model, texts whose hash is there are not embedded again:
each worker indexes the previous files' text hashes once (16 bytes per previous row) and reads the vectors of a
file's matches from the previous files' row groups that hold them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError

from winnow.pipelines.engine import file_resume
from winnow.pipelines.engine.embed_model import EmbedHandler, EmbedPlan
from winnow.pipelines.engine.model_stage import acquire_model, model_lock
from winnow.pipelines.engine.progress import Progress
from winnow.pipelines.engine.stage import (
    ManifestContext,
    PlanContext,
    Stage,
    Step,
    StepContext,
    StepOutput,
    config_section,
)
from winnow.pipelines.io.blocks import REUSED_COLUMN, VECTOR_COLUMN, is_block, vector_array, vector_matrix, write_block
from winnow.pipelines.io.cache_files import RECORDS, read_cache_table, table_elements, write_records_file
from winnow.pipelines.io.ordered_io import WriteOrderedFiles
from winnow.pipelines.io.storage import join, list_files, open_file, read_json

EMBEDDINGS_DIR = "embeddings"
VECTOR_CHUNK_ROWS = 16_384  # the embeddings output holds this many vectors at once (24 MiB at 384 dimensions)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [("id", pa.string()), ("text_hash", pa.string()), ("embedding", pa.list_(pa.float32(), dim))]
    )


def read_embeddings(directory: str | Path) -> tuple[list[str], np.ndarray]:
    """Ids and the (n, dim) float32 matrix of an output's embeddings, in input order (files as its manifest
    lists them)."""
    directory = str(directory)
    files = read_json(join(directory, "manifest.json"))["embeddings"]["files"]
    tables = []
    for entry in files:
        with open_file(join(directory, entry["file"])) as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    return table.column("id").to_pylist(), vector_matrix(table.column("embedding"))


def _hash_keys(text_hashes: list[str]) -> np.ndarray:
    """The first 64 bits of each text hash (hex BLAKE2b): what the previous embeddings are indexed by."""
    return np.fromiter((int(value[:16], 16) for value in text_hashes), dtype=np.uint64, count=len(text_hashes))


class PreviousEmbeddings:
    """The previous output's embeddings files, indexed by text hash: sorted 64-bit keys with each one's file and
    row (16 bytes a row); vectors are read on demand, a row group at a time."""

    def __init__(self, paths: tuple[str, ...]):
        self.paths = paths
        keys, files, rows, self.group_starts = [], [], [], []
        for number, path in enumerate(paths):
            with open_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                hashes = parquet.read(columns=["text_hash"]).column(0).to_pylist()
                sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            self.group_starts.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            keys.append(_hash_keys(hashes))
            files.append(np.full(len(hashes), number, dtype=np.int32))
            rows.append(np.arange(len(hashes), dtype=np.int64))
        key = np.concatenate([np.zeros(0, np.uint64), *keys])
        order = np.argsort(key, kind="stable")  # equal keys: the first in file order wins
        self.keys = key[order]
        self.files = np.concatenate([np.zeros(0, np.int32), *files])[order]
        self.rows = np.concatenate([np.zeros(0, np.int64), *rows])[order]

    def find(self, text_hashes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(mask of the rows whose text hash the previous output has, their vectors in row order)."""
        wanted = _hash_keys(text_hashes)
        at = np.minimum(np.searchsorted(self.keys, wanted), max(len(self.keys) - 1, 0))
        found = (at < len(self.keys)) & (self.keys[at] == wanted) if len(self.keys) else \
            np.zeros(len(wanted), dtype=bool)
        if not found.any():
            return found, None
        vectors: dict[int, np.ndarray] = {}
        rows = np.flatnonzero(found)
        files, positions = self.files[at[rows]], self.rows[at[rows]]
        for number in np.unique(files).tolist():
            mine = files == number
            starts = self.group_starts[number]
            group_of = np.searchsorted(starts, positions[mine], side="right") - 1
            groups = np.unique(group_of)
            with open_file(self.paths[number]) as handle:
                table = pq.ParquetFile(handle).read_row_groups(groups.tolist(), columns=["text_hash", "embedding"])
            read_start = np.cumsum(np.r_[0, starts[groups + 1] - starts[groups]])  # each group's first row read
            local = read_start[np.searchsorted(groups, group_of)] + positions[mine] - starts[group_of]
            matrix = vector_matrix(table.column("embedding"))
            previous_hashes = table.column("text_hash").to_pylist()
            for row, index in zip(rows[mine].tolist(), local.tolist(), strict=True):
                if previous_hashes[index] == text_hashes[row]:  # the full hash, not only its first 64 bits
                    vectors[row] = matrix[index]
        found[:] = False
        found[list(vectors)] = True
        ordered = [vectors[row] for row in sorted(vectors)]
        return found, np.stack(ordered) if ordered else None


_PREVIOUS: dict[tuple[str, ...], PreviousEmbeddings] = {}


def previous_embeddings(paths: tuple[str, ...]) -> PreviousEmbeddings:
    """The worker's index of the previous embeddings (built once per process)."""
    if paths not in _PREVIOUS:
        _PREVIOUS.clear()
        _PREVIOUS[paths] = PreviousEmbeddings(paths)
    return _PREVIOUS[paths]


class _EmbedFileFn(beam.DoFn):
    """A cache file of records -> the same rows with their vectors, written into this stage's cache (a typed
    block for a block, pickled records for pickled records); its file metadata."""

    def __init__(self, plan: EmbedPlan, directory: str, compression: str, resume: str):
        self.plan = plan
        self.directory = directory
        self.compression = compression
        self.resume = resume
        self.busy_ms = beam.metrics.Metrics.distribution(EmbedHandler.namespace, "busy_ms")
        self.embedded = beam.metrics.Metrics.counter(EmbedHandler.namespace, EmbedHandler.counter)
        self.reused = beam.metrics.Metrics.counter(EmbedHandler.namespace, "texts_reused")

    def setup(self):
        self.held = None
        self.handler = EmbedHandler(self.plan)
        self.progress = Progress(EmbedHandler.label, self.plan.expected_records, EmbedHandler.unit)

    def _model(self):
        if self.held is None:
            self.held = acquire_model(self.handler)
        return self.held.value

    def _vectors(self, file_index: np.ndarray, input_row: np.ndarray, texts: list[str],
                 text_hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each row's vector (rows in input order) and whether it was reused."""
        import time

        count = len(texts)
        reused = np.zeros(count, dtype=bool)
        vectors: np.ndarray | None = None
        if self.plan.reuse_from:
            reused, previous = previous_embeddings(self.plan.reuse_from).find(text_hashes)
            if previous is not None:
                vectors = np.zeros((count, previous.shape[1]), dtype=np.float32)
                vectors[reused] = previous
        todo = np.flatnonzero(~reused)
        windows = file_index[todo] * (1 << 40) + input_row[todo] // self.plan.window
        bounds = np.flatnonzero(np.r_[True, windows[1:] != windows[:-1], True]) if len(todo) else [0]
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            rows = todo[start:stop]
            with model_lock(self.handler):
                started = time.perf_counter()
                window = self._model().encode([texts[row] for row in rows.tolist()], self.plan.batch_size)
            self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
            if vectors is None:
                vectors = np.zeros((count, window.shape[1]), dtype=np.float32)
            vectors[rows] = window
            self.embedded.inc(len(rows))
            self.progress.advance(len(rows))
        self.reused.inc(int(reused.sum()))
        self.progress.advance(int(reused.sum()))
        return vectors, reused

    def process(self, path: str) -> Iterator[dict[str, Any]]:
        relative = f"{RECORDS}/{posixpath.basename(path)}"
        meta, taken = file_resume.take_or_compute(self.resume, self.directory, relative,
                                                  lambda: self._embed_file(path, relative))
        if taken:
            self.progress.advance(meta["rows"])
        yield meta

    def _embed_file(self, path: str, relative: str) -> dict[str, Any]:
        table = read_cache_table(path)
        if is_block(table.schema):
            table = table.sort_by([("file_index", "ascending"), ("input_row", "ascending")])
            vectors, reused = self._vectors(
                table.column("file_index").to_numpy(), table.column("input_row").to_numpy(),
                table.column("text").to_pylist(), table.column("text_hash").to_pylist())
            if table.num_rows:
                table = table.append_column(VECTOR_COLUMN, vector_array(vectors))
                table = table.append_column(REUSED_COLUMN, pa.array(reused))
            return write_block(self.directory, relative, table, self.compression)
        records = sorted(table_elements(table), key=lambda r: (r["file_index"], r["input_row"], r.get("variant", 0)))
        vectors, reused = self._vectors(
            np.array([r["file_index"] for r in records], dtype=np.int64),
            np.array([r["input_row"] for r in records], dtype=np.int64),
            [r["text"] for r in records], [r["text_hash"] for r in records])
        return write_records_file(self.directory, relative, [
            {**record, VECTOR_COLUMN: vectors[index], REUSED_COLUMN: bool(reused[index])}
            for index, record in enumerate(records)])


_EMBEDDED_COLUMNS = ("file_index", "input_row", "variant", "id", "text_hash", VECTOR_COLUMN, REUSED_COLUMN)


def _embedded_columns(names: list[str]) -> list[str]:
    """What the embeddings output reads of an embedded cache file (pickled records are one column)."""
    return [name for name in names if name in _EMBEDDED_COLUMNS or name == "record"]


def _embedded_schema(dim: int) -> pa.Schema:
    return pa.schema([("file_index", pa.int64()), ("input_row", pa.int64()), ("variant", pa.int64()),
                      ("id", pa.string()), ("text_hash", pa.string()), (VECTOR_COLUMN, pa.list_(pa.float32(), dim)),
                      (REUSED_COLUMN, pa.bool_())])


def _embedded_rows(table: pa.Table, kind: str) -> pa.Table:
    """Rows of an embedded cache file (a block, or pickled records) as rows of the embeddings output, with
    their order keys and reuse flags, in one schema whatever the file's kind."""
    if is_block(table.schema):
        dim = table.schema.field(VECTOR_COLUMN).type.list_size
        variant = pa.array(np.zeros(table.num_rows, dtype=np.int64))
        return table.append_column("variant", variant).select(_embedded_schema(dim).names) \
            .cast(_embedded_schema(dim))
    records = list(table_elements(table))
    vectors = np.stack([r[VECTOR_COLUMN] for r in records])
    return pa.Table.from_arrays([
        pa.array([r["file_index"] for r in records], pa.int64()),
        pa.array([r["input_row"] for r in records], pa.int64()),
        pa.array([r.get("variant", 0) for r in records], pa.int64()),
        pa.array([r["id"] for r in records], pa.string()),
        pa.array([r["text_hash"] for r in records], pa.string()),
        vector_array(vectors),
        pa.array([r[REUSED_COLUMN] for r in records], pa.bool_()),
    ], schema=_embedded_schema(vectors.shape[1]))


def _embeddings_output(rows: pa.Table) -> pa.Table:
    vectors = rows.column(VECTOR_COLUMN)
    return rows.select(["id", "text_hash", VECTOR_COLUMN]).cast(embeddings_schema(vectors.type.list_size))


def _reuse_tally(rows: pa.Table) -> dict[str, int]:
    reused = int(pc.sum(rows.column(REUSED_COLUMN).cast(pa.int64())).as_py() or 0)
    tally = {"reused": reused, "computed": rows.num_rows - reused}
    return {key: count for key, count in tally.items() if count}


def _previous_embeddings(output: str, plan: EmbedPlan) -> tuple[str, ...] | None:
    """The previous output's embeddings files, when they were made by the same model, backend and precision
    (vectors of two backends are never mixed) and are all there (paths from its manifest: on an object store
    they sit under that run's prefix)."""
    try:
        manifest = read_json(join(output, "manifest.json"))
    except (OSError, ValueError, BeamIOError):
        return None
    previous = manifest.get("embeddings") or {}
    made_by = (previous.get("fingerprint"), previous.get("backend", "torch"), previous.get("precision", "fp32"))
    if made_by != (plan.fingerprint, plan.backend, plan.precision) or not previous.get("files"):
        return None
    paths = tuple(join(output, entry["file"]) for entry in previous["files"])
    present = list_files(join(output, posixpath.dirname(previous["files"][0]["file"])))
    if not all(path in present for path in paths):
        return None
    return paths


def _plan(context: PlanContext) -> EmbedPlan:
    config = context.config.embed
    plan = replace(EmbedPlan.from_config(config, context.workers), expected_records=context.expected_records)
    if config.reuse:
        plan = replace(plan, reuse_from=_previous_embeddings(context.output, plan))
    return plan


def _embed(plan: EmbedPlan):
    def build(pipeline, files, context: StepContext) -> StepOutput:
        written = (
            files  # stage_run's Create of the files spreads them (a Reshuffle)
            | "Embed" >> beam.ParDo(_EmbedFileFn(plan, context.directory, context.compression, context.resume))
        )
        return StepOutput(None, [], [written])
    return build


def _write_embeddings(pipeline, files, context: StepContext) -> StepOutput:
    """The embeddings output, cut from the embed step's files in input order."""
    output = context.job.config.output
    embeddings = (
        files
        | "Embedded" >> beam.Map(lambda path: (path, RECORDS))
        | "WriteEmbeddings" >> WriteOrderedFiles(
            context.directory, EMBEDDINGS_DIR, output.ledger_rows, _embedded_rows, _embeddings_output,
            output.row_group_rows, _reuse_tally, columns=_embedded_columns, chunk_rows=VECTOR_CHUNK_ROWS)
    )
    return StepOutput(None, [], [embeddings])


def _steps(plan: EmbedPlan, config) -> list[Step]:
    settings = config_section(config, "embed", exclude=("reuse", "torch_threads", "export_dir"))
    return [
        Step("embed", _embed(plan), {"embed": settings}, {"model": plan.fingerprint, "device": plan.device},
             adds_vectors=True, reads_files=True, resumes_files=True),
        Step(EMBEDDINGS_DIR, _write_embeddings, {"output": {"rows": config.output.ledger_rows,
                                                            "row_group_rows": config.output.row_group_rows}},
             reads_vectors=True, reads_files=True, writes_records=False),
    ]


def _manifest(context: ManifestContext) -> dict[str, Any]:
    vectors = sorted((f for f in context.files if f["dir"] == EMBEDDINGS_DIR), key=lambda f: f.get("index", 0))
    tally: dict[str, int] = {}
    for entry in vectors:
        for key, rows in entry["tally"].items():
            tally[key] = tally.get(key, 0) + rows
    if context.result.reused:
        tally = {"reused": sum(tally.values())}  # this run computed none: the whole stage came from the cache
    return {"embeddings": {
        **{k: v for k, v in asdict(context.plan).items() if k != "reuse_from"},
        "reused_rows": tally.get("reused", 0),
        "computed_rows": tally.get("computed", 0),
        "files": [{key: f[key] for key in ("file", "rows", "bytes", "sha256")} for f in vectors],
    }}


STAGE = Stage(
    name="embed",
    module=__name__,
    section="embed",
    enabled=lambda config: config.embed.enabled is True,  # auto: added before a stage that reads embeddings
    plan=_plan,
    steps=_steps,
    libraries=("torch", "transformers", "sentence-transformers", "numpy"),
    manifest=_manifest,
    output_dirs=(EMBEDDINGS_DIR,),
    on_force=lambda plan: replace(plan, reuse_from=None),
)
