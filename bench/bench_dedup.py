"""The dedup stage against ground truth, against DataTrove's MinHash, and at scale.

1. planted: real texts of ../shared/data (docs paragraphs and English Debian descriptions of >= 50 words, a
   seeded sample) with one variant each at a known Jaccard similarity of their 5-gram sets (word substitutions,
   deletions and insertions at a random rate, sometimes boilerplate added, case or whitespace changed) and
   exact copies (verbatim and whitespace-changed). winnow's job with `dedup` on, the check at 0.8 and without
   it (the second run reuses the candidates step: its time against the cold stage's is reported); recall per
   Jaccard band beside the S-curve of 14 bands x 8 rows.
2. agreement: DataTrove 0.10.1's four MinHash stages (its defaults: 5-grams, 14 x 8, seed 1, 64-bit xxhash64;
   one task) on the same planted corpus against winnow with the same settings and no exact pass or check
   (DataTrove has none), once per `dedup.shingles` (words; datatrove): the share of the records DataTrove puts
   in a cluster whose cluster is their winnow component.
3. shingles: the real texts of ../shared/data (--shingle-rows, an equal slice of each file) normalised,
   shingled and signed with `dedup.shingles` words and datatrove, alternated: texts/s of each.
4. speed: the tiled corpus (bench_scale.py: 247,744 multilingual Debian descriptions repeated with new ids, so
   exact copies plus the real -dev/-doc siblings) at --compare-rows, winnow (read, validate, dedup, shards; no
   cache) and DataTrove (its four stages, 2 tasks on 2 workers) alternating --repeats times, then winnow alone
   at --sizes; wall time, rows/s, peak RSS of the process tree.

    make bench-dedup
    make bench-dedup ARGS="--parts planted agreement --base 3000"
    make bench-dedup ARGS="--parts speed --compare-rows 1000000 --repeats 2 --sizes 1000000 10000000"

Writes bench/out/dedup.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_scale import DATA as TILED_DATA
from bench_scale import measure, spread, tile

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BANDS = [(0.0, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.0001)]
BOILERPLATE = "Copyright 2026 Example Corporation. All rights reserved. Terms of use apply."
EXACT_COPIES, SPACED_COPIES = 400, 200


def base_texts(count: int, seed: int) -> list[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    texts = []
    for name in ("docs_paragraphs.parquet", "debian_descriptions_en.parquet"):
        column = pq.read_table(SHARED / name, columns=["text"]).column("text")
        words = pc.list_value_length(pc.utf8_split_whitespace(column)).to_numpy()
        texts += [text for text, n in zip(column.to_pylist(), words, strict=True) if n >= 50]
    texts = sorted(set(texts))
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.choice(len(texts), count, replace=False)]


def variant(text: str, rate: float, rng, vocabulary: list[str]) -> str:
    """Each word substituted, deleted or followed by an inserted word with probability `rate` in all; sometimes
    boilerplate added, the case or the whitespace changed."""
    out = []
    for word in text.split():
        draw = rng.random()
        if draw < rate / 3:
            out.append(vocabulary[rng.integers(len(vocabulary))])
        elif draw < 2 * rate / 3:
            continue
        elif draw < rate:
            out += [word, vocabulary[rng.integers(len(vocabulary))]]
        else:
            out.append(word)
    changed = " ".join(out)
    if rng.random() < 0.3:
        changed = f"{changed} {BOILERPLATE}"
    if rng.random() < 0.3:
        changed = changed.upper()
    if rng.random() < 0.3:
        changed = changed.replace(" ", "  \n", 5)
    return changed


def true_jaccard(first: str, second: str) -> float:
    import pyarrow as pa

    from winnow.selectors import minhash

    sets = minhash.shingle_sets(minhash.normalise(pa.array([first, second]), "datatrove"), 5)
    return minhash.jaccard(sets[0], sets[1])


def planted_corpus(base: int, seed: int, directory: Path) -> list[dict]:
    """Write the planted corpus; the planted rows (variants and copies) with their origin and true Jaccard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = base_texts(base, seed)
    rng = np.random.default_rng(seed + 1)
    vocabulary = sorted({word for text in texts[:500] for word in text.split()})
    rows = [{"id": f"b-{i}", "text": text, "source": "base"} for i, text in enumerate(texts)]
    planted = []
    for i, text in enumerate(texts):
        changed = variant(text, float(rng.uniform(0.0, 0.3)), rng, vocabulary)
        planted.append({"id": f"v-{i}", "text": changed, "source": "variant", "origin": f"b-{i}",
                        "jaccard": true_jaccard(text, changed)})
    for i in range(EXACT_COPIES + SPACED_COPIES):
        text = texts[i]
        copy = text if i < EXACT_COPIES else "  " + "\n\n".join(text.split(" ")) + " "
        planted.append({"id": f"x-{i}", "text": copy, "source": "exact", "origin": f"b-{i}", "jaccard": 1.0})
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows + [{k: r[k] for k in ("id", "text", "source")} for r in planted])
    pq.write_table(table, directory / "planted.parquet", row_group_size=2_000)
    return planted


