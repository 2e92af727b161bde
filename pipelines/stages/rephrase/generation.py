"""Generating rephrasings: the model handler that turns a window of chosen records into segments, prompts, raw
generations (cached window by window under `window_key`) and cleaned rephrasings with their ledger rows."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError

from winnow.pipelines.engine.model_stage import ModelHandler
from winnow.pipelines.io.records import content_id, ledger_row, order_key
from winnow.pipelines.io.storage import join, read_json, write_bytes
from winnow.pipelines.stages.rephrase.choice import RephrasePlan, Tokenizer
from winnow.rephrase import clean as cleaning
from winnow.rephrase import generate, prompts

SYNTHETIC, LEDGER, SUMMARY = "synthetic", "ledger", "summary"
PROGRESS_EVERY_S = 10.0


CACHE_FORMAT = "1"  # the layout of a cached window (raw generations); cleaning is not part of the key


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
            self._tokenizer = Tokenizer(self.plan).get()
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
