r"""The winnow job: a loop over the planned stages, each reused from the cache or computed, then the mix and
the output, published atomically.

    read -> validate -> [quality] -> [embed] -> [prune] -> [select] -> [rephrase] -> [mix] -> shards
(the order of the config's `pipeline` list; see stages.py). Every stage is cached (stage_run.py); the mix and
the output writing form the last pipeline, always run: they are the run's product. The job writes into a hidden
sibling of output.path and renames it into place only after the manifest is written (on an object store: under
a prefix of the run's own, with the manifest written last; see publish.py), so a crashed run never leaves an
output that looks complete.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from winnow.pipelines.engine.options import (
    add_metrics,
    beam_options,
    metrics_unavailable,
    run_pipeline,
    share_with_workers,
)
from winnow.pipelines.engine.passes import run_passes
from winnow.pipelines.engine.stage_cache import StageCache, StageEntry
from winnow.pipelines.engine.stage_run import build_stage_graph, run_stage
from winnow.pipelines.io.cache_files import (
    FILES_META,
    RECORDS,
    REMOVED,
    read_files_meta,
    table_elements,
    write_files_meta,
)
from winnow.pipelines.io.extra_kinds import extra_schema, merge_kinds
from winnow.pipelines.io.ordered_io import PlanOrderedFiles, WriteTasks, ordered_file_writer
from winnow.pipelines.io.records import LEDGER_SCHEMA
from winnow.pipelines.io.storage import (
    copy_file,
    delete_file,
    delete_tree,
    is_remote,
    join,
    sibling,
    split,
)
from winnow.pipelines.io.write import (
    LEDGER_KEYS,
    file_extra_kinds,
    ledger_rows_table,
    ledger_tally,
    rows_from_table,
    shard_output,
    value_tally,
)
from winnow.pipelines.outputs.manifest import build_manifest
from winnow.pipelines.outputs.mix import FRAGMENTS as MIX_FRAGMENTS
from winnow.pipelines.outputs.mix import LEDGER as MIX_LEDGER
from winnow.pipelines.outputs.mix import SHARDS as MIX_SHARDS
from winnow.pipelines.outputs.mix import MixFiles, partition_pass, shard_writer
from winnow.pipelines.outputs.mix import plan as mix_plan
from winnow.pipelines.outputs.publish import OutputError, output_lock, publish
from winnow.pipelines.outputs.selfcheck import SelfCheckError, check_stages, failed_stages
from winnow.pipelines.plan import JobPlan, plan_job

__all__ = ["OutputError", "beam_options", "build_output_graph", "build_stage_graph", "plan_job", "run_job"]

StageCallback = Callable[[str, StageEntry | None], None]
REMOVED_ROWS, KEPT, LEDGER_FRAGMENT = "removed", "kept", "ledger"
SHARDS, LEDGER = "shards", "ledger"  # the output files' kinds


def output_extra(entry: StageEntry) -> list[tuple[str, str]]:
    """The shards' passed-through columns: the kinds each of the last stage's record files notes in its
    metadata, merged (a file whose metadata has none, from an older cache, is read for them)."""
    parts = []
    for meta in entry.files:
        if meta["dir"] == RECORDS and "step" not in meta:
            noted = meta.get("extra_kinds")
            parts.append(noted if noted is not None else file_extra_kinds(join(entry.directory, meta["file"])))
    return extra_schema(merge_kinds(parts))


def _ledger_rows(table: pa.Table, kind: str) -> pa.Table:
    """Rows of a source of ledger rows as a ledger table with its order keys: a stage's removed rows (pickled),
    the mix's ledger fragments, or (without the mix) the kept records, each of which is written once."""
    if kind == LEDGER_FRAGMENT:
        return table
    if kind == KEPT:
        return ledger_rows_table(rows_from_table(table, []), "write", None, None, 1)
    if "fate" in table.column_names:  # removed rows a stage wrote as a ledger table (prune)
        return table.select([*LEDGER_SCHEMA.names, *LEDGER_KEYS])
    rows = list(table_elements(table))
    ledger = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
    for name in LEDGER_KEYS:
        ledger = ledger.append_column(name, pa.array([row.get(name, 0) for row in rows], pa.int64()))
    return ledger


def _without_vectors(names: list[str]) -> list[str]:
    return [name for name in names if name != "embedding"]


def _ledger_output(rows: pa.Table) -> pa.Table:
    return rows.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)


def _copies(rows: pa.Table) -> int:
    return int(pc.sum(rows.column("copies")).as_py() or 0)


