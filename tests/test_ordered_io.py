"""Output tables: one schema for all shards, passed-through columns of every kind."""

from __future__ import annotations

from winnow.pipelines.io.cache_files import write_records_file
from winnow.pipelines.io.extra_kinds import extra_schema
from winnow.pipelines.io.write import file_extra_kinds, rows_table, shard_output


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


def test_record_files_note_the_kinds_of_their_passed_through_columns(tmp_path):
    """The output's schema is merged from the kinds each writer notes (no pass reads the files again): they
    equal the kinds read back from the file, for pickled records and for a typed block."""
    import pyarrow as pa

    from winnow.pipelines.io.blocks import write_block
    from winnow.pipelines.io.extra_kinds import merge_kinds

    records = [{"id": "1", "text": "a", "source": "s", "input_file": "f", "input_row": 0, "file_index": 0,
                "extra": {"score": 1, "meta": {"k": 1}}},
               {"id": "2", "text": "b", "source": "s", "input_file": "f", "input_row": 1, "file_index": 0,
                "extra": {"score": None, "tag": "x"}}]
    pickled = write_records_file(str(tmp_path), "records/pickled.parquet", records)
    block = pa.table({"file_index": [1, 1], "input_row": [0, 1], "id": ["3", "4"], "text": ["c", "d"],
                      "extra:score": [0.5, None], "extra:tag": pa.array([None, None], pa.string()),
                      "extra:nested": [[1], None]})
    typed = write_block(str(tmp_path), "records/block.parquet", block)
    empty = write_block(str(tmp_path), "records/empty.parquet", block.slice(0, 0))
    assert pickled["extra_kinds"] == {"meta": ["json"], "score": ["int64"], "tag": ["string"]}
    assert typed["extra_kinds"] == {"nested": ["json"], "score": ["float64"], "tag": []}
    assert empty["extra_kinds"] == {}
    for meta in (pickled, typed, empty):
        read_back = file_extra_kinds(str(tmp_path / meta["file"]))
        assert {column: sorted(kinds) for column, kinds in read_back.items()} == meta["extra_kinds"]
    assert extra_schema(merge_kinds(meta["extra_kinds"] for meta in (pickled, typed, empty))) == [
        ("meta", "json"), ("nested", "json"), ("score", "float64"), ("tag", "string")]


class _Labelled:
    """A writer that yields (its label, the task)."""

    def __init__(self, label: str):
        self.label = label

    def process(self, task):
        yield self.label, task


def test_output_tasks_of_every_kind_reach_their_own_writer_in_one_graph_step():
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from winnow.pipelines.io.ordered_io import WriteTasks

    with beam.Pipeline() as pipeline:
        tasks = {"shards": pipeline | "Shards" >> beam.Create([1, 2, 3]),
                 "ledger": pipeline | "Ledger" >> beam.Create(["a"])}
        written = tasks | WriteTasks({"shards": _Labelled("S"), "ledger": _Labelled("L")})
        assert_that(written, equal_to([("S", 1), ("S", 2), ("S", 3), ("L", "a")]))


def test_a_sorted_source_gives_the_rows_of_its_blocks_and_so_does_one_out_of_order(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from winnow.pipelines.io.ordered_io import ORDER_BLOCK_ROWS, SortedSource

    rows = np.arange(0, 6 * ORDER_BLOCK_ROWS, 997)
    table = pa.table({"file_index": np.zeros(len(rows), dtype=np.int64), "input_row": rows, "value": rows * 2})
    shuffled = table.take(pa.array(np.random.default_rng(1).permutation(len(rows))))
    for name, source in (("sorted", table), ("shuffled", shuffled)):
        pq.write_table(source, tmp_path / f"{name}.parquet", row_group_size=7)
        found = SortedSource(str(tmp_path / f"{name}.parquet")).rows(np.array([1, 2, 3]))
        wanted = sorted(int(r) for r in rows if 1 <= r // ORDER_BLOCK_ROWS <= 3)
        assert sorted(found.column("input_row").to_pylist()) == wanted, name
        assert found.column("value").to_pylist() == [2 * r for r in found.column("input_row").to_pylist()]
