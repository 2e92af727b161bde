"""Rephrase-stage throughput: generated tokens/s of the winnow job vs a plain batched `model.generate` loop.

The same 64 segments (real paragraphs of ../shared/data/docs_paragraphs.parquet, each within 300 tokens, so
one segment per record), style medium, greedy decoding, the same max_new_tokens and torch threads, one after
the other in this process, at batch sizes 1, 8 and 32. The plain loop feeds the prompts in input order,
`batch` at a time, left-padded, to `model.generate`; the job's figure is the whole job's wall time (read,
validate, segment, generate, clean, write), so the ratio is a lower bound for the stage. Greedy decoding makes
both generate the same tokens. With a GPU and vLLM installed, the vLLM backend's tokens/s is measured too.

    make bench-rephrase
    make bench-rephrase ARGS="--segments 16 --batch-sizes 8"
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

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from winnow.pipelines.config import build_config  # noqa: E402
from winnow.pipelines.job import plan_job, run_job  # noqa: E402
from winnow.rephrase import generate, prompts  # noqa: E402
from winnow.selectors import embedding, lm  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "docs_paragraphs.parquet"


def plain_loop(model, tokenizer, texts: list[str], batch: int, max_new_tokens: int) -> int:
    """Generated tokens (up to and excluding end-of-sequence) of a plain batched generate loop."""
    tokens = 0
    eos = model.generation_config.eos_token_id
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                    top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        for row in output[:, encoded["input_ids"].shape[1] :].tolist():
            tokens += next((n for n, t in enumerate(row) if t == eos), len(row))
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/out/rephrase.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="Parquet with id, text, source")
    parser.add_argument("--lm", default=lm.PACKAGED_LM, help="a transformers instruction model folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if not args.data.exists():
        print(f"bench-rephrase needs {args.data} (../shared/data); it is absent", file=sys.stderr)
        return 2
    threads = embedding.threads_per_worker(0, 1)
    torch.set_num_threads(threads)
    path = lm.resolve_lm_path(args.lm)
    generator = generate.TransformersGenerator(path, args.device)
    tokenizer, model = generator.tokenizer, generator.model
    table = pq.read_table(args.data, columns=["id", "text", "source"])
    rows = [r for r in table.slice(2000, 4000).to_pylist() if 300 < len(r["text"]) < 1200]
    rows = [r for r in rows if len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) <= 300]
    rows = rows[: args.segments]
    style = prompts.STYLES["medium"]
    texts = [prompts.build_prompt(tokenizer, style, r["text"]) for r in rows]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "segments.parquet"
        pq.write_table(pa.Table.from_pylist(rows), source)
        for batch in args.batch_sizes:
            started = time.perf_counter()
            plain_tokens = plain_loop(model, tokenizer, texts, batch, args.max_new_tokens)
            plain_s = time.perf_counter() - started
            config = build_config({
                "input": {"path": str(source), "columns": {"id": "id", "text": "text", "source": "source"}},
                "output": {"path": str(Path(scratch) / f"out{batch}")},
                "rephrase": {"enabled": True, "styles": ["medium"], "greedy": True, "cache": False,
                             "max_new_tokens": args.max_new_tokens, "batch_size": batch, "window": 1_000_000,
                             "torch_threads": threads, "model": args.lm, "device": args.device},
            })
            started = time.perf_counter()
            manifest = run_job(plan_job(config, []), force=True)
            job_s = time.perf_counter() - started
            job_tokens = manifest["rephrase"]["styles_summary"]["medium"]["new_tokens"]
            result = {
                "batch_size": batch,
                "plain_tokens": plain_tokens, "plain_s": round(plain_s, 2),
                "plain_tokens_per_s": round(plain_tokens / plain_s, 1),
                "job_tokens": job_tokens, "job_s": round(job_s, 2),
                "job_tokens_per_s": round(job_tokens / job_s, 1),
                "ratio_job_over_plain": round((job_tokens / job_s) / (plain_tokens / plain_s), 3),
            }
            print(json.dumps(result), flush=True)
            results.append(result)
    summary = {"segments": len(rows), "max_new_tokens": args.max_new_tokens, "torch_threads": threads,
               "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "runs": results, "vllm": None}
    if generate.vllm_available():
        vllm = generate.VllmGenerator(path, args.device)
        started = time.perf_counter()
        outputs = vllm.generate(texts, generate.GenerationParams(max_new_tokens=args.max_new_tokens, do_sample=False))
        seconds = time.perf_counter() - started
        tokens = sum(o.new_tokens for o in outputs)
        summary["vllm"] = {"tokens": tokens, "s": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
