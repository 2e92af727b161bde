"""Embedding backends side by side: speed and quality of each tier against the fp32 torch vectors.

For each corpus (real near-duplicate siblings in Debian descriptions; documentation paragraphs) the same rows
are embedded by every tier in one process, with the same threads (cores / 1 worker): torch fp32 (the
reference), ONNX fp32, ONNX int8, OpenVINO fp32, OpenVINO int8 and the static model distilled from the same
model folder.
Exports are made first (timed apart, in --export-dir). Per tier: docs/s and its ratio to torch, mean and
minimum cosine to the reference (same dimensions only), top-10 neighbour overlap, SemDeDup pair precision /
recall / F1 at the default eps 0.05 (pairs over the whole sample, a superset of the per-cluster pairs the stage
compares), and the agreement of `prune.strategy: dbp` kept sets (keep_fraction 0.5, the same k-means settings).
Then the two-tier design measured: static candidate pairs at looser cosines, confirmed by the full model (recall
of the reference pairs, and the share of rows the full model would still embed). Last, `embed.batch_size` swept
for torch and OpenVINO (fp32 and int8) on the first --sweep-rows rows.

    make bench-backends                        # 3,000 rows per corpus
    make bench-backends ARGS="--rows 1000"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from winnow.selectors import backends, embedding  # noqa: E402
from winnow.selectors.pruning import PruneSettings, prune_pool  # noqa: E402
from winnow.selectors.semdedup import near_pairs  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPORA = {"debian_en": "debian_descriptions_en.parquet", "docs": "docs_paragraphs.parquet"}
TIERS = [("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "int8"),
         ("static", "fp32")]
SWEPT = (("torch", "fp32"), ("openvino", "fp32"), ("openvino", "int8"))


def neighbours(vectors: np.ndarray, k: int = 10) -> np.ndarray:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, k, axis=1)[:, :k]


def quality(reference: np.ndarray, vectors: np.ndarray, reference_top: np.ndarray, eps: float) -> dict:
    """The tier's vectors against the reference's on the same rows."""
    figures: dict = {}
    if vectors.shape[1] == reference.shape[1]:
        cosine = np.sum(reference * vectors, axis=1)
        figures.update(mean_cosine=round(float(cosine.mean()), 5), min_cosine=round(float(cosine.min()), 5))
    top = neighbours(vectors)
    overlap = [len(np.intersect1d(a, b)) / a.size for a, b in zip(reference_top, top, strict=True)]
    figures["top10_overlap"] = round(float(np.mean(overlap)), 4)
    expected = {(int(i), int(j)) for i, j, _ in zip(*near_pairs(reference, eps), strict=True)}
    found = {(int(i), int(j)) for i, j, _ in zip(*near_pairs(vectors, eps), strict=True)}
    hits = len(expected & found)
    precision = hits / len(found) if found else 1.0
    recall = hits / len(expected) if expected else 1.0
    figures.update(semdedup_pairs_reference=len(expected), semdedup_pairs=len(found),
                   pair_precision=round(precision, 4), pair_recall=round(recall, 4),
                   pair_f1=round(2 * precision * recall / (precision + recall), 4) if hits else 0.0)
    return figures


def two_tier(reference: np.ndarray, static: np.ndarray, eps: float) -> list[dict]:
    """Static vectors find candidate pairs at a looser cosine; the full model embeds only the candidates' rows
    and confirms them at the reference threshold. Precision is the reference's by construction; what a looser
    threshold buys is recall, paid for with the rows the full model must embed."""
    expected = {(int(i), int(j)) for i, j, _ in zip(*near_pairs(reference, eps), strict=True)}
    rows = []
    for loose in (0.9, 0.85, 0.8, 0.75, 0.7):
        first, second, _ = near_pairs(static, 1.0 - loose)
        candidates = {(int(i), int(j)) for i, j in zip(first, second, strict=True)}
        confirmed = expected & candidates
        embedded = len(np.union1d(first, second))
        rows.append({"static_cosine": loose, "candidate_pairs": len(candidates),
                     "rows_for_full_model": round(embedded / len(static), 4),
                     "pair_recall": round(len(confirmed) / len(expected), 4) if expected else 1.0})
    return rows


def batch_sweep(encoders: dict, texts: list[str], sizes: list[int], default: int, eps: float) -> dict:
    """`embed.batch_size` per runtime: docs/s of each size against torch at the default size, and how far the
    vectors move from that run (a batch's padding changes the sums' order, not the model)."""
    reference = encoders[("torch", "fp32")].encode(texts, default)
    reference_pairs = near_pairs(reference, eps)
    timed: dict = {}
    for size in sizes:
        for tier in SWEPT:
            encoders[tier].encode(texts[:size], size)  # warm
            started = time.perf_counter()
            vectors = encoders[tier].encode(texts, size)
            pairs = near_pairs(vectors, eps)
            timed[f"{'-'.join(tier)}-{size}"] = {
                "seconds": time.perf_counter() - started, "max_abs_diff": float(np.abs(vectors - reference).max()),
                "same_pairs": bool(np.array_equal(pairs[0], reference_pairs[0])
                                   and np.array_equal(pairs[1], reference_pairs[1]))}
    base = timed[f"torch-fp32-{default}"]["seconds"]
    return {name: {"docs_per_s": round(len(texts) / row["seconds"], 1),
                   "x_torch_default": round(base / row["seconds"], 2),
                   "max_abs_diff": float(f"{row['max_abs_diff']:.2g}"), "same_pairs": row["same_pairs"]}
            for name, row in timed.items()}


def dbp_kept(vectors: np.ndarray) -> np.ndarray:
    return prune_pool(vectors, PruneSettings(strategy="dbp", keep_fraction=0.5))["kept"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--sweep-sizes", type=int, nargs="*", default=[64, 32, 16, 8],
                        help="batch sizes timed for torch and OpenVINO fp32 and int8 (none: skip the sweep)")
    parser.add_argument("--sweep-rows", type=int, default=1000)
    parser.add_argument("--export-dir", type=Path, default=backends.default_export_dir())
    parser.add_argument("--out", type=Path, default=Path("bench/out/backends.json"))
    args = parser.parse_args()
    missing = [name for name in CORPORA.values() if not (DATA / name).exists()]
    if missing:
        print(f"bench-backends needs {', '.join(missing)} in {DATA} (../shared/data); absent", file=sys.stderr)
        return 2
    threads = embedding.threads_per_worker(0, 1)
    torch.set_num_threads(threads)
    path = embedding.resolve_model_path(embedding.PACKAGED_MODEL)
    fingerprint = embedding.model_fingerprint(path)
    encoders, exports = {}, {}
    for backend, precision in TIERS:
        started = time.perf_counter()
        folder = backends.ensure_export(path, fingerprint, backend, precision, args.export_dir)
        exports[f"{backend}-{precision}"] = round(time.perf_counter() - started, 1)
        encoders[(backend, precision)] = backends.load_encoder(backend, folder, "cpu", None, threads)
    result = {"rows": args.rows, "threads": threads, "batch_size": args.batch_size, "cpu": os.cpu_count(),
              "export_s": exports, "corpora": {}}
    for corpus, name in CORPORA.items():
        texts = pq.read_table(DATA / name, columns=["text"]).column(0).to_pylist()[: args.rows]
        vectors, seconds = {}, {}
        for tier, encoder in encoders.items():
            encoder.encode(texts[: args.batch_size], args.batch_size)  # warm
            started = time.perf_counter()
            vectors[tier] = encoder.encode(texts, args.batch_size)
            seconds[tier] = time.perf_counter() - started
        reference = vectors[TIERS[0]]
        reference_top = neighbours(reference)
        reference_kept = dbp_kept(reference)
        rows = {}
        for tier in encoders:
            kept = dbp_kept(vectors[tier])
            figures = {"docs_per_s": round(len(texts) / seconds[tier], 1),
                       "x_torch": round(seconds[TIERS[0]] / seconds[tier], 2),
                       **quality(reference, vectors[tier], reference_top, args.eps),
                       "dbp_kept_agreement": round(float(np.mean(kept == reference_kept)), 4),
                       "dbp_kept_jaccard": round(float((kept & reference_kept).sum()
                                                   / (kept | reference_kept).sum()), 4)}
            rows["-".join(tier)] = figures
            print(corpus, "-".join(tier), json.dumps(figures), flush=True)
        result["corpora"][corpus] = rows
        result.setdefault("two_tier", {})[corpus] = two_tier(reference, vectors[("static", "fp32")], args.eps)
        print(corpus, "two-tier", json.dumps(result["two_tier"][corpus]), flush=True)
        if args.sweep_sizes:
            sizes = sorted(set(args.sweep_sizes) | {args.batch_size}, reverse=True)
            sweep = batch_sweep(encoders, texts[: args.sweep_rows], sizes, args.batch_size, args.eps)
            result.setdefault("batch_sweep", {})[corpus] = sweep
            print(corpus, "batch sizes", json.dumps(sweep), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"bench-backends: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
