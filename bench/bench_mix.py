"""Mix-stage scaling: the winnow job (read, validate, mix into 20 shards, ledger; no embedding) on 250k, 500k
and 1M records of ../shared/data/debian_descriptions_multilingual.parquet tiled (ids suffixed per copy).

Each size runs in its own process, so that its peak resident memory (ru_maxrss) is its own; the in-process
FnApiRunner holds each GroupByKey in memory, so memory grows with the data on one machine (a distributed
runner spreads it). Prints wall time, records/s and peak memory per size and the growth factors.

    make bench-mix
    make bench-mix ARGS="--sizes 100000 200000"
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_descriptions_multilingual.parquet"


def tiled_input(rows: int, directory: Path) -> Path:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    base = pq.read_table(DATA, columns=["id", "text", "source"])
    parts, copy = [], 0
    while sum(p.num_rows for p in parts) < rows:
        part = base.slice(0, min(base.num_rows, rows - sum(p.num_rows for p in parts)))
        ids = pc.binary_join_element_wise(part.column("id"), pa.scalar(f"~{copy}"), "")
        parts.append(part.set_column(0, "id", ids))
        copy += 1
    path = directory / f"tiled-{rows}.parquet"
    pq.write_table(pa.concat_tables(parts), path, row_group_size=50_000)
    return path


def run_one(path: str, output: str) -> dict:
    from winnow.pipelines.config import build_config
    from winnow.pipelines.job import plan_job, run_job

    config = build_config({
        "input": {"path": path, "columns": {"id": "id", "text": "text", "source": "source"}},
        "output": {"path": output},
        "mix": {"enabled": True, "shards": 20},
    })
    started = time.perf_counter()
    manifest = run_job(plan_job(config, []), force=True)
    return {
        "records": manifest["counts"]["input_records"],
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=Path("bench/out/mix.json"))
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return 0
    if not DATA.exists():
        print(f"bench-mix needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            path = tiled_input(size, Path(scratch))
            child = subprocess.run(
                [sys.executable, __file__, "--one", str(path), str(Path(scratch) / f"out-{size}")],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["records_per_s"] = round(result["records"] / result["wall_s"])
            results.append(result)
            print(json.dumps(result), flush=True)
    first = results[0]
    for result in results:
        result["time_growth"] = round(result["wall_s"] / first["wall_s"], 2)
        result["memory_growth"] = round(result["peak_rss_mib"] / first["peak_rss_mib"], 2)
        result["size_growth"] = round(result["records"] / first["records"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("| records | wall s | records/s | peak RSS MiB | size x | time x | memory x |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['records']} | {r['wall_s']} | {r['records_per_s']} | {r['peak_rss_mib']} | {r['size_growth']} "
              f"| {r['time_growth']} | {r['memory_growth']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
