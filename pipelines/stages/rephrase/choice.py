"""Which records are rephrased, before any model runs: the stage's plan (model, styles, prompts, generation
settings), the choice by `rephrase.sources`, a seeded hash below `rephrase.fraction` and the `max_records`
bound (the `choice` pass finds that bound and the number of segments, for progress)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.utils.shared import Shared

from winnow.pipelines.config import ConfigError, RephraseConfig
from winnow.pipelines.engine.passes import smallest
from winnow.pipelines.io.cached_rows import CachedRows
from winnow.pipelines.io.records import seeded_hash, seeded_hashes
from winnow.pipelines.io.storage import sibling, split
from winnow.rephrase import generate, prompts, segment
from winnow.selectors import embedding, lm


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
    device = embedding.choose_device(config.device, "rephrase.device")
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


class Tokenizer:
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


class SegmentFn(beam.DoFn):
    """A chosen record -> one unit per (segment, style), keyed by its window."""

    def __init__(self, plan: RephrasePlan):
        self.plan = plan

    def setup(self):
        self.tokenizer = Tokenizer(self.plan).get()

    def process(self, record: dict[str, Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
        pieces = segment.segment(record["text"], self.tokenizer, self.plan.max_segment_tokens)
        parent = {k: record[k] for k in ("id", "source", "input_file", "input_row", "file_index")}
        window = record["input_row"] // self.plan.window
        for style_index in range(len(self.plan.styles)):
            for index, piece in enumerate(pieces):
                unit = {"parent": parent, "segment_index": index, "segment": piece, "style_index": style_index}
                yield (style_index, record["file_index"], window), unit


class _UnitCountFn(SegmentFn):
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
