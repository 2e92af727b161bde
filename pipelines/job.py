r"""The winnow job: plan on the driver, run the Beam graph, then publish the output directory atomically.

Graph (stages switched by the config):
    read -> validate -> [embed] -> [prune: k-means, SemDeDup, DBP] -> [select] -> [rephrase] -> [mix] -> shards
               |                          |                            |            |
               +-- rejected --------------+-- deduplicated, pruned ----+------------+-- kept, not_selected
                                                                                         --> ledger
The job writes into a hidden sibling of output.path and renames it into place only after the manifest is
written, so a crashed run never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from winnow.pipelines.config import WinnowConfig
from winnow.pipelines.embed import EMBEDDINGS_DIR, EmbedPlan, EmbedRecords, embeddings_table
from winnow.pipelines.mix import LEDGER as MIX_LEDGER
from winnow.pipelines.mix import PLACED, MixRecords
from winnow.pipelines.mix import PLAN as MIX_PLAN
from winnow.pipelines.ordered_io import AssignPositions, WriteOrderedParquet, write_bytes
from winnow.pipelines.prune import KEPT as PRUNE_KEPT
from winnow.pipelines.prune import LEDGER as PRUNE_LEDGER
from winnow.pipelines.prune import PLAN as PRUNE_PLAN
from winnow.pipelines.prune import PruneRecords
from winnow.pipelines.read import ReadRecords, ReadTask, expected_rows, plan_reads
from winnow.pipelines.records import ledger_row, order_key
from winnow.pipelines.rephrase import LEDGER as REPHRASE_LEDGER
from winnow.pipelines.rephrase import PLAN as REPHRASE_PLAN
from winnow.pipelines.rephrase import SYNTHETIC, RephrasePlan, RephraseRecords, plan_rephrase
from winnow.pipelines.select import KEPT as SELECT_KEPT
from winnow.pipelines.select import LEDGER as SELECT_LEDGER
from winnow.pipelines.select import PLAN as SELECT_PLAN
from winnow.pipelines.select import SelectPlan, SelectRecords, plan_select
from winnow.pipelines.stage_cache import (
    RECORDS,
    REMOVED,
    ReadCache,
    StageCache,
    StageEntry,
    WriteCache,
    input_fingerprint,
    library_versions,
    source_hash,
    stage_key,
)
from winnow.pipelines.validate import REJECTED, VALID, ValidateRecords
from winnow.pipelines.write import LEDGER_TALLY_FIELDS, WriteLedger, WriteMixedShards, WriteShards

DEFAULT_RUNNER = "FnApiRunner"
RUNNER_ALIASES = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}
MANIFEST = "manifest.json"
VERSIONED_PACKAGES = (
    "winnow", "apache-beam", "torch", "transformers", "sentence-transformers", "faiss-cpu", "sae-lens",
    "pyarrow", "numpy", "dask", "distributed",
)


class OutputError(ValueError):
    """The output directory cannot be written as asked; one line."""


@dataclass
class JobPlan:
    """Everything decided on the driver before the graph is built."""

    config: WinnowConfig
    input_paths: list[str]
    tasks: list[ReadTask]
    output: Path
    work_dir: Path
    embed: EmbedPlan | None
    beam_args: list[str]
    select: SelectPlan | None = None
    rephrase: RephrasePlan | None = None
    cache_dir: Path | None = None
    stages: list[Stage] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def beam_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options with winnow's defaults: the in-process FnApiRunner (the DirectRunner first tries to
    download the Prism runner, which stalls offline); runner aliases such as DaskRunner expanded."""
    args = []
    for arg in beam_args:
        if arg.startswith("--runner="):
            name = arg.split("=", 1)[1]
            arg = f"--runner={RUNNER_ALIASES.get(name, name)}"
        args.append(arg)
    if not any(arg == "--runner" or arg.startswith("--runner=") for arg in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    return PipelineOptions(args)


def worker_processes(options: PipelineOptions) -> int:
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_processing":
        return direct.direct_num_workers or os.cpu_count() or 1
    return 1


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: output.path exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).exists():
        raise OutputError(
            f"{output}: output.path is a non-empty directory that is not a winnow output; refusing to replace it"
        )


