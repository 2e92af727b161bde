"""Rephrasing quality at a glance: the job over real paragraphs in every built-in style, and what came out.

Runs the job with the rephrase stage (default model, the paper's four styles, the default sampling:
temperature 0.5, top_p 0.9) over `--paragraphs` real paragraphs of ../shared/data/docs_paragraphs.parquet
(seeded sample of those between 200 and 1,200 characters), then reports per style: outputs generated, the
share accepted, the rejection reasons, for qa the share of outputs with at least one Question/Answer pair, and
the mean length ratio output/input of accepted outputs; plus a few examples side by side.

    make eval-rephrase                  # writes eval/out/rephrase.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.rephrase.clean import has_qa_pair

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "docs_paragraphs.parquet"
STYLES = ["easy", "medium", "hard", "qa"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paragraphs", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--work", type=Path, default=Path("eval/cache/rephrase"))
    parser.add_argument("--out", type=Path, default=Path("eval/out"))
    args = parser.parse_args()
    if not DATA.exists():
        print(f"eval-rephrase needs {DATA} (../shared/data); it is absent", file=sys.stderr)
        return 2
    table = pq.read_table(DATA, columns=["id", "text", "source"])
    lengths = np.array([len(t) for t in table.column("text").to_pylist()])
    candidates = np.flatnonzero((lengths > 200) & (lengths < 1200))
    picked = np.sort(np.random.default_rng(0).choice(candidates, args.paragraphs, replace=False))
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / "paragraphs.parquet"
    pq.write_table(table.take(pa.array(picked)), source)
    config = build_config({
        "input": {"path": str(source), "columns": {"id": "id", "text": "text", "source": "source"}},
        "output": {"path": str(args.work / "out")},
        "rephrase": {"enabled": True, "styles": STYLES, "max_new_tokens": args.max_new_tokens, "batch_size": 16},
    })
    started = time.perf_counter()
    manifest = run_job(plan_job(config, []))
    elapsed = time.perf_counter() - started
    ledger = pq.read_table(args.work / "out" / "ledger").to_pandas()
    shards = pq.read_table(args.work / "out" / "shards").to_pandas()
    summary = manifest["rephrase"]["styles_summary"]
    made = ledger[ledger["parent_id"].notna()]
    originals = shards[shards["parent_id"].isna()].set_index("id")["text"]
    synthetic = shards[shards["parent_id"].notna()]
    lines = [
        f"# eval-rephrase: {args.paragraphs} paragraphs x {len(STYLES)} styles, SmolLM2-135M-Instruct, "
        f"temperature 0.5, top_p 0.9, max_new_tokens {args.max_new_tokens}; job {elapsed:.0f} s "
        f"({manifest['rephrase']['backend']})",
        "",
        "| style | generated | accepted | rejected (reasons) | qa pairs | length ratio out/in |",
        "|---|---|---|---|---|---|",
    ]
    table_rows = {}
    for style in STYLES:
        entry = summary[style]
        style_rows = synthetic[synthetic["style"] == style]
        qa = float(np.mean([has_qa_pair(t) for t in style_rows["text"]])) * entry["accepted"] / entry["generated"] \
            if style == "qa" and entry["generated"] else None
        table_rows[style] = {**entry, "qa_pair_share": qa}
        reasons = ", ".join(f"{reason} {n}" for reason, n in entry["rejected"].items()) or "-"
        lines.append(
            f"| {style} | {entry['generated']} | {entry['acceptance']:.0%} | {reasons} | "
            f"{'-' if qa is None else f'{qa:.0%}'} | {entry['length_ratio'] or 0:.2f} |"
        )
    lines += ["", "Examples (first accepted output per style):", ""]
    for style in STYLES:
        style_rows = synthetic[synthetic["style"] == style]
        if len(style_rows):
            row = style_rows.iloc[0]
            lines += [f"## {style}", "", "Original:", "", "> " + originals[row["parent_id"]][:600].replace("\n", " "),
                      "", "Rephrased:", "", "> " + row["text"][:600].replace("\n", " "), ""]
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "rephrase.md").write_text("\n".join(lines) + "\n")
    (args.out / "rephrase.json").write_text(json.dumps({"styles": table_rows, "elapsed_s": elapsed,
                                                        "rejected_rows": int((made["fate"] == "rejected").sum())},
                                                       indent=1))
    print("\n".join(lines[:10]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
