"""Rephrase stage (WRAP): synthetic paraphrases of chosen records, in configured styles, beside the originals.

Input: the previous step's record files (after select). Every file passes through under its name (its rows
are never in a GroupByKey); only the chosen records go on, as units grouped by window. Outputs of
RephraseRecords (routed pairs, see records.split_routed):
  synthetic  new records: id `PARENT#STYLE#SEGMENT`, source `PREFIX:SOURCE` (e.g. `wiki:linux-doc`), with
             provenance (parent_id, segment_index, style, model, generation parameters)
  ledger     `rejected` rows (stage rephrase) for generations the cleaner refused, with the reason
  plan       one dict for the manifest: model, backend, styles, parameters, segments, tokens, acceptance and
             rejection reasons per style, windows generated vs reused from the cache

Records are chosen by `rephrase.sources`, then a seeded hash below `rephrase.fraction`, then (with
`rephrase.max_records`) the records with the smallest hashes. Each is cut into segments of at most
`max_segment_tokens` tokens of the generator's tokenizer; one unit per (segment, style) is generated. Units
are grouped into windows of consecutive input rows per style and generated with the model loaded once per
worker. Every finished window is written to the cache (`.NAME.rephrase-cache/` beside output.path, under a key
of the model, parameters, prompts and cleaning version) before its outputs move on, so a run that is killed
and started again reuses every finished window instead of generating it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import BeamIOError
from apache_beam.utils.shared import Shared

from winnow.pipelines.blocks import VECTOR_COLUMN
from winnow.pipelines.cached_rows import CachedRows
from winnow.pipelines.config import ConfigError, RephraseConfig
from winnow.pipelines.model_stage import ModelHandler, RunModel
from winnow.pipelines.passes import Pass, smallest
from winnow.pipelines.records import content_id, ledger_row, order_key, seeded_hash, seeded_hashes, split_routed
from winnow.pipelines.stage import ManifestContext, Stage, Step, StepContext, StepOutput, config_section, summary_meta
from winnow.pipelines.stage_cache import RECORDS, WriteCache, table_elements
from winnow.pipelines.storage import delete_tree, join, read_json, sibling, split, write_bytes
from winnow.rephrase import clean as cleaning
from winnow.rephrase import generate, prompts, segment
from winnow.selectors import embedding, lm

SYNTHETIC, LEDGER, SUMMARY = "synthetic", "ledger", "summary"
SUMMARY_DIR = "_rephrase_summary"
PROGRESS_EVERY_S = 10.0
CACHE_FORMAT = "1"  # the layout of a cached window (raw generations); cleaning is not part of the key


@dataclass(frozen=True)
class RephrasePlan:
    model: str
    model_path: str
    model_fingerprint: str
    backend: str
    device: str
    torch_threads: int
    styles: tuple[tuple[str, str, str], ...]  # (name, instruction, source prefix)
    system_turn: bool | None
    max_segment_tokens: int
    sources: tuple[str, ...] | None
    fraction: float
    max_records: int | None
    params: generate.GenerationParams
    window: int
    cache_dir: str | None

    def manifest(self) -> dict[str, Any]:
        entry = asdict(self)
        entry["styles"] = [{"name": n, "instruction": i, "source_prefix": p} for n, i, p in self.styles]
        return entry


def plan_rephrase(config: RephraseConfig, output: str, workers: int) -> RephrasePlan:
    styles = prompts.resolve_styles(config.styles, config.custom_styles)
    path = lm.resolve_lm_path(config.model)
    device = embedding.choose_device(config.device)
    try:
        backend = generate.choose_backend(config.backend)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return RephrasePlan(
        model=config.model, model_path=str(path), model_fingerprint=lm.lm_fingerprint(path),
        backend=backend, device=device,
        torch_threads=embedding.threads_per_worker(config.torch_threads, workers),
        styles=tuple((s.name, s.instruction, s.source_prefix) for s in styles),
        system_turn=None if config.system_turn == "auto" else config.system_turn == "true",
        max_segment_tokens=config.max_segment_tokens, sources=tuple(config.sources) if config.sources else None,
        fraction=config.fraction, max_records=config.max_records,
        params=generate.GenerationParams(
            max_new_tokens=config.max_new_tokens, do_sample=not config.greedy, temperature=config.temperature,
            top_p=config.top_p, seed=config.seed, batch_size=config.batch_size,
        ),
        window=config.window,
        cache_dir=sibling(str(output), f".{split(str(output))[1]}.rephrase-cache") if config.cache else None,
    )


class _Tokenizer:
    _shared = Shared()

    def __init__(self, plan: RephrasePlan):
        self.plan = plan

    def _load(self):
        from transformers import AutoTokenizer

        return _Holder(AutoTokenizer.from_pretrained(self.plan.model_path, local_files_only=True))

    def get(self):
        return self._shared.acquire(self._load, tag=f"tokenizer:{self.plan.model_fingerprint}").value


class _Holder:
    def __init__(self, value):
        self.value = value


def _chosen(record: dict[str, Any], plan: RephrasePlan) -> bool:
    if plan.sources is not None and record["source"] not in plan.sources:
        return False
    return seeded_hash(plan.params.seed, record["id"], "rephrase") < plan.fraction * 2**64


def _choice_key(record: dict[str, Any], seed: int) -> tuple[int, str]:
    return seeded_hash(seed, record["id"], "rephrase"), record["id"]


class _SegmentFn(beam.DoFn):
    """A chosen record -> one unit per (segment, style), keyed by its window."""

    def __init__(self, plan: RephrasePlan):
        self.plan = plan

    def setup(self):
        self.tokenizer = _Tokenizer(self.plan).get()

    def process(self, record: dict[str, Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
        pieces = segment.segment(record["text"], self.tokenizer, self.plan.max_segment_tokens)
        parent = {k: record[k] for k in ("id", "source", "input_file", "input_row", "file_index")}
        window = record["input_row"] // self.plan.window
        for style_index in range(len(self.plan.styles)):
            for index, piece in enumerate(pieces):
                unit = {"parent": parent, "segment_index": index, "segment": piece, "style_index": style_index}
                yield (style_index, record["file_index"], window), unit


class _UnitCountFn(_SegmentFn):
    """A chosen record -> (its choice key, how many units it makes): what the choice pass needs."""

    def process(self, record: dict[str, Any]) -> Iterator[tuple[tuple[int, str], int]]:
        pieces = segment.segment(record["text"], self.tokenizer, self.plan.max_segment_tokens)
        yield _choice_key(record, self.plan.params.seed), len(pieces) * len(self.plan.styles)


def choice_pass(records, plan: RephrasePlan):
    """A pass's graph: {"bound": the largest choice key kept under `rephrase.max_records` (None: no cap or
    nothing chosen), "units": how many (segment, style) units the chosen records make, for progress}."""
    counted = records | "Choose" >> beam.Filter(_chosen, plan) | "CountUnits" >> beam.ParDo(_UnitCountFn(plan))
    if plan.max_records is None:
        return (
            counted
            | "Units" >> beam.Map(lambda pair: pair[1])
            | "Total" >> beam.CombineGlobally(sum)
            | "Choice" >> beam.Map(lambda units: {"bound": None, "units": units})
        )
    return (
        smallest(counted, plan.max_records, "FirstChoices")
        | "Choice" >> beam.Map(lambda first: {"bound": first[-1][0] if first else None,
                                              "units": sum(units for _, units in first)})
    )


def window_key(plan: RephrasePlan, style: tuple[str, str, str], prompts_: list[str]) -> str:
    """The cache key of one window: what determines its raw outputs (cleaning runs again on reuse)."""
    digest = hashlib.sha256()
    for part in (plan.model_fingerprint, plan.backend, json.dumps(asdict(plan.params), sort_keys=True),
                 json.dumps(style), CACHE_FORMAT):
        digest.update(part.encode() + b"\0")
    for prompt in prompts_:
        digest.update(prompt.encode() + b"\0")
    return digest.hexdigest()


class RephraseHandler(ModelHandler):
    """The generator: one window of units of one style -> synthetic records and rejection rows (routed pairs).
    Every finished window is written to the window cache before its outputs move on; a cached window is
    reused without loading the model."""

    namespace, counter, label, unit = "winnow.rephrase", "units", "rephrase", "segments (style x segment)"

    def __init__(self, plan: RephrasePlan, total_units: int | None = None):
        super().__init__(plan.torch_threads)
        self.plan = plan
        self.total_units = total_units
        self.generated = beam.metrics.Metrics.counter("winnow.rephrase", "segments_generated")
        self.reused = beam.metrics.Metrics.counter("winnow.rephrase", "segments_reused")
        self.tokens = beam.metrics.Metrics.counter("winnow.rephrase", "tokens_generated")
        self.accepted = beam.metrics.Metrics.counter("winnow.rephrase", "accepted")
        self.rejected = beam.metrics.Metrics.counter("winnow.rephrase", "rejected")
        self._tokenizer = None
        self._started = None
        self._tokens_done = 0
        self._last_reused = False

    def tag(self) -> str:
        return f"{self.plan.backend}:{self.plan.model_fingerprint}:{self.plan.device}"

    def load(self):
        return generate.load_generator(self.plan.backend, self.plan.model_path, self.plan.device)

    def order(self, unit):
        return order_key(unit["parent"]), unit["segment_index"]

    def expected(self) -> int | None:
        return self.total_units

    def note(self) -> str:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        return f"{self._tokens_done / elapsed:.1f} generated tokens/s" + (" (cached)" if self._last_reused else "")

    def run(self, model, units) -> Iterator[tuple[str, Any]]:
        if self._tokenizer is None:
            self._tokenizer = _Tokenizer(self.plan).get()
            self._started = time.perf_counter()
        style = self.plan.styles[units[0]["style_index"]]
        style_obj = prompts.Style(*style)
        texts = [prompts.build_prompt(self._tokenizer, style_obj, u["segment"], self.plan.system_turn)
                 for u in units]
        key = window_key(self.plan, style, texts)
        outputs = self._cached(key)
        reused = outputs is not None
        if outputs is None:
            outputs = [asdict(g) for g in model().generate(texts, self.plan.params)]
            self._store(key, outputs)
            self.generated.inc(len(units))
        else:
            self.reused.inc(len(units))
        for unit, output in zip(units, outputs, strict=True):
            yield from self._emit(unit, style, output, reused)
        self._tokens_done += sum(o["new_tokens"] for o in outputs) if not reused else 0
        self._last_reused = reused

    def _emit(self, unit, style, output, reused) -> Iterator[tuple[str, Any]]:
        parent = unit["parent"]
        name, _, prefix = style
        record = {
            "id": f"{parent['id']}#{name}#{unit['segment_index']}",
            "source": f"{prefix}:{parent['source']}",
            "input_file": parent["input_file"],
            "input_row": parent["input_row"],
            "file_index": parent["file_index"],
            "variant": 1 + unit["style_index"] * 1_000_000 + unit["segment_index"],
            "parent_id": parent["id"],
            "extra": {
                "parent_id": parent["id"], "segment_index": unit["segment_index"], "style": name,
                "model": self.plan.model, "generation": json.dumps(asdict(self.plan.params), sort_keys=True),
            },
        }
        self.tokens.inc(output["new_tokens"] if not reused else 0)
        text, reason, detail = cleaning.clean(output["text"], unit["segment"], name, output["finished"], style[1])
        if text is None:
            self.rejected.inc()
            yield LEDGER, {**ledger_row(record, "rejected", "rephrase", reason, detail), "reused": reused,
                           "new_tokens": output["new_tokens"]}
            return
        self.accepted.inc()
        yield SYNTHETIC, {**record, "text": text, "text_hash": content_id(text), "segment": unit["segment"],
                          "new_tokens": output["new_tokens"], "reused": reused}

    def _cached(self, key: str) -> list[dict[str, Any]] | None:
        if not self.plan.cache_dir:
            return None
        try:
            return read_json(join(self.plan.cache_dir, f"{key}.json"))
        except (OSError, ValueError, BeamIOError):
            return None

    def _store(self, key: str, outputs: list[dict[str, Any]]) -> None:
        if not self.plan.cache_dir:
            return
        write_bytes(join(self.plan.cache_dir, f"{key}.json"), json.dumps(outputs).encode())


def _summary(parts, plan: RephrasePlan) -> dict[str, Any]:
    styles: dict[str, dict[str, Any]] = {name: {"accepted": 0, "rejected": {}, "new_tokens": 0,
                                                "input_chars": 0, "output_chars": 0} for name, _, _ in plan.styles}
    chosen = 0
    reused = {True: 0, False: 0}
    for kind, value in parts[1]:
        if kind == "chosen":
            chosen = value
            continue
        reused[value[-1]] += 1
        if kind == "accepted":
            entry = styles[value[0]]
            entry["accepted"] += 1
            entry["new_tokens"] += value[1]
            entry["input_chars"] += value[2]
            entry["output_chars"] += value[3]
        else:
            entry = styles[value[0]]
            entry["rejected"][value[1]] = entry["rejected"].get(value[1], 0) + 1
            entry["new_tokens"] += value[2]
    for entry in styles.values():
        entry["rejected"] = dict(sorted(entry["rejected"].items()))
        generated = entry["accepted"] + sum(entry["rejected"].values())
        entry["generated"] = generated
        entry["acceptance"] = round(entry["accepted"] / generated, 4) if generated else None
        entry["length_ratio"] = round(entry.pop("output_chars") / entry["input_chars"], 4) \
            if entry["input_chars"] else None
        entry.pop("input_chars")
    return {"dir": SUMMARY_DIR, **plan.manifest(), "records_chosen": chosen, "segments_generated": reused[False],
            "segments_reused_from_cache": reused[True], "styles_summary": styles}


def chosen_rows(rows: CachedRows, plan: RephrasePlan, bound: tuple[int, str] | None) -> np.ndarray:
    """Which rows of a record file are chosen: `rephrase.sources`, the seeded hash below `rephrase.fraction`
    (exactly `_chosen`), and with `rephrase.max_records` a choice key at most `bound` (exactly the Cap)."""
    count = len(rows)
    ids = rows.ids().to_pylist()
    mask = np.ones(count, dtype=bool)
    if plan.sources is not None:
        sources = set(plan.sources)
        mask &= np.array([source in sources for source in rows.values("source")], dtype=bool).reshape(count)
    hashes = seeded_hashes(plan.params.seed, rows.ids(), "rephrase")
    limit = math.ceil(plan.fraction * 2**64)  # an integer hash is below the float exactly when below its ceiling
    if limit < 2**64:
        mask &= hashes < np.uint64(limit)
    if plan.max_records is not None:
        for index in np.flatnonzero(mask).tolist():
            mask[index] = bound is not None and (int(hashes[index]), ids[index]) <= tuple(bound)
    return mask


FILES, CHOSEN = "files", "chosen"


class _PassThroughFn(beam.DoFn):
    """A record file -> the same rows written into this step's records under the same name (routed FILES,
    file metadata), and its chosen records (CHOSEN), which alone go on to be rephrased."""

    def __init__(self, plan: RephrasePlan, bound, directory: str, drops_vectors: bool, compression: str):
        self.plan = plan
        self.compression = compression
        self.bound = bound
        self.directory = directory
        self.drops_vectors = drops_vectors

    def process(self, path: str) -> Iterator[tuple[str, Any]]:
        drop = (VECTOR_COLUMN,) if self.drops_vectors else ()
        rows = CachedRows.read(path, drop)
        yield FILES, rows.write(self.directory, f"{RECORDS}/{posixpath.basename(path)}", {}, drop=drop,
                                compression=self.compression)
        chosen = chosen_rows(rows, self.plan, self.bound)
        if chosen.any():
            for record in table_elements(rows.rows_table(chosen), drop):
                yield CHOSEN, record


class RephraseRecords(beam.PTransform):
    """chosen records -> {synthetic, ledger, plan} (see the module docstring)."""

    def __init__(self, plan: RephrasePlan, choice: dict[str, Any]):
        super().__init__()
        self.plan = plan
        self.choice = choice

    def expand(self, chosen):
        plan = self.plan
        units = chosen | "Segment" >> beam.ParDo(_SegmentFn(plan))
        generated = split_routed(
            units
            | "Windows" >> beam.GroupByKey()
            | "Generate" >> beam.ParDo(RunModel(RephraseHandler(plan, self.choice["units"]), PROGRESS_EVERY_S)),
            "Generated",
            (SYNTHETIC, LEDGER),
        )
        parts = [
            chosen
            | "CountChosen" >> beam.combiners.Count.Globally()
            | "ChosenPart" >> beam.Map(lambda n: ("chosen", n)),
            generated[SYNTHETIC] | "AcceptedPart" >> beam.Map(
                lambda r: ("accepted", (r["extra"]["style"], r["new_tokens"], len(r["segment"]), len(r["text"]),
                                        r["reused"]))),
            generated[LEDGER] | "RejectedPart" >> beam.Map(
                lambda row: ("rejected", (row["id"].split("#")[-2], row["reason"], row["new_tokens"], row["reused"]))),
        ]
        section = (
            parts
            | "SummaryParts" >> beam.Flatten()
            | "KeySummary" >> beam.Map(lambda part: (None, part))
            | "GatherSummary" >> beam.GroupByKey()
            | "Summary" >> beam.Map(_summary, plan)
        )
        synthetic = generated[SYNTHETIC] | "DropWorkFields" >> beam.Map(
            lambda r: {k: v for k, v in r.items() if k not in ("segment", "new_tokens", "reused")})
        return {SYNTHETIC: synthetic, LEDGER: generated[LEDGER], SUMMARY: section}


def _rephrase(plan: RephrasePlan):
    """Every record file passes through under its name; the chosen records are rephrased, and the synthetic
    records written beside them (pickled, `records/synthetic-*`)."""
    def build(pipeline, paths, context: StepContext) -> StepOutput:
        choice = context.constants["choice"]
        read = split_routed(
            paths  # stage_run's Create of the files spreads them (a Reshuffle)
            | "PassThrough" >> beam.ParDo(_PassThroughFn(plan, choice["bound"], context.directory,
                                                         context.drops_vectors, context.compression)),
            "Read", (FILES, CHOSEN))
        rephrased = read[CHOSEN] | "Rephrase" >> RephraseRecords(plan, choice)
        synthetic = rephrased[SYNTHETIC] | "CacheSynthetic" >> WriteCache(context.directory, RECORDS, "synthetic")
        return StepOutput(None, [rephrased[LEDGER]], [read[FILES], synthetic, rephrased[SUMMARY]])
    return build


def _steps(plan: RephrasePlan, config) -> list[Step]:
    settings = config_section(config, "rephrase", exclude=("torch_threads",))
    return [Step("rephrase", _rephrase(plan), {"rephrase": settings},
                 {"model": plan.model_fingerprint, "backend": plan.backend, "device": plan.device},
                 reads_files=True, passes=(Pass("choice", lambda records, constants: choice_pass(records, plan)),))]


def _manifest(context: ManifestContext) -> dict[str, Any]:
    section = summary_meta(context.files, SUMMARY_DIR)
    reused = context.result.reused
    section["stage_reused"] = reused
    if reused and "segments_generated" in section:  # every segment came from the stage cache
        section["segments_reused_from_cache"] += section["segments_generated"]
        section["segments_generated"] = 0
    return {"rephrase": section}


def _forget_windows(plan: RephrasePlan) -> RephrasePlan:
    """--force: the window cache goes too, so every generation is made again."""
    if plan.cache_dir:
        delete_tree(plan.cache_dir)
    return plan


def _check(context) -> list[str]:
    """The summary against the ledger: chosen within max_records, accepted and rejected generations equal to
    the synthetic ledger rows."""
    summary = context.manifest["rephrase"]
    if "styles_summary" not in summary:
        return []
    problems = []
    chosen, bound = summary["records_chosen"], summary.get("max_records")
    if bound is not None and chosen > bound:
        problems.append(f"{chosen} records chosen, max_records is {bound}")
    accepted = sum(style["accepted"] for style in summary["styles_summary"].values())
    rejected = sum(sum(style["rejected"].values()) for style in summary["styles_summary"].values())
    synthetic = sum(rows for (fate, _), rows in context.synthetic.items() if fate != "rejected")
    if accepted != synthetic:
        problems.append(f"{accepted} rephrasings accepted, the ledger has {synthetic} synthetic rows")
    if rejected != context.synthetic[("rejected", "rephrase")]:
        problems.append(f"{rejected} rephrasings rejected, the ledger has "
                        f"{context.synthetic[('rejected', 'rephrase')]}")
    return problems


STAGE = Stage(
    name="rephrase",
    module=__name__,
    section="rephrase",
    enabled=lambda config: config.rephrase.enabled,
    plan=lambda context: plan_rephrase(context.config.rephrase, context.output, context.workers),
    steps=_steps,
    libraries=("torch", "transformers", "vllm"),
    manifest=_manifest,
    report="winnow.pipelines.report:rephrase_section",
    ledger_stages=("rephrase",),
    on_force=_forget_windows,
    check=_check,
)
