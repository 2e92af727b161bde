"""The manifest: counts from the ledger files' tallies, the mix's shards, each stage's section, versions."""

from __future__ import annotations

import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from winnow.pipelines.config import WinnowConfig
from winnow.pipelines.engine.stage import ManifestContext, summary_meta
from winnow.pipelines.io.write import LEDGER_TALLY_FIELDS

VERSIONED_PACKAGES = (
    "winnow", "apache-beam", "torch", "transformers", "sentence-transformers", "faiss-cpu", "sae-lens",
    "pyarrow", "numpy", "dask", "distributed",
)


def files_in(files: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return sorted((f for f in files if f["dir"] == name), key=lambda f: f.get("index", 0))


def files_entry(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def build_manifest(job, options: PipelineOptions, files: list[dict[str, Any]], results: list) -> dict[str, Any]:
    """The manifest from the metadata of every file the run wrote or reused (`files`) and its stages'
    results; each stage adds its own section(s)."""
    shards = files_in(files, "shards")
    ledger = files_in(files, "ledger")
    counts = ledger_counts(ledger)
    copies = sum(entry["copies"] for entry in ledger)
    shard_rows = sum(entry["rows"] for entry in shards)
    if shard_rows != copies:
        raise RuntimeError(f"internal error: {shard_rows} rows in shards but {copies} copies in the ledger")
    manifest: dict[str, Any] = {
        "winnow_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": job.config.resolved(),
        "config_hash": job.config.fingerprint(),
        "inputs": job.input_paths,
        "counts": counts,
        "kept_by_source": {s: f.get("kept", 0) for s, f in counts["by_source"].items() if f.get("kept")},
        "shards": [
            {**entry, "rows_per_source": shard["tally"]}
            for entry, shard in zip(files_entry(shards), shards, strict=True)
        ],
        "ledger": files_entry(ledger),
        "embeddings": None,
        "runner": options.view_as(StandardOptions).runner,
        "beam_args": job.beam_args,
        "versions": package_versions(),
        "timings": {},
        "stages": [result.summary() for result in results],
    }
    for planned, result in zip(job.stages, results, strict=True):
        if planned.stage.manifest is not None:
            manifest.update(planned.stage.manifest(ManifestContext(job, planned.plan, result, files)))
    if job.config.mix.enabled:
        mix_plan = summary_meta(files, "_mix_summary")
        manifest["mix"] = mix_manifest(job.config, mix_plan, shards) if "sources" in mix_plan else mix_plan
    return manifest
