"""Select stage, its scores: the method registry, the driver-side plan (targets, models, layer) and
score_files, the first cached step of the select stage (see select.py)."""

from __future__ import annotations

import io
import json
import posixpath
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from winnow.pipelines.config import ConfigError, WinnowConfig
from winnow.pipelines.engine import file_resume
from winnow.pipelines.engine.model_stage import ModelHandler, acquire_model, model_lock
from winnow.pipelines.engine.passes import Pass
from winnow.pipelines.engine.progress import Progress
from winnow.pipelines.io.blocks import FEATURES_COLUMN, VECTOR_COLUMN
from winnow.pipelines.io.cache_files import RECORDS
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.ordered_io import write_bytes
from winnow.pipelines.io.read import InputError, expand_paths, read_column
from winnow.pipelines.io.storage import join, read_bytes
from winnow.pipelines.io.text_checks import check_text
from winnow.pipelines.stages.select import threshold
from winnow.selectors import backends, embedding, lm, task_selection
from winnow.selectors import sae as sae_lib
from winnow.selectors.embedding import ModelNotFound
from winnow.selectors.names import SELECT_METHODS

PROTOTYPE = "prototype.npy"
SHORTLIST_SCORE = "shortlist_score"


@dataclass(frozen=True)
class SelectPlan:
    """What the driver decided about the select stage; recorded in the manifest."""

    method: str
    targets: tuple[str, ...]
    targets_rejected: int
    ratio: float | None
    count: int | None
    seed: int
    device: str
    torch_threads: int
    window: int
    batch_size: int
    max_tokens: int
    top_features: int
    feature_examples: int
    model: str | None = None
    model_path: str | None = None
    model_fingerprint: str | None = None
    layer: int | None = None
    model_layers: int | None = None
    sae: str | None = None
    sae_fingerprint: str | None = None
    d_sae: int | None = None
    sae_k: int | None = None
    embed_model_path: str | None = None
    embed_model_fingerprint: str | None = None
    embed_backend: str = "torch"  # the targets are embedded as the embed stage embedded the pool
    expected_records: int | None = None
    shortlist: str | None = None  # mona on the top shortlist_multiple x n of this cheaper method
    shortlist_multiple: int = 4

    def manifest(self) -> dict[str, Any]:
        entry = asdict(self)
        entry["targets"] = len(self.targets)
        return entry


def load_targets(path: str, column: str) -> tuple[list[str], int]:
    """The usable target texts of a Parquet/JSONL file or glob (input order) and how many were unusable."""

    texts, rejected = [], 0
    for file in expand_paths(path):
        for value in read_column(file, column, "select.targets"):
            text, problem = check_text(value, 1 << 30)
            if problem is None:
                texts.append(text)
            else:
                rejected += 1
    if not texts:
        raise InputError(f"{path}: select.targets holds no usable text in column {column!r}")
    return texts, rejected


def _sae_config(path: str) -> dict[str, Any]:
    cfg = Path(path).expanduser() / "cfg.json"
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError):
        raise ModelNotFound(f"{path}: not an SAE directory (sae-lens format: cfg.json + weights)") from None


def plan_select(config: WinnowConfig, workers: int, embed_model_path: str | None,
                embed_model_fingerprint: str | None = None, embed_backend: str = "torch") -> SelectPlan:
    """Resolve targets, models and the layer on the driver; raises InputError, ConfigError, ModelNotFound."""
    select = config.select
    texts, rejected = load_targets(select.targets, select.target_text or config.input.columns.text)
    common = dict(
        method=select.method, targets=tuple(texts), targets_rejected=rejected, ratio=select.effective_ratio,
        count=select.count, seed=select.seed, device=embedding.choose_device(select.device, "select.device"),
        torch_threads=embedding.threads_per_worker(select.torch_threads, workers), window=select.window,
        batch_size=select.batch_size, max_tokens=select.max_tokens, top_features=select.top_features,
        feature_examples=select.feature_examples,
    )
    if "embedding" in (select.method, select.shortlist):
        common.update(embed_model_path=embed_model_path, embed_model_fingerprint=embed_model_fingerprint,
                      embed_backend=embed_backend)
    if select.method != "mona":
        return SelectPlan(**common)
    if select.shortlist:
        common.update(shortlist=select.shortlist, shortlist_multiple=select.shortlist_multiple)
    model_path = lm.resolve_lm_path(select.model)
    model_config = json.loads((model_path / "config.json").read_text())
    layers, hidden = int(model_config["num_hidden_layers"]), int(model_config["hidden_size"])
    sae_cfg = _sae_config(select.sae)
    metadata = sae_cfg.get("metadata") or {}
    sae_layer = metadata.get("winnow_layer")
    layer = select.layer or (int(sae_layer) if sae_layer else max(1, layers - 1))
    if not 1 <= layer <= layers:
        raise ConfigError(f"select.layer: {layer} is outside the model's decoder blocks 1..{layers}")
    if sae_layer and int(sae_layer) != layer:
        raise ConfigError(f"select.layer: {layer}, but the SAE {select.sae} was trained on layer {sae_layer}")
    if int(sae_cfg["d_in"]) != hidden:
        raise ConfigError(f"select.sae: the SAE reads {sae_cfg['d_in']} dims, the model's stream has {hidden}")
    return SelectPlan(
        **common, model=select.model, model_path=str(model_path), model_fingerprint=lm.lm_fingerprint(model_path),
        layer=layer, model_layers=layers, sae=str(Path(select.sae).expanduser().resolve()),
        sae_fingerprint=sae_lib.sae_fingerprint(select.sae), d_sae=int(sae_cfg["d_sae"]), sae_k=sae_cfg.get("k"),
    )


