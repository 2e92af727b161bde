"""The GPU benchmarks in one prepared run, for a machine with CUDA: embed, select and rephrase on CUDA against
their bare loops (bench_embed, bench_select, bench_rephrase with `--device cuda`, each in its own process), and
pruning at 1M vectors: the k-means fit and the nearest-centroid assignment (winnow.selectors.clustering, faiss)
on the GPU against the CPU, and SemDeDup inside the clusters (numpy, as the stage runs it), and the training
rate of `winnow eval train`'s presets (train). Writes one JSON;
a part that fails is recorded with the end of its error output, and the others still run.

The prune part's vectors are synthetic (1M unit vectors of 384 dimensions around `--clusters` random centres),
so that it needs no model or corpus; the model parts read `--data-dir` (../shared/data: embed the Debian
descriptions, select and rephrase the docs paragraphs) and the packaged models, or the folders given with
`--model` and `--lm`.

A GPU machine that cannot be reached by the packaged weights (they are larger than what may travel to it) gets
stand-ins: `--pack DIR` writes here the packaged models' folders without their weights (config, tokenizer,
sentence-transformers modules) and slices of the two corpora, and `--stand-ins DIR` there draws the weights at
random (torch seed 0) and runs on those folders. A forward pass costs the same whatever its weights, so the
speeds are the architectures'; what the stand-ins select or write means nothing, and generation runs to
`max_new_tokens` more often than with real weights.

    make bench-gpu                                     # on the device machine
    make bench-gpu ARGS="--parts prune --vectors 100000"
    make bench-gpu ARGS="--pack .gpu/pack --device cpu"                 # here, before the GPU run
    python bench/bench_gpu.py --stand-ins .gpu/pack --data-dir .gpu/pack/data   # there
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PARTS = ("embed", "select", "rephrase", "prune", "train")
DATA_DIR = HERE.parents[1] / "shared" / "data"
PART_DATA = {"embed": "debian_descriptions_en.parquet", "select": "docs_paragraphs.parquet",
             "rephrase": "docs_paragraphs.parquet"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def pack(target: Path, data_dir: Path, rows: dict[str, int]) -> dict:
    """The packaged embedding model and LM without their weights, and the first `rows` of each part's corpus."""
    import shutil

    import pyarrow.parquet as pq

    from winnow.selectors import embedding, lm

    sources = {"model": embedding.resolve_model_path(embedding.PACKAGED_MODEL),
               "lm": lm.resolve_lm_path(lm.PACKAGED_LM)}
    for name, source in sources.items():
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(source, target / name, ignore=shutil.ignore_patterns(*WEIGHT_FILES, "README.md", "*.py*"))
    (target / "data").mkdir(parents=True, exist_ok=True)
    for name, count in rows.items():
        table = pq.read_table(data_dir / name, columns=["id", "text", "source"])
        pq.write_table(table.slice(0, count), target / "data" / name, compression="zstd")
    return {path.relative_to(target).as_posix(): path.stat().st_size for path in sorted(target.rglob("*"))
            if path.is_file()}


