"""Stage cache: what a rerun costs. The default job (configs/default.yaml: the bundled 1,840-record sample,
embed + prune + mix) side by side in one process:
  cold        empty cache (every stage computed and cached)
  uncached    output.cache false (every stage computed, nothing kept): the cost of writing the cache
  rerun       the same config again (every stage reused)
  mix change  only mix.seed changed (every stage reused; the mix and shards written afresh)
Each configuration runs `--repeats` times in alternation; the medians and their ratios to `cold` are printed
and written to bench/out/cache.json. The bytes of the shards and ledger of `cold`, `uncached` and `rerun` must
be identical, and `mix change` must embed nothing.

    make bench-cache
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def data_bytes(output: Path) -> list[bytes]:
    return [p.read_bytes() for part in ("shards", "ledger") for p in sorted((output / part).glob("*.parquet"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "cache.json")
    args = parser.parse_args()

    from winnow.pipelines.config import build_config
    from winnow.pipelines.job import plan_job, run_job

    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["input"]["path"] = str(ROOT / raw["input"]["path"])
    times: dict[str, list[float]] = {"cold": [], "uncached": [], "rerun": [], "mix change": []}
    with tempfile.TemporaryDirectory() as scratch:
        def run(name: str, target: Path, **changes) -> dict:
            config = json.loads(json.dumps(raw))
            config["output"] = {**config.get("output", {}), "path": str(target), "report": False}
            for section, values in changes.items():
                config[section] = {**config.get(section, {}), **values}
            started = time.perf_counter()
            manifest = run_job(plan_job(build_config(config), []))
            times[name].append(time.perf_counter() - started)
            return manifest

        for _ in range(args.repeats):
            cold, uncached = Path(scratch) / "cold", Path(scratch) / "uncached"
            shutil.rmtree(cold, ignore_errors=True)
            shutil.rmtree(uncached, ignore_errors=True)  # its old vectors would be reused by text hash
            shutil.rmtree(Path(scratch) / ".cold.cache", ignore_errors=True)
            shutil.rmtree(Path(scratch) / ".cold.rephrase-cache", ignore_errors=True)
            run("cold", cold)
            first = data_bytes(cold)
            run("uncached", uncached, output={"cache": False})
            rerun = run("rerun", cold)
            if data_bytes(uncached) != first or data_bytes(cold) != first:
                print("bench-cache: outputs differ between cold, uncached and rerun", file=sys.stderr)
                return 1
            if not all(stage["reused"] for stage in rerun["stages"]):
                print("bench-cache: the rerun recomputed a stage", file=sys.stderr)
                return 1
            seed = int(raw.get("mix", {}).get("seed", 0)) + 1
            changed = run("mix change", cold, mix={"seed": seed})
            if changed["embeddings"]["computed_rows"] != 0:
                print("bench-cache: a mix-only change embedded again", file=sys.stderr)
                return 1
    cold_median = statistics.median(times["cold"])
    result = {
        name: {"median_s": round(statistics.median(values), 2), "runs_s": [round(v, 2) for v in values],
               "ratio_to_cold": round(statistics.median(values) / cold_median, 3)}
        for name, values in times.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'run':<12} {'median s':>9} {'x cold':>8}")
    for name, entry in result.items():
        print(f"{name:<12} {entry['median_s']:>9.2f} {entry['ratio_to_cold']:>8.3f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
