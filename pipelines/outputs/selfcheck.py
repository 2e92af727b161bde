"""Self-checks: each stage's manifest summary against the ledger's counts, so that a wrong result cannot pass
for a right one.

A runner that computes a global value wrongly (Beam's DaskRunner did, silently) leaves a summary that disagrees
with the records: the manifest said `selected: 40` while the ledger kept 2. Each stage declares a `check`
(stage.Stage.check) of what its summary must satisfy given the ledger rows by (fate, stage): selected ==
pool - not_selected, chosen <= max_records, quotas == kept per cluster, centroids non-empty with the
embedding dimension. The job runs them before it publishes (a mismatch fails the run with one line) and
`winnow verify` runs them on a finished output, with the counts read from the ledger files themselves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from winnow.pipelines.io.storage import join, open_file


class SelfCheckError(RuntimeError):
    """A stage's summary disagrees with the ledger: the run's result is wrong and is not published."""


@dataclass
class CheckContext:
    """What a stage's check reads: the manifest, ledger rows by (fate, stage) for input records and for
    synthetic ones, and the output folder (for the embeddings' dimension)."""

    manifest: dict[str, Any]
    rows: Counter
    synthetic: Counter
    output: str

    def embedding_dimension(self) -> int | None:
        files = (self.manifest.get("embeddings") or {}).get("files") or []
        if not files:
            return None
        with open_file(join(self.output, files[0]["file"])) as handle:
            return pq.read_schema(handle).field("embedding").type.list_size


def rows_by_fate_stage(counts: dict[str, Any]) -> tuple[Counter, Counter]:
    """(input, synthetic) ledger rows by (fate, stage), from a manifest's `counts`."""
    def tally(section: dict[str, Any]) -> Counter:
        found: Counter = Counter()
        for entry in section.get("by_stage_reason", []):
            found[(entry["fate"], entry["stage"])] += entry["rows"]
        return found
    return tally(counts), tally(counts.get("synthetic", {}))


FILE_LEVEL_REASONS = frozenset({"unreadable_row_group"})


def _all_unreadable(counts: dict[str, Any]) -> list[str]:
    """Every input record rejected for a file-level reason is a broken input (or a path the workers cannot
    reach), not a job that ran."""
    entries = counts.get("by_stage_reason", [])
    total = counts.get("input_records", 0)
    unreadable = sum(e["rows"] for e in entries if e["fate"] == "rejected" and e["reason"] in FILE_LEVEL_REASONS)
    if total and unreadable == total:
        reasons = sorted({e["reason"] for e in entries})
        return [f"every one of the {total} input records was rejected as {', '.join(reasons)}: the input files "
                "cannot be read where the workers run"]
    return []


def check_stages(manifest: dict[str, Any], output: str, rows: Counter | None = None,
                 synthetic: Counter | None = None) -> list[str]:
    """Every stage's check whose section the manifest has; the problems, one line each, each naming its stage
    (`self-check STAGE: ...`)."""
    from winnow.pipelines.stages import STAGES

    if rows is None or synthetic is None:
        rows, synthetic = rows_by_fate_stage(manifest.get("counts", {}))
    context = CheckContext(manifest, rows, synthetic, str(output))
    problems = [f"self-check read: {problem}" for problem in _all_unreadable(manifest.get("counts", {}))]
    for stage in STAGES:
        if stage.check is not None and stage.section and isinstance(manifest.get(stage.section), dict):
            problems += [f"self-check {stage.name}: {problem}" for problem in stage.check(context)]
    return problems


def failed_stages(problems: list[str]) -> set[str]:
    return {problem.split(":", 1)[0].removeprefix("self-check ") for problem in problems}
