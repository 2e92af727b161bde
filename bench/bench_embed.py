"""Embed-stage throughput: the winnow job (FnApiRunner, in-process) vs a plain SentenceTransformer.encode loop.

Both embed the same rows of ../shared/data/debian_descriptions_en.parquet with the same packaged model, batch
size and torch threads, one after the other in this process. The Beam figure is the whole job's wall time
(read, validate, embed, write shards, ledger and embeddings), so the ratio is a lower bound for the stage.

    make bench-embed                 # 20,000 rows
    make bench-embed ARGS="--rows 2000"
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

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from winnow.pipelines.config import build_config  # noqa: E402
from winnow.pipelines.job import plan_job, run_job  # noqa: E402
from winnow.selectors import embedding  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debian_descriptions_en.parquet"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/out/embed.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="Parquet with id, text, source")
    parser.add_argument("--model", default=embedding.PACKAGED_MODEL, help="a sentence-transformers folder")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if not args.data.exists():
        print(f"bench-embed needs {args.data} (../shared/data); it is absent", file=sys.stderr)
        return 2
    threads = embedding.threads_per_worker(0, 1)
    torch.set_num_threads(threads)
    table = pq.read_table(args.data, columns=["id", "text", "source"]).slice(0, args.rows)
    texts = table.column("text").to_pylist()

    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "rows.parquet"
        pq.write_table(table, source)

        model = embedding.load_model(embedding.resolve_model_path(args.model), args.device)
        embedding.encode(model, texts[: args.batch_size], args.batch_size)
        started = time.perf_counter()
        plain = embedding.encode(model, texts, args.batch_size)
        plain_s = time.perf_counter() - started
        del model

        config = build_config({
            "input": {"path": str(source), "columns": {"id": "id", "text": "text", "source": "source"}},
            "output": {"path": str(Path(scratch) / "out")},
            "embed": {"enabled": True, "reuse": False, "batch_size": args.batch_size, "torch_threads": threads,
                      "model": args.model, "device": args.device},
        })
        started = time.perf_counter()
        manifest = run_job(plan_job(config, []), force=True)
        beam_s = time.perf_counter() - started
        from winnow.pipelines.stages.embed import read_embeddings

        _, beam_vectors = read_embeddings(Path(scratch) / "out")
        max_diff = float(abs(beam_vectors - plain).max())

    result = {
        "rows": len(texts),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch_threads": threads,
        "batch_size": args.batch_size,
        "plain_encode_s": round(plain_s, 2),
        "plain_docs_per_s": round(len(texts) / plain_s, 1),
        "beam_job_s": round(beam_s, 2),
        "beam_docs_per_s": round(len(texts) / beam_s, 1),
        "ratio_beam_over_plain": round(plain_s / beam_s, 3),
        "max_abs_vector_difference": max_diff,
        "beam_timings": manifest["timings"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