def run_winnow_dedup(source: Path, output: Path, dedup: dict, cache: bool = True) -> dict:
    from winnow.pipelines.config import build_config
    from winnow.pipelines.job import plan_job, run_job

    config = build_config({
        "input": {"path": str(source / "*.parquet"), "columns": {"id": "id", "text": "text", "source": "source"}},
        "output": {"path": str(output), "cache": cache, "report": False},
        "dedup": {"enabled": True, **dedup},
    })
    started = time.perf_counter()
    manifest = run_job(plan_job(config, []))
    manifest["wall_s"] = time.perf_counter() - started
    return manifest


def winnow_components(output: Path) -> dict[str, frozenset]:
    """{id: its component} from the ledger: a survivor and the records whose duplicate_of names it."""
    import pyarrow.parquet as pq

    ledger = pq.read_table(output / "ledger", columns=["id", "fate", "duplicate_of"]).to_pylist()
    groups: dict[str, set] = {}
    for row in ledger:
        if row["fate"] == "deduplicated":
            groups.setdefault(row["duplicate_of"], {row["duplicate_of"]}).add(row["id"])
    return {member: frozenset(group) for group in groups.values() for member in group}


def planted_part(base: int, seed: int, root: Path) -> dict:
    from winnow.selectors import minhash

    planted = planted_corpus(base, seed, root / "planted-in")
    (root / "planted.json").write_text(json.dumps([{k: r[k] for k in ("id", "origin", "jaccard", "source")}
                                                   for r in planted]))
    checked = run_winnow_dedup(root / "planted-in", root / "planted-out", {})
    stage = next(entry for entry in checked["stages"] if entry["stage"] == "dedup")
    cold = {step["step"]: step["seconds"] for step in stage["steps"]}
    components = winnow_components(root / "planted-out")
    flagged_checked = [r["origin"] in components.get(r["id"], ()) for r in planted]
    unchecked = run_winnow_dedup(root / "planted-in", root / "planted-out", {"threshold": None})
    stage = next(entry for entry in unchecked["stages"] if entry["stage"] == "dedup")
    warm = {step["step"]: (step["seconds"], step["reused"]) for step in stage["steps"]}
    components = winnow_components(root / "planted-out")
    flagged_unchecked = [r["origin"] in components.get(r["id"], ()) for r in planted]
    table = []
    for low, high in BANDS:
        rows = [i for i, r in enumerate(planted) if r["source"] == "variant" and low <= r["jaccard"] < high]
        middle = (low + min(high, 1.0)) / 2
        table.append({
            "band": f"{low:.2f}-{min(high, 1.0):.2f}", "pairs": len(rows),
            "flagged_checked": round(float(np.mean([flagged_checked[i] for i in rows])), 4) if rows else None,
            "flagged_unchecked": round(float(np.mean([flagged_unchecked[i] for i in rows])), 4) if rows else None,
            "s_curve_at_middle": round(float(minhash.lsh_probability(middle, 14, 8)), 4),
        })
    exact_rows = [i for i, r in enumerate(planted) if r["source"] == "exact"]
    high_rows = [i for i, r in enumerate(planted) if r["source"] == "variant" and r["jaccard"] >= 0.85]
    low_rows = [i for i, r in enumerate(planted) if r["source"] == "variant" and r["jaccard"] <= 0.6]
    return {
        "base_records": base, "planted_variants": base, "exact_copies": len(exact_rows), "bands": table,
        "exact_removed": round(float(np.mean([flagged_checked[i] for i in exact_rows])), 4),
        "recall_at_0.85_and_above": round(float(np.mean([flagged_checked[i] for i in high_rows])), 4),
        "false_positive_rate_at_0.6_and_below_checked":
            round(float(np.mean([flagged_checked[i] for i in low_rows])), 4),
        "false_positive_rate_at_0.6_and_below_unchecked":
            round(float(np.mean([flagged_unchecked[i] for i in low_rows])), 4),
        "cold_stage_s": round(sum(cold.values()), 2), "cold_steps_s": cold,
        "threshold_change_steps": warm, "threshold_change_stage_s": round(sum(s for s, _ in warm.values()), 2),
        "removed_checked": checked["dedup"]["removed"], "removed_unchecked": unchecked["dedup"]["removed"],
    }


