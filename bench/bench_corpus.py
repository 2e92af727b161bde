"""The corpus benchmark: every real corpus in ../shared/data/ together through validate -> embed -> prune
(SemDeDup + DBP) -> mix, once per embedding tier, with semhash's self-deduplication of the same texts beside it.

The five files become one input (`id` prefixed with the file's name, `source` = the file's name; 465,056 rows).
Each tier runs `winnow run` in a process of its own (peak RSS is that process's high-water mark or its largest
child's), with the stage cache off and the default prune settings (k-means k = sqrt(n), SemDeDup eps 0.05, DBP
keep 0.7 hard) and mix into 20 shards with the cooldown schedule. A tier may run on the first `--sample-rows`
rows only (the model tiers: ~35 docs/s here would be 3.6 hours for the whole corpus); its hours for 10M
documents are extrapolated from the stages' rates. semhash 0.5 (`SemHash.from_records` +
`self_deduplicate(threshold)`) runs with the static model winnow distils (the same vectors as the static tier),
in its own process as well.

    make bench-corpus                                  # static and OpenVINO int8 on all rows, semhash
    make bench-corpus ARGS="--tiers static openvino-int8 onnx-int8"   # ONNX int8 on 5,000 rows as well
    make bench-corpus ARGS="--tiers static --no-semhash"
    make bench-corpus ARGS="--tiers --no-semhash --candidates"   # two-tier's share of rows, nothing run

`--candidates` counts, with the static vectors of the whole corpus (k-means k = sqrt(n) fitted on 100,000 rows),
the rows in a SemDeDup candidate pair inside their cluster at a few candidate cosines: the rows two-tier
SemDeDup's confirming model would embed, on all rows and on the distinct texts alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from bench_scale import _peak_rss_mib  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = ("debian_descriptions_en", "debian_descriptions_multilingual", "bigbench_tasks", "docs_paragraphs",
         "multiemo_en")
TIERS = {"static": ("static", "fp32"), "onnx-int8": ("onnx", "int8"), "onnx-fp32": ("onnx", "fp32"),
         "openvino-fp32": ("openvino", "fp32"), "openvino-int8": ("openvino", "int8"), "torch": ("torch", "fp32")}
TEN_MILLION = 10_000_000


def combine(work: Path) -> Path:
    """The five corpora as one Parquet file (row groups of 20,000)."""
    path = work / "corpus.parquet"
    if not path.exists():
        parts = []
        for name in FILES:
            table = pq.read_table(DATA / f"{name}.parquet", columns=["id", "text"])
            ids = pa.array([f"{name}/{i}" for i in table.column("id").to_pylist()], pa.string())
            parts.append(pa.table({"id": ids, "text": table.column("text").cast(pa.string()),
                                   "source": pa.array([name] * table.num_rows, pa.string())}))
        pq.write_table(pa.concat_tables(parts), path, row_group_size=20_000, compression="zstd")
    return path


def sample(source: Path, rows: int | None, work: Path) -> Path:
    """The first `rows` of the corpus in each source's share (every source stays in the mix)."""
    if rows is None:
        return source
    path = work / f"sample-{rows}.parquet"
    if not path.exists():
        table = pq.read_table(source)
        step = max(1, table.num_rows // rows)
        pq.write_table(table.take(list(range(0, table.num_rows, step))[:rows]), path, row_group_size=5_000)
    return path


def tier_config(tier: str, source: Path, output: Path, export_dir: Path, batch_size: int = 64) -> dict:
    backend, precision = TIERS[tier]
    return {
        "input": {"path": str(source), "columns": {"id": "id", "text": "text", "source": "source"}},
        "output": {"path": str(output), "cache": False, "report": False},
        "embed": {"enabled": "auto", "backend": backend, "precision": precision, "export_dir": str(export_dir),
                  "batch_size": batch_size},
        "prune": {"enabled": True, "strategy": "dbp", "keep_fraction": 0.7, "keep": "hard",
                  "semdedup": {"enabled": True, "eps": 0.05}},
        "mix": {"enabled": True, "shards": 20,
                "schedule": [{"at": 0.0, "temperature": 5}, {"at": 0.5, "temperature": 1}], "seed": 0},
    }


def run_tier(config: dict) -> dict:
    from winnow.pipelines.config import build_config
    from winnow.pipelines.job import plan_job, run_job

    started = time.perf_counter()
    manifest = run_job(plan_job(build_config(config), []), force=True)
    return {"wall_s": round(time.perf_counter() - started, 1), "timings": manifest["timings"],
            "input_records": manifest["counts"]["input_records"], "by_fate": manifest["counts"]["by_fate"],
            "output_rows": sum(shard["rows"] for shard in manifest["shards"]), "peak_rss_mib": _peak_rss_mib()}


def run_semhash(source: Path, model_folder: str, threshold: float) -> dict:
    from model2vec import StaticModel
    from semhash import SemHash

    texts = pq.read_table(source, columns=["text"]).column("text").to_pylist()
    started = time.perf_counter()
    index = SemHash.from_records(records=texts, model=StaticModel.from_pretrained(model_folder))
    indexed = time.perf_counter()
    result = index.self_deduplicate(threshold=threshold)
    done = time.perf_counter()
    return {"rows": len(texts), "embed_and_index_s": round(indexed - started, 1),
            "deduplicate_s": round(done - indexed, 1), "wall_s": round(done - started, 1),
            "docs_per_s": round(len(texts) / (done - started), 1), "kept": len(result.selected),
            "removed": len(result.filtered), "threshold": threshold, "peak_rss_mib": _peak_rss_mib()}


def child(argv: list[str]) -> int:
    kind, payload = argv[0], json.loads(argv[1])
    result = run_tier(payload) if kind == "tier" else run_semhash(Path(payload["source"]), payload["model"],
                                                                  payload["threshold"])
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def in_child(kind: str, payload: dict) -> dict:
    finished = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(payload)], check=True,
                              stdout=subprocess.PIPE, text=True)
    line = next(line for line in finished.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def candidate_shares(source: Path, model: str, eps_values: tuple[float, ...] = (0.05, 0.10, 0.15)) -> dict:
    """The share of rows two-tier SemDeDup would hand to the full model, from the static vectors alone."""
    import numpy as np

    from winnow.selectors import backends, clustering, semdedup

    texts = pq.read_table(source, columns=["text"]).column("text")
    vectors = backends.load_encoder("static", model).encode(texts.to_pylist())
    distinct = np.zeros(len(texts), bool)
    distinct[np.unique(texts.to_numpy(zero_copy_only=False), return_index=True)[1]] = True
    result = {"rows": len(texts), "distinct_texts": int(distinct.sum())}
    for name, rows in (("all_rows", np.arange(len(texts))), ("distinct_texts", np.flatnonzero(distinct))):
        pool = vectors[rows]
        k = clustering.default_k(len(rows))
        fit = np.random.default_rng(0).choice(len(rows), min(len(rows), 100_000), replace=False)
        labels, _ = clustering.assign(pool, clustering.fit_centroids(pool[fit], k))
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(k + 1))
        shares = {}
        for eps in eps_values:
            in_pairs = 0
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
                members = rows[order[start:stop]]
                first, second, _ = semdedup.near_pairs(vectors[members], eps)
                in_pairs += len(np.union1d(first, second))
            shares[f"candidate_eps_{eps}"] = {"rows": in_pairs, "share_of_corpus": round(in_pairs / len(texts), 4)}
        result[name] = shares
    return result


