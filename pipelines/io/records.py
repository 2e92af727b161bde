"""The record and ledger-row shapes that flow between stages, and the stable ids records are known by.

A record is a plain dict (it pickles cheaply and crosses any runner):
  id, text, source     the mapped input columns (id: given, or a content hash of the text)
  extra                every other input column, passed through to the shards
  input_file, input_row where the record came from (file path, 0-based row); (file_index, input_row) orders
                        records in input order
  file_index           the file's position in the sorted list of input files
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa

from winnow.pipelines.io import native

LEDGER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("fate", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("input_file", pa.string()),
        ("input_row", pa.int64()),
        ("copies", pa.int64()),
        ("cluster", pa.int64()),
        ("dist_to_centroid", pa.float32()),
        ("duplicate_of", pa.string()),
        ("select_score", pa.float64()),
        ("sae_score", pa.float64()),
        ("parent_id", pa.string()),
    ]
)

def content_id(text: str) -> str:
    """A stable id for a record that has none: 128 bits of BLAKE2b over the UTF-8 text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def seeded_hash(seed: int, *parts: Any) -> int:
    """A 64-bit hash of the parts, stable across processes and runs (unlike Python's hash)."""
    text = "\0".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def seeded_hashes(seed: int, values: pa.Array | list[str], suffix: pa.Array | list[str] | str | None = None
                   ) -> np.ndarray:
    """`seeded_hash(seed, value)` (or `seeded_hash(seed, value, *suffix parts)` with each suffix already joined
    by NUL, or one suffix for all) of every value, as uint64; hashed in native code (`hashing`)."""
    values = _strings(values)
    if not len(values):
        return np.zeros(0, dtype=np.uint64)
    parts = [str(seed), values] + ([] if suffix is None else [suffix if isinstance(suffix, str) else _strings(suffix)])
    return native.digest_integers(native.joined(parts), "big")


def content_ids(texts: pa.Array) -> pa.Array:
    """`content_id` of every text of an Arrow string array."""
    return native.hexdigests(_strings(texts), 16)


def _strings(values: pa.Array | list[str]) -> pa.Array:
    values = native.one_chunk(values)
    return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())


def position_id(input_file: str, input_row: int) -> str:
    """The id of a record too broken to have one (no usable id, no usable text): where it was read."""
    return f"{PurePosixPath(input_file).name}#{input_row}"


def token_count(text: str) -> int:
    """Whitespace tokens: the tokenizer-free size used for token budgets and token-weighted mixing."""
    return len(text.split())


def order_key(record: dict[str, Any]) -> tuple[int, int, int]:
    """Input order; synthetic records (a `variant` > 0) follow their parent."""
    return record["file_index"], record["input_row"], record.get("variant", 0)


def ledger_row(
    record: dict[str, Any],
    fate: str,
    stage: str,
    reason: str | None = None,
    detail: str | None = None,
    copies: int = 0,
    duplicate_of: str | None = None,
) -> dict[str, Any]:
    """The ledger row of a record; `copies` is how many times it appears in the shards. A synthetic record
    (one with a `parent_id`) that is kept has the fate `synthetic`. The scores that drove
    a decision (cluster, dist_to_centroid, select_score, sae_score) come from the record when a stage has set them;
    without a detail of its own, a row carries the record's `note` (what validation changed in it)."""
    if fate == "kept" and record.get("parent_id"):
        fate = "synthetic"
    return {
        "id": record["id"],
        "source": record["source"],
        "fate": fate,
        "stage": stage,
        "reason": reason,
        "detail": detail if detail is not None else record.get("note"),
        "input_file": record["input_file"],
        "input_row": record["input_row"],
        "copies": copies,
        "cluster": record.get("cluster"),
        "dist_to_centroid": record.get("dist_to_centroid"),
        "duplicate_of": duplicate_of,
        "select_score": record.get("select_score"),
        "sae_score": record.get("sae_score"),
        "parent_id": record.get("parent_id"),
        "variant": record.get("variant", 0),
        "file_index": record["file_index"],
    }


def split_routed(routed, label: str, routes: tuple[str, ...]) -> dict[str, Any]:
    """Split a PCollection of (route, element) pairs into one PCollection per route.

    Stages route elements this way rather than with multi-output ParDos (`with_outputs`): Beam 2.77's
    DaskRunner hands every element of a multi-output ParDo to every output, which would duplicate records.
    """
    import apache_beam as beam

    def only(pair, route):
        if pair[0] == route:
            yield pair[1]

    return {route: routed | f"{label}{route.title()}" >> beam.FlatMap(only, route) for route in routes}


# a character that str.strip() and str.split() do not treat as whitespace (RE2 syntax, for Arrow compute)
NOT_WHITESPACE = ("[^\\t-\\r\\x{1c}- \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}"
                  "\\x{205f}\\x{3000}]")


def token_counts(texts) -> pa.Array:
    """`token_count` of every text of an Arrow string array (null stays null), counted in native code."""
    texts = native.one_chunk(texts)
    texts = texts if pa.types.is_large_string(texts.type) else texts.cast(pa.string())
    nulls = texts.is_null().to_numpy(zero_copy_only=False) if texts.null_count else None
    return pa.array(native.token_counts(texts), mask=nulls)
