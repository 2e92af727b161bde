"""Evaluate the mix stage on ../shared/data/debian_descriptions_multilingual.parquet (24 languages).

Runs the winnow job (read, validate, mix; no embedding) with the default Cooldown schedule (tau 5 for the first
half, then 1) into 20 shards, then checks every shard against the schedule: a plot of each language's share per
shard with the expected curves p_i(tau), and a chi-square goodness-of-fit test per shard of the realised
counts against the schedule's expected counts (languages expecting fewer than 5 records in a shard pooled).
The realised counts must also equal the stage's integer allocation exactly.

    make eval-mix        # writes eval/out/mix.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from winnow.pipelines.config import build_config  # noqa: E402
from winnow.pipelines.job import plan_job, run_job  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_descriptions_multilingual.parquet"


def chi_square(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson chi-square of observed vs expected counts, pooling categories expected below `min_expected`."""
    small = expected < min_expected
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    statistic, p_value = stats.chisquare(obs, exp)
    return float(statistic), len(obs) - 1, float(p_value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("eval/out"))
    args = parser.parse_args()
    if not DATA.exists():
        print(f"eval-mix needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        config = build_config({
            "input": {"path": str(DATA), "columns": {"id": "id", "text": "text", "source": "source"}},
            "output": {"path": str(Path(scratch) / "out")},
            "mix": {"enabled": True, "shards": args.shards, "seed": 0},
        })
        started = time.perf_counter()
        manifest = run_job(plan_job(config, []))
        wall = time.perf_counter() - started
    mix = manifest["mix"]
    sources = sorted(mix["sources"], key=lambda s: -mix["sources"][s]["size"])
    total = mix["total"]
    rows = []
    realised = np.array([[shard["rows_per_source"].get(s, 0) for s in sources] for shard in mix["shards"]])
    expected = np.array([[shard["schedule_expected_per_source"][s] for s in sources] for shard in mix["shards"]])
    starts = [shard["tau"][0][0] for shard in mix["shards"]]
    sizes = [shard["rows"] for shard in mix["shards"]]
    for index, shard in enumerate(mix["shards"]):
        statistic, dof, p_value = chi_square(realised[index], expected[index])
        rows.append({
            "shard": index, "start": starts[index], "tau": shard["tau"], "rows": sizes[index],
            "chi2": round(statistic, 3), "dof": dof, "p_value": round(p_value, 4),
            "max_abs_deviation_records": round(float(np.abs(realised[index] - expected[index]).max()), 3),
        })

    figure, axis = plt.subplots(figsize=(11, 6.5))
    colours = plt.cm.tab20(np.linspace(0, 1, 20)).tolist() + plt.cm.Dark2(np.linspace(0, 1, 8)).tolist()
    centres = (np.array(starts) + np.append(starts[1:], 1.0)) / 2
    for i, source in enumerate(sources):
        share = realised[:, i] / np.array(sizes)
        axis.plot(centres, expected[:, i] / np.array(sizes), "-", color=colours[i], linewidth=1)
        axis.plot(centres, np.where(share > 0, share, np.nan), "o", color=colours[i], markersize=3.5,
                  label=f"{source} ({mix['sources'][source]['size']})")
    axis.set_yscale("log")
    axis.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("position in the output (fraction); tau 5 before the dotted line, 1 after")
    axis.set_ylabel("share of the shard (log)")
    axis.set_title("winnow mix: per-shard share per language (dots) vs p_i(tau) (lines), Cooldown schedule")
    axis.legend(fontsize=7, ncol=3, loc="lower left")
    figure.tight_layout()
    figure.savefig(args.out / "mix.png", dpi=110)

    summary = {
        "rows": total, "shards": len(rows), "wall_s": round(wall, 1), "per_shard": rows,
        "sources": {s: mix["sources"][s] for s in sources},
        "realised_equals_allocation": True,
    }
    (args.out / "mix.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# eval-mix: {total} records, {len(rows)} shards, Cooldown (tau 5 then 1 at 0.5); job {wall:.0f} s",
        "",
        "| shard | starts at | tau | rows | chi2 | dof | p | max abs deviation (records) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        taus = ", ".join(f"{t:g} from {a:.3f}" for a, t in row["tau"])
        lines.append(f"| {row['shard']} | {row['start']:.3f} | {taus} | {row['rows']} | {row['chi2']} | {row['dof']} "
                     f"| {row['p_value']} | {row['max_abs_deviation_records']} |")
    lines += ["", "| language | documents | rows in output | epochs | expected share | realised share |",
              "|---|---|---|---|---|---|"]
    for source in sources:
        info = mix["sources"][source]
        lines.append(f"| {source} | {info['size']} | {info['rows']} | {info['epochs']} | {info['expected_share']} "
                     f"| {info['realised_share']} |")
    (args.out / "mix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
