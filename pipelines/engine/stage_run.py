"""Running a stage: each step is a Beam pipeline of its own that reads the previous step's cached records,
runs the step's graph and writes its records, removed rows and file list to the cache.

A stage of several steps (scores, then a decision) is cached as one entry `.OUT.cache/STAGE-KEY/`: the last
step's files at its top, each earlier step's in a folder named after the step with its own `step.json` (a last
step that writes no records leaves the stage's records in the previous step's folder). When
the stage's key has no entry, an earlier step whose key is unchanged is taken from the stage's previous entry
(hard links, or copies on an object store) instead of being computed again: that is what makes a changed
threshold cost only the decision.

The models a step loaded are let go when its pipeline is done, before the next step starts: the embed stage's
model (2 GiB of OpenVINO at int8) is not resident while its embeddings output is written.

A step that `resumes_files` (embed, select's scores) keeps each file it finishes apart while it runs, so that
the same command after a killed run takes those files and computes only the rest (engine/file_resume.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import apache_beam as beam

from winnow.pipelines.engine import file_resume
from winnow.pipelines.engine.model_stage import release_models
from winnow.pipelines.engine.options import add_metrics, run_pipeline
from winnow.pipelines.engine.passes import run_passes
from winnow.pipelines.engine.stage import StepContext
from winnow.pipelines.engine.stage_cache import StageCache, StageEntry
from winnow.pipelines.io.blocks import block_compression
from winnow.pipelines.io.cache_files import (
    FILES_META,
    RECORDS,
    REMOVED,
    ReadCache,
    WriteCache,
    read_files_meta,
    write_files_meta,
)
from winnow.pipelines.io.storage import copy_tree, delete_file, delete_tree, is_remote, join


def build_stage_graph(pipeline: beam.Pipeline, planned, upstream: list[str], directory: str, step: int = 0,
                      job=None, previous: StageEntry | None = None, constants: dict[str, Any] | None = None,
                      scratch: str = "", resume: str = "") -> None:
    """One step's graph (by default the stage's first): read the previous step's cached records (the first
    step of the first stage reads the input), run the step, write its records and removed rows to the cache
    and the list of every file it wrote. Its last step gathers that list, so every branch is upstream of it:
    Beam 2.77's DaskRunner computes only the last transform and what it depends on."""
    planned_step = planned.steps[step]
    definition = planned_step.step
    records = None
    if definition.reads_files:
        records = pipeline | "CachedFiles" >> beam.Create(list(upstream))
    elif not definition.reads_input:
        with_vectors = definition.reads_vectors or planned_step.keeps_vectors
        records = pipeline | "ReadCached" >> ReadCache(upstream, () if with_vectors else ("embedding",))
    job = job or planned.job
    output = definition.build(pipeline, records, StepContext(job, directory, previous, constants or {},
                                                             planned_step.drops_vectors, scratch,
                                                             block_compression(job.config.output.cache),
                                                             resume))
    written = [*output.metadata]
    if not definition.reads_files:  # a files step wrote its records itself (their metadata is in `metadata`)
        records = output.records
        if planned_step.drops_vectors:
            records = records | "DropVectors" >> beam.Map(lambda r: {k: v for k, v in r.items() if k != "embedding"})
        written.append(records | "CacheRecords" >> WriteCache(directory, RECORDS))
    if output.removed:
        removed = output.removed[0] if len(output.removed) == 1 else \
            tuple(output.removed) | "AllRemoved" >> beam.Flatten()
        written.append(removed | "CacheRemoved" >> WriteCache(directory, REMOVED))
    _ = (
        written
        | "AllFiles" >> beam.Flatten()
        | "FileList" >> beam.combiners.ToList()
        | "WriteFileList" >> beam.Map(write_files_meta, join(directory, FILES_META))
    )