def stand_in_weights(folder: Path) -> dict:
    """Random weights (torch seed 0) for the weightless `model` and `lm` folders that `pack` wrote."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    made = {}
    for name, auto in (("model", AutoModel), ("lm", AutoModelForCausalLM)):
        torch.manual_seed(0)
        model = auto.from_config(AutoConfig.from_pretrained(folder / name, local_files_only=True))
        model.save_pretrained(folder / name)
        made[name] = {"parameters": sum(p.numel() for p in model.parameters()), "architecture": type(model).__name__}
    return made


def run_bench(script: str, out: Path, extra: list[str]) -> dict:
    """One bench script in its own process; its JSON, or the end of its error output."""
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, str(HERE / script), "--out", str(out), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = round(time.perf_counter() - started, 1)
    if finished.returncode != 0 or not out.exists():
        return {"failed": True, "returncode": finished.returncode, "wall_s": seconds,
                "output_tail": finished.stdout[-3000:]}
    return {"wall_s": seconds, **json.loads(out.read_text())}


def clustered_vectors(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.35 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def prune_part(count: int, dim: int, clusters: int, fit_sample: int, niter: int) -> dict:
    """k-means fit and assignment on CPU and (when faiss sees a GPU) on the GPU, then SemDeDup per cluster."""
    import faiss

    from winnow.selectors import clustering, semdedup

    vectors = clustered_vectors(count, dim, clusters, 0)
    sample = vectors[np.random.default_rng(1).choice(count, min(fit_sample, count), replace=False)]
    k = clustering.default_k(count)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    result = {"vectors": count, "dim": dim, "k": k, "fit_sample": len(sample), "niter": niter, "faiss_gpus": gpus,
              "faiss_version": faiss.__version__}
    centroids = None
    for device in ("cpu", "gpu") if gpus else ("cpu",):
        started = time.perf_counter()
        fitted = clustering.fit_centroids(sample, k, niter=niter, gpu=device == "gpu")
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        labels, dist = clustering.assign(vectors, fitted)
        assign_s = time.perf_counter() - started
        result[device] = {"fit_s": round(fit_s, 2), "assign_s": round(assign_s, 2),
                          "assign_vectors_per_s": round(count / assign_s, 0)}
        if centroids is None:
            centroids, cpu_labels = fitted, labels
        else:
            result["gpu"]["labels_equal_to_cpu"] = float(np.mean(labels == cpu_labels))
    labels, dist = clustering.assign(vectors, centroids)
    started = time.perf_counter()
    removed = 0
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0, True])
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        members = order[start:stop]
        keep, _, _ = semdedup.semdedup(vectors[members], np.argsort(-dist[members], kind="stable"), 0.05)
        removed += int((~keep).sum())
    result["semdedup_cpu"] = {"s": round(time.perf_counter() - started, 2), "removed": removed,
                              "largest_cluster": int(np.max(np.diff(bounds)))}
    return result


def train_part(device: str, steps: int) -> dict:
    """`winnow eval train`'s presets on `device`: training tokens/s over `steps` steps of random tokens (after
    two warm-up steps) and the hours one arm and seed of each preset would take at that rate."""
    import dataclasses

    import torch

    from winnow.proxy import recipe

    figures = {}
    for name in ("cpu", "gpu-4m", "gpu-10m", "gpu-20m"):
        preset = recipe.PRESETS[name]
        model = recipe.build_model(preset, preset.vocab_size, seed=0)
        sequences = (steps + 2) * preset.batch_size
        stream = np.random.default_rng(0).integers(1, preset.vocab_size, sequences * preset.seq_len, dtype=np.int32)
        timed = dataclasses.replace(preset, warmup_fraction=0.0)
        started = []

        def mark(step: int, started=started) -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started.append(time.perf_counter())

        recipe.train(model, stream, dataclasses.replace(timed, curve_points=steps + 2), steps + 2, 0,
                     device=device, evaluate=mark)
        seconds = started[-1] - started[1]
        rate = steps * preset.batch_size * preset.seq_len / seconds
        figures[name] = {"parameters": recipe.parameter_count(model), "tokens_per_s": round(rate),
                         "hours_per_arm_and_seed": round(preset.tokens / rate / 3600, 2)}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cpu: a dry run of the script")
    parser.add_argument("--embed-rows", type=int, default=20_000)
    parser.add_argument("--select-rows", type=int, default=5_000)
    parser.add_argument("--rephrase-segments", type=int, default=64)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=2_000, help="centres of the synthetic vectors")
    parser.add_argument("--fit-sample", type=int, default=100_000)
    parser.add_argument("--niter", type=int, default=100)
    parser.add_argument("--model", help="sentence-transformers folder for embed (default: the packaged one)")
    parser.add_argument("--lm", help="causal LM folder for select and rephrase (default: the packaged one)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help=f"holds the parts' corpora ({', '.join(sorted(set(PART_DATA.values())))})")
    parser.add_argument("--pack", type=Path, help="write the weightless model folders and corpus slices here; exit")
    parser.add_argument("--stand-ins", type=Path, help="a folder --pack wrote: run on random weights drawn there")
    parser.add_argument("--train-steps", type=int, default=20, help="timed steps per proxy preset (train part)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.pack:
        sizes = pack(args.pack, args.data_dir, {PART_DATA["embed"]: args.embed_rows,
                                                 PART_DATA["select"]: max(args.select_rows + 1_000, 4_000)})
        print(json.dumps(sizes, indent=1))
        return 0
    work = args.out.parent / "gpu-parts"
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": args.device}
    if args.stand_ins:
        result["stand_in_weights"] = stand_in_weights(args.stand_ins)
        args.model, args.lm = str(args.stand_ins / "model"), str(args.stand_ins / "lm")
    try:
        import torch

        result["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        result["torch"] = torch.__version__
    except ImportError:
        result["cuda_device"] = None
    for part in args.parts:
        print(f"bench-gpu: {part}", flush=True)
        common = ["--device", args.device] + (["--data", str(args.data_dir / PART_DATA[part])]
                                              if part in PART_DATA else [])
        if part == "embed":
            extra = ["--rows", str(args.embed_rows), "--batch-size", "128"] + (["--model", args.model] if args.model
                                                                                else [])
            result[part] = run_bench("bench_embed.py", work / "embed.json", common + extra)
        elif part == "select":
            extra = ["--rows", str(args.select_rows)] + (["--lm", args.lm] if args.lm else [])
            result[part] = run_bench("bench_select.py", work / "select.json", common + extra)
        elif part == "rephrase":
            extra = ["--segments", str(args.rephrase_segments), "--batch-sizes", "8", "32"] + (
                ["--lm", args.lm] if args.lm else [])
            result[part] = run_bench("bench_rephrase.py", work / "rephrase.json", common + extra)
        else:
            started = time.perf_counter()
            try:
                result[part] = train_part(args.device, args.train_steps) if part == "train" else \
                    prune_part(args.vectors, 384, args.clusters, args.fit_sample, args.niter)
            except Exception as error:  # recorded, as the other parts' failures are
                result[part] = {"failed": True, "error": f"{type(error).__name__}: {error}"}
            result[part]["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result[part])[:2000], flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"bench-gpu: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