def _source_tally(rows: pa.Table) -> dict[str, int]:
    return value_tally(rows.column("source"))


def build_output_graph(pipeline: beam.Pipeline, plan: JobPlan, records_paths: list[str],
                       removed_paths: list[str], extra: list[tuple[str, str]], mixed: tuple | None = None) -> None:
    """The last graph: the final stage's records are mixed (or written in input order) into shards, and the
    ledger gets every record's one row. Records move as Arrow tables between files (mix.py, ordered_io.py);
    the graph carries file names and metadata. Its last step gathers the metadata of every written file, so
    every branch is upstream of it: Beam 2.77's DaskRunner computes only the last transform and what it
    depends on. `mixed` is (the hash partitions' fragments, the placement, the summary) from mix.py's pass and
    plan."""
    config, work = plan.config, plan.work_dir
    output = config.output
    written, tasks, writers = [], {}, {}
    removed = pipeline | "Removed" >> beam.Create([(path, REMOVED_ROWS) for path in removed_paths])
    if config.mix.enabled:
        fragments, placement, summary = mixed
        placed = pipeline | "Mix" >> MixFiles(config.mix, work, fragments, placement)
        tasks[SHARDS] = placed[MIX_SHARDS]
        writers[SHARDS] = shard_writer(work, extra, output.row_group_rows)
        written.append(pipeline | "MixSummary" >> beam.Create([summary]))
        kept = placed[MIX_LEDGER] | "Fragments" >> beam.Map(lambda path: (path, LEDGER_FRAGMENT))
    else:
        tasks[SHARDS] = (
            pipeline
            | "Kept" >> beam.Create([(path, KEPT) for path in records_paths])
            | "PlanShards" >> PlanOrderedFiles(output.shard_rows))
        writers[SHARDS] = ordered_file_writer(
            work, "shards", lambda table, kind: rows_from_table(table, extra),
            functools.partial(shard_output, extra=extra), output.row_group_rows, _source_tally,
            columns=_without_vectors)
        kept = pipeline | "KeptRows" >> beam.Create([(path, KEPT) for path in records_paths])
    tasks[LEDGER] = (removed, kept) | "LedgerSources" >> beam.Flatten() | "PlanLedger" >> PlanOrderedFiles(
        output.ledger_rows)
    writers[LEDGER] = ordered_file_writer(work, "ledger", _ledger_rows, _ledger_output, output.row_group_rows,
                                          ledger_tally, {"copies": _copies}, columns=_without_vectors)
    written.append(tasks | "WriteFiles" >> WriteTasks(writers))
    _ = (
        written
        | "AllFiles" >> beam.Flatten()
        | "FileList" >> beam.combiners.ToList()
        | "WriteFileList" >> beam.Map(write_files_meta, join(plan.work_dir, FILES_META))
    )


def run_job(plan: JobPlan, force: bool = False, on_stage: StageCallback | None = None) -> dict[str, Any]:
    """Run the planned job and publish OUT, holding the output's lock; returns the manifest (see `_run_job`), with
    `cache`: what the stage cache holds after the run and what it dropped (not in the published manifest, which
    is written before the cache is trimmed)."""
    share_with_workers(plan.beam_args)
    with output_lock(plan.output):
        return _run_job(plan, force, on_stage)


def _run_stages(plan: JobPlan, cache: StageCache, options, force: bool, cached: bool,
                on_stage: StageCallback | None, metrics: dict[str, Any]) -> list[StageEntry]:
    entries: list[StageEntry] = []
    for planned in plan.stages:
        entry = None if force or not cached else cache.lookup(planned.name, planned.key)
        if entry is None:
            if on_stage:
                on_stage(planned.name, None)
            entry = run_stage(plan, planned, entries[-1] if entries else None, cache, options,
                              reuse_steps=cached and not force)
        add_metrics(metrics, entry.metrics)
        plan.timings[f"{planned.name}_s"] = 0.0 if entry.reused else entry.seconds
        entries.append(entry)
        if on_stage:
            on_stage(planned.name, entry)
    return entries