def sae_codes(models, plan: SelectPlan, texts: list[str]) -> sae_lib.SparseCodes:
    """Mean-pooled SAE codes; `models()` gives the worker's (LM, tokenizer, SAE)."""
    model, tokenizer, sae = models()
    return sae_lib.sample_codes(model, tokenizer, sae, texts, plan.layer, plan.max_tokens, plan.batch_size)


def _load_mona(plan: SelectPlan):
    model, tokenizer = lm.load_lm(plan.model_path, plan.device)
    return model, tokenizer, sae_lib.load_sae(plan.sae, plan.device)


def _mona_scores(models, plan: SelectPlan, records: list[dict[str, Any]], prototype, stats):
    """Jaccard of each record's mean SAE code to the prototype, and the record's values of the prototype's
    features (any of them may be reported: `select.top_features` is part of the decision)."""
    codes = sae_codes(models, plan, [r["text"] for r in records])
    reported = np.flatnonzero(prototype)
    features = []
    for i in range(len(records)):
        indices, values = codes.row(i)
        hit = np.isin(indices, reported)
        features.append(dict(zip(indices[hit].tolist(), values[hit].tolist(), strict=True)))
    return task_selection.jaccard_to_prototype(codes, prototype), features


def _bm25_scores(models, plan: SelectPlan, records: list[dict[str, Any]], query, stats):
    stats = _bm25_stats(stats, query)
    return np.array([task_selection.bm25_score(task_selection.bm25_document(r["text"], query), query, stats)
                     for r in records]), None


@dataclass(frozen=True)
class Method:
    """A selection method: how to load its models (once per worker; None: it has none), the prototype of the
    targets and the scores of a window of records (with per-record feature values, or None). Both get a
    `models()` callable that loads the models on first use: embedding scores read the records' vectors and
    never load the encoder."""

    load: Any
    prototype: Any
    scores: Any
    reads_vectors: bool = False
    seeded_scores: bool = False  # random: the scores are the seed's, so the seed is part of the scores' key
    pool_statistics: bool = False  # BM25: document frequencies over the pool, a global step before scoring
    sparse_features: bool = False  # MONA: SAE features reported in the summary; `sae_score` in the ledger


METHODS = {
    "mona": Method(
        _load_mona,
        lambda models, plan, texts: task_selection.prototype(sae_codes(models, plan, texts)),
        _mona_scores, sparse_features=True),
    "embedding": Method(
        lambda plan: backends.load_encoder(plan.embed_backend, plan.embed_model_path, plan.device, None,
                                           plan.torch_threads or embedding.worker_threads()),
        lambda models, plan, texts: task_selection.embedding_prototype(models().encode(texts)),
        lambda models, plan, records, prototype, stats: (
            task_selection.cosine_scores(np.stack([r["embedding"] for r in records]), prototype), None),
        reads_vectors=True),
    "bm25": Method(
        None, lambda models, plan, texts: task_selection.Bm25Query.from_targets(texts), _bm25_scores,
        pool_statistics=True),
    "random": Method(
        None, lambda models, plan, texts: None,
        lambda models, plan, records, prototype, stats: (
            np.array([task_selection.random_score(plan.seed, r["id"]) for r in records]), None),
        seeded_scores=True),
}
assert tuple(METHODS) == SELECT_METHODS, "every configurable method has an implementation"


