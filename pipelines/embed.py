"""Embed stage: sentence embeddings through Beam's RunInference, the model loaded once per worker.

Input: valid records (`id`, `text`, `text_hash`, ...). Output: the same records with `embedding` (a unit
float32 vector) and `embedding_reused` (whether it came from the previous run's embeddings).

RunInference hands the model windows of up to `embed.window` texts; sentence-transformers sorts each window by
length before cutting batches of `embed.batch_size`, which keeps padding low. When the previous run's
embeddings exist for the same model, texts whose hash is there are not embedded again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from winnow.pipelines.config import EmbedConfig
from winnow.selectors import embedding

EMBEDDINGS_DIR = "embeddings"


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
    reuse_from: str | None = None

    @classmethod
    def from_config(cls, config: EmbedConfig, workers: int, reuse_from: str | None = None) -> EmbedPlan:
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


class SentenceEmbeddingHandler(ModelHandler[str, np.ndarray, Any]):
    """RunInference handler for a local sentence-transformers model."""

    def __init__(self, plan: EmbedPlan):
        super().__init__()
        self.plan = plan

    def load_model(self):
        import torch

        torch.set_num_threads(self.plan.torch_threads)
        return embedding.load_model(self.plan.model_path, self.plan.device, self.plan.max_seq_length)

    def run_inference(self, batch: Sequence[str], model, inference_args=None) -> Iterable[PredictionResult]:
        vectors = embedding.encode(model, batch, self.plan.batch_size)
        return [PredictionResult(text, vector) for text, vector in zip(batch, vectors)]

    def get_num_bytes(self, batch: Sequence[str]) -> int:
        return sum(len(text) for text in batch)

    def get_metrics_namespace(self) -> str:
        return "winnow.embed"

    def batch_elements_kwargs(self):
        return {"min_batch_size": min(self.plan.batch_size, self.plan.window), "max_batch_size": self.plan.window}


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
    """Ids and the (n, dim) float32 matrix of an output's embeddings, in input order."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(Path(directory) / EMBEDDINGS_DIR))
    column = table.column("embedding").combine_chunks()
    matrix = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return table.column("id").to_pylist(), matrix


def _attach(record: dict[str, Any], vector: np.ndarray, reused: bool) -> dict[str, Any]:
    return {**record, "embedding": np.asarray(vector, dtype=np.float32), "embedding_reused": reused}


class _ReuseFn(beam.DoFn):
    """Per text hash: records with a previous vector get it; the others go on to be embedded."""

    TO_EMBED = "to_embed"

    def process(self, element) -> Iterator[Any]:
        _, grouped = element
        records, previous = grouped["records"], list(grouped["previous"])
        for record in records:
            if previous:
                yield _attach(record, previous[0], True)
            else:
                yield beam.pvalue.TaggedOutput(self.TO_EMBED, record)


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
                | "ReadPrevious" >> beam.io.ReadFromParquet(self.plan.reuse_from, columns=["text_hash", "embedding"])
                | "KeyPrevious" >> beam.Map(lambda row: (row["text_hash"], row["embedding"]))
            )
            split = (
                {"records": records | "KeyByHash" >> beam.Map(lambda r: (r["text_hash"], r)), "previous": previous}
                | "JoinPrevious" >> beam.CoGroupByKey()
                | "Reuse" >> beam.ParDo(_ReuseFn()).with_outputs(_ReuseFn.TO_EMBED, main="reused")
            )
            reused, to_embed = split["reused"], split[_ReuseFn.TO_EMBED]
        embedded = (
            to_embed
            | "KeyText" >> beam.Map(lambda record: (record, record["text"]))
            | "Encode" >> RunInference(KeyedModelHandler(SentenceEmbeddingHandler(self.plan)))
            | "Attach" >> beam.MapTuple(lambda record, result: _attach(record, result.inference, False))
        )
        if reused is None:
            return embedded
        return (reused, embedded) | "AllEmbedded" >> beam.Flatten()
