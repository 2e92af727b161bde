"""Evaluate concept-cluster pruning on ../shared/data/debian_descriptions_en.parquet (59 archive sections).

Embeds the corpus with the winnow job (embed stage, default model; cached in eval/cache/ and reused), splits it
80/20 with a fixed seed, and for two training pools (5,500 rows and the whole ~51,000) keeps 10/30/50/70% with
DBP (hard, easy), SSP (hard, easy) and random, using selectors.pruning.prune_pool (the same decisions as the
prune stage; k = sqrt(pool), tau = 0.5, no SemDeDup, as in the calibration run of the issue). The same
classifier (multinomial logistic regression on the embeddings) is trained on each kept set and scored on the
held-out 20%. SemDeDup's removals are counted separately at two eps values.

With `--tiers torch onnx-int8 static` every embedding tier of issue 26 is probed on the same rows (the split
and the pools depend on the seed only); `--rows N` takes a seeded sample of the corpus first.

    make eval-prune          # writes eval/out/prune.{md,json,png}
    make eval-prune ARGS="--rows 8000 --pools 0 --tiers torch onnx-int8 static"
    make eval-prune ARGS="--rows 8000 --pools 0 --tiers torch onnx-int8 static --probe-on-torch"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from winnow.pipelines.job import embed_corpus  # noqa: E402
from winnow.selectors.pruning import PruneSettings, prune_pool  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_descriptions_en.parquet"
STRATEGIES = [("dbp", "hard"), ("dbp", "easy"), ("ssp", "hard"), ("ssp", "easy"), ("random", "random")]
FRACTIONS = [0.1, 0.3, 0.5, 0.7]


def accuracy(train_x, train_y, test_x, test_y, max_iter: int) -> float:
    model = LogisticRegression(max_iter=max_iter, C=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(train_x, train_y)
    return float((model.predict(test_x) == test_y).mean())


TIERS = {"torch": {}, "onnx-int8": {"backend": "onnx", "precision": "int8"}, "static": {"backend": "static"}}


def sample_of(rows: int, cache: Path, seed: int) -> Path:
    """A seeded sample of `rows` rows of DATA, written once under the cache (0: DATA itself)."""
    if not rows:
        return DATA
    path = cache / f"sample-{rows}-seed{seed}" / "input.parquet"
    if not path.exists():
        table = pq.read_table(DATA)
        picked = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.take(picked), path)
    return path


def evaluate(tier: str, ids: list, vectors: np.ndarray, labels: np.ndarray, pools: list[int], seed: int,
             max_iter: int, probe: np.ndarray | None = None) -> list[dict]:
    """Every strategy and fraction on each pool, scored by the probe on the held-out fifth (the split and the
    pools depend on the seed only, so every tier sees the same rows). The tier's vectors decide what is kept;
    the probe trains on `probe` vectors of the same rows when given (the torch ones: then only the choice of
    rows differs between tiers), else on the tier's own."""
    probe = vectors if probe is None else probe
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(len(ids))
    test, train = permutation[: len(ids) // 5], permutation[len(ids) // 5:]
    results = []
    for pool_size in pools:
        pool = np.sort(train if pool_size == 0 or pool_size >= len(train) else
                       rng.choice(train, pool_size, replace=False))
        x, y, seen = vectors[pool], labels[pool], probe[pool]
        full = accuracy(seen, y, probe[test], labels[test], max_iter)
        results.append({"tier": tier, "pool": len(pool), "strategy": "full data", "keep_fraction": 1.0,
                        "accuracy": full})
        print(f"{tier} pool {len(pool)}: full data {full:.3f}", flush=True)
        dedup = {}
        for eps in (0.01, 0.05):
            decided = prune_pool(x, PruneSettings(strategy="none", eps=eps))
            dedup[eps] = int(decided["deduplicated"].sum())
        results.append({"tier": tier, "pool": len(pool), "strategy": "semdedup removed", "eps_0.01": dedup[0.01],
                        "eps_0.05": dedup[0.05]})
        print(f"{tier} pool {len(pool)}: SemDeDup removes {dedup[0.01]} (eps 0.01), {dedup[0.05]} (eps 0.05)",
              flush=True)
        for fraction in FRACTIONS:
            for strategy, keep in STRATEGIES:
                settings = PruneSettings(strategy=strategy, keep=keep, keep_fraction=fraction, semdedup=False,
                                         seed=seed)
                kept = prune_pool(x, settings)["kept"]
                score = accuracy(seen[kept], y[kept], probe[test], labels[test], max_iter)
                name = strategy if strategy == "random" else f"{strategy}-{keep}"
                results.append({"tier": tier, "pool": len(pool), "strategy": name, "keep_fraction": fraction,
                                "kept": int(kept.sum()), "accuracy": score})
                print(f"{tier} pool {len(pool)} keep {fraction:.0%} {name}: {score:.3f} ({int(kept.sum())} rows)",
                      flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("eval/cache/debian_en"))
    parser.add_argument("--out", type=Path, default=Path("eval/out"))
    parser.add_argument("--pools", type=int, nargs="+", default=[5500, 0], help="0: the whole training split")
    parser.add_argument("--tiers", nargs="+", default=["torch"], choices=list(TIERS),
                        help="embedding tiers, each embedded by the job and probed on the same rows")
    parser.add_argument("--probe-on-torch", action="store_true",
                        help="every tier chooses the rows, the probe trains on their torch vectors (first tier)")
    parser.add_argument("--rows", type=int, default=0, help="a seeded sample of the corpus (0: all of it)")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not DATA.exists():
        print(f"eval-prune needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    source = sample_of(args.rows, args.cache, args.seed)
    labels_by_id = dict(zip(*pq.read_table(source, columns=["id", "label"]).to_pydict().values(), strict=True))
    results, timings, probe = [], {}, None
    if args.probe_on_torch and args.tiers[0] != "torch":
        parser.error("--probe-on-torch needs torch as the first tier")
    for tier in args.tiers:
        started = time.perf_counter()
        cache = args.cache if tier == "torch" and not args.rows else args.cache / f"{source.parent.name}-{tier}"
        ids, vectors = embed_corpus(str(source), str(cache), embed=TIERS[tier])
        timings[tier] = round(time.perf_counter() - started, 1)
        print(f"{tier}: embeddings of {len(ids)} rows ready in {timings[tier]:.0f} s", flush=True)
        labels = np.array([labels_by_id[i] for i in ids])
        results += evaluate(tier, ids, vectors, labels, args.pools, args.seed, args.max_iter, probe)
        if args.probe_on_torch and tier == "torch":
            probe = vectors
    (args.out / "prune.json").write_text(json.dumps({"rows": args.rows or "all", "embed_s": timings,
                                                     "probe_on_torch": args.probe_on_torch,
                                                     "results": results}, indent=1) + "\n")
    write_report(results, args.out, args.probe_on_torch)
    return 0


def write_report(results: list[dict], out: Path, probe_on_torch: bool = False) -> None:
    groups = sorted({(r["tier"], r["pool"]) for r in results}, key=lambda g: (list(TIERS).index(g[0]), g[1]))
    names = [s if s == "random" else f"{s}-{k}" for s, k in STRATEGIES]
    lines = ["# eval-prune: held-out accuracy of a logistic-regression probe trained on the kept rows", ""]
    figure, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for axis, (tier, pool) in zip(axes[0], groups, strict=True):
        rows = [r for r in results if r["pool"] == pool and r["tier"] == tier]
        full = next(r["accuracy"] for r in rows if r["strategy"] == "full data")
        dedup = next(r for r in rows if r["strategy"] == "semdedup removed")
        chosen = f"rows chosen with {tier} vectors, probe on torch vectors" if probe_on_torch else f"{tier} vectors"
        lines += [f"## {chosen}, pool of {pool} training rows (full data: {full:.3f}; SemDeDup would remove "
                  f"{dedup['eps_0.01']} at eps 0.01, {dedup['eps_0.05']} at eps 0.05)", "",
                  "| keep | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for fraction in FRACTIONS:
            scores = {r["strategy"]: r["accuracy"] for r in rows if r.get("keep_fraction") == fraction}
            best = max(scores.values())
            cells = [f"**{scores[n]:.3f}**" if scores[n] == best else f"{scores[n]:.3f}" for n in names]
            lines.append(f"| {fraction:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
        for name in names:
            axis.plot(FRACTIONS, [next(r["accuracy"] for r in rows if r["strategy"] == name and
                                       r.get("keep_fraction") == f) for f in FRACTIONS], "o-", label=name)
        axis.axhline(full, color="grey", linestyle=":", label="full data")
        axis.set_title(f"{tier}, pool {pool}")
        axis.set_xlabel("fraction kept")
        axis.set_ylabel("held-out accuracy")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "prune.png", dpi=110)
    (out / "prune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
