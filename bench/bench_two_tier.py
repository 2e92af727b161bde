"""Two-tier SemDeDup in the job (`prune.semdedup.confirm`) against the full model alone, side by side.

For each corpus, the first `--rows` texts of ../shared/data go through the job twice or more, in one process:
  reference  embed.backend torch, prune with SemDeDup at eps (strategy none, every survivor kept)
  two-tier   embed.backend static, SemDeDup's candidates at each --candidate-eps confirmed by the torch model
Reported per run: the embed and prune stages' seconds, the rows the confirming model embedded, the candidate
and confirmed pairs, and each run's SemDeDup removals caught by the other (a removal and its survivor, one of
the two removed). The static model clusters differently, so a pair the reference finds across two static
clusters is lost, and which record of a pair goes follows each run's clusters.
Writes bench/out/two_tier.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.selectors import backends

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = {"debian_en": "debian_descriptions_en.parquet", "docs": "docs_paragraphs.parquet"}


def run(source: Path, output: Path, embed: dict, semdedup: dict) -> tuple[dict, float]:
    config = build_config({
        "input": {"path": str(source), "columns": {"id": "id", "text": "text"}},
        "output": {"path": str(output), "cache": False, "report": False},
        "embed": {"enabled": True, **embed},
        "prune": {"enabled": True, "strategy": "none", "keep_fraction": 1.0, "semdedup": semdedup},
    })
    started = time.perf_counter()
    manifest = run_job(plan_job(config, []))
    return manifest, time.perf_counter() - started


def removed(output: Path) -> dict[str, str]:
    """{removed id: the id of the record it duplicates} of SemDeDup."""
    ledger = pq.read_table(output / "ledger", columns=["id", "stage", "duplicate_of"]).to_pylist()
    return {row["id"]: row["duplicate_of"] for row in ledger if row["stage"] == "semdedup"}


def caught(reference: dict[str, str], found: dict[str, str]) -> float | None:
    """The share of the reference's removals (a duplicate and its survivor) of which the other run removed one
    or the other: which record of a pair goes depends on the clusters' order, that one of them goes does not."""
    if not reference:
        return None
    return round(sum(a in found or b in found for a, b in reference.items()) / len(reference), 3)


def stage_seconds(manifest: dict) -> dict[str, float]:
    return {entry["stage"]: round(entry["seconds"], 1) for entry in manifest["stages"]
            if entry["stage"] in ("embed", "prune")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--candidate-eps", type=float, nargs="+", default=[0.10, 0.15])
    parser.add_argument("--export-dir", type=Path, default=backends.default_export_dir())
    parser.add_argument("--out", type=Path, default=Path("bench/out/two_tier.json"))
    args = parser.parse_args()
    missing = [name for name in CORPORA.values() if not (DATA / name).exists()]
    if missing:
        print(f"bench-two-tier needs {', '.join(missing)} in {DATA} (../shared/data); absent", file=sys.stderr)
        return 2
    report: dict = {"rows": args.rows, "eps": args.eps, "corpora": {}}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for corpus, name in CORPORA.items():
            table = pq.read_table(DATA / name, columns=["text"]).slice(0, args.rows)
            ids = pa.array([f"{corpus}-{n}" for n in range(table.num_rows)])
            source = root / f"{corpus}.parquet"
            pq.write_table(table.append_column("id", ids), source)
            manifest, wall = run(source, root / f"{corpus}-reference", {"backend": "torch"}, {"eps": args.eps})
            reference = removed(root / f"{corpus}-reference")
            runs = [{"tier": "torch", "wall_s": round(wall, 1), **stage_seconds(manifest),
                     "removed": len(reference)}]
            for candidate_eps in args.candidate_eps:
                output = root / f"{corpus}-two-tier-{candidate_eps}"
                semdedup = {"eps": args.eps, "confirm": "torch", "candidate_eps": candidate_eps}
                manifest, wall = run(source, output, {"backend": "static", "export_dir": str(args.export_dir)},
                                     semdedup)
                found = removed(output)
                runs.append({"tier": f"static + torch confirm, candidate_eps {candidate_eps}",
                             "wall_s": round(wall, 1), **stage_seconds(manifest), "removed": len(found),
                             **{key: manifest["prune"]["confirm"][key]
                                for key in ("candidate_pairs", "rows_embedded", "confirmed_pairs")},
                             "rows_embedded_share": round(manifest["prune"]["confirm"]["rows_embedded"]
                                                          / table.num_rows, 3),
                             "reference_removals_caught": caught(reference, found),
                             "removals_the_reference_catches": caught(found, reference),
                             "x_reference_time": round(runs[0]["wall_s"] / wall, 2)})
            report["corpora"][corpus] = runs
            for entry in runs:
                print(json.dumps({"corpus": corpus, **entry}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
