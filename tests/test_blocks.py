"""Records as Arrow blocks: vectorised validation decides exactly as the per-record path, and files written in
a global order without a GroupByKey holding the rows cut at exact positions."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to

from winnow.pipelines.config import InputConfig
from winnow.pipelines.io.blocks import block_records
from winnow.pipelines.io.ordered_io import WriteOrderedFiles, plan_ordered_files
from winnow.pipelines.io.read import ReadTask, table_records
from winnow.pipelines.io.records import token_count, token_counts
from winnow.pipelines.stages.validate.checks import check_block, check_records

TEXTS = [
    "a usable text", "   ", "\u3000\u2003", "\x1c\x1f", "", None, "tab\tand newline\n ok", "ctrl \x01 inside",
    "\x1b[31mred\x1b[0m", "\x1b[1m\x02", "x" * 41, "é" * 20, "é" * 21, "ok\u200b", "\x85\xa0 \u202f",
]


def _table(id_kind: str) -> pa.Table:
    count = len(TEXTS)
    if id_kind == "string":
        ids = pa.array([None if i == 3 else "  " if i == 4 else "\u3000" if i == 5 else f"r{i % 9}"
                        for i in range(count)])
    else:
        ids = pa.array([None if i == 2 else i % 11 for i in range(count)], pa.int64())
    return pa.table({
        "id": ids, "text": pa.array(TEXTS, pa.string()),
        "source": pa.array([None if i % 4 == 0 else f"s{i % 3}" for i in range(count)]),
        "score": pa.array([i * 0.5 if i % 3 else None for i in range(count)]),
        "tags": pa.array([[f"t{i}"] for i in range(count)]),
    })


@pytest.mark.parametrize("control", ["reject", "strip", "keep"])
@pytest.mark.parametrize("id_kind", ["string", "int", "none"])
def test_vectorised_validation_equals_the_per_record_path(control, id_kind):
    table = _table("int" if id_kind == "int" else "string")
    columns = {"id": "id" if id_kind != "none" else None, "text": "text", "source": "source"}
    config = InputConfig(path="x.parquet", columns=columns)
    task = ReadTask("/data/x.parquet", 3, "parquet", 0, 100, table.num_rows, "x.parquet")
    if id_kind == "none":
        table = table.drop_columns(["id"])
    checked = check_block(table, task, config, 40, control)
    valid, rejected, changed = check_records(enumerate(table_records(table, task, config)), 40, control)
    assert list(block_records(checked.kept)) == [record for _, record in valid]
    assert checked.rejected == rejected
    assert checked.changed == changed
    assert 0 < len(valid) < table.num_rows, "the table exercises both outcomes"


def test_invalid_utf8_rows_are_found_one_by_one():
    texts = pa.array([b"fine", b"bad \xff byte", b"also fine"], pa.binary()).cast(pa.string(), safe=False)
    table = pa.table({"id": ["a", "b", "c"], "text": texts})
    config = InputConfig(path="x.parquet", columns={"id": "id", "text": "text", "source": None})
    task = ReadTask("/x.parquet", 0, "parquet", 0, 0, 3, "x.parquet")
    checked = check_block(table, task, config, 100, "reject")
    assert [r["id"] for r in block_records(checked.kept)] == ["a", "c"]
    assert [(r["id"], r["reason"]) for r in checked.rejected] == [("x.parquet#1", "invalid_utf8")]


def test_token_counts_split_as_python_does():
    texts = ["a b  c", " \u3000x\x1cy\u200bz ", "", "é ü\n\tv", "\x85one\xa0two", None, "  ", "x"]
    assert token_counts(pa.array(texts)).to_pylist() == [None if t is None else token_count(t) for t in texts]
    assert token_counts(pa.array(texts).slice(2)).to_pylist() == [None if t is None else token_count(t)
                                                                  for t in texts[2:]]
    every = [chr(code) for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF]
    for texts in (every, ["a" + c + "b" for c in every], ["é" + c for c in every]):
        assert token_counts(pa.array(texts)).to_pylist() == [len(text.split()) for text in texts]


def test_ordered_files_are_cut_at_exact_positions():
    sources = [("a", "k", {0: 7, 1 << 32: 3}), ("b", "k", {0: 5, 1: 12})]  # (file 0, block 0) in both
    tasks = list(plan_ordered_files(sources, 10))
    assert [(number, first, end, start) for number, first, end, start, _, _ in tasks] == [
        (0, 0, 10, 0), (1, 10, 20, 0), (2, 20, 27, 12)]
    assert tasks[0][4] == [(0, 12)] and tasks[2][4] == [(1, 12), (1 << 32, 3)]
    assert tasks[0][5] == [("a", "k", [0]), ("b", "k", [0])]
    assert tasks[2][5] == [("a", "k", [1 << 32]), ("b", "k", [1])]


def _rows(table, kind):
    return table


def test_write_ordered_files_merges_sources_in_input_order_in_chunks_with_one_writes_bytes(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(file, row) for file, count in ((0, 23_000), (1, 5), (2, 12)) for row in range(count)]
    order = rng.permutation(len(rows))
    paths = []
    for part in range(3):  # three files, each sorted, their rows interleaved across order blocks
        mine = sorted(rows[i] for i in order[part::3])
        table = pa.table({"file_index": [r[0] for r in mine], "input_row": [r[1] for r in mine],
                          "variant": [0] * len(mine), "source": ["ab"[r[1] % 2] for r in mine]})
        path = tmp_path / f"in-{part}.parquet"
        pq.write_table(table, path, row_group_size=1_000)
        paths.append((str(path), "rows"))
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        metas = (
            pipeline
            | beam.Create(paths)
            | WriteOrderedFiles(str(tmp_path / "out"), "parts", 10_000, _rows,
                                lambda t: t.select(["file_index", "input_row"]), 4_000,
                                lambda t: {"n": t.num_rows}, chunk_rows=3_000)
        )
        assert_that(metas | beam.Map(lambda m: (m["file"], m["rows"], m["tally"])), equal_to([
            ("parts/part-00000.parquet", 10_000, {"n": 10_000}),
            ("parts/part-00001.parquet", 10_000, {"n": 10_000}),
            ("parts/part-00002.parquet", 3_017, {"n": 3_017}),
        ]))
    written = pq.read_table(tmp_path / "out" / "parts")
    assert list(zip(written.column("file_index").to_pylist(), written.column("input_row").to_pylist(),
                    strict=True)) == sorted(rows)
    assert pq.ParquetFile(tmp_path / "out" / "parts" / "part-00000.parquet").metadata.num_row_groups == 3
    whole = pa.table({"file_index": [r[0] for r in sorted(rows)], "input_row": [r[1] for r in sorted(rows)]})
    for number, first in enumerate((0, 10_000, 20_000)):  # each file is what one write of its rows gives
        sink = pa.BufferOutputStream()
        pq.write_table(whole.slice(first, 10_000), sink, row_group_size=4_000, compression="zstd")
        assert (tmp_path / "out" / "parts" / f"part-{number:05d}.parquet").read_bytes() == sink.getvalue().to_pybytes()


def test_a_shard_written_in_key_ranges_is_the_file_one_write_gives(tmp_path, monkeypatch):
    from winnow.pipelines.io.ordered_io import table_bytes
    from winnow.pipelines.io.storage import write_arrow
    from winnow.pipelines.io.write import ROW_COLUMNS, shard_output
    from winnow.pipelines.outputs import mix

    rng = np.random.default_rng(3)
    count = 97
    columns = {name: pa.nulls(count, kind) for name, kind in ROW_COLUMNS}
    columns.update(id=pa.array([f"r{i}" for i in range(count)]), text=pa.array(["a b"] * count),
                   source=pa.array([f"s{i % 3}" for i in range(count)]), input_file=pa.array(["f"] * count),
                   input_row=pa.array(np.arange(count)), epoch=pa.array(np.zeros(count, dtype=np.int64)))
    rows = pa.table(columns).append_column("shuffle", pa.array(rng.integers(0, 2**64 - 1, count, dtype=np.uint64)))
    rows = rows.append_column("tokens", pa.array(np.full(count, 2)))
    paths = []
    for part, indices in enumerate(np.array_split(rng.permutation(count), 4)):
        fragment = rows.take(pa.array(indices)).sort_by("shuffle")
        path = tmp_path / f"fragment-{part}.arrow"
        write_arrow(str(path), fragment, 6)  # batches of 6 rows, as the placement writes them
        paths.append((str(path), fragment.num_rows, fragment.column("shuffle").to_numpy()[::6]))
    monkeypatch.setattr(mix, "SHARD_CHUNK_ROWS", 9)  # 11 key ranges, cut at row groups of 5
    meta = next(mix._WriteShardFn(str(tmp_path / "out"), [], 5).process((2, paths)))
    expected = table_bytes(shard_output(rows.sort_by("shuffle"), []), 5)
    assert (tmp_path / "out" / "shards" / "part-00002.parquet").read_bytes() == expected
    assert meta["rows"] == count and meta["tokens"] == 2 * count
    assert meta["tally"] == {"s0": 33, "s1": 32, "s2": 32}


def test_a_block_a_stage_emptied_passes_no_column_through_to_the_shards(tmp_path):
    """Passed-through columns are those some output record carries: a block with no rows left (pruned or not
    selected) still has its input's columns but adds none of them (a record that has the column, even null,
    does)."""
    from winnow.pipelines.io.blocks import block_table
    from winnow.pipelines.io.write import file_extra_kinds

    core = {name: [] for name in ("file_index", "input_row", "id", "text", "source", "input_file", "text_hash",
                                  "note")}
    empty = block_table(core, pa.table({"md5": pa.array([], pa.string())}))
    pq.write_table(empty, tmp_path / "empty.parquet")
    assert file_extra_kinds(str(tmp_path / "empty.parquet")) == {}
    one = block_table({**{name: [0] for name in ("file_index", "input_row")},
                       **{name: ["x"] for name in ("id", "text", "source", "input_file", "text_hash")},
                       "note": [None]}, pa.table({"md5": pa.array([None], pa.string())}))
    pq.write_table(one, tmp_path / "one.parquet")
    assert file_extra_kinds(str(tmp_path / "one.parquet")) == {"md5": set()}
