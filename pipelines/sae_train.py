"""`winnow sae train`: a TopK SAE on the selection model's activations over a corpus, saved in sae-lens format.

    winnow sae train --input data/sample/*.parquet --out out/sae [--layer 28] [--d-sae 4608] [--k 32] [--steps 400]

Reads up to --max-records texts (a seeded sample when the corpus is larger), takes the residual stream after
decoder block --layer (default: the penultimate) for every token but position 0 and padding, trains with
sae-lens' SAETrainer and saves the SAE (cfg.json + weights) with winnow's metadata (model, its fingerprint,
layer, corpus, tokens). Prints the fraction of variance the SAE explains on held-out tokens.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from winnow.selectors import lm

HELD_OUT_TOKENS = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="Parquet/JSONL file or glob of the corpus (e.g. the pool)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--out", required=True, help="directory for the SAE (replaced when it exists)")
    parser.add_argument("--model", default=lm.PACKAGED_LM, help="local causal LM folder (default: packaged)")
    parser.add_argument("--layer", type=int, default=None, help="decoder block, 1-based (default: penultimate)")
    parser.add_argument("--d-sae", type=int, default=4608, help="SAE features (default 8 x 576)")
    parser.add_argument("--k", type=int, default=32, help="active features per token")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--max-records", type=int, default=5000, help="texts read (seeded sample beyond that)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per text")
    parser.add_argument("--seed", type=int, default=0)


def read_texts(pattern: str, column: str, limit: int, seed: int) -> list[str]:
    """Usable texts of the corpus, in input order; a seeded sample of `limit` when there are more."""
    from winnow.pipelines.io.read import InputError, expand_paths, read_column
    from winnow.pipelines.io.text_checks import check_text

    texts: list[str] = []
    for file in expand_paths(pattern):
        values = read_column(file, column, "the corpus")
        texts.extend(text for text, problem in (check_text(v, 1 << 30) for v in values) if problem is None)
    if not texts:
        raise InputError(f"{pattern}: no usable text in column {column!r}")
    if len(texts) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), limit, replace=False))
        texts = [texts[i] for i in keep]
    return texts


def explained_variance(sae, activations: np.ndarray) -> float:
    """1 - residual / total sum of squares of the SAE's reconstruction of `activations`."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(activations)
        reconstruction = sae.decode(sae.encode(x))
        residual = ((x - reconstruction) ** 2).sum()
        total = ((x - x.mean(dim=0)) ** 2).sum()
    return float(1 - residual / total)


def train_command(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from winnow.selectors import embedding
    from winnow.selectors import sae as sae_lib

    torch.set_num_threads(embedding.threads_per_worker(0, 1))
    started = time.perf_counter()
    texts = read_texts(args.input, args.text_column, args.max_records, args.seed)
    model_path = lm.resolve_lm_path(args.model)
    model, tokenizer = lm.load_lm(model_path)
    layer = args.layer or lm.default_layer(model)
    streams = lm.token_activations(model, tokenizer, texts, [layer], args.max_tokens)[layer]
    activations = np.concatenate(streams).astype(np.float32)
    extract_s = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(activations))
    held_out = activations[order[: min(HELD_OUT_TOKENS, len(activations) // 10)]]
    train = activations[order[len(held_out) :]]
    settings = sae_lib.SaeTrainingSettings(
        d_sae=args.d_sae, k=args.k, steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr, seed=args.seed
    )
    metadata = {
        "model_name": args.model, "winnow_layer": layer, "hook_name": f"blocks.{layer - 1}.hook_resid_post",
        "winnow_model_fingerprint": lm.lm_fingerprint(model_path), "winnow_corpus": args.input,
        "winnow_texts": len(texts), "winnow_tokens": int(len(activations)),
    }
    trained = time.perf_counter()
    sae = sae_lib.train_sae(train, settings, metadata)
    train_s = time.perf_counter() - trained
    path = sae_lib.save_sae(sae, args.out)
    loaded = sae_lib.load_sae(path)
    return {
        "sae": str(path), "layer": layer, "texts": len(texts), "tokens": int(len(activations)),
        "d_sae": args.d_sae, "k": args.k, "steps": args.steps,
        "explained_variance_held_out": round(explained_variance(loaded, held_out), 4) if len(held_out) else None,
        "extract_s": round(extract_s, 1), "train_s": round(train_s, 1),
    }
