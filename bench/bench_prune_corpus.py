"""The prune stage alone on the whole corpus's real vectors and texts: wall time, peak RSS and what it kept.

`make bench-corpus` runs embed for an hour before prune starts; this starts from the embeddings that run wrote
(`--embeddings`, its `embeddings/` output) and the corpus it read (`--corpus`), joined by id and written as
the embed stage writes its blocks (50,000 rows, row groups of 5,000; in a child process), then runs the prune stage
(`stage_run.run_stage`, in-process FnApiRunner) with bench-corpus's prune settings. Peak RSS is the process's
high-water mark over the stage alone (reset after the blocks are written); RSS is also sampled every 0.5 s.

    make bench-corpus ARGS="--tiers openvino-int8 --no-semhash"      # first, once: writes the embeddings
    .venv/bin/python bench/bench_prune_corpus.py
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_prune_stage import peak_rss_mib, reset_peak_rss, status_kib

OUT = Path("bench/out/corpus")
BLOCK_ROWS = 50_000


def write_blocks(embeddings: Path, corpus: Path, directory: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from winnow.pipelines.io.blocks import embedded_block, write_block

    vectors = pq.read_table(embeddings, columns=["id", "text_hash", "embedding"])
    rows = pq.read_table(corpus, columns=["id", "text", "source"])
    where = pc.index_in(vectors.column("id"), rows.column("id")).to_numpy()
    matrix = vectors.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(where), -1)
    files = []
    for number, start in enumerate(range(0, len(where), BLOCK_ROWS)):
        chosen = np.arange(start, min(start + BLOCK_ROWS, len(where)))
        picked = rows.take(pa.array(where[chosen]))
        core = {"file_index": pa.array(np.zeros(len(chosen), dtype=np.int64)),
                "input_row": pa.array(where[chosen].astype(np.int64)), "id": picked.column("id"),
                "text": picked.column("text"), "source": picked.column("source"),
                "input_file": [corpus.name] * len(chosen), "text_hash": vectors.column("text_hash").take(chosen),
                "note": [None] * len(chosen)}
        files.append(write_block(str(directory), f"records/block-00000-{number:05d}.parquet",
                                 embedded_block(core, matrix[chosen])))
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=Path, default=OUT / "out-openvino-int8" / "embeddings")
    parser.add_argument("--corpus", type=Path, default=OUT / "corpus.parquet")
    parser.add_argument("--out", type=Path, default=Path("bench/out/prune_corpus.json"))
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        (args.write / "files.json").write_text(json.dumps(write_blocks(args.embeddings, args.corpus, args.write)))
        return 0
    if not args.embeddings.exists() or not args.corpus.exists():
        print(f"bench-prune-corpus needs {args.embeddings} and {args.corpus}: run make bench-corpus first",
              file=sys.stderr)
        return 2
    from bench_corpus import tier_config

    from winnow.pipelines.config import build_config
    from winnow.pipelines.engine.options import beam_options
    from winnow.pipelines.engine.stage_cache import StageCache, StageEntry
    from winnow.pipelines.engine.stage_run import run_stage
    from winnow.pipelines.io.cache_files import RECORDS, REMOVED
    from winnow.pipelines.plan import plan_job

    with tempfile.TemporaryDirectory(dir=args.out.parent) as scratch:
        root = Path(scratch)
        # in a process of its own, so that the stage's peak and start are not the join's memory
        subprocess.run([sys.executable, __file__, "--write", str(root / "upstream"), "--embeddings",
                        str(args.embeddings), "--corpus", str(args.corpus)], check=True)
        files = json.loads((root / "upstream" / "files.json").read_text())
        rows = sum(f["rows"] for f in files)
        settings = tier_config("openvino-int8", args.corpus, root / "out", root / "models")
        config = build_config({"input": settings["input"], "output": settings["output"],
                               "embed": {"enabled": True}, "prune": settings["prune"]})
        plan = plan_job(config, [])
        planned = next(stage for stage in plan.stages if stage.name == "prune")
        upstream = StageEntry("embed", "bench", str(root / "upstream"), files, rows, 0, 0.0)
        samples: list[tuple[float, int]] = []
        gc.collect()
        reset_peak_rss()
        started = time.perf_counter()

        def sample() -> None:
            while True:
                samples.append((round(time.perf_counter() - started, 1), status_kib("VmRSS") // 1024))
                time.sleep(0.5)

        threading.Thread(target=sample, daemon=True).start()
        entry = run_stage(plan, planned, upstream, StageCache(root / "cache"), beam_options([]), reuse_steps=False)
        seconds = time.perf_counter() - started
        result = {
            "rows": rows, "stage_s": round(seconds, 1), "start_rss_mib": samples[0][1] if samples else None,
            "peak_rss_mib": peak_rss_mib(),
            "kept": sum(f["rows"] for f in entry.files if f["dir"] == RECORDS and "step" not in f),
            "removed": sum(f["rows"] for f in entry.files if f["dir"] == REMOVED),
            "steps": {step["step"]: step["seconds"] for step in entry.steps},
            "rss_mib_every_half_second": samples,
        }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mib_every_half_second"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