def xxhash64_of_text(data: str | bytes) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)


def datatrove_clusters(source: Path, work: Path, tasks: int = 1) -> dict[str, frozenset]:
    """DataTrove's four MinHash stages on `source`; {id: its cluster} for the records it puts in a cluster."""
    # its defaults: 5-grams, 14 buckets x 8 hashes, seed 1, 64-bit xxhash64 shingles. DataTrove 0.10.1 hands
    # xxhash a str, which xxhash 3.x and 4.x refuse ("Strings must be encoded before hashing"): its function is
    # given the UTF-8 bytes, which is what xxhash 2.x hashed for a str
    import datatrove.utils.hashes.xxhash as datatrove_xxhash
    import pyarrow.parquet as pq
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.utils.hashing import HashConfig

    datatrove_xxhash.xxhash64 = xxhash64_of_text
    config = MinhashConfig(hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    reader = ParquetReader(str(source), glob_pattern="*.parquet", text_key="text", id_key="id")
    LocalPipelineExecutor([reader, MinhashDedupSignature(str(work / "signatures"), config=config)],
                          tasks=tasks, workers=tasks, logging_dir=str(work / "logs1")).run()
    LocalPipelineExecutor([MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)],
                          tasks=config.num_buckets, workers=2, logging_dir=str(work / "logs2")).run()
    LocalPipelineExecutor([MinhashDedupCluster(str(work / "buckets"), str(work / "clusters"), config=config,
                                               save_cluster_id=True)],
                          tasks=1, logging_dir=str(work / "logs3")).run()
    ids = pq.read_table(sorted(source.glob("*.parquet")), columns=["id"]).column("id").to_pylist()
    clusters: dict[int, set] = {}
    path = work / "clusters" / "000000.clusters"
    if path.exists():
        raw = path.read_bytes()
        for doc, cluster in struct.iter_unpack("<II", raw):
            clusters.setdefault(cluster, set()).add(ids[doc])
    return {member: frozenset(group) for group in clusters.values() for member in group}


def agreement_part(root: Path) -> dict:
    """DataTrove's clusters against winnow's components with the same settings, for each `dedup.shingles`."""
    if not (root / "planted-in").exists():
        raise SystemExit("the agreement part runs on the planted corpus: give --parts planted agreement")
    started = time.perf_counter()
    theirs = datatrove_clusters(root / "planted-in", root / "datatrove")
    report = {"datatrove_marked": len(theirs), "datatrove_clusters": len(set(theirs.values())),
              "datatrove_s": round(time.perf_counter() - started, 1)}
    planted = json.loads((root / "planted.json").read_text())
    for kind in ("words", "datatrove"):
        settings = {"exact": False, "threshold": None, "shingles": kind}
        manifest = run_winnow_dedup(root / "planted-in", root / f"same-settings-{kind}", settings)
        mine = winnow_components(root / f"same-settings-{kind}")
        agree = [theirs[i] == mine.get(i, frozenset()) for i in theirs]
        by_band = []
        for low, high in BANDS:
            rows = [r for r in planted if r["source"] == "variant" and low <= r["jaccard"] < high]
            if not rows:
                continue
            flagged_theirs = [r["origin"] in theirs.get(r["id"], ()) for r in rows]
            flagged_mine = [r["origin"] in mine.get(r["id"], ()) for r in rows]
            by_band.append({
                "band": f"{low:.2f}-{min(high, 1.0):.2f}", "pairs": len(rows),
                "datatrove_flagged": round(float(np.mean(flagged_theirs)), 4),
                "winnow_flagged": round(float(np.mean(flagged_mine)), 4),
                "same_decision": round(float(np.mean(np.equal(flagged_theirs, flagged_mine))), 4),
            })
        report[f"shingles_{kind}"] = {
            "planted_pairs_by_band": by_band, "winnow_marked": len(mine),
            "winnow_components": len(set(mine.values())),
            "same_component_share": round(float(np.mean(agree)), 4) if agree else None,
            "marked_by_winnow_only": len(set(mine) - set(theirs)),
            "winnow_s": round(manifest["wall_s"], 1),
        }
    return report


