"""Ordered output: dense positions in input order, files cut at exact positions, one schema for all shards."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from winnow.pipelines.ordered_io import AssignPositions, WriteOrderedParquet, block_offsets
from winnow.pipelines.stage_cache import write_records_file
from winnow.pipelines.write import extra_schema, file_extra_kinds, rows_table, shard_output


def test_block_offsets_are_prefix_sums_in_block_order():
    assert block_offsets([((1, 0), 5), ((0, 1), 3), ((0, 0), 10)]) == {(0, 0): 0, (0, 1): 10, (1, 0): 13}
    assert block_offsets([]) == {}


def test_assign_positions_numbers_in_order_across_blocks_and_files():
    elements = [(file, row) for file, rows in ((0, 7), (1, 0), (2, 12)) for row in range(rows)]
    kept = [e for e in elements if (e[1] % 3) != 1]
    expected = list(enumerate(sorted(kept)))
    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        numbered = pipeline | beam.Create(list(reversed(kept))) | AssignPositions(lambda e: e, block_rows=4)
        assert_that(numbered, equal_to(expected))


def test_write_ordered_parquet_cuts_files_at_positions(tmp_path):
    rows = [{"source": "ab"[i % 2], "value": i} for i in range(23)]

    def to_table(chunk):
        return pa.Table.from_pylist(chunk)

    with beam.Pipeline(runner="FnApiRunner") as pipeline:
        metas = (
            pipeline
            | beam.Create(list(enumerate(rows)))
            | WriteOrderedParquet(str(tmp_path), "parts", 10, to_table, row_group_rows=4)
        )
        assert_that(metas | beam.Map(lambda m: (m["file"], m["rows"], m["tally"])), equal_to([
            ("parts/part-00000.parquet", 10, {"a": 5, "b": 5}),
            ("parts/part-00001.parquet", 10, {"a": 5, "b": 5}),
            ("parts/part-00002.parquet", 3, {"a": 2, "b": 1}),
        ]))
    table = pq.read_table(tmp_path / "parts")
    assert table.column("value").to_pylist() == list(range(23))
    assert pq.ParquetFile(tmp_path / "parts" / "part-00000.parquet").metadata.num_row_groups == 3


def test_extra_schema_unifies_kinds():
    schema = extra_schema({"n": {"int64"}, "x": {"int64", "float64"}, "s": {"string"}, "m": {"string", "int64"},
                           "j": {"json"}, "empty": set()})
    assert schema == [("empty", "string"), ("j", "json"), ("m", "json"), ("n", "int64"), ("s", "string"),
                      ("x", "float64")]


def test_shard_table_keeps_one_schema_and_renames_clashing_columns(tmp_path):
    records = [
        {"id": "1", "text": "a", "source": "s", "input_file": "f", "input_row": 0, "file_index": 0,
         "extra": {"label": "x", "score": 1, "meta": {"k": [1, 2]}, "text": "dup"}},
        {"id": "2", "text": "b", "source": "s", "input_file": "f", "input_row": 1, "file_index": 0,
         "extra": {"score": 2.5}},
    ]
    write_records_file(str(tmp_path), "records/part.parquet", records)
    extra = extra_schema(file_extra_kinds(str(tmp_path / "records" / "part.parquet")))
    assert extra == [("label", "string"), ("meta", "json"), ("score", "float64"), ("text", "string")]
    table = shard_output(rows_table(str(tmp_path / "records" / "part.parquet"), extra), extra)
    assert table.schema.names == ["id", "text", "source", "input_file", "input_row", "epoch", "label", "meta",
                                  "score", "input_text"]
    assert table.column("epoch").to_pylist() == [0, 0], "records not repeated by a mix are epoch 0"
    assert table.column("meta").to_pylist() == ['{"k": [1, 2]}', None]
    assert table.column("score").to_pylist() == [1.0, 2.5]
    assert table.column("input_text").to_pylist() == ["dup", None]