def _previous_embeddings(output: Path, fingerprint: str) -> str | None:
    try:
        manifest = json.loads((output / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    previous = manifest.get("embeddings") or {}
    if previous.get("fingerprint") != fingerprint or not previous.get("files"):
        return None
    if not all((output / entry["file"]).exists() for entry in previous["files"]):
        return None
    return str(output / EMBEDDINGS_DIR / "*.parquet")


def plan_job(config: WinnowConfig, beam_args: list[str]) -> JobPlan:
    """Check inputs, output and model before anything runs; raises InputError, OutputError, ModelNotFound."""
    started = time.perf_counter()
    paths, tasks = plan_reads(config.input)
    output = Path(config.output.path).expanduser().resolve()
    _check_output(output)
    embed = None
    workers = worker_processes(beam_options(beam_args))
    if config.needs_embeddings():
        embed = replace(EmbedPlan.from_config(config.embed, workers), expected_records=expected_rows(tasks))
        if config.embed.reuse:
            embed = replace(embed, reuse_from=_previous_embeddings(output, embed.fingerprint))
    work_dir = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:12]}"
    select = None
    if config.select.enabled:
        select = replace(plan_select(config, workers, embed.model_path if embed else None),
                         expected_records=expected_rows(tasks))
    rephrase = plan_rephrase(config.rephrase, output, workers) if config.rephrase.enabled else None
    plan = JobPlan(config, paths, tasks, output, work_dir, embed, list(beam_args), select, rephrase,
                   cache_dir=output.parent / f".{output.name}.cache")
    plan.stages = plan_stages(plan)
    plan.timings["plan_s"] = time.perf_counter() - started
    return plan


FILES_META = "_files.json"
StageBuild = Callable[[beam.Pipeline, Any, str], tuple[Any, list[Any], list[Any]]]


@dataclass
class Stage:
    """One cached step of the job: `build(pipeline, records or None, directory)` returns (records out,
    ledger-row collections of the records it removed, metadata collections of files it wrote)."""

    name: str
    material: dict[str, Any]
    build: StageBuild
    key: str = ""
    reads_vectors: bool = False  # whether it reads the records' embeddings
    keeps_vectors: bool = False  # whether its cached records keep them (a later stage reads them)
    drops_vectors: bool = False  # whether its records hold embeddings that no later stage reads


def _write_files_meta(files: list[dict[str, Any]], path: str) -> None:
    write_bytes(path, json.dumps(sorted(files, key=lambda f: (f["dir"], f.get("file", ""))), indent=1).encode())


def _validate_build(plan: JobPlan) -> StageBuild:
    def build(pipeline, records, directory):
        records = pipeline | "Read" >> ReadRecords(plan.config.input, plan.tasks)
        checked = records | "Validate" >> ValidateRecords(
            plan.config.validate_.max_text_bytes, plan.config.validate_.control_characters)
        return checked[VALID], [checked[REJECTED]], []
    return build


def _embed_build(plan: JobPlan) -> StageBuild:
    def build(pipeline, records, directory):
        embedded = records | "Embed" >> EmbedRecords(plan.embed)
        written = (
            embedded
            | "OrderEmbeddings" >> AssignPositions(order_key)
            | "WriteEmbeddings"
            >> WriteOrderedParquet(
                directory, EMBEDDINGS_DIR, plan.config.output.ledger_rows, embeddings_table,
                plan.config.output.row_group_rows,
                tally_key=lambda record: "reused" if record["embedding_reused"] else "computed",
            )
        )
        return embedded, [], [written]
    return build


def _prune_build(plan: JobPlan) -> StageBuild:
    def build(pipeline, records, directory):
        pruned = records | "Prune" >> PruneRecords(plan.config.prune)
        return pruned[PRUNE_KEPT], [pruned[PRUNE_LEDGER]], [pruned[PRUNE_PLAN]]
    return build


def _select_build(plan: JobPlan) -> StageBuild:
    def build(pipeline, records, directory):
        selected = records | "Select" >> SelectRecords(plan.select)
        return selected[SELECT_KEPT], [selected[SELECT_LEDGER]], [selected[SELECT_PLAN]]
    return build