def speed_part(compare_rows: int, repeats: int, sizes: list[int], root: Path) -> dict:
    import subprocess

    report: dict = {"compare_rows": compare_rows, "compare": {}, "scale": []}
    if compare_rows:
        source = tile(compare_rows, root / f"tiled-{compare_rows}")
        runs: dict[str, list[dict]] = {"winnow": [], "datatrove": []}
        for repeat in range(repeats):
            for kind in runs:
                runs[kind].append(measure_dedup(kind, source, root / f"speed-{kind}-{repeat}", compare_rows))
        best = {kind: max(r["rows_per_s"] for r in results) for kind, results in runs.items()}
        report["compare"] = {kind: {"runs": results, "best_rows_per_s": best[kind]} for kind, results in runs.items()}
        report["winnow_over_datatrove"] = round(best["winnow"] / best["datatrove"], 3)
        report["decision_change"] = measure_dedup("rethreshold", source, root / "rethreshold", compare_rows)
        report["components_graph"] = measure_dedup("graph", source, root / "graph", compare_rows)
    for size in sizes:
        source = tile(size, root / f"tiled-{size}")
        report["scale"].append(measure_dedup("winnow", source, root / f"scale-{size}", size))
        subprocess.run(["rm", "-rf", str(root / f"scale-{size}")], check=True)
    return report


