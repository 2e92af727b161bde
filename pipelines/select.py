"""Select stage: keep the records most like a handful of target examples (MONA or a baseline).

Input: records (after prune; with `embedding` when the method is `embedding`). Outputs (routed pairs, see
records.split_routed):
  kept     the top n records by score, with `select_score` (and `sae_score` for mona)
  ledger   `not_selected` rows (stage select) for the others, with their score and the threshold
  plan     one dict for the manifest: method, pool, n, threshold, score quantiles, models and hashes, and for
           mona the prototype's top SAE features with the records that activate them most

Wiring (ALGORITHMS.md section 3): the targets (a few, read on the driver) become the prototype in one small
step, broadcast as a side input; records are scored in windows of `select.window` consecutive input rows by a
model loaded once per worker; the exact global top n is found without gathering the pool: a histogram of the
top 16 bits of each score's order-preserving 64-bit key finds the bucket holding the n-th score, a second
histogram the next 16 bits inside it, and only the records of that last bucket meet on one worker to place the
threshold. Ties are broken by a seeded hash of the id (selectors.task_selection.select_top is the same order).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np

from winnow.pipelines.config import ConfigError, WinnowConfig
from winnow.pipelines.model_stage import ModelHandler, RunModel, acquire_model
from winnow.pipelines.ordered_io import write_bytes
from winnow.pipelines.read import InputError, expand_paths
from winnow.pipelines.records import ledger_row, split_routed
from winnow.pipelines.stage import PlanContext, Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.pipelines.validate import check_text
from winnow.selectors import embedding, lm, task_selection
from winnow.selectors import sae as sae_lib
from winnow.selectors.embedding import ModelNotFound

KEPT, LEDGER, SUMMARY = "kept", "ledger", "summary"
SUMMARY_DIR = "_select_summary"
PROTOTYPE = "prototype.npy"
SNIPPET_CHARS = 300


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
    expected_records: int | None = None

    def manifest(self) -> dict[str, Any]:
        entry = asdict(self)
        entry["targets"] = len(self.targets)
        return entry


def load_targets(path: str, column: str) -> tuple[list[str], int]:
    """The usable target texts of a Parquet/JSONL file or glob (input order) and how many were unusable."""
    import pyarrow.parquet as pq

    texts, rejected = [], 0
    for file in expand_paths(path):
        try:
            if file.lower().endswith((".parquet", ".pq")):
                table = pq.read_table(file)
                if column not in table.column_names:
                    raise InputError(f"{file}: select.targets has no column {column!r}")
                values = table.column(column).to_pylist()
            else:
                with open(file, encoding="utf-8") as handle:
                    values = [json.loads(line).get(column) for line in handle if line.strip()]
        except InputError:
            raise
        except (OSError, ValueError, AttributeError) as error:
            raise InputError(f"{file}: cannot read select.targets ({type(error).__name__})") from None
        for value in values:
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
                embed_model_fingerprint: str | None = None) -> SelectPlan:
    """Resolve targets, models and the layer on the driver; raises InputError, ConfigError, ModelNotFound."""
    select = config.select
    texts, rejected = load_targets(select.targets, select.target_text or config.input.columns.text)
    common = dict(
        method=select.method, targets=tuple(texts), targets_rejected=rejected, ratio=select.effective_ratio,
        count=select.count, seed=select.seed, device=embedding.choose_device(select.device),
        torch_threads=embedding.threads_per_worker(select.torch_threads, workers), window=select.window,
        batch_size=select.batch_size, max_tokens=select.max_tokens, top_features=select.top_features,
        feature_examples=select.feature_examples,
    )
    if select.method == "embedding":
        return SelectPlan(**common, embed_model_path=embed_model_path,
                          embed_model_fingerprint=embed_model_fingerprint)
    if select.method != "mona":
        return SelectPlan(**common)
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
        lambda plan: embedding.load_model(plan.embed_model_path, plan.device),
        lambda models, plan, texts: task_selection.embedding_prototype(embedding.encode(models(), texts)),
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
assert set(METHODS) == set(task_selection.METHODS), "every configurable method has an implementation"


class SelectHandler(ModelHandler):
    """A method's models and scores: a window of records -> the records with `select_score` (and for MONA
    `sae_score` and `select_features`)."""

    namespace, counter, unit = "winnow.select", "records_scored", "records"

    def __init__(self, plan: SelectPlan):
        super().__init__(plan.torch_threads)
        self.plan = plan
        self.method = METHODS[plan.method]
        self.label = f"select:{plan.method}"
        self.score_values = beam.metrics.Metrics.distribution("winnow.select", "score_x1e6")

    def tag(self) -> str:
        plan = self.plan
        return f"{plan.method}:{plan.model_fingerprint}:{plan.sae_fingerprint}:{plan.embed_model_path}:{plan.device}"

    def load(self):
        return self.method.load(self.plan)

    def expected(self, *side_values) -> int | None:
        return self.plan.expected_records

    def run(self, model, records: list[dict[str, Any]], prototype, stats=None) -> Iterator[dict[str, Any]]:
        scores, features = self.method.scores(model, self.plan, records, prototype, stats)
        for index, (record, score) in enumerate(zip(records, scores.tolist(), strict=True)):
            self.score_values.update(int(score * 1e6))
            scored = {**record, "select_score": float(score),
                      "select_features": features[index] if features is not None else {}}
            if self.method.sparse_features:
                scored["sae_score"] = float(score)
            yield scored


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
        yield self.handler.method.prototype(self._model, plan, list(plan.targets))


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


def top_features(prototype: np.ndarray, count: int) -> np.ndarray:
    """The prototype's `count` strongest features, strongest first (ties: lower index)."""
    order = np.lexsort((np.arange(len(prototype)), -np.asarray(prototype)))
    return order[: min(count, int(np.count_nonzero(prototype)))]