def make_export(tier: str, export_dir: Path) -> str | None:
    """A tier's exported model, made ahead (as `winnow embed export` would), so that a tier's run and its peak
    memory are the job's alone; the static one is also semhash's model."""
    from winnow.selectors import backends, embedding

    backend, precision = TIERS[tier]
    if backend == "torch":
        return None
    folder = embedding.resolve_model_path(embedding.PACKAGED_MODEL)
    return str(backends.ensure_export(folder, embedding.model_fingerprint(folder), backend, precision, export_dir))


def rates(result: dict) -> dict:
    """Docs/s of each timed stage and the hours 10M documents would take at those rates."""
    rows = result["input_records"]
    stages = {key[:-2]: value for key, value in result["timings"].items()
              if key.endswith("_s") and key not in ("total_s", "plan_s")}
    per_doc = sum(stages.values()) / rows
    return {"docs_per_s": round(rows / result["wall_s"], 1),
            "stage_docs_per_s": {name: round(rows / max(seconds, 1e-9), 1) for name, seconds in stages.items()},
            "hours_for_10m_docs": round(per_doc * TEN_MILLION / 3600, 2)}


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", nargs="*", default=["static", "openvino-int8"], choices=list(TIERS))
    parser.add_argument("--sample-rows", type=int, default=5_000,
                        help="rows for the tiers named by --sampled (an even stride over the corpus)")
    parser.add_argument("--sampled", nargs="*", default=["onnx-int8", "onnx-fp32", "openvino-fp32", "torch"])
    parser.add_argument("--batch-size", type=int, default=64,
                        help="embed.batch_size (on a CPU: 16 for fp32, 32-64 for OpenVINO int8)")
    parser.add_argument("--semhash", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--candidates", action="store_true", help="two-tier's share of rows (see above)")
    parser.add_argument("--work", type=Path, default=Path("bench/out/corpus"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/corpus.json"))
    args = parser.parse_args()
    if not DATA.exists():
        print(f"bench-corpus needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    export_dir = args.work / "models"
    corpus = combine(args.work)
    result = {"corpus_rows": pq.ParquetFile(corpus).metadata.num_rows, "cpus": os.cpu_count(),
              "batch_size": args.batch_size, "tiers": {}}
    model = make_export("static", export_dir)
    for tier in args.tiers:
        make_export(tier, export_dir)
        rows = args.sample_rows if tier in args.sampled else None
        source = sample(corpus, rows, args.work)
        measured = in_child("tier", tier_config(tier, source, args.work / f"out-{tier}", export_dir,
                                                args.batch_size))
        result["tiers"][tier] = {"rows": measured["input_records"], **measured, **rates(measured)}
        print(tier, json.dumps(result["tiers"][tier]), flush=True)
    if args.candidates:
        result["candidates"] = candidate_shares(corpus, model)
        print("candidates", json.dumps(result["candidates"]), flush=True)
    if args.semhash:
        result["semhash"] = in_child("semhash", {"source": str(corpus), "model": model, "threshold": args.threshold})
        print("semhash", json.dumps(result["semhash"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
