"""Select-stage throughput: the winnow job with MONA vs a plain batched loop over the same samples.

Both extract SmolLM2-135M activations at the same layer and encode them with the same SAE, with the same batch
size, token cap and torch threads, one after the other in this process, over the same rows of
../shared/data/docs_paragraphs.parquet. The plain loop is selectors.sae.sample_codes called once on all texts
(length-sorted batches of forward passes up to the layer, SAE encoding, mean pooling; no Beam). The Beam figure
is the whole job's wall time (read, validate, score, threshold, write shards and ledger), so the ratio is a
lower bound for the stage; the same job without select runs just before it, in the same process, and its stage
timings are recorded (`record_path_job_timings`). First, the default-size SAE (4,608 features, k 32, 400 steps
of 1,024 tokens) is trained on the activations of `--train-rows` other rows, and that training is timed. Then
the same job with `select.shortlist` (`--shortlist`, BM25 by default) at each of `--multiples`, side by side: the
whole job's wall time against the exact job's, and the share of the exact job's selection each keeps.

    make bench-select                   # 5,000 samples
    make bench-select ARGS="--rows 500"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from winnow.pipelines.config import build_config  # noqa: E402
from winnow.pipelines.job import plan_job, run_job  # noqa: E402
from winnow.selectors import embedding, lm  # noqa: E402
from winnow.selectors import sae as sae_lib  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "docs_paragraphs.parquet"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000)
    parser.add_argument("--train-rows", type=int, default=1_000)
    parser.add_argument("--steps", type=int, default=400, help="SAE training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/out/select.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="Parquet with id, text, source")
    parser.add_argument("--lm", default=lm.PACKAGED_LM, help="a transformers causal LM folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shortlist", default="bm25", choices=["bm25", "embedding"])
    parser.add_argument("--multiples", type=int, nargs="*", default=[2, 4, 8])
    args = parser.parse_args()
    if not args.data.exists():
        print(f"bench-select needs {args.data} (../shared/data); it is absent", file=sys.stderr)
        return 2
    threads = embedding.threads_per_worker(0, 1)
    torch.set_num_threads(threads)
    table = pq.read_table(args.data, columns=["id", "text", "source"])
    pool = table.slice(0, args.rows)
    train_texts = table.slice(args.rows, args.train_rows).column("text").to_pylist()
    texts = pool.column("text").to_pylist()
    model, tokenizer = lm.load_lm(lm.resolve_lm_path(args.lm), args.device)
    layer = lm.default_layer(model)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        acts = np.concatenate(lm.token_activations(model, tokenizer, train_texts, [layer], args.max_tokens)[layer])
        extract_s = time.perf_counter() - started
        started = time.perf_counter()
        sae = sae_lib.train_sae(acts, sae_lib.SaeTrainingSettings(steps=args.steps), {"winnow_layer": layer},
                                device=args.device)
        train_s = time.perf_counter() - started
        sae_path = sae_lib.save_sae(sae, scratch / "sae")
        sae = sae_lib.load_sae(sae_path, args.device)

        started = time.perf_counter()
        plain = sae_lib.sample_codes(model, tokenizer, sae, texts, layer, args.max_tokens, args.batch_size)
        plain_s = time.perf_counter() - started
        tokens = sum(min(len(ids), args.max_tokens) - 1 for ids in tokenizer(texts)["input_ids"])
        target = sae_lib.sample_codes(model, tokenizer, sae, [train_texts[0]], layer, args.max_tokens, 1)

        source = scratch / "rows.parquet"
        pq.write_table(pool, source)
        (scratch / "targets.jsonl").write_text(json.dumps({"text": train_texts[0]}) + "\n")
        config = build_config({
            "input": {"path": str(source), "columns": {"id": "id", "text": "text", "source": "source"}},
            "output": {"path": str(scratch / "out")},
            "select": {"enabled": True, "method": "mona", "sae": str(sae_path),
                       "targets": str(scratch / "targets.jsonl"), "ratio": 0.05,
                       "batch_size": args.batch_size, "max_tokens": args.max_tokens,
                       "torch_threads": threads, "model": args.lm, "device": args.device},
        })
        record_path = config.resolved()  # the same job without select: the record path's share of the wall time
        record_path["select"]["enabled"] = False
        record_path["output"]["path"] = str(scratch / "out-record-path")
        record_path_timings = run_job(plan_job(build_config(record_path), []), force=True)["timings"]
        started = time.perf_counter()
        manifest = run_job(plan_job(config, []), force=True)
        beam_s = time.perf_counter() - started
        ledger = pq.read_table(scratch / "out" / "ledger", columns=["id", "sae_score", "fate"]).to_pandas()
        ledger = ledger.set_index("id")
        exact = set(ledger.index[ledger["fate"] == "kept"])
        shortlists = []
        for multiple in args.multiples:
            config_dict = config.resolved()  # embed.enabled auto: on for an embedding shortlist
            config_dict["select"].update(shortlist=args.shortlist, shortlist_multiple=multiple)
            config_dict["output"]["path"] = str(scratch / f"out-{multiple}")
            started = time.perf_counter()
            timings = run_job(plan_job(build_config(config_dict), []), force=True)["timings"]
            seconds = time.perf_counter() - started
            kept = pq.read_table(scratch / f"out-{multiple}" / "ledger", columns=["id", "fate"]).to_pandas()
            chosen = set(kept.loc[kept["fate"] == "kept", "id"])
            shortlists.append({"shortlist": args.shortlist, "multiple": multiple, "job_s": round(seconds, 2),
                               "speedup_over_exact": round(beam_s / seconds, 2),
                               "recall_of_exact_selection": round(len(chosen & exact) / max(1, len(exact)), 4),
                               "job_timings": {name: round(value, 2) for name, value in timings.items()}})
            print(json.dumps(shortlists[-1]), flush=True)

    from winnow.selectors.task_selection import jaccard_to_prototype, prototype

    plain_scores = jaccard_to_prototype(plain, prototype(target))
    beam_scores = ledger.loc[pool.column("id").to_pylist(), "sae_score"].to_numpy()
    result = {
        "rows": len(texts),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "tokens": tokens,
        "layer": layer,
        "torch_threads": threads,
        "batch_size": args.batch_size,
        "plain_s": round(plain_s, 2),
        "plain_samples_per_s": round(len(texts) / plain_s, 2),
        "plain_tokens_per_s": round(tokens / plain_s, 1),
        "beam_job_s": round(beam_s, 2),
        "beam_samples_per_s": round(len(texts) / beam_s, 2),
        "ratio_beam_over_plain": round(plain_s / beam_s, 3),
        "max_abs_score_difference": float(np.abs(beam_scores - plain_scores).max()),
        "sae_training": {"d_sae": 4608, "k": 32, "steps": args.steps, "batch_tokens": 1024,
                         "train_s": round(train_s, 1), "activation_tokens": int(len(acts)),
                         "activation_extract_s": round(extract_s, 1)},
        "beam_timings": manifest["timings"],
        "record_path_job_timings": {name: round(value, 2) for name, value in record_path_timings.items()},
        "shortlists": shortlists,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
