"""The pieces the stages move record files with, without Beam: prune's fit sample merged from any split of
the rows, record files written back whatever their kind (cached_rows.py), decisions read back by record
file, and the rephrase choice made per file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.pipelines.io.blocks import block_table, vector_array
from winnow.pipelines.io.cache_files import read_cache_file, write_records_file
from winnow.pipelines.io.cached_rows import CachedRows, in_input_order
from winnow.pipelines.io.row_groups import read_groups
from winnow.pipelines.stages.prune.common import DECISION_SCHEMA, SmallestRows
from winnow.pipelines.stages.prune.decide import write_decisions


def test_the_fit_sample_is_the_smallest_hashes_then_input_order_whatever_the_split():
    rng = np.random.default_rng(7)
    count, n = 500, 60
    hashes = rng.integers(0, 40, count).astype(np.uint64)  # many ties: the order key decides them
    keys = np.stack([rng.integers(0, 3, count), rng.permutation(count), np.zeros(count, int)], axis=1)
    vectors = rng.standard_normal((count, 4)).astype(np.float32)
    expected = sorted(range(count), key=lambda i: (int(hashes[i]), tuple(keys[i].tolist())))[:n]
    combine = SmallestRows(n)
    cuts = np.sort(rng.choice(np.arange(1, count), 9, replace=False))
    accumulators = []
    for part in np.split(np.arange(count), cuts):
        accumulator = combine.create_accumulator()
        for piece in np.array_split(part, 2):
            accumulator = combine.add_input(accumulator, (hashes[piece], keys[piece], vectors[piece], len(piece)))
        accumulators.append(accumulator)
    sample = combine.extract_output(combine.merge_accumulators(accumulators[::-1]))
    assert sample[3] == count
    assert sample[0].tolist() == hashes[expected].tolist()
    assert sample[1].tolist() == keys[expected].tolist()
    np.testing.assert_array_equal(sample[2], vectors[expected])
    empty = combine.extract_output(combine.create_accumulator())
    assert empty[3] == 0 and len(empty[0]) == 0


def _records(count: int) -> list[dict]:
    return [{"id": f"r{i}", "text": f"text {i}", "source": "s", "extra": {}, "input_file": "in.parquet",
             "input_row": i, "file_index": 2, "text_hash": f"{i:032x}", "embedding": np.full(3, i, np.float32)}
            for i in range(count)]


def test_a_block_and_pickled_records_are_written_back_with_the_same_columns_and_rows(tmp_path):
    records = _records(6)
    columns = {name: [r[name] for r in records] for name in
               ("file_index", "input_row", "id", "text", "source", "input_file", "text_hash")}
    block = block_table({**columns, "note": [None] * 6}, None)
    block = block.append_column("embedding", vector_array(np.stack([r["embedding"] for r in records])))
    block = block.take(pa.array([3, 0, 5, 1, 4, 2]))  # rows out of input order: read back in input order
    (tmp_path / "block").mkdir()
    pq.write_table(block, tmp_path / "block" / "f.parquet")
    write_records_file(str(tmp_path / "pickled"), "f.parquet", records[::-1])
    cluster = pa.array([5, 4, 3, 2, 1, 0], pa.int64())
    dist = pa.array([0.5, 0.25, 0.125, 1.0, 2.0, 4.0], pa.float32())
    keep = np.array([True, False, True, True, False, True])
    written = {}
    for kind in ("block", "pickled"):
        rows = CachedRows.read(str(tmp_path / kind / "f.parquet"))
        assert rows.keys()[:, 1].tolist() == list(range(6)) and rows.ids().to_pylist() == [f"r{i}" for i in range(6)]
        assert rows.vectors()[:, 0].tolist() == list(range(6))
        meta = rows.write(str(tmp_path / f"{kind}_out"), "records/f.parquet",
                          {"cluster": cluster, "dist_to_centroid": dist}, keep=keep, drop=("embedding",))
        assert meta["rows"] == 4
        written[kind] = list(read_cache_file(str(tmp_path / f"{kind}_out" / "records" / "f.parquet")))
    for kind, out in written.items():
        assert [(r["id"], r["cluster"], r["dist_to_centroid"]) for r in out] == \
            [("r0", 5, 0.5), ("r2", 3, 0.125), ("r3", 2, 1.0), ("r5", 0, 4.0)], kind
        assert all("embedding" not in r for r in out), kind


def test_each_record_file_reads_back_exactly_its_decisions(tmp_path):
    rng = np.random.default_rng(3)
    blocks = np.array(["c.parquet", "a.parquet", "b.parquet"])[rng.integers(0, 3, 40)]
    rows = rng.permutation(40)
    decisions = pa.Table.from_arrays([
        pa.array(blocks), pa.array(np.zeros(40, np.int64)), pa.array(rows), pa.array(np.zeros(40, np.int64)),
        pa.array(rng.integers(0, 3, 40).astype(np.int8)), pa.array(rng.integers(0, 9, 40)),
        pa.array(rng.random(40).astype(np.float32)), pa.array([None] * 40, pa.string()),
        pa.array([None] * 40, pa.string())], schema=DECISION_SCHEMA)
    halves = [write_decisions(str(tmp_path / f"part-{i}.parquet"), decisions.slice(20 * i, 20)) for i in range(2)]
    refs: dict[str, list] = {}
    for block, ref in halves[0] + halves[1]:
        refs.setdefault(block, []).append(ref)
    assert sorted(refs) == sorted(set(blocks.tolist()))
    for block, block_refs in refs.items():
        read = read_groups(block_refs, DECISION_SCHEMA).sort_by("input_row")
        assert read.column("block").to_pylist() == [block] * read.num_rows
        assert read.column("input_row").to_pylist() == sorted(rows[blocks == block].tolist())
    assert read_groups([], DECISION_SCHEMA).num_rows == 0


def test_the_rephrase_choice_per_file_equals_the_per_record_filters():
    from types import SimpleNamespace

    from winnow.pipelines.stages.rephrase.choice import _choice_key, _chosen, chosen_rows

    count = 300
    records = [{"id": f"doc-{i}", "source": ("en", "de", "fr")[i % 3]} for i in range(count)]
    table = pa.table({"file_index": np.zeros(count, np.int64), "input_row": np.arange(count),
                      "id": [r["id"] for r in records], "source": [r["source"] for r in records]})
    rows = CachedRows(table)
    for sources, fraction, cap in ((None, 1.0, None), (("en", "fr"), 0.37, None), (("en", "fr"), 0.37, 20),
                                   (None, 0.5, 7), (None, 0.0, None)):
        plan = SimpleNamespace(sources=sources, fraction=fraction, max_records=cap, params=SimpleNamespace(seed=11))
        chosen = [r for r in records if _chosen(r, plan)]
        keys = sorted(_choice_key(r, 11) for r in chosen)
        bound = keys[:cap][-1] if cap is not None and keys else None
        expected = [_chosen(r, plan) and (cap is None or _choice_key(r, 11) <= bound) for r in records]
        assert chosen_rows(rows, plan, bound).tolist() == expected, (sources, fraction, cap)
        assert sum(expected) == (min(cap, len(chosen)) if cap is not None else len(chosen))


def test_in_input_order_is_a_lexicographic_check_on_the_order_columns():
    """CachedRows skips its sort (a copy of every column) exactly when a stable sort would change nothing."""
    columns = ["file_index", "input_row", "variant"]
    table = pa.table({"file_index": [0, 0, 1, 1], "input_row": [5, 6, 0, 0], "variant": [0, 0, 0, 1]})
    assert in_input_order(table, columns)
    assert not in_input_order(table.take([1, 0, 2, 3]), columns)
    assert not in_input_order(table.take([0, 1, 3, 2]), columns)
    assert in_input_order(table.take([0, 1, 3, 2]), columns[:2]), "ties on the compared columns are in order"
    assert in_input_order(table.slice(0, 1), columns) and in_input_order(table.slice(0, 0), columns)
