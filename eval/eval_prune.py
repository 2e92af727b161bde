"""Evaluate concept-cluster pruning on ../shared/data/debian_descriptions_en.parquet (59 archive sections).

Embeds the corpus with the winnow job (embed stage, default model; cached in eval/cache/ and reused), splits it
80/20 with a fixed seed, and for two training pools (5,500 rows and the whole ~51,000) keeps 10/30/50/70% with
DBP (hard, easy), SSP (hard, easy) and random, using selectors.pruning.prune_pool (the same decisions as the
prune stage; k = sqrt(pool), tau = 0.5, no SemDeDup, as in the calibration run of the issue). The same
classifier (multinomial logistic regression on the embeddings) is trained on each kept set and scored on the
held-out 20%. SemDeDup's removals are counted separately at two eps values.

    make eval-prune          # writes eval/out/prune.{md,json,png}
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("eval/cache/debian_en"))
    parser.add_argument("--out", type=Path, default=Path("eval/out"))
    parser.add_argument("--pools", type=int, nargs="+", default=[5500, 0], help="0: the whole training split")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not DATA.exists():
        print(f"eval-prune needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ids, vectors = embed_corpus(str(DATA), str(args.cache))
    print(f"embeddings of {len(ids)} rows ready in {time.perf_counter() - started:.0f} s", flush=True)
    labels_by_id = dict(zip(*pq.read_table(DATA, columns=["id", "label"]).to_pydict().values(), strict=True))
    labels = np.array([labels_by_id[i] for i in ids])
    rng = np.random.default_rng(args.seed)
    permutation = rng.permutation(len(ids))
    test, train = permutation[: len(ids) // 5], permutation[len(ids) // 5:]
    results = []
    for pool_size in args.pools:
        pool = np.sort(train if pool_size == 0 else rng.choice(train, pool_size, replace=False))
        x, y = vectors[pool], labels[pool]
        full = accuracy(x, y, vectors[test], labels[test], args.max_iter)
        results.append({"pool": len(pool), "strategy": "full data", "keep_fraction": 1.0, "accuracy": full})
        print(f"pool {len(pool)}: full data {full:.3f}", flush=True)
        dedup = {}
        for eps in (0.01, 0.05):
            decided = prune_pool(x, PruneSettings(strategy="none", eps=eps))
            dedup[eps] = int(decided["deduplicated"].sum())
        results.append({"pool": len(pool), "strategy": "semdedup removed", "eps_0.01": dedup[0.01],
                        "eps_0.05": dedup[0.05]})
        print(f"pool {len(pool)}: SemDeDup removes {dedup[0.01]} (eps 0.01), {dedup[0.05]} (eps 0.05)", flush=True)
        for fraction in FRACTIONS:
            for strategy, keep in STRATEGIES:
                settings = PruneSettings(strategy=strategy, keep=keep, keep_fraction=fraction, semdedup=False,
                                         seed=args.seed)
                kept = prune_pool(x, settings)["kept"]
                score = accuracy(x[kept], y[kept], vectors[test], labels[test], args.max_iter)
                name = strategy if strategy == "random" else f"{strategy}-{keep}"
                results.append({"pool": len(pool), "strategy": name, "keep_fraction": fraction,
                                "kept": int(kept.sum()), "accuracy": score})
                print(f"pool {len(pool)} keep {fraction:.0%} {name}: {score:.3f} ({int(kept.sum())} rows)", flush=True)
    (args.out / "prune.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, args.out)
    return 0


def write_report(results: list[dict], out: Path) -> None:
    pools = sorted({r["pool"] for r in results})
    names = [s if s == "random" else f"{s}-{k}" for s, k in STRATEGIES]
    lines = ["# eval-prune: held-out accuracy of a logistic-regression probe trained on the kept rows", ""]
    figure, axes = plt.subplots(1, len(pools), figsize=(6 * len(pools), 4.5), squeeze=False)
    for axis, pool in zip(axes[0], pools, strict=True):
        rows = [r for r in results if r["pool"] == pool]
        full = next(r["accuracy"] for r in rows if r["strategy"] == "full data")
        dedup = next(r for r in rows if r["strategy"] == "semdedup removed")
        lines += [f"## pool of {pool} training rows (full data: {full:.3f}; SemDeDup would remove "
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
        axis.set_title(f"pool {pool}")
        axis.set_xlabel("fraction kept")
        axis.set_ylabel("held-out accuracy")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "prune.png", dpi=110)
    (out / "prune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