def _run_job(plan: JobPlan, force: bool, on_stage: StageCallback | None) -> dict[str, Any]:
    """Run the planned job and publish OUT; returns the manifest.

    Stages whose cache entry matches their key are reused (unless `force`); the others run, one Beam pipeline
    per step, and are cached. `on_stage(name, entry)` is called before a stage runs (entry None) and after it
    is reused or computed."""
    options = beam_options(plan.beam_args)
    cached = plan.config.output.cache
    scratch = sibling(plan.output, f".{split(plan.output)[1]}.stages-{uuid.uuid4().hex[:12]}")
    cache = StageCache(plan.cache_dir if cached else scratch)
    if force:
        for planned in plan.stages:
            if planned.stage.on_force is not None:
                planned.plan = planned.stage.on_force(planned.plan)
                planned.steps = [replace(step, step=new) for step, new in
                                 zip(planned.steps, planned.stage.steps(planned.plan, plan.config), strict=True)]
    work = plan.work_dir
    if not is_remote(work):
        Path(work).mkdir(parents=True)
    try:
        metrics: dict[str, Any] = {}
        entries = _run_stages(plan, cache, options, force, cached, on_stage, metrics)
        started = time.perf_counter()
        removed = [path for entry in entries for path in entry.all_paths(REMOVED)]
        kept = entries[-1].paths(RECORDS)
        mixing = plan.config.mix.enabled
        extra = output_extra(entries[-1])
        mixed = None
        if mixing:
            passes = (partition_pass(plan.config.mix, kept, work, entries[-1].records, extra),)
            constants = run_passes(options, passes, kept, work, metrics)
            partitions = constants["mix_partitions"]
            summary, placement = mix_plan(plan.config.mix, partitions["counts"], partitions["bits"])
            mixed = (partitions["fragments"], placement, summary)
        add_metrics(metrics, run_pipeline(
            options, lambda pipeline: build_output_graph(pipeline, plan, kept, removed, extra, mixed)))
        files = read_files_meta(join(work, FILES_META))
        delete_file(join(work, FILES_META))
        delete_tree(join(work, MIX_FRAGMENTS))
        for planned, entry in zip(plan.stages, entries, strict=True):
            for meta in entry.metas():
                files.append(meta)
                if meta["dir"] in planned.stage.output_dirs:
                    copy_file(join(entry.directory, meta["file"]), join(work, meta["file"]))
        plan.timings["output_s"] = time.perf_counter() - started
        started = time.perf_counter()
        root = work
        if is_remote(plan.output):  # the manifest lists files relative to OUT: this run's are under its prefix
            prefix = split(work)[1] + "/"
            files = [{**f, "file": prefix + f["file"]} if "file" in f else f for f in files]
            root = plan.output
        manifest = build_manifest(plan, options, files, entries)
        manifest["metrics"] = dict(sorted(metrics.items()))
        if metrics_unavailable(options):
            manifest["metrics_unavailable"] = metrics_unavailable(options)
        manifest["timings"] = {**plan.timings, "finalize_s": time.perf_counter() - started}
        manifest["timings"]["total_s"] = sum(manifest["timings"].values())
        problems = check_stages(manifest, root)
        if problems:
            failed = failed_stages(problems)
            for entry in entries:
                if entry.name in failed:
                    cache.discard(entry.directory)  # never reused by a later run
            raise SelfCheckError("; ".join(problems) + " (the output was not published)")
        if plan.config.output.report:
            from winnow.pipelines.outputs.report import REPORT_DIR, build_report

            report = f"{split(work)[1]}/{REPORT_DIR}/index.html" if is_remote(plan.output) else \
                f"{REPORT_DIR}/index.html"
            build_report(root, join(root, report), display=plan.output, manifest=manifest)
            if is_remote(plan.output):
                manifest["report"] = report
        payload = (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode()
    except BaseException:
        delete_tree(work)
        if not cached:
            delete_tree(cache.root)
        raise
    publish(work, plan.output, payload)
    if cached:
        use = cache.remember(entries, plan.config.output.cache_max_bytes)
        manifest["cache"] = {"entries": use.entries, "bytes": use.bytes, "dropped": use.dropped,
                             "dropped_bytes": use.dropped_bytes, "max_bytes": plan.config.output.cache_max_bytes}
    else:
        delete_tree(cache.root)
    return manifest


def embed_corpus(path: str, output: str, text_column: str = "text", id_column: str | None = "id",
                 embed: dict | None = None):
    """Embed a Parquet/JSONL corpus with the job (default model and backend unless `embed` says otherwise,
    reusing what `output` already holds) and return (ids, unit float32 matrix) in input order: what evaluations
    and benchmarks start from."""
    from winnow.pipelines.config import build_config
    from winnow.pipelines.stages.embed import read_embeddings

    config = build_config({
        "input": {"path": path, "columns": {"id": id_column, "text": text_column}},
        "output": {"path": output},
        "embed": {**(embed or {}), "enabled": True},
    })
    run_job(plan_job(config, []))
    return read_embeddings(output)
