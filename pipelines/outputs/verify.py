"""`winnow verify OUT`: check an output directory against its manifest before training on it.

Checks that every file the manifest lists (shards, ledger, embeddings) exists with its recorded SHA-256,
size and row count; that the ledger has one row per input record (no input position twice, no id twice except
rejected duplicate ids, which repeat the id they duplicate) and unique synthetic ids; and that the counts
reconcile: ledger rows per fate equal the manifest's counts, and the copies the ledger records equal the rows
in the shards; and that each stage's summary agrees with the ledger (selfcheck: selected == pool -
not_selected, quotas == kept per cluster, ...). Returns the list of problems, each one line naming the file
or the count.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.io.read import error_text
from winnow.pipelines.io.storage import exists, join, list_files, read_bytes, resolve
from winnow.pipelines.outputs.selfcheck import check_stages, rows_by_fate_stage

MANIFEST = "manifest.json"
LEDGER_COLUMNS = ("id", "fate", "stage", "reason", "input_file", "input_row", "copies", "parent_id")


def _check_files(output: str, section: str, entries: list[dict[str, Any]], problems: list[str],
                 columns: tuple[str, ...] = ()) -> list[pa.Table]:
    """Each listed file's size, SHA-256 and rows (one read of its bytes, one file at a time); for those that
    match, a table of `columns` (only its row count when none). A Parquet file in a listed file's folder that
    the manifest does not list is reported too."""
    present = []
    folders = sorted({posixpath.dirname(entry["file"]) for entry in entries}) or [section]
    sizes: dict[str, int] = {}
    for folder in folders:
        sizes.update(list_files(join(output, folder)))
    for entry in entries:
        path = join(output, entry["file"])
        if path not in sizes:
            problems.append(f"{entry['file']}: listed in the manifest ({section}) but missing")
            continue
        payload = read_bytes(path) if sizes[path] == entry["bytes"] else b""
        if len(payload) != entry["bytes"] or hashlib.sha256(payload).hexdigest() != entry["sha256"]:
            problems.append(f"{entry['file']}: content differs from the manifest (SHA-256 or size)")
            continue
        parquet = pq.ParquetFile(pa.BufferReader(payload))
        rows = parquet.metadata.num_rows
        if rows != entry["rows"]:
            problems.append(f"{entry['file']}: {rows} rows, the manifest says {entry['rows']}")
            continue
        names = parquet.schema_arrow.names
        present.append(parquet.read([c for c in columns if c in names]) if columns else pa.table({"_": pa.nulls(rows)}))
    listed = {join(output, entry["file"]) for entry in entries}
    prefix = output.rstrip("/") + "/"
    for extra in sorted(path for path in sizes if path.endswith(".parquet") and path not in listed):
        problems.append(f"{extra[len(prefix):]}: not listed in the manifest")
    return present


def verify(output: str) -> list[str]:
    output = resolve(output)
    try:
        if not exists(join(output, MANIFEST)):
            return [f"{output}: no {MANIFEST} (not a finished winnow output)"]
        payload = read_bytes(join(output, MANIFEST))
    except Exception as error:  # noqa: BLE001 - each filesystem raises its own errors
        return [f"{join(output, MANIFEST)}: cannot be read ({error_text(error)})"]
    try:
        manifest = json.loads(payload)
    except ValueError:
        return [f"{join(output, MANIFEST)}: not valid JSON"]
    problems: list[str] = []
    shards = _check_files(output, "shards", manifest.get("shards", []), problems)
    ledger_files = _check_files(output, "ledger", manifest.get("ledger", []), problems, LEDGER_COLUMNS)
    if manifest.get("embeddings"):
        _check_files(output, "embeddings", manifest["embeddings"].get("files", []), problems)
    if len(ledger_files) != len(manifest.get("ledger", [])):
        return problems  # counts cannot be reconciled without the whole ledger
    ledger = []
    for table in ledger_files:
        rows = table.to_pylist()
        ledger.extend({"parent_id": None, **row} for row in rows)
    inputs = [row for row in ledger if not row["parent_id"]]
    synthetic = [row for row in ledger if row["parent_id"]]
    positions = Counter((row["input_file"], row["input_row"]) for row in inputs)
    for (file, row), times in sorted(positions.items()):
        if times > 1:
            problems.append(f"ledger: input {file} row {row} has {times} rows")
    ids = Counter(row["id"] for row in inputs if row["reason"] != "duplicate_id")
    ids.update(row["id"] for row in synthetic)
    repeated = sorted(i for i, n in ids.items() if n > 1)
    if repeated:
        problems.append(f"ledger: {len(repeated)} ids appear more than once (e.g. {repeated[0]})")
    counts = manifest.get("counts", {})
    if len(inputs) != counts.get("input_records"):
        problems.append(f"ledger: {len(inputs)} input records, the manifest counts {counts.get('input_records')}")
    by_fate = dict(Counter(row["fate"] for row in inputs))
    if by_fate != counts.get("by_fate"):
        problems.append(f"ledger: fates {dict(sorted(by_fate.items()))} differ from the manifest's "
                        f"{counts.get('by_fate')}")
    rows = Counter((row["fate"], row["stage"]) for row in inputs)
    made = Counter((row["fate"], row["stage"]) for row in synthetic)
    listed, listed_made = rows_by_fate_stage(counts)
    if rows != listed or made != listed_made:
        problems.append("ledger: rows by fate and stage differ from the manifest's counts.by_stage_reason")
    problems += check_stages(manifest, output, rows, made)
    copies = sum(row["copies"] or 0 for row in ledger)
    shard_rows = sum(table.num_rows for table in shards)
    if len(shards) == len(manifest.get("shards", [])) and copies != shard_rows:
        problems.append(f"ledger: records {copies} copies in the shards, the shards hold {shard_rows} rows")
    return problems
