"""Build the small real sample shipped in data/sample/ from ../shared/data (run once; output is committed).

Deterministic: rows are drawn with a fixed seed, so rerunning reproduces the same files byte for byte.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SEED = 20261127

# (file in ../shared/data, output name, {source: rows}); sources of very different sizes on purpose, so that
# the mixing stage has something to balance.
PLAN = [
    ("debian_descriptions_multilingual.parquet", "debian_descriptions.parquet",
     {"en": 1000, "de": 160, "fr": 120, "it": 80, "da": 40, "sk": 20}),
    ("docs_paragraphs.parquet", "docs_paragraphs.parquet", {"linux-doc": 200, "python-doc": 100}),
    ("bigbench_tasks.parquet", "bigbench_tasks.parquet",
     {"arithmetic/3_digit_addition": 40, "semantic_parsing_spider": 40, "gem/xsum": 40}),
]


def sample(table: pa.Table, per_source: dict[str, int], rng: np.random.Generator) -> pa.Table:
    parts = []
    for source, rows in per_source.items():
        subset = table.filter(pc.equal(table["source"], source))
        picked = np.sort(rng.choice(subset.num_rows, size=min(rows, subset.num_rows), replace=False))
        parts.append(subset.take(pa.array(picked)))
    return pa.concat_tables(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "sample")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for source_file, out_name, per_source in PLAN:
        table = sample(pq.read_table(args.shared / source_file), per_source, rng)
        pq.write_table(table, args.out / out_name, compression="zstd")
        print(f"{out_name}: {table.num_rows} rows from {source_file}")
    write_targets(args.shared, args.out)


TARGETS = ("select_targets.jsonl", "semantic_parsing_spider", 5)


def write_targets(shared: Path, out: Path) -> None:
    """Target examples for the select preset: text-to-SQL rows of BIG-bench that are not in the sample."""
    name, source, rows = TARGETS
    taken = set(pq.read_table(out / "bigbench_tasks.parquet", columns=["id"]).column("id").to_pylist())
    table = pq.read_table(shared / "bigbench_tasks.parquet", columns=["id", "text", "source"])
    candidates = [r for r in table.filter(pc.equal(table["source"], source)).to_pylist() if r["id"] not in taken]
    picked = np.sort(np.random.default_rng(SEED + 1).choice(len(candidates), size=rows, replace=False))
    with open(out / name, "w", encoding="utf-8") as handle:
        for index in picked.tolist():
            handle.write(json.dumps({"id": candidates[index]["id"], "text": candidates[index]["text"]}) + "\n")
    print(f"{name}: {rows} {source} rows not in the sample")


if __name__ == "__main__":
    main()
