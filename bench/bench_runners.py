"""Runner matrix timings: the same job in-process (FnApiRunner), on multi_processing workers, on Beam's
portable runner (LOOPBACK) and on a local Dask cluster (a scheduler and two single-threaded workers started as
separate processes), one after the other in one run; each output compared byte for byte with the in-process
one. Two jobs:

  default   configs/default.yaml (validate, embed, prune, mix on the bundled sample), stage cache off
  mix-only  50,000 rows of ../shared/data/debian_descriptions_multilingual.parquet: validate + mix, 20 shards

Each runner runs `--repeats` times, the order reversed on every other repeat; prints and writes the fastest and
slowest wall seconds per runner, the ratio of the fastest to in-process's fastest, and whether the outputs are
identical.

    make bench-runners
    make bench-runners ARGS="--jobs mix-only --rows 20000"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from winnow.pipelines.config import build_config  # noqa: E402
from winnow.pipelines.engine.dask_cluster import local_cluster  # noqa: E402
from winnow.pipelines.job import plan_job, run_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "debian_descriptions_multilingual.parquet"
RUNNERS = ("in-process", "multi_processing", "portable", "dask")


def beam_args(runner: str, address: str) -> list[str]:
    return {
        "in-process": [],
        "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
        "dask": ["--runner=DaskRunner", f"--dask_client_address={address}"],
    }[runner]


def identical(first: Path, second: Path) -> bool:
    for part in ("shards", "ledger", "embeddings"):
        names = sorted(p.name for p in (first / part).glob("*.parquet"))
        if names != sorted(p.name for p in (second / part).glob("*.parquet")):
            return False
        if any((first / part / n).read_bytes() != (second / part / n).read_bytes() for n in names):
            return False
    return True


def job_configs(jobs: list[str], rows: int, scratch: Path) -> dict[str, dict]:
    configs = {}
    if "default" in jobs:
        raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
        raw["input"]["path"] = str(ROOT / raw["input"]["path"])
        raw["output"]["cache"] = False
        configs["default"] = raw
    if "mix-only" in jobs:
        if not DATA.exists():
            print(f"mix-only needs {DATA} (../shared/data); skipped", file=sys.stderr)
        else:
            source = scratch / "mix-input.parquet"
            table = pq.read_table(DATA, columns=["id", "text", "source"]).slice(0, rows)
            pq.write_table(table, source, row_group_size=10_000)
            configs["mix-only"] = {
                "input": {"path": str(source), "columns": {"id": "id", "text": "text", "source": "source"}},
                "output": {"path": "", "cache": False},
                "embed": {"enabled": False},
                "mix": {"enabled": True, "shards": 20},
            }
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=["default", "mix-only"], choices=["default", "mix-only"])
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the mix-only job")
    parser.add_argument("--repeats", type=int, default=2, help="runs per runner, alternating the order")
    parser.add_argument("--out", type=Path, default=Path("bench/out/runners.json"))
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch, local_cluster(2, 1, Path(scratch) / "dask") as address:
        scratch = Path(scratch)
        for job, raw in job_configs(args.jobs, args.rows, scratch).items():
            others = [r for r in args.runners if r != "in-process"]
            times: dict[str, list[float]] = {runner: [] for runner in ["in-process", *others]}
            for repeat in range(args.repeats):
                order = ["in-process", *others] if repeat % 2 == 0 else [*reversed(others), "in-process"]
                for runner in order:
                    raw["output"]["path"] = str(scratch / f"{job}-{runner}")
                    plan = plan_job(build_config(raw), beam_args(runner, address))
                    started = time.perf_counter()
                    manifest = run_job(plan, force=True)
                    times[runner].append(time.perf_counter() - started)
                    print(json.dumps({"job": job, "runner": runner, "repeat": repeat,
                                      "s": round(times[runner][-1], 1)}), flush=True)
            baseline = min(times["in-process"])
            results[job] = {
                runner: {
                    "s_min": round(min(seconds), 1), "s_max": round(max(seconds), 1),
                    "ratio_to_in_process": round(min(seconds) / baseline, 2),
                    "records": manifest["counts"]["input_records"],
                    "identical_to_in_process": identical(scratch / f"{job}-in-process", scratch / f"{job}-{runner}"),
                }
                for runner, seconds in times.items()
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
