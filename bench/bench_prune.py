"""Pruning at scale: k-means (faiss vs scikit-learn MiniBatchKMeans), assignment, SemDeDup and DBP quotas over
50,000 to 250,000 embeddings, each step timed with its peak memory, in one run.

The embeddings are the real ones of ../shared/data/debian_descriptions_en.parquet (63,956, from the embed stage,
cached in eval/cache/debian_en like eval-prune), tiled with Gaussian noise up to each size (sigma 0.03 per
dimension, re-normalised: a copy's cosine to its original is about 0.85, so copies are not SemDeDup duplicates).
Every size runs in its own process so that its peak memory is its own.

    make bench-prune
    make bench-prune ARGS="--sizes 50000 100000"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_descriptions_en.parquet"


class PeakMemory:
    """Samples this process's resident memory every 5 ms; `peak_over(start)` is the rise during a step."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def step(self):
        self.peak = self.process.memory_info().rss
        return self.peak


def tiled(vectors: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = vectors[np.arange(size) % len(vectors)]
    noisy = rows + rng.normal(scale=0.03, size=rows.shape).astype(np.float32)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def run_size(size: int, cache: str) -> dict:
    import faiss
    from sklearn.cluster import MiniBatchKMeans

    from winnow.pipelines.stages.embed import read_embeddings
    from winnow.selectors import clustering
    from winnow.selectors.pruning import PruneSettings, cluster_quotas, dedup_cluster, pool_budget, select_in_cluster

    faiss.omp_set_num_threads(2)
    _, base = read_embeddings(cache)
    vectors = tiled(base, size)
    settings = PruneSettings(strategy="dbp", keep_fraction=0.3, eps=0.05)
    k = clustering.default_k(size)
    memory = PeakMemory()
    steps = {}

    def timed(name, function):
        before = memory.step()
        started = time.perf_counter()
        value = function()
        steps[name] = {"s": round(time.perf_counter() - started, 2),
                       "peak_rise_mib": round((memory.peak - before) / 2**20, 1)}
        return value

    centroids = timed("kmeans_faiss", lambda: clustering.fit_centroids(vectors, k, settings.niter, 1234))
    timed("kmeans_sklearn_minibatch", lambda: MiniBatchKMeans(
        n_clusters=k, batch_size=4096, max_iter=settings.niter, n_init=1, random_state=1234).fit(vectors))
    labels, dist = timed("assign", lambda: clustering.assign(vectors, centroids))
    members_of = timed("group_by_cluster", lambda: np.split(np.argsort(labels, kind="stable"),
                                                            np.cumsum(np.bincount(labels, minlength=k))[:-1]))

    def semdedup_all():
        return [dedup_cluster(vectors[m], dist[m], c, settings) for c, m in enumerate(members_of)]

    decisions = timed("semdedup", semdedup_all)
    sizes = np.array([int(d.survivors.sum()) for d in decisions])
    sums = np.array([float(dist[m][d.survivors].sum()) for m, d in zip(members_of, decisions, strict=True)])
    budget = pool_budget(settings, size, int(sizes.sum()))
    stats = timed("dbp_quotas", lambda: cluster_quotas(sizes, sums, centroids, budget, settings))
    timed("select", lambda: [select_in_cluster(d.order, d.survivors, int(q))
                             for d, q in zip(decisions, stats["quota"], strict=True)])
    memory.running = False
    return {
        "embeddings": size, "k": k, "deduplicated": int(size - sizes.sum()), "kept": int(stats["quota"].sum()),
        "steps": steps,
        "faiss_over_sklearn_time": round(steps["kmeans_faiss"]["s"] / steps["kmeans_sklearn_minibatch"]["s"], 3),
        "peak_rss_mib": round(psutil.Process().memory_info().rss / 2**20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000, 250_000])
    parser.add_argument("--cache", default="eval/cache/debian_en")
    parser.add_argument("--out", type=Path, default=Path("bench/out/prune.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_size(args.one, args.cache)))
        return 0
    if not DATA.exists():
        print(f"bench-prune needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    from winnow.pipelines.job import embed_corpus

    embed_corpus(str(DATA), args.cache)
    results = []
    for size in args.sizes:
        child = subprocess.run([sys.executable, __file__, "--one", str(size), "--cache", args.cache],
                               capture_output=True, text=True, check=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    names = list(results[0]["steps"])
    print("| embeddings | k | " + " | ".join(f"{n} s (MiB)" for n in names) + " | faiss/sklearn time |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for r in results:
        cells = [f"{r['steps'][n]['s']} ({r['steps'][n]['peak_rise_mib']})" for n in names]
        print(f"| {r['embeddings']} | {r['k']} | " + " | ".join(cells) + f" | {r['faiss_over_sklearn_time']} |")
    first, last = results[0], results[-1]
    growth = {n: round(last["steps"][n]["s"] / max(first["steps"][n]["s"], 1e-3), 2) for n in names}
    print(f"time growth {first['embeddings']} -> {last['embeddings']} "
          f"(x{last['embeddings'] / first['embeddings']:.0f} data): {growth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
