"""Stage cache: what a rerun costs. The default job (configs/default.yaml: the bundled 1,840-record sample,
embed + prune + mix) side by side in one process:
  cold        empty cache (every stage computed and cached)
  uncached    output.cache false (every stage computed, nothing kept): the cost of writing the cache
  rerun       the same config again (every stage reused)
  mix change  only mix.seed changed (every stage reused; the mix and shards written afresh)
Each configuration runs `--repeats` times in alternation; the medians and their ratios to `cold` are printed
and written to bench/out/cache.json. The bytes of the shards and ledger of `cold`, `uncached` and `rerun` must
be identical, and `mix change` must embed nothing.

Then decisions apart from scores, on a job that selects (mona, the sample's SAE, configs/select.yaml) and
prunes: `--rows` rows of the sample (every k-th row of each file), `pipeline: [validate, embed, select, prune]`.
After a cold run, each case changes one decision key of that config (select.count, select.ratio, select.seed,
select.top_features, prune.keep_fraction, prune.keep, prune.tau, prune.strategy) and runs on the warm cache
(the base config is rerun in between, untimed, so every case starts from the base's cache). A case must take at
most 5% of the cold run, reuse its stage's scores, and give shards and ledger identical to a cold, uncached run
of the changed config.

    make bench-cache [ARGS="--rows 600 --skip-default"]
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


DECISION_CASES = {
    "select.count": {"select": {"count": 60}},
    "select.ratio": {"select": {"count": None, "ratio": 0.1}},
    "select.seed": {"select": {"seed": 7}},
    "select.top_features": {"select": {"top_features": 4}},
    "prune.keep_fraction": {"prune": {"keep_fraction": 0.5}},
    "prune.keep": {"prune": {"keep": "easy"}},
    "prune.tau": {"prune": {"tau": 0.2}},
    "prune.strategy": {"prune": {"strategy": "ssp"}},
}
SCORE_STEPS = {"select": "scores", "prune": "clusters"}


def sample_input(directory: Path, rows: int) -> str:
    """About `rows` rows of the bundled sample, every k-th row of each file (all its sources kept)."""
    import pyarrow.parquet as pq

    files = sorted((ROOT / "data" / "sample").glob("*.parquet"))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    step = max(1, total // rows)
    directory.mkdir(parents=True, exist_ok=True)
    for path in files:
        table = pq.read_table(path)
        pq.write_table(table.take(list(range(0, table.num_rows, step))), directory / path.name)
    return str(directory / "*.parquet")


def decision_cases(rows: int, scratch: Path) -> tuple[dict, bool]:
    """Time each decision change against the cold run; check reuse and bytes against a cold changed run."""
    from winnow.pipelines.config import build_config
    from winnow.pipelines.job import plan_job, run_job

    default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    select = yaml.safe_load((ROOT / "configs" / "select.yaml").read_text())["select"]
    select = {**select, "targets": str(ROOT / select["targets"]), "sae": str(ROOT / select["sae"])}
    base = {
        "input": {**default["input"], "path": sample_input(scratch / "input", rows)},
        "output": {"path": str(scratch / "warm"), "report": False},
        "pipeline": ["validate", "embed", "select", "prune"],
        "embed": default["embed"], "prune": default["prune"], "select": select, "mix": default["mix"],
    }

    def config_for(changes: dict, path: Path, cache: bool = True) -> dict:
        config = json.loads(json.dumps(base))
        config["output"].update(path=str(path), cache=cache)
        for section, values in changes.items():
            config[section].update(values)
        return config

    def timed(config: dict) -> tuple[float, dict]:
        started = time.perf_counter()
        manifest = run_job(plan_job(build_config(config), []))
        return time.perf_counter() - started, manifest

    cold_s, _ = timed(config_for({}, scratch / "warm"))
    results, ok = {"cold": {"seconds": round(cold_s, 2), "rows": rows}}, True
    for name, changes in DECISION_CASES.items():
        timed(config_for({}, scratch / "warm"))  # back to the base's cache, untimed
        seconds, manifest = timed(config_for(changes, scratch / "warm"))
        stage = name.split(".")[0]
        entry = next(e for e in manifest["stages"] if e["stage"] == stage)
        scores_reused = any(s["step"] == SCORE_STEPS[stage] and s["reused"] for s in entry.get("steps", []))
        reference = scratch / f"cold-{name}"
        timed(config_for(changes, reference, cache=False))
        identical = data_bytes(scratch / "warm") == data_bytes(reference)
        ratio = seconds / cold_s
        results[name] = {"seconds": round(seconds, 2), "ratio_to_cold": round(ratio, 4),
                         "scores_reused": scores_reused, "identical_to_cold": identical}
        ok = ok and ratio <= 0.05 and scores_reused and identical
        shutil.rmtree(reference, ignore_errors=True)
    return results, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=600, help="rows of the select + prune job")
    parser.add_argument("--skip-default", action="store_true", help="only the decision cases")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "cache.json")
    args = parser.parse_args()
    result: dict = {}
    if not args.skip_default:
        code, result = default_job(args.repeats)
        if code:
            return code
    with tempfile.TemporaryDirectory() as scratch:
        cases, ok = decision_cases(args.rows, Path(scratch))
    result["decisions"] = cases
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.skip_default:
        print(f"{'run':<12} {'median s':>9} {'x cold':>8}")
        for name, entry in result.items():
            if name != "decisions":
                print(f"{name:<12} {entry['median_s']:>9.2f} {entry['ratio_to_cold']:>8.3f}")
    print(f"select (mona) + prune on {args.rows} rows: cold {cases['cold']['seconds']:.1f} s")
    print(f"{'change':<22} {'s':>7} {'x cold':>8} {'scores reused':>14} {'= cold run':>11}")
    for name, entry in cases.items():
        if name != "cold":
            print(f"{name:<22} {entry['seconds']:>7.2f} {entry['ratio_to_cold']:>8.4f} "
                  f"{str(entry['scores_reused']):>14} {str(entry['identical_to_cold']):>11}")
    print(f"written to {args.out}")
    if not ok:
        print("bench-cache: a decision change took over 5% of cold, recomputed its scores or differs from a cold "
              "run", file=sys.stderr)
        return 1
    return 0


def default_job(repeats: int) -> tuple[int, dict]:
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

        for _ in range(repeats):
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
                return 1, {}
            if not all(stage["reused"] for stage in rerun["stages"]):
                print("bench-cache: the rerun recomputed a stage", file=sys.stderr)
                return 1, {}
            seed = int(raw.get("mix", {}).get("seed", 0)) + 1
            changed = run("mix change", cold, mix={"seed": seed})
            if changed["embeddings"]["computed_rows"] != 0:
                print("bench-cache: a mix-only change embedded again", file=sys.stderr)
                return 1, {}
    cold_median = statistics.median(times["cold"])
    return 0, {
        name: {"median_s": round(statistics.median(values), 2), "runs_s": [round(v, 2) for v in values],
               "ratio_to_cold": round(statistics.median(values) / cold_median, 3)}
        for name, values in times.items()
    }


if __name__ == "__main__":
    sys.exit(main())
