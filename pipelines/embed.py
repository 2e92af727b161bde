"""Embed stage: sentence embeddings, the model loaded once per worker and fed a window of texts at a time.

Input: valid records (`id`, `text`, `text_hash`, ...). Output: the same records with `embedding` (a unit
float32 vector) and `embedding_reused` (whether it came from the previous run's embeddings).

Records are grouped into windows of up to `embed.window` consecutive input rows, and the model gets one
window at a time (model_stage.RunModel with EmbedHandler); sentence-transformers sorts each window by length
before cutting batches of `embed.batch_size`, which keeps padding low.
When the previous run's embeddings exist for the same model, texts whose hash is there are not embedded again.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import BeamIOError

from winnow.pipelines.config import EmbedConfig
from winnow.pipelines.model_stage import ModelHandler, RunModel
from winnow.pipelines.ordered_io import AssignPositions, WriteOrderedParquet
from winnow.pipelines.records import order_key, split_routed
from winnow.pipelines.stage import ManifestContext, PlanContext, Stage, Step, StepContext, StepOutput, config_section
from winnow.pipelines.storage import join, list_files, open_file, read_json
from winnow.selectors import embedding

EMBEDDINGS_DIR = "embeddings"
REUSED, TO_EMBED = "reused", "to_embed"


@dataclass(frozen=True)
class EmbedPlan:
    """What the driver decided about the embed stage, recorded in the manifest."""

    model: str
    model_path: str
    fingerprint: str
    device: str
    torch_threads: int
    batch_size: int
    window: int
    max_seq_length: int | None
    reuse_from: tuple[str, ...] | None = None
    expected_records: int | None = None

    @classmethod
    def from_config(cls, config: EmbedConfig, workers: int, reuse_from: tuple[str, ...] | None = None) -> EmbedPlan:
        path = embedding.resolve_model_path(config.model)
        return cls(
            model=config.model,
            model_path=str(path),
            fingerprint=embedding.model_fingerprint(path),
            device=embedding.choose_device(config.device),
            torch_threads=embedding.threads_per_worker(config.torch_threads, workers),
            batch_size=config.batch_size,
            window=config.window,
            max_seq_length=config.max_seq_length,
            reuse_from=reuse_from,
        )


class EmbedHandler(ModelHandler):
    """The sentence-transformers model: a window of records -> the records with their vectors."""

    namespace, counter, label, unit = "winnow.embed", "texts_embedded", "embed", "texts"

    def __init__(self, plan: EmbedPlan):
        super().__init__(plan.torch_threads)
        self.plan = plan

    def tag(self) -> str:
        return f"{self.plan.fingerprint}:{self.plan.device}:{self.plan.max_seq_length}"

    def load(self):
        return embedding.load_model(self.plan.model_path, self.plan.device, self.plan.max_seq_length)

    def expected(self) -> int | None:
        return self.plan.expected_records

    def run(self, model, records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        vectors = embedding.encode(model(), [record["text"] for record in records], self.plan.batch_size)
        for record, vector in zip(records, vectors, strict=True):
            yield _attach(record, vector, False)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [("id", pa.string()), ("text_hash", pa.string()), ("embedding", pa.list_(pa.float32(), dim))]
    )


def embeddings_table(records: list[dict[str, Any]]) -> pa.Table:
    """The embeddings file of some records: id, text_hash and the vector as a fixed-size list."""
    matrix = np.stack([record["embedding"] for record in records]).astype(np.float32, copy=False)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    return pa.Table.from_arrays(
        [pa.array([r["id"] for r in records]), pa.array([r["text_hash"] for r in records]), vectors],
        schema=embeddings_schema(matrix.shape[1]),
    )


def read_embeddings(directory: str | Path) -> tuple[list[str], np.ndarray]:
    """Ids and the (n, dim) float32 matrix of an output's embeddings, in input order (files as its manifest
    lists them)."""
    import pyarrow.parquet as pq

    directory = str(directory)
    files = read_json(join(directory, "manifest.json"))["embeddings"]["files"]
    tables = []
    for entry in files:
        with open_file(join(directory, entry["file"])) as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    column = table.column("embedding").combine_chunks()
    matrix = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return table.column("id").to_pylist(), matrix


def _attach(record: dict[str, Any], vector: np.ndarray, reused: bool) -> dict[str, Any]:
    return {**record, "embedding": np.asarray(vector, dtype=np.float32), "embedding_reused": reused}


class _ReuseFn(beam.DoFn):
    """Per text hash: records with a previous vector get it; the others go on to be embedded."""

    def process(self, element) -> Iterator[Any]:
        _, grouped = element
        records, previous = grouped["records"], list(grouped["previous"])
        for record in records:
            if previous:
                yield REUSED, _attach(record, previous[0], True)
            else:
                yield TO_EMBED, record


def _previous_vectors(path: str) -> Iterator[tuple[str, list[float]]]:
    """(text_hash, vector) of each row of a previous output's embeddings file, on any filesystem."""
    import pyarrow.parquet as pq

    with open_file(path) as handle:
        table = pq.read_table(handle, columns=["text_hash", "embedding"])
    yield from zip(table.column("text_hash").to_pylist(), table.column("embedding").to_pylist(), strict=True)


