"""Scale on one machine: winnow validate + mix against DataTrove and the pyarrow limit, and winnow's growth.

Input: ../shared/data/debian_descriptions_multilingual.parquet (247,744 rows, 24 languages) tiled to N rows
with unique ids (`~COPY` suffixes), in Parquet files of 250,000 rows (row groups of 50,000).

1. Side by side at --compare-rows (default 1M), alternating, --repeats times:
   - winnow: read, validate, mix into 20 shards with the default cooldown schedule, ledger; no stage cache,
     no report (`output.cache: false`, `output.report: false`), in-process FnApiRunner;
   - DataTrove: ParquetReader -> LambdaFilter (text of 1 .. 1,000,000 UTF-8 bytes, winnow's length rule)
     -> ParquetWriter, LocalPipelineExecutor with 2 tasks on 2 workers (one per core);
   - pyarrow: read, vectorised filter (same rule), write 20 shards: what the hardware allows.
2. winnow alone at --sizes (default 1M 4M 10M): wall time, rows/s, peak RSS, and their growth.

Each job runs in a process of its own; its peak RSS is the largest sum of resident memory over the job's whole
process tree, sampled every 0.2 s (DataTrove's workers are forkserver children that getrusage never counts), or
the job process's own high-water mark (VmHWM) if that is larger. Writes bench/out/scale.json and prints the
tables with the ratios the issue asks for.

    make bench-scale
    make bench-scale ARGS="--compare-rows 250000 --repeats 1 --sizes 250000 500000"
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_descriptions_multilingual.parquet"
FILE_ROWS = 250_000
MAX_TEXT_BYTES = 1_000_000
KINDS = ("winnow", "datatrove", "pyarrow")


def tiled_input(rows: int, directory: Path) -> Path:
    """N rows of the corpus, tiled with unique ids, as Parquet files of FILE_ROWS rows in `directory`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    base = pq.read_table(DATA, columns=["id", "text", "source"])
    written, copy, buffer = 0, 0, []
    file_index = 0
    while written < rows:
        part = base.slice(0, min(base.num_rows, rows - written))
        ids = pc.binary_join_element_wise(part.column("id"), pa.scalar(f"~{copy}"), "")
        buffer.append(part.set_column(0, "id", ids))
        written += part.num_rows
        copy += 1
        pending = pa.concat_tables(buffer)
        while pending.num_rows >= FILE_ROWS or (written >= rows and pending.num_rows):
            chunk = pending.slice(0, FILE_ROWS)
            pq.write_table(chunk, directory / f"part-{file_index:04d}.parquet", row_group_size=50_000)
            file_index += 1
            pending = pending.slice(chunk.num_rows)
        buffer = [pending] if pending.num_rows else []
    return directory


def _peak_rss_mib() -> float:
    """This process's high-water RSS (VmHWM: ru_maxrss would carry the parent's over fork and exec) or its
    largest child's, whichever is larger."""
    own = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


def run_winnow(source: Path, output: Path) -> int:
    from winnow.pipelines.config import build_config
    from winnow.pipelines.job import plan_job, run_job

    config = build_config({
        "input": {"path": str(source / "*.parquet"), "columns": {"id": "id", "text": "text", "source": "source"}},
        "output": {"path": str(output), "cache": False, "report": False},
        "mix": {"enabled": True, "shards": 20},
    })
    manifest = run_job(plan_job(config, []), force=True)
    return sum(shard["rows"] for shard in manifest["shards"])


def run_datatrove(source: Path, output: Path) -> int:
    import pyarrow.parquet as pq
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    LocalPipelineExecutor(
        pipeline=[
            ParquetReader(str(source), glob_pattern="*.parquet", text_key="text", id_key="id"),
            LambdaFilter(lambda doc: 0 < len(doc.text.encode("utf-8")) <= MAX_TEXT_BYTES),
            ParquetWriter(str(output / "data"), compression="zstd"),
        ],
        tasks=2, workers=2, logging_dir=str(output / "logs"),
    ).run()
    return sum(pq.ParquetFile(path).metadata.num_rows for path in sorted((output / "data").rglob("*.parquet")))


