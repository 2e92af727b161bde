"""Global values computed from the data reach a pipeline as constants, never as Beam side inputs.

On Beam 2.77's DaskRunner a side input computed from the data after a GroupByKey comes out wrong (a count of
1,000 read as 3,288; docs/NOTES.md), and a stage built on one exits 0 with a wrong result. So a value that
depends on the whole of a step's input (a record count, a k-means fit sample, BM25 statistics, the exact
top-n threshold, a choice bound) is computed by a `Pass`: a small pipeline of its own over the step's input
records whose one result is written to a file, read back on the driver, and handed to the next pass and to the
step's graph as a plain constant (`StepContext.constants`). Each pass costs one more read of the step's
input; what crosses to the driver is small by construction (counts, histograms, a bounded sample).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam

from winnow.pipelines.engine.options import add_metrics, run_pipeline
from winnow.pipelines.io.cache_files import RECORDS, ReadCache
from winnow.pipelines.io.storage import delete_file, join, read_bytes, write_bytes

PassBuild = Callable[[Any, dict[str, Any]], Any]


@dataclass(frozen=True)
class Pass:
    """One global value: `build(records, constants)` returns a PCollection of exactly one element (for a pass
    that does not read records, `records` is the pipeline itself; for one with `reads_files`, the paths of
    the files it reads: the step's input record files, or the previous step's files of that `dir`).
    `constants` holds the earlier passes' results by name, under `previous` the previous step of the stage
    (a StageEntry, or None), and under `scratch` the step's folder for temporary files (a pass may leave
    files there for the step's graph). A pass with `again` repeats (the rounds of an iterative algorithm, a
    pipeline each) and finds its own last result under its name."""

    name: str
    build: PassBuild
    reads_records: bool = True
    reads_vectors: bool = False
    reads_files: str | None = None
    when: Callable[[Any], bool] | None = None  # runs only if when(the previous step) holds
    again: Callable[[Any], bool] | None = None  # runs again while again(its result) holds; it sees that result
    most: int = 1  # runs at most, with `again`: one more is an error


def _write_value(values: list[Any], path: str, name: str) -> None:
    if len(values) != 1:
        raise RuntimeError(f"internal error: pass {name} produced {len(values)} values, not one")
    write_bytes(path, pickle.dumps(values[0]))


def _read_value(path: str) -> Any:
    value = pickle.loads(read_bytes(path))
    delete_file(path)
    return value


def build_pass_graph(pipeline: beam.Pipeline, definition: Pass, inputs: list[str], path: str,
                     constants: dict[str, Any], previous=None) -> None:
    source = pipeline
    if definition.reads_files:
        paths = inputs if definition.reads_files == RECORDS else previous.paths(definition.reads_files)
        source = pipeline | "Files" >> beam.Create(paths)  # Create spreads its elements (a Reshuffle)
    elif definition.reads_records:
        source = pipeline | "ReadCached" >> ReadCache(inputs, () if definition.reads_vectors else ("embedding",))
    _ = (
        definition.build(source, constants)
        | "Gather" >> beam.combiners.ToList()
        | "WriteValue" >> beam.Map(_write_value, path, definition.name)
    )


def run_passes(options, passes: tuple[Pass, ...], inputs: list[str], directory: str,
               metrics: dict[str, Any], previous=None, scratch: str = "") -> dict[str, Any]:
    """Run `passes` in order over the records in `inputs` (or the files of the `previous` step, a StageEntry);
    their results by name. Each pass sees the results of the ones before it."""
    constants: dict[str, Any] = {}
    for definition in passes:
        if definition.when is not None and not definition.when(previous):
            continue
        path = join(directory, f"_pass-{definition.name}.pickle")
        for run in range(definition.most + 1):
            if run == definition.most:
                raise RuntimeError(f"internal error: pass {definition.name} did not finish in {run} runs")
            add_metrics(metrics, run_pipeline(
                options, lambda pipeline, d=definition, p=path: build_pass_graph(pipeline, d, inputs, p,
                                                                                 {**constants, "scratch": scratch,
                                                                                  "previous": previous}, previous)))
            constants[definition.name] = _read_value(path)
            if definition.again is None or not definition.again(constants[definition.name]):
                break
    return constants


def gather(parts: dict[str, Any], label: str = "Gather"):
    """{name: PCollection of one element} -> a PCollection of one dict {name: element}."""
    tagged = [pcollection | f"{label}Tag{name}" >> beam.Map(lambda value, n=name: (n, value))
              for name, pcollection in parts.items()]
    return (
        tagged
        | f"{label}Parts" >> beam.Flatten()
        | f"{label}List" >> beam.combiners.ToList()
        | f"{label}Dict" >> beam.Map(dict)
    )


def smallest(pcollection, n: int, label: str, key=None):
    """The `n` smallest elements as one sorted list. Not `beam.combiners.Top.Smallest`: its global form emits
    from `finish_bundle`, whose output Beam 2.77's DaskRunner drops (it came out [] on a cluster)."""
    return pcollection | label >> beam.CombineGlobally(beam.combiners.TopCombineFn(n, key=key, reverse=True))