def score_key(score: float) -> int:
    """An unsigned 64-bit integer with the same order as the float64 score."""
    bits = struct.unpack(">Q", struct.pack(">d", score))[0]
    return bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)


def rank_key(record: dict[str, Any], seed: int) -> tuple[int, int, str]:
    return score_key(record["select_score"]), task_selection.tiebreak(seed, record["id"]), record["id"]


class _PrefixCountFn(beam.CombineFn):
    """How many rank keys share each top-`bits` prefix of the score key (at most 2^16 entries)."""

    def __init__(self, shift: int):
        self.shift = shift

    def create_accumulator(self):
        return Counter()

    def add_input(self, accumulator, key):
        accumulator[key[0] >> self.shift] += 1
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = Counter()
        for counts in accumulators:
            merged.update(counts)
        return merged

    def extract_output(self, accumulator):
        return dict(accumulator)


def boundary(counts: dict[int, int], wanted: int) -> tuple[int, int] | None:
    """(prefix holding the `wanted`-th largest key, how many to take from it); None when nothing is wanted."""
    if wanted <= 0:
        return None
    above = 0
    for prefix in sorted(counts, reverse=True):
        if above + counts[prefix] >= wanted:
            return prefix, wanted - above
        above += counts[prefix]
    raise RuntimeError(f"internal error: {wanted} wanted from {above} scored records")


def _wanted(count: int, plan: SelectPlan) -> int:
    return task_selection.selection_size(count, plan.ratio, plan.count)


def _in_bucket(key, level, shift: int):
    return level is not None and key[0] >> shift == level[0]


def _threshold(last: list, level) -> tuple | None:
    """The smallest selected rank key: the level[1]-th largest of the last bucket."""
    if level is None:
        return None
    if len(last) < level[1]:
        raise RuntimeError(f"internal error: {len(last)} keys in the last bucket, {level[1]} wanted")
    return sorted(last, reverse=True)[level[1] - 1]


class _DecideFn(beam.DoFn):
    def __init__(self, plan: SelectPlan):
        self.plan = plan

    def process(self, record, threshold, wanted) -> Iterator[tuple[str, Any]]:
        key = rank_key(record, self.plan.seed)
        clean = {k: v for k, v in record.items() if k != "select_features"}
        if threshold is not None and key >= tuple(threshold):
            yield KEPT, clean
            return
        detail = f"score {record['select_score']:.6g} below the top {wanted} ({self.plan.method})"
        yield LEDGER, ledger_row(clean, "not_selected", "select", f"below_threshold_{self.plan.method}", detail)


def _feature_hits(record: dict[str, Any], reported: frozenset[int]) -> Iterator[tuple[int, tuple[float, str, str]]]:
    for feature, value in record["select_features"].items():
        if feature in reported:
            yield feature, (value, record["id"], record["text"][:SNIPPET_CHARS])