class EmbedRecords(beam.PTransform):
    """valid records -> records with `embedding`."""

    def __init__(self, plan: EmbedPlan):
        super().__init__()
        self.plan = plan

    def expand(self, records):
        reused = None
        to_embed = records
        if self.plan.reuse_from:
            previous = (
                records.pipeline
                | "PreviousFiles" >> beam.Create(list(self.plan.reuse_from))
                | "SpreadPrevious" >> beam.Reshuffle()
                | "ReadPrevious" >> beam.FlatMap(_previous_vectors)
            )
            split = split_routed(
                {"records": records | "KeyByHash" >> beam.Map(lambda r: (r["text_hash"], r)), "previous": previous}
                | "JoinPrevious" >> beam.CoGroupByKey()
                | "Reuse" >> beam.ParDo(_ReuseFn()),
                "Reuse",
                (REUSED, TO_EMBED),
            )
            reused, to_embed = split[REUSED], split[TO_EMBED]
        window = self.plan.window
        embedded = (
            to_embed
            | "WindowKey" >> beam.Map(lambda r: ((r["file_index"], r["input_row"] // window), r))
            | "Windows" >> beam.GroupByKey()
            | "Encode" >> beam.ParDo(RunModel(EmbedHandler(self.plan)))
        )
        if reused is None:
            return embedded
        return (reused, embedded) | "AllEmbedded" >> beam.Flatten()


def _previous_embeddings(output: str, fingerprint: str) -> tuple[str, ...] | None:
    """The previous output's embeddings files, when they were made by the same model and are all there (paths
    from its manifest: on an object store they sit under that run's prefix)."""
    try:
        manifest = read_json(join(output, "manifest.json"))
    except (OSError, ValueError, BeamIOError):
        return None
    previous = manifest.get("embeddings") or {}
    if previous.get("fingerprint") != fingerprint or not previous.get("files"):
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
        plan = replace(plan, reuse_from=_previous_embeddings(context.output, plan.fingerprint))
    return plan


def _embed_and_write(plan: EmbedPlan):
    def build(pipeline, records, context: StepContext) -> StepOutput:
        output = context.job.config.output
        embedded = records | "Embed" >> EmbedRecords(plan)
        written = (
            embedded
            | "OrderEmbeddings" >> AssignPositions(order_key)
            | "WriteEmbeddings"
            >> WriteOrderedParquet(
                context.directory, EMBEDDINGS_DIR, output.ledger_rows, embeddings_table, output.row_group_rows,
                tally_key=lambda record: "reused" if record["embedding_reused"] else "computed",
            )
        )
        return StepOutput(embedded, [], [written])
    return build


def _steps(plan: EmbedPlan, config) -> list[Step]:
    settings = config_section(config, "embed", exclude=("reuse", "torch_threads"))
    return [Step("embed", _embed_and_write(plan), {"embed": settings},
                 {"model": plan.fingerprint, "device": plan.device}, adds_vectors=True)]


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
