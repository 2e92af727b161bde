"""One DoFn for the model stages (embed, select, rephrase): a model loaded once per worker process, fed one
window of elements at a time, with the same metrics and progress for every stage.

A stage supplies a `ModelHandler` (after Beam's `apache_beam.ml.inference.base.ModelHandler`): how to load its
model, what identifies it, and how to run one window. `RunModel` does the rest: the model is loaded on the
first window that needs it (a rephrase window found in its cache needs none), shared by the worker's threads
through Beam's `Shared`, with `torch_threads` set before loading, and called by one thread at a time
(`model_lock`); each window is put in input order, timed
(`NAMESPACE.busy_ms`), counted (`NAMESPACE.COUNTER`) and reported to the console.

Windows come from a GroupByKey on input position, not from BatchElements or RunInference: on Beam 2.77's
DaskRunner, RunInference lost whole windows and BatchElements' last batch (emitted in finish_bundle) is
dropped; windows by position are also the same on every runner, so the model sees the same batches and
gives the same numbers.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.utils.shared import Shared

from winnow.pipelines.engine.progress import Progress
from winnow.selectors.embedding import worker_threads

_SHARED = Shared()
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


class _Held:
    """A weak-referenceable holder: Shared keeps what it holds alive while a DoFn refers to it."""

    def __init__(self, value: Any):
        self.value = value


class ModelHandler:
    """What a model stage supplies to `RunModel`. Subclasses set `namespace` and `counter` (metrics), `label`
    and `unit` (console progress) and implement `tag`, `load` and `run`."""

    namespace = "winnow"
    counter = "elements"
    label = "model"
    unit = "records"

    def __init__(self, torch_threads: int):
        self.torch_threads = torch_threads

    def tag(self) -> str:
        """Identifies the loaded model: workers share one model per tag."""
        raise NotImplementedError

    def load(self) -> Any:
        raise NotImplementedError

    def order(self, element: Any) -> Any:
        """The order of a window's elements (input order)."""
        from winnow.pipelines.io.records import order_key

        return order_key(element)

    def expected(self) -> int | None:
        """The elements the stage will see in all, for progress (None: unknown)."""
        return None

    def run(self, model: Callable[[], Any], elements: list[Any]) -> Iterable[Any]:
        """Outputs of one window; `model()` loads (once) and returns the model."""
        raise NotImplementedError

    def note(self) -> str:
        """Extra text for the progress line (e.g. tokens per second)."""
        return ""


def acquire_model(handler: ModelHandler) -> _Held:
    """The worker's model for `handler`, loaded once per process; keep the returned holder referenced."""

    def load() -> _Held:
        import torch

        torch.set_num_threads(handler.torch_threads or worker_threads())
        return _Held(handler.load())

    return _SHARED.acquire(load, tag=_tag(handler))


def release_models() -> None:
    """Let this process's models go once the stage that used them is done. Beam's `Shared` keeps the object it
    handed out last alive until a different one is acquired (its keep-alive, for runners that drop every
    reference between bundles), so in-process the embedding model would otherwise stay resident through
    prune and mix: 2 GiB of OpenVINO's CPU plugin at int8. Acquiring an empty holder under another tag moves
    the keep-alive to it; the model goes with the last DoFn that held it (`RunModel.teardown`)."""
    _SHARED.acquire(lambda: _Held(None), tag="released")
    gc.collect()


def _tag(handler: ModelHandler) -> str:
    return f"{type(handler).__name__}:{handler.tag()}"


def model_lock(handler: ModelHandler) -> threading.Lock:
    """The lock that a worker's threads take turns on to call `handler`'s model. The threads share one model
    (in-process threads, a Dask worker's threads) and fast tokenizers fail when two threads call them at once
    ("Already borrowed"); each call already uses every torch thread, and the threads' reading and writing
    still overlap."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(_tag(handler), threading.Lock())


class RunModel(beam.DoFn):
    """(key, window of elements) -> the handler's outputs, window by window (see the module docstring)."""

    def __init__(self, handler: ModelHandler, progress_every_s: float | None = None):
        self.handler = handler
        self.progress_every_s = progress_every_s
        self.busy_ms = beam.metrics.Metrics.distribution(handler.namespace, "busy_ms")
        self.elements = beam.metrics.Metrics.counter(handler.namespace, handler.counter)

    def setup(self):
        self.held = None
        self.progress = None

    def _model(self) -> Any:
        if self.held is None:
            self.held = acquire_model(self.handler)
        return self.held.value

    def teardown(self):
        self.held = None

    def process(self, window) -> Iterator[Any]:
        elements = sorted(window[1], key=self.handler.order)
        with model_lock(self.handler):
            started = time.perf_counter()
            outputs = list(self.handler.run(self._model, elements))
        self.busy_ms.update(int(1000 * (time.perf_counter() - started)))
        self.elements.inc(len(elements))
        if self.progress is None:
            every = {} if self.progress_every_s is None else {"every_s": self.progress_every_s}
            self.progress = Progress(self.handler.label, self.handler.expected(), self.handler.unit,
                                     **every)
        self.progress.advance(len(elements), self.handler.note())
        yield from outputs