def _rephrase_build(plan: JobPlan) -> StageBuild:
    def build(pipeline, records, directory):
        rephrased = records | "Rephrase" >> RephraseRecords(plan.rephrase)
        together = (records, rephrased[SYNTHETIC]) | "WithSynthetic" >> beam.Flatten()
        return together, [rephrased[REPHRASE_LEDGER]], [rephrased[REPHRASE_PLAN]]
    return build


def _section(model) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)


def _text_digest(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def plan_stages(plan: JobPlan) -> list[Stage]:
    """The job's cached stages in order, each keyed by the previous key, its config section, its code, the
    libraries that compute it and its models' fingerprints. The mix and the output are not cached stages: they
    are what a run writes."""
    config = plan.config
    common = ("winnow.pipelines.records", "winnow.pipelines.stage_cache", "winnow.pipelines.config")
    stages = [Stage("validate", {
        "code": source_hash((*common, "winnow.pipelines.read", "winnow.pipelines.validate")),
        "inputs": input_fingerprint(plan.input_paths),
        "input": _section(config.input), "validate": _section(config.validate_),
        "libraries": library_versions(("apache-beam", "pyarrow")),
    }, _validate_build(plan))]
    if plan.embed is not None:
        settings = {k: v for k, v in _section(config.embed).items() if k not in ("reuse", "torch_threads")}
        stages.append(Stage("embed", {
            "code": source_hash((*common, "winnow.pipelines.embed", "winnow.selectors.embedding")),
            "embed": settings, "model": plan.embed.fingerprint, "device": plan.embed.device,
            "libraries": library_versions(("torch", "transformers", "sentence-transformers", "numpy")),
        }, _embed_build(plan)))
    if config.prune.enabled:
        stages.append(Stage("prune", {
            "code": source_hash((*common, "winnow.pipelines.prune", "winnow.pipelines.mix",
                                 "winnow.selectors.clustering", "winnow.selectors.pruning",
                                 "winnow.selectors.semdedup", "winnow.selectors.dbp")),
            "prune": _section(config.prune), "libraries": library_versions(("faiss-cpu", "numpy")),
        }, _prune_build(plan), reads_vectors=True))
    if plan.select is not None:
        select = plan.select
        stages.append(Stage("select", {
            "code": source_hash((*common, "winnow.pipelines.select", "winnow.pipelines.validate",
                                 "winnow.selectors.lm", "winnow.selectors.sae",
                                 "winnow.selectors.task_selection", "winnow.selectors.embedding")),
            "select": {k: v for k, v in _section(config.select).items() if k != "torch_threads"},
            "targets": _text_digest(select.targets), "model": select.model_fingerprint,
            "sae": select.sae_fingerprint, "embed_model": plan.embed.fingerprint if plan.embed else None,
            "device": select.device,
            "libraries": library_versions(("torch", "transformers", "sae-lens", "sentence-transformers")),
        }, _select_build(plan), reads_vectors=select.method == "embedding"))
    if plan.rephrase is not None:
        stages.append(Stage("rephrase", {
            "code": source_hash((*common, "winnow.pipelines.rephrase", "winnow.pipelines.mix",
                                 "winnow.rephrase.clean", "winnow.rephrase.generate", "winnow.rephrase.prompts",
                                 "winnow.rephrase.segment", "winnow.selectors.lm")),
            "rephrase": {k: v for k, v in _section(config.rephrase).items() if k != "torch_threads"},
            "model": plan.rephrase.model_fingerprint, "backend": plan.rephrase.backend,
            "device": plan.rephrase.device, "libraries": library_versions(("torch", "transformers", "vllm")),
        }, _rephrase_build(plan)))
    previous, vectors = "", False
    for index, stage in enumerate(stages):
        stage.keeps_vectors = any(later.reads_vectors for later in stages[index + 1:])
        vectors = vectors or stage.name == "embed"
        stage.drops_vectors, vectors = vectors and not stage.keeps_vectors, vectors and stage.keeps_vectors
        stage.material = {"stage": stage.name, "previous": previous, "keeps_vectors": stage.keeps_vectors,
                          **stage.material}
        stage.key = previous = stage_key(stage.material)
    return stages


def build_stage_graph(pipeline: beam.Pipeline, stage: Stage, upstream: list[str], directory: str) -> None:
    """One stage's graph: read the previous stage's cached records (the validate stage reads the input), run
    the stage, write its records and removed rows to the cache and the list of every file it wrote."""
    records = None
    if stage.name != "validate":
        records = pipeline | "ReadCached" >> ReadCache(upstream, () if stage.reads_vectors else ("embedding",))
    records, removed, written = stage.build(pipeline, records, directory)
    if stage.drops_vectors:
        records = records | "DropVectors" >> beam.Map(lambda r: {k: v for k, v in r.items() if k != "embedding"})
    written = [*written, records | "CacheRecords" >> WriteCache(directory, RECORDS)]
    if removed:
        removed = removed[0] if len(removed) == 1 else tuple(removed) | "AllRemoved" >> beam.Flatten()
        written.append(removed | "CacheRemoved" >> WriteCache(directory, REMOVED))
    _ = (
        written
        | "AllFiles" >> beam.Flatten()
        | "FileList" >> beam.combiners.ToList()
        | "WriteFileList" >> beam.Map(_write_files_meta, str(Path(directory) / FILES_META))
    )


def build_output_graph(pipeline: beam.Pipeline, plan: JobPlan, records_paths: list[str],
                       removed_paths: list[str]) -> None:
    """The last graph: the final stage's records are mixed (or written in input order) into shards, and the
    ledger gets every record's one row. Its last step gathers the metadata of every written file, so every
    branch is upstream of it: Beam 2.77's DaskRunner computes only the last transform and what it depends on."""
    config, work = plan.config, str(plan.work_dir)
    written = []
    kept = pipeline | "ReadKept" >> ReadCache(records_paths, ("embedding",))
    removed = pipeline | "ReadRemoved" >> ReadCache(removed_paths)
    if config.mix.enabled:
        mixed = kept | "Mix" >> MixRecords(config.mix)
        kept_rows = mixed[MIX_LEDGER]
        written.append(mixed[MIX_PLAN])
        written.append(mixed[PLACED] | "Shards" >> WriteMixedShards(work, config.output.row_group_rows))
    else:
        kept_rows = kept | "KeptLedger" >> beam.Map(ledger_row, "kept", "write", copies=1)
        written.append(kept | "Shards" >> WriteShards(work, config.output.shard_rows, config.output.row_group_rows))
    ledger = (removed, kept_rows) | "LedgerRows" >> beam.Flatten()
    written.append(ledger | "Ledger" >> WriteLedger(work, config.output.ledger_rows, config.output.row_group_rows))
    _ = (
        written
        | "AllFiles" >> beam.Flatten()
        | "FileList" >> beam.combiners.ToList()
        | "WriteFileList" >> beam.Map(_write_files_meta, str(plan.work_dir / FILES_META))
    )


def _read_files_meta(directory: Path) -> list[dict[str, Any]]:
    return json.loads((directory / FILES_META).read_text())


def _meta(files: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return sorted((f for f in files if f["dir"] == name), key=lambda f: f.get("index", 0))


def _plan_meta(files: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A stage's plan section; a stage that no record reached writes none."""
    found = _meta(files, name)
    if not found:
        return {"records": 0, "note": "no record reached this stage"}
    return {k: v for k, v in found[0].items() if k != "dir"}


def _files_entry(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: f[key] for key in ("file", "rows", "bytes", "sha256")} for f in files]


def ledger_counts(ledger_files: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per fate, per (fate, stage, reason) and per source, from the ledger files' tallies: input
    records (each exactly once) at the top level, rephrased outputs under `synthetic`."""
    sections: dict[str, dict[str, Any]] = {"input": {}, "synthetic": {}}
    for origin in sections:
        sections[origin] = {"by_fate": {}, "by_reason": {}, "by_source": {}}
    for entry in ledger_files:
        for key, rows in entry["tally"].items():
            values = dict(zip(LEDGER_TALLY_FIELDS, key.split("\t"), strict=True))
            section = sections[values["origin"]]
            section["by_fate"][values["fate"]] = section["by_fate"].get(values["fate"], 0) + rows
            reason_key = (values["fate"], values["stage"], values["reason"])
            section["by_reason"][reason_key] = section["by_reason"].get(reason_key, 0) + rows
            per_source = section["by_source"].setdefault(values["source"], {})
            per_source[values["fate"]] = per_source.get(values["fate"], 0) + rows

    def summary(section: dict[str, Any], total_name: str) -> dict[str, Any]:
        return {
            total_name: sum(section["by_fate"].values()),
            "by_fate": dict(sorted(section["by_fate"].items())),
            "by_stage_reason": [
                {"fate": fate, "stage": stage, "reason": reason or None, "rows": rows}
                for (fate, stage, reason), rows in sorted(section["by_reason"].items())
            ],
            "by_source": {source: dict(sorted(f.items())) for source, f in sorted(section["by_source"].items())},
        }

    counts = summary(sections["input"], "input_records")
    if sections["synthetic"]["by_fate"]:
        counts["synthetic"] = summary(sections["synthetic"], "generated")
    return counts


def mix_manifest(config: WinnowConfig, mix_plan: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shard: tau, allocated and realised rows per source, the schedule's expectation; per source: size,
    rows, epochs, expected (schedule) and realised shares. Realised rows must equal the allocation."""
    sources = mix_plan["sources"]
    section: dict[str, Any] = {
        "schedule": [point.model_dump() for point in config.mix.schedule],
        "schedule_kind": config.mix.schedule_kind,
        "size_by": config.mix.size_by,
        "seed": config.mix.seed,
        "max_epochs": config.mix.max_epochs,
        "total_tokens_requested": config.mix.total_tokens,
        "total": mix_plan.get("total", 0),
        "total_tokens": sum(shard.get("tokens", 0) for shard in shards),
        "shards": [],
        "sources": {},
    }
    if not sources:
        return section
    counts, schedule_expected = mix_plan["counts"], mix_plan["schedule_expected"]
    for index, shard in enumerate(shards):
        allocated = {s: counts[index][i] for i, s in enumerate(sources) if counts[index][i]}
        if shard["tally"] != allocated:
            raise RuntimeError(f"internal error: {shard['file']} holds {shard['tally']}, allocated {allocated}")
        section["shards"].append({
            "file": shard["file"],
            "rows": shard["rows"],
            "tokens": shard["tokens"],
            "tau": mix_plan["shard_taus"][index],
            "rows_per_source": allocated,
            "schedule_expected_per_source": {s: round(schedule_expected[index][i], 3) for i, s in enumerate(sources)},
        })
    total = mix_plan["total"]
    for i, source in enumerate(sources):
        rows = sum(row[i] for row in counts)
        expected_rows = sum(row[i] for row in schedule_expected)
        section["sources"][source] = {
            "size": mix_plan["sizes"][i],
            "tokens": mix_plan["tokens"][i],
            "rows": rows,
            "epochs": round(rows / mix_plan["sizes"][i], 4),
            "repeated": rows > mix_plan["sizes"][i],
            "expected_share": round(expected_rows / total, 6),
            "realised_share": round(rows / total, 6),
            "capped": rows + 0.5 < expected_rows,
        }
    return section


def code_version() -> str:
    version = metadata.version("winnow")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" if commit else version


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(plan: JobPlan, options: PipelineOptions, files: list[dict[str, Any]],
                   stages: list[StageEntry]) -> dict[str, Any]:
    """The manifest from the metadata of every file the run wrote or reused (`files`) and its stages."""
    shards = _meta(files, "shards")
    ledger = _meta(files, "ledger")
    counts = ledger_counts(ledger)
    copies = sum(entry["copies"] for entry in ledger)
    shard_rows = sum(entry["rows"] for entry in shards)
    if shard_rows != copies:
        raise RuntimeError(f"internal error: {shard_rows} rows in shards but {copies} copies in the ledger")
    manifest: dict[str, Any] = {
        "winnow_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": plan.config.resolved(),
        "config_hash": plan.config.fingerprint(),
        "inputs": plan.input_paths,
        "counts": counts,
        "kept_by_source": {s: f.get("kept", 0) for s, f in counts["by_source"].items() if f.get("kept")},
        "shards": [
            {**entry, "rows_per_source": shard["tally"]}
            for entry, shard in zip(_files_entry(shards), shards, strict=True)
        ],
        "ledger": _files_entry(ledger),
        "embeddings": None,
        "runner": options.view_as(StandardOptions).runner,
        "beam_args": plan.beam_args,
        "versions": package_versions(),
        "timings": {},
        "stages": [entry.summary() for entry in stages],
    }
    if plan.config.prune.enabled:
        manifest["prune"] = {**_plan_meta(files, "_prune_plan"), "settings": plan.config.prune.model_dump()}
    if plan.select is not None:
        manifest["select"] = _plan_meta(files, "_select_plan")
    if plan.rephrase is not None:
        manifest["rephrase"] = _plan_meta(files, "_rephrase_plan")
        reused = next(entry for entry in stages if entry.name == "rephrase").reused
        manifest["rephrase"]["stage_reused"] = reused
        if reused and "segments_generated" in manifest["rephrase"]:  # every segment came from the stage cache
            manifest["rephrase"]["segments_reused_from_cache"] += manifest["rephrase"]["segments_generated"]
            manifest["rephrase"]["segments_generated"] = 0
    if plan.config.mix.enabled:
        mix_plan = _plan_meta(files, "_mix_plan")
        manifest["mix"] = mix_manifest(plan.config, mix_plan, shards) if "sources" in mix_plan else mix_plan
    if plan.embed is not None:
        vectors = _meta(files, EMBEDDINGS_DIR)
        tally: dict[str, int] = {}
        for entry in vectors:
            for key, rows in entry["tally"].items():
                tally[key] = tally.get(key, 0) + rows
        if next(entry for entry in stages if entry.name == "embed").reused:
            tally = {"reused": sum(tally.values())}  # this run computed none: the whole stage came from the cache
        manifest["embeddings"] = {
            **{k: v for k, v in asdict(plan.embed).items() if k != "reuse_from"},
            "reused_rows": tally.get("reused", 0),
            "computed_rows": tally.get("computed", 0),
            "files": _files_entry(vectors),
        }
    return manifest


def publish(work_dir: Path, output: Path) -> None:
    """Swap the finished work directory into place; the old output survives until the new one is there."""
    (work_dir / FILES_META).unlink(missing_ok=True)
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:12]}"
        output.rename(old)
    work_dir.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _close_client(result) -> None:
    """The DaskRunner leaves its cluster client open; closed here, it stops reconnecting after the job."""
    client = getattr(result, "client", None)
    if client is not None and hasattr(client, "close"):
        client.close()


StageCallback = Callable[[str, StageEntry | None], None]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def output_lock(output: Path):
    """One run at a time per output: `.NAME.lock` beside it holds the running job's host and pid. A lock left
    by a killed run (its process gone) is taken over; a live one stops this run with one line."""
    lock = output.parent / f".{output.name}.lock"
    output.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": platform.node(), "pid": os.getpid()}
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _process_alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # left by a killed run
                continue
            raise OutputError(
                f"{output}: another winnow run (host {holder.get('host')}, pid {holder.get('pid')}) is writing "
                f"it; if none is, remove {lock}"
            ) from None
        with os.fdopen(handle, "w") as file:
            json.dump(me, file)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _run_pipeline(options: PipelineOptions, build: Callable[[beam.Pipeline], None]) -> dict[str, Any]:
    pipeline = beam.Pipeline(options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    metrics = beam_metrics(result)
    _close_client(result)
    return metrics


def _add_metrics(total: dict[str, Any], more: dict[str, Any]) -> None:
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


def _run_stage(stage: Stage, upstream: StageEntry | None, cache: StageCache, options: PipelineOptions) -> StageEntry:
    started = time.perf_counter()
    directory = cache.begin(stage.name, stage.key)
    try:
        upstream_paths = upstream.paths(RECORDS) if upstream else []
        metrics = _run_pipeline(
            options, lambda pipeline: build_stage_graph(pipeline, stage, upstream_paths, str(directory)))
        files = _read_files_meta(directory)
        (directory / FILES_META).unlink()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return cache.commit(stage.name, stage.key, directory, files, time.perf_counter() - started, stage.material,
                        metrics)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def run_job(plan: JobPlan, force: bool = False, on_stage: StageCallback | None = None) -> dict[str, Any]:
    """Run the planned job and publish OUT, holding the output's lock; returns the manifest (see `_run_job`)."""
    with output_lock(plan.output):
        return _run_job(plan, force, on_stage)


def _run_job(plan: JobPlan, force: bool, on_stage: StageCallback | None) -> dict[str, Any]:
    """Run the planned job and publish OUT; returns the manifest.

    Stages whose cache entry matches their key are reused (unless `force`); the others run, one Beam pipeline
    each, and are cached. `on_stage(name, entry)` is called before a stage runs (entry None) and after it is
    reused or computed."""
    options = beam_options(plan.beam_args)
    cached = plan.config.output.cache
    scratch = plan.output.parent / f".{plan.output.name}.stages-{uuid.uuid4().hex[:12]}"
    cache = StageCache(plan.cache_dir if cached else scratch)
    if force and plan.embed is not None:
        plan.embed = replace(plan.embed, reuse_from=None)
    if force and plan.rephrase is not None and plan.rephrase.cache_dir:
        shutil.rmtree(plan.rephrase.cache_dir, ignore_errors=True)
    plan.work_dir.mkdir(parents=True)
    try:
        metrics: dict[str, Any] = {}
        entries: list[StageEntry] = []
        for stage in plan.stages:
            entry = None if force or not cached else cache.lookup(stage.name, stage.key)
            if entry is None:
                if on_stage:
                    on_stage(stage.name, None)
                entry = _run_stage(stage, entries[-1] if entries else None, cache, options)
            _add_metrics(metrics, entry.metrics)
            plan.timings[f"{stage.name}_s"] = 0.0 if entry.reused else entry.seconds
            entries.append(entry)
            if on_stage:
                on_stage(stage.name, entry)
        started = time.perf_counter()
        removed = [path for entry in entries for path in entry.paths(REMOVED)]
        _add_metrics(metrics, _run_pipeline(
            options, lambda pipeline: build_output_graph(pipeline, plan, entries[-1].paths(RECORDS), removed)))
        files = _read_files_meta(plan.work_dir)
        (plan.work_dir / FILES_META).unlink()
        for entry in entries:
            for meta in entry.metas():
                files.append(meta)
                if meta["dir"] == EMBEDDINGS_DIR:
                    _link_or_copy(entry.directory / meta["file"], plan.work_dir / meta["file"])
        plan.timings["output_s"] = time.perf_counter() - started
        started = time.perf_counter()
        manifest = build_manifest(plan, options, files, entries)
        manifest["metrics"] = dict(sorted(metrics.items()))
        manifest["timings"] = {**plan.timings, "finalize_s": time.perf_counter() - started}
        manifest["timings"]["total_s"] = sum(manifest["timings"].values())
        (plan.work_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        if plan.config.output.report:
            from winnow.pipelines.report import build_report

            build_report(plan.work_dir, plan.work_dir / "report" / "index.html", display=str(plan.output))
    except BaseException:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
        if not cached:
            shutil.rmtree(cache.root, ignore_errors=True)
        raise
    publish(plan.work_dir, plan.output)
    if cached:
        cache.keep_only(entries)
    else:
        shutil.rmtree(cache.root, ignore_errors=True)
    return manifest


def embed_corpus(path: str, output: str, text_column: str = "text", id_column: str | None = "id"):
    """Embed a Parquet/JSONL corpus with the job (default model, reusing what `output` already holds) and
    return (ids, unit float32 matrix) in input order: what evaluations and benchmarks start from."""
    from winnow.pipelines.config import build_config
    from winnow.pipelines.embed import read_embeddings

    config = build_config({
        "input": {"path": path, "columns": {"id": id_column, "text": text_column}},
        "output": {"path": output},
        "embed": {"enabled": True},
    })
    run_job(plan_job(config, []))
    return read_embeddings(output)
