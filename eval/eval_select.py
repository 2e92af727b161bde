"""Evaluate task-specific selection (MONA and its baselines) on ../shared/data/bigbench_tasks.parquet.

Protocol (issue #4): a pool of `--per-type` rows of each of the 13 task types (seeded sample), each scored as
`instruction` + blank line + `output`, WITHOUT the task_prefix (it gives the task away). For each type and
seed, 5 random examples of that type are the targets; from the rest of the pool the method selects as many
samples as the type has there; precision = the share of the selection that is of the type.

Methods, all through winnow.selectors (the code the select stage runs):
  mona            generalised Jaccard of mean SAE codes to the targets' mean code (SmolLM2-135M, TopK SAE
                  trained with sae-lens on the pool's own activations)
  sae-cosine      cosine on the same SAE codes (the paper's similarity ablation)
  hidden-cosine   cosine on mean hidden states of the same layer (no SAE)
  embedding       cosine of all-MiniLM-L6-v2 embeddings to the targets' mean embedding
  bm25            BM25 of the candidates against the targets' words
  random          a seeded random score
plus MONA at other layers and SAE sizes. Activations and SAEs are cached in eval/cache/select/.

    make eval-select          # writes eval/out/select.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from winnow.selectors import embedding, lm, task_selection  # noqa: E402
from winnow.selectors import sae as sae_lib  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bigbench_tasks.parquet"


def load_pool(per_type: int, seed: int) -> pd.DataFrame:
    table = pd.read_parquet(DATA, columns=["id", "instruction", "output", "label"])
    parts = [group.sample(min(per_type, len(group)), random_state=seed) for _, group in table.groupby("label")]
    pool = pd.concat(parts).reset_index(drop=True)
    pool["text"] = pool["instruction"] + "\n\n" + pool["output"]
    return pool


def activations(pool: pd.DataFrame, layers: list[int], max_tokens: int, cache: Path, model, tokenizer):
    """Per layer: (all tokens, d) float32 and the sample index of each token; cached on disk."""
    out = {}
    missing = [layer for layer in layers if not (cache / f"acts_l{layer}.npy").exists()]
    if missing:
        started = time.perf_counter()
        streams = lm.token_activations(model, tokenizer, pool["text"].tolist(), missing, max_tokens, 16)
        tokens = sum(len(a) for a in streams[missing[0]])
        print(f"activations: {tokens} tokens, layers {missing}, {time.perf_counter() - started:.0f} s", flush=True)
        for layer in missing:
            np.save(cache / f"acts_l{layer}.npy", np.concatenate(streams[layer]).astype(np.float16))
        np.save(cache / "sample_of_token.npy", np.repeat(np.arange(len(pool)), [len(a) for a in streams[missing[0]]]))
    owner = np.load(cache / "sample_of_token.npy")
    for layer in layers:
        out[layer] = np.load(cache / f"acts_l{layer}.npy").astype(np.float32)
    return out, owner


def trained_sae(acts: np.ndarray, layer: int, d_sae: int, k: int, steps: int, cache: Path):
    path = cache / f"sae_l{layer}_{d_sae}_k{k}_s{steps}"
    if not (path / "cfg.json").exists():
        started = time.perf_counter()
        settings = sae_lib.SaeTrainingSettings(d_sae=d_sae, k=k, steps=steps)
        sae_lib.save_sae(sae_lib.train_sae(acts, settings, {"winnow_layer": layer}), path)
        print(f"SAE layer {layer} d_sae {d_sae}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return sae_lib.load_sae(path)


def mean_hidden(acts: np.ndarray, owner: np.ndarray, samples: int) -> np.ndarray:
    sums = np.zeros((samples, acts.shape[1]))
    np.add.at(sums, owner, acts)
    return embedding.l2_normalise(sums / np.bincount(owner, minlength=samples)[:, None])


def precision_table(pool: pd.DataFrame, scorers: dict, seeds: list[int], targets_per_type: int) -> dict:
    """{method: {label: [precision per seed]}}."""
    labels = sorted(pool["label"].unique())
    ids = pool["id"].tolist()
    result = {name: {label: [] for label in labels} for name in scorers}
    for seed in seeds:
        for index, label in enumerate(labels):
            rng = np.random.default_rng([seed, index])
            members = np.flatnonzero(pool["label"].to_numpy() == label)
            targets = rng.choice(members, targets_per_type, replace=False)
            candidates = np.setdiff1d(np.arange(len(pool)), targets)
            wanted = int((pool["label"].to_numpy()[candidates] == label).sum())
            for name, scorer in scorers.items():
                scores = scorer(targets, candidates, seed)
                chosen = candidates[task_selection.select_top(scores, [ids[i] for i in candidates], wanted, seed)]
                result[name][label].append(float((pool["label"].to_numpy()[chosen] == label).mean()))
    return result


def shortlist_table(pool: pd.DataFrame, mona, cheap: dict, multiples: list[int], seeds: list[int],
                    targets_per_type: int) -> dict:
    """{cheap method: {multiple: {"recall": [...], "precision": [...], "scored": [...]}}}: per type and seed,
    the cheap scorer keeps the top multiple x n candidates, MONA picks n of those (the select stage's
    `select.shortlist`); recall = the share of full MONA's n that it still picks, scored = the share of the
    candidates MONA had to score."""
    labels = sorted(pool["label"].unique())
    truth = pool["label"].to_numpy()
    ids = pool["id"].tolist()
    result = {name: {m: {"recall": [], "precision": [], "scored": []} for m in multiples} for name in cheap}
    for seed in seeds:
        for index, label in enumerate(labels):
            rng = np.random.default_rng([seed, index])
            targets = rng.choice(np.flatnonzero(truth == label), targets_per_type, replace=False)
            candidates = np.setdiff1d(np.arange(len(pool)), targets)
            wanted = int((truth[candidates] == label).sum())
            candidate_ids = [ids[i] for i in candidates]
            full_scores = mona(targets, candidates, seed)
            full = set(task_selection.select_top(full_scores, candidate_ids, wanted, seed).tolist())
            for name, scorer in cheap.items():
                cheap_scores = scorer(targets, candidates, seed)
                for multiple in multiples:
                    kept = task_selection.select_top(cheap_scores, candidate_ids, multiple * wanted, seed)
                    chosen = kept[task_selection.select_top(full_scores[kept], [candidate_ids[i] for i in kept],
                                                            wanted, seed)]
                    cell = result[name][multiple]
                    cell["recall"].append(len(full & set(chosen.tolist())) / wanted)
                    cell["precision"].append(float((truth[candidates[chosen]] == label).mean()))
                    cell["scored"].append(len(kept) / len(candidates))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-type", type=int, default=100)
    parser.add_argument("--targets", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layer", type=int, default=28)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ablation-layers", type=int, nargs="*", default=[20, 24, 29])
    parser.add_argument("--ablation-sizes", type=int, nargs="*", default=[1152, 9216])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--shortlist-multiples", type=int, nargs="*", default=[2, 4, 8])
    parser.add_argument("--cache", type=Path, default=Path("eval/cache/select"))
    parser.add_argument("--out", type=Path, default=Path("eval/out"))
    args = parser.parse_args()
    if not DATA.exists():
        print(f"eval-select needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    torch.set_num_threads(embedding.threads_per_worker(0, 1))
    cache = args.cache / f"pool{args.per_type}_t{args.max_tokens}"
    cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pool = load_pool(args.per_type, 0)
    model, tokenizer = lm.load_lm(lm.resolve_lm_path(lm.PACKAGED_LM))
    layers = sorted({args.layer, *args.ablation_layers})
    acts, owner = activations(pool, layers, args.max_tokens, cache, model, tokenizer)
    samples = len(pool)

    def codes_for(layer: int, d_sae: int) -> sae_lib.SparseCodes:
        sae = trained_sae(acts[layer], layer, d_sae, args.k, args.steps, cache)
        return sae_lib.mean_codes(sae, acts[layer], owner, samples)

    def mona(codes):
        return lambda targets, candidates, _seed: task_selection.jaccard_to_prototype(
            codes.take(candidates), task_selection.prototype(codes.take(targets)))

    def cosine(vectors):
        return lambda targets, candidates, _seed: task_selection.cosine_scores(
            vectors[candidates], task_selection.embedding_prototype(vectors[targets]))

    main_codes = codes_for(args.layer, args.d_sae)
    hidden = mean_hidden(acts[args.layer], owner, samples)
    minilm = embedding.encode(embedding.load_model(embedding.resolve_model_path(embedding.PACKAGED_MODEL)),
                              pool["text"].tolist())
    texts = pool["text"].tolist()
    ids = pool["id"].tolist()

    def bm25(targets, candidates, _seed):
        query = task_selection.Bm25Query.from_targets(texts[i] for i in targets)
        return task_selection.bm25_scores([texts[i] for i in candidates], query)

    def random(_targets, candidates, seed):
        return np.array([task_selection.random_score(seed, ids[i]) for i in candidates])

    scorers = {
        "mona": mona(main_codes),
        "sae-cosine": lambda t, c, _s: task_selection.cosine_to_prototype_sparse(
            main_codes.take(c), task_selection.prototype(main_codes.take(t))),
        "hidden-cosine": cosine(hidden),
        "embedding": cosine(minilm),
        "bm25": bm25,
        "random": random,
    }
    for layer in args.ablation_layers:
        scorers[f"mona L{layer}"] = mona(codes_for(layer, args.d_sae))
    for size in args.ablation_sizes:
        scorers[f"mona d_sae {size}"] = mona(codes_for(args.layer, size))
    table = precision_table(pool, scorers, args.seeds, args.targets)
    shortlists = shortlist_table(pool, scorers["mona"], {"bm25": bm25, "embedding": scorers["embedding"]},
                                 args.shortlist_multiples, args.seeds, args.targets)
    elapsed = time.perf_counter() - started
    write_outputs(args, table, pool, elapsed, shortlists)
    return 0


def shortlist_lines(shortlists: dict, full_precision: float, seeds: int) -> list[str]:
    lines = ["", f"MONA on a shortlist (`select.shortlist`; full MONA's average precision {full_precision:.3f}; "
             "mean over types and seeds, ± std over seeds):", "",
             "| shortlist | multiple | share of pool scored by MONA | recall of full MONA's choice | precision |",
             "|---|---|---|---|---|"]
    for name, by_multiple in shortlists.items():
        for multiple, cell in by_multiple.items():
            recall = np.array(cell["recall"]).reshape(seeds, -1).mean(axis=1)
            precision = np.array(cell["precision"]).reshape(seeds, -1).mean(axis=1)
            lines.append(f"| {name} | {multiple} | {np.mean(cell['scored']):.3f} | {recall.mean():.3f} "
                         f"±{recall.std():.3f} | {precision.mean():.3f} ±{precision.std():.3f} |")
    return lines


def write_outputs(args, table: dict, pool: pd.DataFrame, elapsed: float, shortlists: dict) -> None:
    methods = list(table)
    labels = sorted(pool["label"].unique())
    mean = {m: float(np.mean([np.mean(table[m][label]) for label in labels])) for m in methods}
    spread = {m: float(np.std([np.mean([table[m][label][s] for label in labels]) for s in range(len(args.seeds))]))
              for m in methods}
    head = ["mona", "sae-cosine", "hidden-cosine", "embedding", "bm25", "random"]
    lines = [
        f"# eval-select: {len(pool)} pool rows ({args.per_type} per type), {args.targets} targets, "
        f"seeds {args.seeds}; SmolLM2-135M layer {args.layer}, TopK SAE d_sae {args.d_sae} k {args.k}, "
        f"{args.steps} steps; {elapsed:.0f} s",
        "",
        "| type | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{np.mean(table[m][label]):.3f}" for m in head) + " |")
    lines.append("| **average** | " + " | ".join(f"**{mean[m]:.3f}** ±{spread[m]:.3f}" for m in head) + " |")
    lines += ["", "Ablations (average precision; ± = std over seeds of the per-seed average):", ""]
    for m in methods:
        if m not in head:
            lines.append(f"- {m}: {mean[m]:.3f} ±{spread[m]:.3f}")
    lines += shortlist_lines(shortlists, mean["mona"], len(args.seeds))
    (args.out / "select.md").write_text("\n".join(lines) + "\n")
    (args.out / "select.json").write_text(json.dumps({"average": mean, "seed_std": spread, "per_type": table,
                                                      "shortlist": shortlists}, indent=1))
    figure, axis = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(head)
    for i, m in enumerate(head):
        axis.bar(np.arange(len(labels)) + i * width, [np.mean(table[m][label]) for label in labels], width, label=m)
    axis.set_xticks(np.arange(len(labels)) + 0.4, labels, rotation=40, ha="right")
    axis.set_ylabel("precision")
    axis.set_title("Task-specific selection precision per BIG-bench task type")
    axis.legend(ncol=3)
    figure.tight_layout()
    figure.savefig(args.out / "select.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