def _build_summary(parts, plan: SelectPlan, prototype: np.ndarray | None) -> dict[str, Any]:
    gathered: dict[str, Any] = {"features": {}}
    for name, value in parts[1]:
        if name == "feature":
            gathered["features"][value[0]] = value[1]
        else:
            gathered[name] = value
    pool, wanted = gathered["pool"], gathered["wanted"]
    section = {
        "dir": SUMMARY_DIR,
        **plan.manifest(),
        "pool": pool,
        "selected": wanted,
        "threshold_score": gathered.get("threshold_score"),
        "score_quantiles": [round(float(q), 6) for q in gathered.get("quantiles") or []],
    }
    if METHODS[plan.method].sparse_features:
        section["prototype_top_features"] = [
            {
                "feature": int(feature),
                "prototype_value": round(float(prototype[feature]), 6),
                "top_records": [
                    {"id": record_id, "value": round(value, 6), "text": text}
                    for value, record_id, text in gathered["features"].get(int(feature), [])
                ],
            }
            for feature in top_features(prototype, plan.top_features).tolist()
        ]
    return section


def _write_prototype(prototype, directory: str) -> dict[str, Any]:
    payload = io.BytesIO()
    np.save(payload, np.asarray(prototype, dtype=np.float32))
    write_bytes(f"{directory}/{PROTOTYPE}", payload.getvalue())
    return {"dir": "prototype", "file": PROTOTYPE, "rows": int(len(prototype)), "bytes": payload.tell()}