class SelectHandler(ModelHandler):
    """A method's models, as model_stage loads and shares them, with what scoring a window needs (the
    prototype and, for BM25, the pool statistics)."""

    namespace, counter, unit = "winnow.select", "records_scored", "records"

    def __init__(self, plan: SelectPlan, prototype=None, stats=None):
        super().__init__(plan.torch_threads)
        self.plan = plan
        self.prototype = prototype
        self.stats = stats
        self.method = METHODS[plan.method]
        self.label = f"select:{plan.method}"
        self.score_values = beam.metrics.Metrics.distribution("winnow.select", "score_x1e6")

    def tag(self) -> str:
        plan = self.plan
        return (f"{plan.method}:{plan.model_fingerprint}:{plan.sae_fingerprint}:{plan.embed_model_path}:"
                f"{plan.embed_backend}:{plan.device}")

    def load(self):
        return self.method.load(self.plan)

    def expected(self) -> int | None:
        return self.plan.expected_records


class _PrototypeFn(beam.DoFn):
    """The targets -> the method's prototype: mean SAE code, unit mean embedding or BM25 query."""

    def __init__(self, plan: SelectPlan):
        self.handler = SelectHandler(plan)

    def setup(self):
        self.held = None

    def _model(self):
        if self.held is None:
            self.held = acquire_model(self.handler)
        return self.held.value

    def process(self, _element) -> Iterator[Any]:
        plan = self.handler.plan
        with model_lock(self.handler):
            prototype = self.handler.method.prototype(self._model, plan, list(plan.targets))
        yield prototype


class _Bm25StatsFn(beam.CombineFn):
    """Pool size, total length and document frequency of the query's terms: BM25's global statistics."""

    def create_accumulator(self):
        return [0, 0, Counter()]

    def add_input(self, accumulator, document):
        length, counts = document
        accumulator[0] += 1
        accumulator[1] += length
        accumulator[2].update(counts.keys())
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for documents, length, frequency in accumulators:
            merged[0] += documents
            merged[1] += length
            merged[2].update(frequency)
        return merged

    def extract_output(self, accumulator):
        return accumulator


def _bm25_stats(accumulator, query: task_selection.Bm25Query) -> task_selection.Bm25Stats:
    documents, length, frequency = accumulator
    df = np.zeros(len(query.terms), dtype=np.int64)
    for position, count in frequency.items():
        df[position] = count
    return task_selection.Bm25Stats(documents, length / max(1, documents), df)


def _write_prototype(prototype, directory: str) -> dict[str, Any]:
    payload = io.BytesIO()
    np.save(payload, np.asarray(prototype, dtype=np.float32))
    write_bytes(f"{directory}/{PROTOTYPE}", payload.getvalue())
    return {"dir": "prototype", "file": PROTOTYPE, "rows": int(len(prototype)), "bytes": payload.tell()}


def prototype_pass(pipeline, plan: SelectPlan):
    """A pass's graph: the targets -> the method's prototype (computed on a worker, with the method's models)."""
    return pipeline | "Targets" >> beam.Create([None]) | "Prototype" >> beam.ParDo(_PrototypeFn(plan))


def bm25_pass(records, prototype):
    """A pass's graph: the pool's BM25 statistics for the query `prototype`."""
    return (
        records
        | "Bm25Documents" >> beam.Map(lambda r, q: task_selection.bm25_document(r["text"], q), prototype)
        | "Bm25Stats" >> beam.CombineGlobally(_Bm25StatsFn())
    )


def score_passes(plan: SelectPlan) -> tuple[Pass, ...]:
    passes = [Pass("prototype", lambda pipeline, constants: prototype_pass(pipeline, plan), reads_records=False)]
    if METHODS[plan.method].pool_statistics:
        passes.append(Pass("bm25", lambda records, constants: bm25_pass(records, constants["prototype"])))
    return tuple(passes)


def _windows(keys: np.ndarray, window: int) -> list[tuple[int, int]]:
    """(start, stop) of each run of rows (in input order) of one input file with the same input_row // window."""
    if not len(keys):
        return []
    labels = keys[:, 0] * (1 << 40) + keys[:, 1] // window
    bounds = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1], True])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