def run_pyarrow(source: Path, output: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    length = pc.binary_length(table.column("text"))
    kept = table.filter(pc.and_(pc.greater(length, 0), pc.less_equal(length, MAX_TEXT_BYTES)))
    output.mkdir(parents=True)
    per_shard = -(-kept.num_rows // 20)
    for shard in range(20):
        pq.write_table(kept.slice(shard * per_shard, per_shard), output / f"part-{shard:05d}.parquet",
                       compression="zstd", row_group_size=5_000)
    return kept.num_rows


def child(kind: str, source: str, output: str) -> dict:
    started = time.perf_counter()
    rows = {"winnow": run_winnow, "datatrove": run_datatrove, "pyarrow": run_pyarrow}[kind](Path(source),
                                                                                             Path(output))
    return {"kind": kind, "rows_out": rows, "wall_s": round(time.perf_counter() - started, 2),
            "peak_rss_mib": _peak_rss_mib()}


def tile(rows: int, directory: Path) -> Path:
    """Tiled input, made in a process of its own: the parent stays small, so children forked from it do not
    start from its memory."""
    subprocess.run([sys.executable, __file__, "--tile", str(rows), str(directory)], check=True)
    return directory


def _tree_rss(process) -> int:
    """Resident bytes of a process and all its descendants (DataTrove's workers are forkserver children, which
    getrusage never counts)."""
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def measure(kind: str, source: Path, output: Path, rows: int, script: str = __file__) -> dict:
    """Run one job in a process of its own (`script --child KIND SOURCE OUTPUT`), sampling the resident memory
    of its whole process tree."""
    import psutil

    job = subprocess.Popen([sys.executable, script, "--child", kind, str(source), str(output)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process, peak = psutil.Process(job.pid), 0
    with ThreadPoolExecutor(2) as pool:  # drain both pipes while sampling
        stdout, stderr = pool.submit(job.stdout.read), pool.submit(job.stderr.read)
        while job.poll() is None:
            try:
                peak = max(peak, _tree_rss(process))
            except psutil.Error:
                pass
            time.sleep(0.2)
        out, err = stdout.result(), stderr.result()
    if job.returncode:
        raise RuntimeError(f"{kind} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_tree_rss_mib"] = max(round(peak / 2**20, 1), result["peak_rss_mib"])
    result["rows_in"] = rows
    result["rows_per_s"] = round(rows / result["wall_s"])
    print(json.dumps(result), flush=True)
    return result


def spread(results: list[dict], key: str) -> str:
    values = sorted(r[key] for r in results)
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 4_000_000, 10_000_000])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--out", type=Path, default=Path("bench/out/scale.json"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--tile", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.tile:
        tiled_input(int(args.tile[0]), Path(args.tile[1]))
        return 0
    if not DATA.exists():
        print(f"bench-scale needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    report: dict = {"compare_rows": args.compare_rows, "compare": {}, "scale": []}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if args.compare_rows:
            source = tile(args.compare_rows, root / f"in-{args.compare_rows}")
            runs: dict[str, list[dict]] = {kind: [] for kind in args.kinds}
            for repeat in range(args.repeats):
                for kind in args.kinds:  # alternating, so that a noisy minute hits every kind alike
                    runs[kind].append(measure(kind, source, root / f"out-{kind}-{repeat}", args.compare_rows))
            best = {kind: max(r["rows_per_s"] for r in results) for kind, results in runs.items()}
            report["compare"] = {kind: {"runs": results, "best_rows_per_s": best[kind]} for kind, results in
                                 runs.items()}
            print(f"\n{args.compare_rows:,} rows, {args.repeats} alternating repeats (min-max):")
            print("| job | wall s | rows/s | peak RSS MiB (process tree) |\n|---|---|---|---|")
            for kind, results in runs.items():
                print(f"| {kind} | {spread(results, 'wall_s')} | {spread(results, 'rows_per_s')} | "
                      f"{spread(results, 'peak_tree_rss_mib')} |")
            if "winnow" in best and "datatrove" in best:
                report["winnow_over_datatrove"] = round(best["winnow"] / best["datatrove"], 3)
                print(f"winnow / DataTrove rows/s (best runs): {report['winnow_over_datatrove']} (goal >= 2)")
            if "winnow" in best and "pyarrow" in best:
                report["pyarrow_over_winnow"] = round(best["pyarrow"] / best["winnow"], 2)
                print(f"pyarrow / winnow rows/s (best runs): {report['pyarrow_over_winnow']} (goal <= 10)")
        for size in args.sizes:
            source = tile(size, root / f"in-{size}")
            report["scale"].append(measure("winnow", source, root / f"scale-{size}", size))
            subprocess.run(["rm", "-rf", str(source), str(root / f"scale-{size}")], check=True)
    if report["scale"]:
        first = report["scale"][0]
        print("\n| rows | wall s | rows/s | peak RSS MiB | rows x | time x | RSS x |\n|---|---|---|---|---|---|---|")
        for r in report["scale"]:
            r["time_growth"] = round(r["wall_s"] / first["wall_s"], 2)
            r["rss_growth"] = round(r["peak_tree_rss_mib"] / first["peak_tree_rss_mib"], 2)
            r["size_growth"] = round(r["rows_in"] / first["rows_in"], 2)
            print(f"| {r['rows_in']:,} | {r['wall_s']} | {r['rows_per_s']} | {r['peak_tree_rss_mib']} | "
                  f"{r['size_growth']} | {r['time_growth']} | {r['rss_growth']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