def shingles_part(rows: int, repeats: int) -> dict:
    """Signatures of real texts per `dedup.shingles`, side by side in one process: normalise, shingle, sign."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from winnow.selectors import minhash

    names = sorted(p.name for p in SHARED.glob("*.parquet"))
    texts = pa.concat_arrays([pq.read_table(SHARED / name, columns=["text"]).column("text").combine_chunks()
                              .slice(0, rows // len(names)) for name in names])
    minhash.compile_all()
    seconds: dict[str, list[float]] = {"words": [], "datatrove": []}
    for _ in range(repeats):
        for kind in seconds:
            started = time.perf_counter()
            hashes, offsets = minhash.shingles(minhash.normalise(texts, "datatrove"), 5, kind)
            minhash.signatures(hashes, offsets, 14, 8, 1)
            seconds[kind].append(time.perf_counter() - started)
    best = {kind: min(values) for kind, values in seconds.items()}
    return {"texts": len(texts), "corpora": names, "seconds": seconds,
            "texts_per_s": {kind: round(len(texts) / value) for kind, value in best.items()},
            "datatrove_over_words_time": round(best["datatrove"] / best["words"], 3)}


def output_digests(output: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(output)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(output.rglob("*.parquet"))}


def graph_against_driver(source: Path, output: Path) -> dict:
    """The decide step with its components joined on the driver, then (reusing the candidates) by
    large-star/small-star rounds in the pipeline: seconds of each, the rounds, and whether the outputs agree."""
    driver = run_winnow_dedup(source, output, {"components": "driver"})
    expected = output_digests(output)
    graph = run_winnow_dedup(source, output, {"components": "graph"})
    decide = [next(step for entry in manifest["stages"] if entry["stage"] == "dedup" for step in entry["steps"]
                   if step["step"] == "decide") for manifest in (driver, graph)]
    return {"driver_decide_s": decide[0]["seconds"], "graph_decide_s": decide[1]["seconds"],
            "graph_passes_s": decide[1]["passes_seconds"], "joined": graph["dedup"]["joined"],
            "identical_output": output_digests(output) == expected, "removed": graph["dedup"]["removed"]}


def measure_dedup(kind: str, source: Path, output: Path, rows: int) -> dict:
    return measure(f"dedup-{kind}", source, output, rows, script=__file__)


def child(kind: str, source: str, output: str) -> dict:
    started = time.perf_counter()
    if kind == "dedup-winnow":
        manifest = run_winnow_dedup(Path(source), Path(output), {}, cache=False)
        stage = next(entry for entry in manifest["stages"] if entry["stage"] == "dedup")
        extra = {"rows_out": manifest["counts"]["by_fate"].get("kept", 0), "removed": manifest["dedup"]["removed"],
                 "dedup_stage_s": stage["seconds"]}
    elif kind == "dedup-rethreshold":
        cold = run_winnow_dedup(Path(source), Path(output), {})
        warm = run_winnow_dedup(Path(source), Path(output), {"threshold": 0.9, "keep": "longest"})
        stages = [next(entry for entry in manifest["stages"] if entry["stage"] == "dedup") for manifest in (cold, warm)]
        extra = {"cold_stage_s": stages[0]["seconds"], "changed_stage_s": stages[1]["seconds"],
                 "changed_steps": [(s["step"], s["reused"], s["seconds"], s.get("passes_seconds"))
                                   for s in stages[1]["steps"]],
                 "ratio": round(stages[1]["seconds"] / stages[0]["seconds"], 3)}
    elif kind == "dedup-graph":
        extra = graph_against_driver(Path(source), Path(output))
    else:
        theirs = datatrove_clusters(Path(source), Path(output), tasks=2)
        extra = {"marked": len(theirs), "clusters": len(set(theirs.values()))}
    from bench_scale import _peak_rss_mib

    return {"kind": kind, **extra, "wall_s": round(time.perf_counter() - started, 2), "peak_rss_mib": _peak_rss_mib()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["planted", "agreement", "shingles", "speed"],
                        choices=["planted", "agreement", "shingles", "speed"])
    parser.add_argument("--shingle-rows", type=int, default=100_000, help="real texts the shingles part signs")
    parser.add_argument("--base", type=int, default=3000, help="real texts in the planted corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", type=Path, default=Path("bench/out/dedup.json"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if not SHARED.exists() or not TILED_DATA.exists():
        print(f"bench-dedup needs {SHARED} (../shared/data); it is absent", file=sys.stderr)
        return 2
    report: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if "planted" in args.parts:
            report["planted"] = planted_part(args.base, args.seed, root)
            print(json.dumps(report["planted"], indent=1), flush=True)
        if "agreement" in args.parts:
            report["agreement"] = agreement_part(root)
            print(json.dumps(report["agreement"], indent=1), flush=True)
        if "shingles" in args.parts:
            report["shingles"] = shingles_part(args.shingle_rows, args.repeats + 1)
            print(json.dumps(report["shingles"], indent=1), flush=True)
        if "speed" in args.parts:
            report["speed"] = speed_part(args.compare_rows, args.repeats, args.sizes, root)
            print_speed(report["speed"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def print_speed(speed: dict) -> None:
    if speed["compare"]:
        print(f"\n{speed['compare_rows']:,} rows (min-max over runs):")
        print("| job | wall s | rows/s | peak RSS MiB (process tree) |\n|---|---|---|---|")
        for kind, entry in speed["compare"].items():
            print(f"| {kind} | {spread(entry['runs'], 'wall_s')} | {spread(entry['runs'], 'rows_per_s')} | "
                  f"{spread(entry['runs'], 'peak_tree_rss_mib')} |")
        print(f"winnow / DataTrove rows/s (best runs): {speed['winnow_over_datatrove']} (goal >= 2)")
        change = speed["decision_change"]
        print(f"threshold 0.8 -> 0.9 and keep first -> longest at {speed['compare_rows']:,} rows: stage "
              f"{change['changed_stage_s']} s against {change['cold_stage_s']} s cold ({change['ratio']}; goal <= 0.1)")
        graph = speed["components_graph"]
        print(f"components at {speed['compare_rows']:,} rows: decide {graph['driver_decide_s']} s on the driver, "
              f"{graph['graph_decide_s']} s by {graph['joined']}; identical output: {graph['identical_output']}")
    if speed["scale"]:
        first = speed["scale"][0]
        print("\n| rows | wall s | dedup stage s | rows/s | peak RSS MiB | RSS x |\n|---|---|---|---|---|---|")
        for r in speed["scale"]:
            r["rss_growth"] = round(r["peak_tree_rss_mib"] / first["peak_tree_rss_mib"], 2)
            print(f"| {r['rows_in']:,} | {r['wall_s']} | {r['dedup_stage_s']} | {r['rows_per_s']} | "
                  f"{r['peak_tree_rss_mib']} | {r['rss_growth']} |")


if __name__ == "__main__":
    sys.exit(main())