def run_stage(job, planned, upstream: StageEntry | None, cache: StageCache, options, reuse_steps: bool
              ) -> StageEntry:
    """Compute a stage whose entry the cache lacks, step by step, into a temporary directory that becomes the
    entry when every step is done. With `reuse_steps`, earlier steps found unchanged in the cache are linked
    in, not computed."""
    started = time.perf_counter()
    directory = cache.begin(planned.name, planned.key)
    try:
        inputs = upstream.paths(RECORDS) if upstream else []
        files: list[dict[str, Any]] = []
        steps: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {}
        previous = None
        last = len(planned.steps) - 1
        records_step = last if planned.steps[last].step.writes_records else last - 1
        for index, planned_step in enumerate(planned.steps):
            step_started = time.perf_counter()
            step_dir = directory if index == last else join(directory, planned_step.name)
            resumed = 0
            found = cache.find_step(planned.name, planned_step.name, planned_step.key) \
                if reuse_steps and index < last else None
            if found is not None:
                copy_tree(found, step_dir)
                info = StageCache.read_step(step_dir)
                step_files, step_metrics, reused = info["files"], info.get("metrics", {}), True
                passes_seconds = 0.0
            else:
                if not is_remote(step_dir):
                    Path(step_dir).mkdir(parents=True, exist_ok=True)
                step_metrics = {}
                scratch = join(job.work_dir, "_steps", f"{planned.name}-{planned_step.name}")
                resume, resumed = _resume_folder(cache, planned, planned_step, fresh=not reuse_steps)
                try:
                    constants = run_passes(options, planned_step.step.passes, inputs, step_dir, step_metrics,
                                           previous, scratch)
                    passes_seconds = time.perf_counter() - step_started
                    add_metrics(step_metrics, run_pipeline(
                        options, lambda pipeline, i=index, d=step_dir, p=previous, u=inputs, c=constants, s=scratch,
                        r=resume: build_stage_graph(pipeline, planned, u, d, i, job, p, c, s, r)))
                finally:
                    delete_tree(scratch)
                    release_models()
                step_files = read_files_meta(join(step_dir, FILES_META))
                delete_file(join(step_dir, FILES_META))
                if resume:
                    delete_tree(resume)
                reused = False
            seconds = time.perf_counter() - step_started
            if index < last:
                if not reused:
                    StageCache.commit_step(step_dir, planned_step.key, step_files, seconds, planned_step.material,
                                           step_metrics)
                files += [_in_step_folder(f, planned_step.name, index == records_step) for f in step_files]
                previous = StageEntry(f"{planned.name}.{planned_step.name}", planned_step.key, step_dir, step_files,
                                      sum(f["rows"] for f in step_files if f["dir"] == RECORDS), 0, seconds)
                inputs = previous.paths(RECORDS)
            else:
                files += step_files
            if not reused:
                add_metrics(metrics, step_metrics)
            steps.append({"step": planned_step.name, "key": planned_step.key, "reused": reused,
                          "seconds": round(0.0 if reused else seconds, 3),
                          "passes_seconds": round(passes_seconds, 3),
                          **({"resumed_files": resumed} if not reused and resumed else {})})
    except BaseException:
        cache.discard(directory)
        raise
    return cache.commit(planned.name, planned.key, directory, files, time.perf_counter() - started,
                        planned.steps[-1].material, metrics, steps)


def _resume_folder(cache: StageCache, planned, planned_step, fresh: bool) -> tuple[str, int]:
    """A `resumes_files` step's folder of finished files, and how many an earlier attempt left in it that this
    one takes ("" and 0 for other steps). `fresh` (--force, or no cache): what an earlier run left is dropped."""
    if not planned_step.step.resumes_files:
        return "", 0
    folder = cache.resume_folder(planned.name, planned_step.name, planned_step.key)
    if fresh:
        delete_tree(folder)
        return folder, 0
    return folder, file_resume.prepare(folder)


def _in_step_folder(meta: dict[str, Any], step: str, stage_records: bool) -> dict[str, Any]:
    """An earlier step's file as the stage lists it: under the step's folder and marked with the step, except
    the records that are the stage's own (those of the step before a last step that writes none)."""
    moved = {**meta, "file": f"{step}/{meta['file']}"} if "file" in meta else dict(meta)
    return moved if stage_records and meta["dir"] == RECORDS else {**moved, "step": step}
