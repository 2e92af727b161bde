"""A worker's threads share one model and call it one at a time (fast tokenizers fail on concurrent calls), and
take turns in the single-threaded kernel sections."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from winnow.pipelines.engine.model_stage import ModelHandler, RunModel, model_lock, release_models


class _CountingHandler(ModelHandler):
    """A model whose calls record how many run at once."""

    inside = 0
    most = 0
    guard = threading.Lock()

    def tag(self) -> str:
        return "counting"

    def load(self):
        return object()

    def order(self, element):
        return element

    def run(self, model, elements):
        model()
        with self.guard:
            type(self).inside += 1
            type(self).most = max(type(self).most, type(self).inside)
        time.sleep(0.02)  # widen the window in which a second call could overlap
        with self.guard:
            type(self).inside -= 1
        return [element * 2 for element in elements]


def test_threads_call_a_shared_model_one_at_a_time():
    handler = _CountingHandler(torch_threads=1)
    functions = [RunModel(handler) for _ in range(4)]  # one DoFn instance per worker thread, as Beam makes them
    for function in functions:
        function.setup()

    def windows(function):
        return [list(function.process((key, [key, key + 1]))) for key in range(5)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(windows, functions))
    assert results == [[[2 * key, 2 * key + 2] for key in range(5)]] * 4
    assert _CountingHandler.most == 1
    assert model_lock(handler) is model_lock(_CountingHandler(torch_threads=2))  # one lock per model tag


def test_single_threaded_kernels_of_two_threads_take_turns():
    """BLAS's thread count is process-wide: a second thread's section must not overlap the first's, or the
    first one leaving would restore the count under the second's running kernel."""
    from threadpoolctl import threadpool_info

    from winnow.selectors.threads import one_thread

    guard, inside, most, seen = threading.Lock(), [0], [0], []

    def section(_):
        with one_thread():
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            seen.append({pool["num_threads"] for pool in threadpool_info()})
            with guard:
                inside[0] -= 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(section, range(8)))
    assert most[0] == 1
    assert all(counts <= {1} for counts in seen)


class _HeavyHandler(ModelHandler):
    """A model whose lifetime the test watches through a weak reference."""

    def tag(self) -> str:
        return "heavy"

    def load(self):
        return _Model()


class _Model:
    pass


def test_a_finished_stage_lets_its_model_go():
    """Beam's Shared keeps the last model it handed out alive; in-process that held the embedding model (2 GiB
    at OpenVINO int8) through prune. Once the DoFns are torn down, release_models lets it be collected."""
    fn = RunModel(_HeavyHandler(1))
    fn.setup()
    model = weakref.ref(fn._model())
    assert model() is not None
    fn.teardown()
    gc.collect()
    assert model() is not None  # Shared's keep-alive still holds it
    release_models()
    assert model() is None
