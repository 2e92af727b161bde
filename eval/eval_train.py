"""The proxy-model evaluation (`winnow eval train`) on ../shared/data, for the two questions of issue #29.

  prune   SemDeDup + DBP keeping 50% of 12,000 Debian descriptions vs a random 50% at the same token count.
          Held out: 2,000 other Debian descriptions (in-domain) and 2,000 docs paragraphs (another domain);
          the tokenizer is trained on 4,000 further Debian descriptions.
  select  MONA (SmolLM2-135M + a TopK SAE trained on the pool) keeping 20% of a 3,000-row BIG-bench pool for
          text-to-SQL (20 target examples) vs a random 20%. The pool holds 240 text-to-SQL rows; 240 others are
          held out ("family"), with 1,000 rows of the other task types ("bigbench"); the tokenizer is trained
          on the remaining rows of the other types.

Every split is by a seeded permutation and written to eval/out/train/<case>/data/, the arm's config beside it.

    make eval-train ARGS="--case prune --seeds 3"     # eval/out/train/prune/{eval_train.json,report/index.html}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "eval" / "out" / "train"


def _write(table: pa.Table, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def write_config(path: Path, pool: str, output: Path, stage: str, section: dict) -> Path:
    """An arm's job config: the pool (id, text, source) through one stage into `output`."""
    import yaml

    columns = {"id": "id", "text": "text", "source": "source"}
    path.write_text(yaml.safe_dump({"input": {"path": pool, "columns": columns}, "output": {"path": str(output)},
                                    stage: section}, sort_keys=False))
    return path


def unique_texts(table: pa.Table) -> pa.Table:
    """The first row of every distinct (stripped) text: a held-out text must not also sit in the pool."""
    seen: set[str] = set()
    keep = [not (text.strip() in seen or seen.add(text.strip())) for text in table.column("text").to_pylist()]
    return table.filter(pa.array(keep))


def prepare_prune(folder: Path, pool_rows: int) -> tuple[str, list[tuple[str, str]], str]:
    debian = pq.read_table(SHARED / "debian_descriptions_en.parquet", columns=["id", "text", "source"])
    debian = unique_texts(debian)
    order = np.random.default_rng(0).permutation(debian.num_rows)
    data = folder / "data"
    pool = _write(debian.take(order[:pool_rows]), data / "pool.parquet")
    heldout = _write(debian.take(order[pool_rows:pool_rows + 2000]), data / "heldout_debian.parquet")
    neutral = _write(debian.take(order[pool_rows + 2000:pool_rows + 6000]), data / "tokenizer.parquet")
    docs = unique_texts(pq.read_table(SHARED / "docs_paragraphs.parquet", columns=["text"]))
    docs_order = np.random.default_rng(1).permutation(docs.num_rows)[:2000]
    heldout_docs = _write(docs.take(docs_order), data / "heldout_docs.parquet")
    config = write_config(folder / "prune.yaml", pool, folder / "arm_prune", "prune", {
        "enabled": True, "strategy": "dbp", "keep_fraction": 0.5, "keep": "hard",
        "semdedup": {"enabled": True, "eps": 0.05}})
    return str(config), [("debian", heldout), ("docs", heldout_docs)], neutral


def prepare_select(folder: Path, family: str, pool_rows: int) -> tuple[str, list[tuple[str, str]], str]:
    table = pq.read_table(SHARED / "bigbench_tasks.parquet", columns=["id", "instruction", "output", "label"])
    text = pa.array([f"{i}\n\n{o}" for i, o in zip(table.column("instruction").to_pylist(),
                                                       table.column("output").to_pylist(), strict=True)])
    table = pa.table({"id": table.column("id"), "text": text, "label": table.column("label"),
                      "source": table.column("label")})
    table = unique_texts(table)
    labels = np.asarray(table.column("label").to_pylist())
    rng = np.random.default_rng(0)
    mine = rng.permutation(np.flatnonzero(labels == family))
    others = rng.permutation(np.flatnonzero(labels != family))
    targets, rest = mine[:20], mine[20:]
    in_pool, held_family = rest[: len(rest) // 2], rest[len(rest) // 2:]
    pool_others = others[: pool_rows - len(in_pool)]
    held_others = others[len(pool_others): len(pool_others) + 1000]
    neutral_rows = others[len(pool_others) + 1000:]
    data = folder / "data"
    pool = _write(table.take(np.sort(np.concatenate([in_pool, pool_others]))), data / "pool.parquet")
    target_file = _write(table.take(targets), data / "targets.parquet")
    heldout = [("family", _write(table.take(held_family), data / "heldout_family.parquet")),
               ("bigbench", _write(table.take(held_others), data / "heldout_bigbench.parquet"))]
    neutral = _write(table.take(neutral_rows), data / "tokenizer.parquet")
    sae = folder / f"sae-pool{pool_rows}"
    if not (sae / "cfg.json").exists():
        from winnow.pipelines.cli import main

        started = time.perf_counter()
        if main(["sae", "train", "--input", pool, "--out", str(sae), "--max-records", "1000", "--steps", "300"]):
            raise SystemExit("eval-train: training the SAE failed")
        print(f"eval-train: SAE trained in {time.perf_counter() - started:.0f} s", flush=True)
    config = write_config(folder / "select.yaml", pool, folder / "arm_mona", "select", {
        "enabled": True, "method": "mona", "targets": target_file, "ratio": 0.2, "sae": str(sae),
        "max_tokens": 256, "batch_size": 16})
    return str(config), heldout, neutral


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["prune", "select"], nargs="+", default=["prune", "select"])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pool-rows", type=int, default=None, help="default: 12,000 (prune), 3,000 (select)")
    parser.add_argument("--family", default="text_to_sql", help="the BIG-bench task type of the select case")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"eval-train needs {SHARED} (../shared/data); it is absent", file=sys.stderr)
        return 2
    from winnow.pipelines.evaluation.train_eval import run_evaluation

    for case in args.case:
        folder = OUT / case
        if case == "prune":
            config, heldout, neutral = prepare_prune(folder, args.pool_rows or 12_000)
        else:
            config, heldout, neutral = prepare_select(folder, args.family, args.pool_rows or 3_000)
        started = time.perf_counter()
        report = run_evaluation([config], heldout, str(folder), args.preset, args.seeds, tokenizer_sample=neutral,
                                say=lambda line, case=case: print(f"eval-train {case}: {line}", flush=True))
        print(f"eval-train {case}: {time.perf_counter() - started:.0f} s; {folder / 'eval_train.json'}")
        for row in report["comparisons"]:
            (arm_mean, arm_sd), (ctl_mean, ctl_sd) = row["arm_mean_spread"], row["control_mean_spread"]
            print(f"  {row['heldout']:>9} {row['metric']:<20} {row['arm']} {arm_mean:.4f} +- {arm_sd:.4f}  "
                  f"{row['control']} {ctl_mean:.4f} +- {ctl_sd:.4f}  winner: {row['winner']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