class _ScoreFileFn(beam.DoFn):
    """A record file -> its rows scored window by window (the rows of one input file with the same
    input_row // `select.window`, in input order) and written back under the same name with `select_score` (and
    for mona `sae_score` and `select_features`); its file metadata. The method's models are loaded once per
    worker, on the first window that needs them."""

    def __init__(self, plan: SelectPlan, directory: str, prototype, stats, drops_vectors: bool, compression: str,
                 column: str, shortlist: tuple | None, resume: str):
        self.handler = SelectHandler(plan, prototype, stats)
        self.resume = resume
        self.column = column
        self.shortlist = shortlist
        self.compression = compression
        self.directory = directory
        self.drops_vectors = drops_vectors
        self.busy_ms = beam.metrics.Metrics.distribution(SelectHandler.namespace, "busy_ms")
        self.scored = beam.metrics.Metrics.counter(SelectHandler.namespace, SelectHandler.counter)

    def setup(self):
        self.held = None
        self.progress = None

    def _model(self):
        if self.held is None:
            self.held = acquire_model(self.handler)
        return self.held.value

    def process(self, path: str) -> Iterator[dict[str, Any]]:
        relative = f"{RECORDS}/{posixpath.basename(path)}"
        finished, taken = file_resume.take_or_compute(self.resume, self.directory, relative,
                                                      lambda: self._score_file(path, relative))
        if taken:
            self._progress().advance(finished["rows"])
        yield finished

    def _progress(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(self.handler.label, self.handler.expected(), self.handler.unit)
        return self.progress

    def _score_file(self, path: str, relative: str) -> dict[str, Any]:
        handler, method, plan = self.handler, self.handler.method, self.handler.plan
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, () if method.reads_vectors else drop)
        keys, ids, texts = rows.keys(), rows.ids().to_pylist(), rows.values("text")
        vectors = rows.vectors() if method.reads_vectors else None
        scored = np.ones(len(rows), dtype=bool)
        if plan.shortlist is not None:  # a shortlist step's own plan has none
            shortlist_scores = np.asarray(rows.values(SHORTLIST_SCORE), dtype=np.float64)
            scored = threshold.selected(shortlist_scores, ids, self.shortlist, plan.seed)
        scores = np.where(scored, 0.0, -np.inf)
        features: list[dict[int, float]] = [{} for _ in range(len(rows))]
        progress = self._progress()
        for start, stop in _windows(keys, plan.window):
            members = start + np.flatnonzero(scored[start:stop])
            if not len(members):
                continue
            window = [{"id": ids[i], "text": texts[i]} for i in members.tolist()]
            if vectors is not None:
                for record, index in zip(window, members.tolist(), strict=True):
                    record[VECTOR_COLUMN] = vectors[index]
            with model_lock(handler):
                started = time.perf_counter()
                window_scores, window_features = method.scores(self._model, plan, window, handler.prototype,
                                                               handler.stats)
            self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
            scores[members] = window_scores
            for index, row_features in zip(members.tolist(), window_features or (), strict=False):
                features[index] = row_features
            for score in np.asarray(window_scores, dtype=np.float64).tolist():
                handler.score_values.update(int(score * 1e6))
            self.scored.inc(len(members))
            progress.advance(len(members))
        columns = {self.column: pa.array(scores, pa.float64())}
        if method.sparse_features:
            columns["sae_score"] = pa.array(scores, pa.float64(), mask=~scored)
            columns[FEATURES_COLUMN] = pa.array([list(f.items()) for f in features],
                                                pa.map_(pa.int64(), pa.float64()))
        return rows.write(self.directory, relative, columns, drop=drop, compression=self.compression)


def score_files(paths, plan: SelectPlan, directory: str, prototype, stats=None, drops_vectors: bool = False,
                compression: str = "zstd", column: str = "select_score", shortlist: tuple | None = None,
                resume: str = ""):
    """The scores of selection: the previous step's record files, the prototype and (BM25) the pool statistics
    from the passes -> (metadata of the record files written with their scores in `column`; of the prototype
    file, mona only). With a shortlist (`plan.shortlist`), only rows whose shortlist rank key is at or above
    `shortlist` are scored; the others get -inf (never selected) and no SAE score. `resume`: the step's folder of
files an interrupted attempt finished (engine/file_resume.py)."""
    written = [
        paths  # stage_run's Create of the files spreads them (a Reshuffle)
        | "Score" >> beam.ParDo(_ScoreFileFn(plan, directory, prototype, stats, drops_vectors, compression,
                                             column, shortlist, resume))
    ]
    if METHODS[plan.method].sparse_features:
        written.append(
            paths.pipeline
            | "PrototypeFile" >> beam.Create([None])
            | "WritePrototype" >> beam.Map(lambda _, p, d: _write_prototype(p, d), prototype, directory))
    return written


def read_prototype(directory: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(join(directory, PROTOTYPE))))