class ScoreRecords(beam.PTransform):
    """The scores of selection: records -> (records with `select_score`, `select_features` and for mona
    `sae_score`; metadata of the prototype written to DIRECTORY, mona only)."""

    def __init__(self, plan: SelectPlan, directory: str):
        super().__init__()
        self.plan = plan
        self.directory = directory

    def expand(self, records):
        plan = self.plan
        prototype = records.pipeline | "Targets" >> beam.Create([None]) | "Prototype" >> beam.ParDo(_PrototypeFn(plan))
        extra = []
        if METHODS[plan.method].pool_statistics:
            extra.append(beam.pvalue.AsSingleton(
                records
                | "Bm25Documents" >> beam.Map(lambda r, q: task_selection.bm25_document(r["text"], q),
                                              beam.pvalue.AsSingleton(prototype))
                | "Bm25Stats" >> beam.CombineGlobally(_Bm25StatsFn())
            ))
        window = plan.window
        scored = (
            records
            | "WindowKey" >> beam.Map(lambda r: ((r["file_index"], r["input_row"] // window), r))
            | "Windows" >> beam.GroupByKey()
            | "Score" >> beam.ParDo(RunModel(SelectHandler(plan)), beam.pvalue.AsSingleton(prototype), *extra)
        )
        written = []
        if METHODS[plan.method].sparse_features:
            written.append(prototype | "WritePrototype" >> beam.Map(_write_prototype, self.directory))
        return scored, written


def read_prototype(directory: Path | str) -> np.ndarray:
    return np.load(Path(directory) / PROTOTYPE)


class DecideRecords(beam.PTransform):
    """The decision of selection: scored records -> {kept, ledger, summary}: the exact top n by score (ties by
    a seeded hash), the rest `not_selected`; `prototype` (mona) names the features the summary reports."""

    def __init__(self, plan: SelectPlan, prototype: np.ndarray | None):
        super().__init__()
        self.plan = plan
        self.prototype = prototype

    def expand(self, scored):
        plan, prototype = self.plan, self.prototype
        seed = plan.seed
        keys = scored | "RankKeys" >> beam.Map(rank_key, seed)
        pool = keys | "Pool" >> beam.combiners.Count.Globally()
        wanted = pool | "Wanted" >> beam.Map(_wanted, plan)
        level1 = (
            keys | "Prefix48" >> beam.CombineGlobally(_PrefixCountFn(48))
            | "Bucket48" >> beam.Map(boundary, beam.pvalue.AsSingleton(wanted))
        )
        inside1 = keys | "In48" >> beam.Filter(_in_bucket, beam.pvalue.AsSingleton(level1), 48)
        level2 = (
            inside1 | "Prefix32" >> beam.CombineGlobally(_PrefixCountFn(32))
            | "Bucket32" >> beam.Map(lambda counts, up: boundary(counts, up[1]) if up else None,
                                     beam.pvalue.AsSingleton(level1))
        )
        threshold = (
            inside1
            | "In32" >> beam.Filter(_in_bucket, beam.pvalue.AsSingleton(level2), 32)
            | "LastBucket" >> beam.combiners.ToList()
            | "Threshold" >> beam.Map(
                lambda last, level: _threshold([tuple(k) for k in last], level), beam.pvalue.AsSingleton(level2))
        )
        decided = split_routed(
            scored
            | "Decide" >> beam.ParDo(_DecideFn(plan), beam.pvalue.AsSingleton(threshold),
                                     beam.pvalue.AsSingleton(wanted)),
            "Decided",
            (KEPT, LEDGER),
        )
        parts = [
            pool | "PoolPart" >> beam.Map(lambda n: ("pool", n)),
            wanted | "WantedPart" >> beam.Map(lambda n: ("wanted", n)),
            threshold | "ThresholdPart" >> beam.Map(
                lambda t: ("threshold_score", None if t is None else _score_of_key(t[0]))),
            scored
            | "Scores" >> beam.Map(lambda r: r["select_score"])
            | "Quantiles" >> beam.ApproximateQuantiles.Globally(21)
            | "QuantilePart" >> beam.Map(lambda q: ("quantiles", q)),
        ]
        if METHODS[plan.method].sparse_features:
            reported = frozenset(top_features(prototype, plan.top_features).tolist())
            parts.append(
                scored
                | "FeatureHits" >> beam.FlatMap(_feature_hits, reported)
                | "TopPerFeature" >> beam.combiners.Top.PerKey(max(1, plan.feature_examples))
                | "FeaturePart" >> beam.Map(lambda kv: ("feature", kv))
            )
        section = (
            parts
            | "SummaryParts" >> beam.Flatten()
            | "KeySummary" >> beam.Map(lambda part: (None, part))
            | "GatherSummary" >> beam.GroupByKey()
            | "Summary" >> beam.Map(_build_summary, plan, prototype)
        )
        return {KEPT: decided[KEPT], LEDGER: decided[LEDGER], SUMMARY: section}


DECISION_KEYS = ("count", "ratio", "seed", "top_features", "feature_examples")


def _scores(plan: SelectPlan):
    def build(pipeline, records, context: StepContext) -> StepOutput:
        scored, written = records | "Select" >> ScoreRecords(plan, context.directory)
        return StepOutput(scored, [], written)
    return build


def _decide(plan: SelectPlan):
    def build(pipeline, records, context: StepContext) -> StepOutput:
        prototype = read_prototype(context.previous.directory) if METHODS[plan.method].sparse_features else None
        decided = records | "SelectDecide" >> DecideRecords(plan, prototype)
        return StepOutput(decided[KEPT], [decided[LEDGER]], [decided[SUMMARY]])
    return build


def _steps(plan: SelectPlan, config: WinnowConfig) -> list[Step]:
    section = config_section(config, "select", exclude=("torch_threads",))
    scores = {k: v for k, v in section.items() if k not in DECISION_KEYS}
    if METHODS[plan.method].seeded_scores:
        scores["seed"] = section["seed"]
    models = {"targets": _text_digest(plan.targets), "model": plan.model_fingerprint, "sae": plan.sae_fingerprint,
              "embed_model": plan.embed_model_fingerprint, "device": plan.device}
    return [
        Step("scores", _scores(plan), {"select": scores}, models, reads_vectors=METHODS[plan.method].reads_vectors),
        Step("decide", _decide(plan), {"select": {k: section[k] for k in DECISION_KEYS}}),
    ]


def _text_digest(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _plan(context: PlanContext) -> SelectPlan:
    embed = context.plans.get("embed")
    return replace(plan_select(context.config, context.workers, embed.model_path if embed else None,
                               embed.fingerprint if embed else None),
                   expected_records=context.expected_records)


STAGE = Stage(
    name="select",
    module=__name__,
    section="select",
    enabled=lambda config: config.select.enabled,
    reads_embeddings=lambda config: config.select.enabled and METHODS[config.select.method].reads_vectors,
    plan=_plan,
    steps=_steps,
    libraries=("torch", "transformers", "sae-lens", "sentence-transformers"),
    manifest=lambda context: {"select": summary_meta(context.files, SUMMARY_DIR)},
    report="winnow.pipelines.report:select_section",
    ledger_stages=("select",),
)


def _score_of_key(key: int) -> float:
    bits = key ^ (1 << 63) if key >> 63 else key ^ 0xFFFFFFFFFFFFFFFF
    return struct.unpack(">d", struct.pack(">Q", bits))[0]
