"""The prune stage (SemDeDup + DBP) as the job runs it, on N vectors: wall time and peak memory of each step.

bench-prune times the algorithms on in-memory arrays; this runs the stage itself (`stage_run.run_stage`: its
passes and its two Beam pipelines, `clusters` and `decide`, in-process FnApiRunner) on an embed-stage cache of N
records. The vectors are real embeddings of ../shared/data/debian_descriptions_en.parquet (the first --base-rows,
embedded by the job once and kept in --cache), tiled with Gaussian noise to N as bench-prune does; they are
written as the embed stage writes them (typed blocks of 50,000 rows with an `embedding` column). Each size runs
in a process of its own; its peak RSS is the process's high-water mark (VmHWM) over the stage alone (reset
after the upstream cache is written).

    make bench-prune-stage
    make bench-prune-stage ARGS="--sizes 100000 1000000"
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_prune import DATA, tiled

BLOCK_ROWS = 50_000


def write_upstream(vectors: np.ndarray, directory: Path) -> list[dict]:
    """N records with their vectors as embed-stage blocks under directory/records; their file metadata."""
    import pyarrow as pa

    from winnow.pipelines.io.blocks import embedded_block, write_block

    files = []
    for number, start in enumerate(range(0, len(vectors), BLOCK_ROWS)):
        rows = np.arange(start, min(start + BLOCK_ROWS, len(vectors)))
        core = {
            "file_index": pa.array(np.zeros(len(rows), dtype=np.int64)), "input_row": pa.array(rows),
            "id": [f"r{row}" for row in rows.tolist()], "text": [f"text {row}" for row in rows.tolist()],
            "source": ["tiled"] * len(rows), "input_file": ["tiled.parquet"] * len(rows),
            "text_hash": [f"{row:032x}" for row in rows.tolist()], "note": [None] * len(rows),
        }
        files.append(write_block(str(directory), f"records/block-00000-{number:05d}.parquet",
                                 embedded_block(core, vectors[rows])))
    return files


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def peak_rss_mib() -> float:
    return round(status_kib("VmHWM") / 1024, 1)


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: 5 to clear_refs), so that the stage's peak is not the tiling's."""
    Path("/proc/self/clear_refs").write_text("5")


def run_size(size: int, cache: str, base_rows: int) -> dict:
    from winnow.pipelines.config import build_config
    from winnow.pipelines.engine.options import beam_options
    from winnow.pipelines.engine.stage_cache import StageCache, StageEntry
    from winnow.pipelines.engine.stage_run import run_stage
    from winnow.pipelines.io.cache_files import RECORDS, REMOVED
    from winnow.pipelines.plan import plan_job
    from winnow.pipelines.stages.embed import read_embeddings

    _, base = read_embeddings(cache)
    vectors = tiled(base[:base_rows], size)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        files = write_upstream(vectors, root / "upstream")
        write_s = time.perf_counter() - started
        del vectors
        config = build_config({
            "input": {"path": str(DATA), "columns": {"id": None, "text": "text"}},
            "output": {"path": str(root / "out"), "cache": False, "report": False},
            "embed": {"enabled": True}, "prune": {"enabled": True, "keep_fraction": 0.5},
        })
        plan = plan_job(config, [])
        planned = next(stage for stage in plan.stages if stage.name == "prune")
        upstream = StageEntry("embed", "bench", str(root / "upstream"), files, size, 0, 0.0)
        rss_before = peak_rss_mib()
        gc.collect()
        reset_peak_rss()
        started = time.perf_counter()
        entry = run_stage(plan, planned, upstream, StageCache(root / "cache"), beam_options([]), reuse_steps=False)
        seconds = time.perf_counter() - started
        removed = sum(f["rows"] for f in entry.files if f["dir"] == REMOVED)
        kept = sum(f["rows"] for f in entry.files if f["dir"] == RECORDS and "step" not in f)
    return {
        "embeddings": size, "base_rows": base_rows, "write_upstream_s": round(write_s, 1),
        "stage_s": round(seconds, 1), "vectors_per_s": round(size / seconds),
        "steps": {step["step"]: {"s": step["seconds"], "passes_s": step["passes_seconds"]} for step in entry.steps},
        "kept": kept, "removed": removed, "peak_rss_mib_writing_upstream": rss_before,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--base-rows", type=int, default=8_192, help="real embeddings tiled (the first N)")
    parser.add_argument("--cache", default="eval/cache/debian_en_8k")
    parser.add_argument("--out", type=Path, default=Path("bench/out/prune_stage.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_size(args.one, args.cache, args.base_rows)))
        return 0
    if not DATA.exists():
        print(f"bench-prune-stage needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    cache = Path(args.cache) / "out"
    if not (cache / "manifest.json").exists():
        import pyarrow.parquet as pq

        from winnow.pipelines.job import embed_corpus

        base = Path(args.cache) / "base.parquet"
        base.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(DATA, columns=["text"]).slice(0, args.base_rows), base)
        embed_corpus(str(base), str(cache), id_column=None)
    args.cache = str(cache)
    results = []
    for size in args.sizes:
        child = subprocess.run([sys.executable, __file__, "--one", str(size), "--cache", args.cache,
                                "--base-rows", str(args.base_rows)], capture_output=True, text=True)
        if child.returncode:
            print(child.stderr[-4000:], file=sys.stderr)
            return child.returncode
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| embeddings | stage s | vectors/s | clusters s (passes) | decide s (passes) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        steps = r["steps"]
        print(f"| {r['embeddings']:,} | {r['stage_s']} | {r['vectors_per_s']:,} | "
              f"{steps['clusters']['s']} ({steps['clusters']['passes_s']}) | "
              f"{steps['decide']['s']} ({steps['decide']['passes_s']}) | {r['peak_rss_mib']:,} |")
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"{first['embeddings']:,} -> {last['embeddings']:,}: time x{last['stage_s'] / first['stage_s']:.2f}, "
              f"peak RSS x{last['peak_rss_mib'] / first['peak_rss_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
