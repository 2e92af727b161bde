"""Beam options with winnow's defaults, running one pipeline, and the Beam metrics it reports."""

from __future__ import annotations

import argparse
import gc
import logging
import os
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from winnow.pipelines.io.filesystems import share_filesystem_options

DEFAULT_RUNNER = "FnApiRunner"
RUNNER_ALIASES = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def beam_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options with winnow's defaults: the in-process FnApiRunner (the DirectRunner first tries to
    download the Prism runner, which stalls offline) with one worker thread per core (`in_process_threads`);
    runner aliases such as DaskRunner expanded."""
    args = []
    for arg in beam_args:
        if arg.startswith("--runner="):
            name = arg.split("=", 1)[1]
            arg = f"--runner={RUNNER_ALIASES.get(name, name)}"
        args.append(arg)
    if not any(arg == "--runner" or arg.startswith("--runner=") for arg in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    if f"--runner={DEFAULT_RUNNER}" in args:
        args += in_process_threads(args)
    return PipelineOptions(args)


def in_process_threads(args: list[str]) -> list[str]:
    """The FnApiRunner's worker threads, unless the arguments choose a running mode or a number of workers: one
    per core, each with an in-memory (embedded) worker. Record work is mostly Arrow, Parquet and compiled loops
    that release the GIL, so the threads share the cores; model calls take turns on one model
    (`model_stage.model_lock`), each with every torch thread. Beam's `multi_threading` mode runs the same
    threads but passes elements through a gRPC data plane: the prune stage's fit sample (150 MB of vectors
    through a combiner) took 14 s there against 8 s in memory (docs/NOTES.md)."""
    if any(arg.split("=", 1)[0] in ("--direct_running_mode", "--direct_num_workers") for arg in args):
        return []
    return ["--direct_running_mode=in_memory", f"--direct_num_workers={os.cpu_count() or 1}"]


class _InMemoryWorkersNote(logging.Filter):
    """Beam 2.77 warns, for every pipeline, that `in_memory` with more than one worker lacks parallelism; its
    FnApiRunner runs a ParallelBundleManager over one embedded worker per thread all the same (measured:
    both cores busy; tests/test_runners.py compares the output with one thread's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("If direct_num_workers is not equal to 1")


logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner").addFilter(_InMemoryWorkersNote())


def worker_processes(options: PipelineOptions) -> int:
    """Worker processes on this machine that share its cores; 0 for a runner whose workers live elsewhere (a
    Dask cluster), where each worker sizes itself."""
    if is_dask(options):
        return 0
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing":
        return direct.direct_num_workers or os.cpu_count() or 1
    return 1


def is_dask(options: PipelineOptions) -> bool:
    return str(options.get_all_options().get("runner") or "").endswith("DaskRunner")


def metrics_unavailable(options: PipelineOptions) -> str | None:
    """Why the manifest's `metrics` is empty for this runner, if it always is."""
    if is_dask(options):
        return "Beam 2.77's DaskRunner collects no metrics (DaskRunnerResult.metrics is not implemented)"
    return None


def beam_metrics(result) -> dict[str, Any]:
    """winnow's Beam counters and distributions (summed over steps), as the runner reports them; {} when the
    runner reports none."""
    try:
        query = result.metrics().query()
    except Exception:  # noqa: BLE001 - runners without metrics support raise various errors
        return {}
    values: dict[str, Any] = {}
    for counter in query.get("counters", []):
        if counter.key.metric.namespace.startswith("winnow"):
            name = f"{counter.key.metric.namespace}.{counter.key.metric.name}"
            values[name] = values.get(name, 0) + counter.committed
    for dist in query.get("distributions", []):
        if dist.key.metric.namespace.startswith("winnow") and dist.committed is not None:
            name = f"{dist.key.metric.namespace}.{dist.key.metric.name}"
            entry = values.setdefault(name, {"count": 0, "sum": 0, "min": None, "max": None})
            committed = dist.committed
            entry["count"] += committed.count
            entry["sum"] += committed.sum
            entry["min"] = committed.min if entry["min"] is None else min(entry["min"], committed.min)
            entry["max"] = committed.max if entry["max"] is None else max(entry["max"], committed.max)
    return dict(sorted(values.items()))


def close_client(result) -> None:
    """The DaskRunner leaves its cluster client open; closed here, it stops reconnecting after the job."""
    client = getattr(result, "client", None)
    if client is not None and hasattr(client, "close"):
        client.close()


def run_pipeline(options: PipelineOptions, build: Callable[[beam.Pipeline], None]) -> dict[str, Any]:
    """Run one pipeline to the end; its metrics. A finished in-process pipeline leaves its bundles' last
    elements (whole files of vectors) in reference cycles that only a full collection frees: collected here,
    before the next pipeline allocates its own."""
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    metrics = beam_metrics(result)
    close_client(result)
    del pipeline, result
    gc.collect()
    return metrics


def add_metrics(total: dict[str, Any], more: dict[str, Any]) -> None:
    for name, value in more.items():
        if isinstance(value, dict):
            entry = total.setdefault(name, {"count": 0, "sum": 0, "min": None, "max": None})
            entry["count"] += value["count"]
            entry["sum"] += value["sum"]
            for bound, pick in (("min", min), ("max", max)):
                if value[bound] is not None:
                    entry[bound] = value[bound] if entry[bound] is None else pick(entry[bound], value[bound])
        else:
            total[name] = total.get(name, 0) + value


def share_with_workers(beam_args: list[str]) -> None:
    """On the driver: the job's filesystem options here, in the environment worker processes inherit, and on a
    Dask cluster (`--runner=DaskRunner --dask_client_address=...`) through a worker plugin that every worker,
    including those that join later, runs (io/filesystems.py)."""
    args = list(beam_args)
    share_filesystem_options(args)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runner")
    parser.add_argument("--dask_client_address")
    known, _ = parser.parse_known_args(args)
    if str(known.runner or "").endswith("DaskRunner") and known.dask_client_address:
        from distributed import Client

        from winnow.pipelines.engine.dask_plugin import FileSystemOptionsPlugin

        with Client(known.dask_client_address, timeout=60) as client:
            client.register_plugin(FileSystemOptionsPlugin(args), name="winnow-filesystem-options")
