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

import json
import os
import platform
import shutil
import subprocess
import time
import uuid
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
    plan = JobPlan(config, paths, tasks, output, work_dir, embed, list(beam_args), select, rephrase)
    plan.timings["plan_s"] = time.perf_counter() - started
    return plan


FILES_META = "_files.json"


def _write_files_meta(files: list[dict[str, Any]], path: str) -> None:
    write_bytes(path, json.dumps(sorted(files, key=lambda f: (f["dir"], f.get("file", ""))), indent=1).encode())


def build_graph(pipeline: beam.Pipeline, plan: JobPlan) -> None:
    """The job graph. Its last step gathers the metadata of every written file, so every branch is upstream
    of it: Beam 2.77's DaskRunner computes only the last transform and what it depends on."""
    config, work = plan.config, str(plan.work_dir)
    written = []
    records = pipeline | "Read" >> ReadRecords(config.input, plan.tasks)
    checked = records | "Validate" >> ValidateRecords(config.validate_.max_text_bytes)
    kept = checked[VALID]
    removed = [checked[REJECTED]]
    if plan.embed is not None:
        kept = kept | "Embed" >> EmbedRecords(plan.embed)
        written.append(
            kept
            | "OrderEmbeddings" >> AssignPositions(order_key)
            | "WriteEmbeddings"
            >> WriteOrderedParquet(
                work,
                EMBEDDINGS_DIR,
                config.output.ledger_rows,
                embeddings_table,
                config.output.row_group_rows,
                tally_key=lambda record: "reused" if record["embedding_reused"] else "computed",
            )
        )
    if config.prune.enabled:
        pruned = kept | "Prune" >> PruneRecords(config.prune)
        kept = pruned[PRUNE_KEPT]
        removed.append(pruned[PRUNE_LEDGER])
        written.append(pruned[PRUNE_PLAN])
    if plan.select is not None:
        selected = kept | "Select" >> SelectRecords(plan.select)
        kept = selected[SELECT_KEPT]
        removed.append(selected[SELECT_LEDGER])
        written.append(selected[SELECT_PLAN])
    if plan.embed is not None:
        kept = kept | "DropVectors" >> beam.Map(lambda r: {k: v for k, v in r.items() if k != "embedding"})
    if plan.rephrase is not None:
        rephrased = kept | "Rephrase" >> RephraseRecords(plan.rephrase)
        removed.append(rephrased[REPHRASE_LEDGER])
        written.append(rephrased[REPHRASE_PLAN])
        kept = (kept, rephrased[SYNTHETIC]) | "WithSynthetic" >> beam.Flatten()
    if config.mix.enabled:
        mixed = kept | "Mix" >> MixRecords(config.mix)
        kept_rows = mixed[MIX_LEDGER]
        written.append(mixed[MIX_PLAN])
        written.append(mixed[PLACED] | "Shards" >> WriteMixedShards(work, config.output.row_group_rows))
    else:
        kept_rows = kept | "KeptLedger" >> beam.Map(ledger_row, "kept", "write", copies=1)
        written.append(kept | "Shards" >> WriteShards(work, config.output.shard_rows, config.output.row_group_rows))
    ledger = (*removed, kept_rows) | "LedgerRows" >> beam.Flatten()
    written.append(ledger | "Ledger" >> WriteLedger(work, config.output.ledger_rows, config.output.row_group_rows))
    _ = (
        written
        | "AllFiles" >> beam.Flatten()
        | "FileList" >> beam.combiners.ToList()
        | "WriteFileList" >> beam.Map(_write_files_meta, str(plan.work_dir / FILES_META))
    )


def _read_meta(work_dir: Path, name: str) -> list[dict[str, Any]]:
    files = json.loads((work_dir / FILES_META).read_text())
    return sorted((f for f in files if f["dir"] == name), key=lambda f: f.get("index", 0))


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


def build_manifest(plan: JobPlan, options: PipelineOptions) -> dict[str, Any]:
    shards = _read_meta(plan.work_dir, "shards")
    ledger = _read_meta(plan.work_dir, "ledger")
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
    }
    if plan.config.prune.enabled:
        manifest["prune"] = {**_read_meta(plan.work_dir, "_prune_plan")[0], "settings": plan.config.prune.model_dump()}
        manifest["prune"].pop("dir")
    if plan.select is not None:
        manifest["select"] = _read_meta(plan.work_dir, "_select_plan")[0]
        manifest["select"].pop("dir")
    if plan.rephrase is not None:
        manifest["rephrase"] = _read_meta(plan.work_dir, "_rephrase_plan")[0]
        manifest["rephrase"].pop("dir")
    if plan.config.mix.enabled:
        manifest["mix"] = mix_manifest(plan.config, _read_meta(plan.work_dir, "_mix_plan")[0], shards)
    if plan.embed is not None:
        files = _read_meta(plan.work_dir, EMBEDDINGS_DIR)
        tally: dict[str, int] = {}
        for entry in files:
            for key, rows in entry["tally"].items():
                tally[key] = tally.get(key, 0) + rows
        manifest["embeddings"] = {
            **{k: v for k, v in asdict(plan.embed).items() if k != "reuse_from"},
            "reused_rows": tally.get("reused", 0),
            "computed_rows": tally.get("computed", 0),
            "files": _files_entry(files),
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


def run_job(plan: JobPlan) -> dict[str, Any]:
    """Run the planned job and publish OUT; returns the manifest."""
    options = beam_options(plan.beam_args)
    plan.work_dir.mkdir(parents=True)
    try:
        started = time.perf_counter()
        pipeline = beam.Pipeline(options=options)
        build_graph(pipeline, plan)
        result = pipeline.run()
        result.wait_until_finish()
        metrics = beam_metrics(result)
        _close_client(result)
        plan.timings["pipeline_s"] = time.perf_counter() - started
        started = time.perf_counter()
        manifest = build_manifest(plan, options)
        manifest["metrics"] = metrics
        manifest["timings"] = {**plan.timings, "finalize_s": time.perf_counter() - started}
        manifest["timings"]["total_s"] = sum(manifest["timings"].values())
        (plan.work_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        if plan.config.output.report:
            from winnow.pipelines.report import build_report

            build_report(plan.work_dir, plan.work_dir / "report" / "index.html", display=str(plan.output))
    except BaseException:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
        raise
    publish(plan.work_dir, plan.output)
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
