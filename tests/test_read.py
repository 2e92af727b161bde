"""Read stage: planning errors name the file; JSON Lines and Parquet rows become records, broken ones too."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow.pipelines.config import InputConfig
from winnow.pipelines.io.read import InputError, jsonl_records, plan_reads


def config(path, **columns) -> InputConfig:
    return InputConfig(path=str(path), columns=columns or {"id": "id", "text": "text", "source": "source"})


def test_no_matching_files(tmp_path):
    with pytest.raises(InputError, match=r"no input files match"):
        plan_reads(config(tmp_path / "*.parquet"))


def test_missing_column_names_the_file_and_column(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "one.parquet")
    with pytest.raises(InputError, match=r"one\.parquet: missing column 'text' \(has: id, body\)"):
        plan_reads(config(tmp_path / "*.parquet"))


def test_truncated_and_empty_parquet_files_are_unreadable(tmp_path):
    pq.write_table(pa.table({"id": ["a"] * 100, "text": ["x"] * 100, "source": ["s"] * 100}), tmp_path / "ok.parquet")
    payload = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(InputError, match=r"cut\.parquet: not a readable Parquet file"):
        plan_reads(config(tmp_path / "cut.parquet"))
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.parquet: not a readable Parquet file"):
        plan_reads(config(tmp_path / "empty.parquet"))


def test_unknown_extension_asks_for_a_format(tmp_path):
    (tmp_path / "data.txt").write_text("{}\n")
    with pytest.raises(InputError, match=r"data\.txt: cannot tell the format"):
        plan_reads(config(tmp_path / "data.txt"))


def test_parquet_tasks_follow_row_groups(tmp_path):
    table = pa.table({"id": [str(i) for i in range(10)], "text": ["t"] * 10, "source": ["s"] * 10})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    paths, tasks = plan_reads(config(tmp_path / "*.parquet"))
    assert [(t.row_group, t.first_row) for t in tasks] == [(0, 0), (1, 4), (2, 8)]
    assert paths == [str(tmp_path / "a.parquet")]


def test_jsonl_broken_lines_become_records_with_problems(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "fine", "source": "web", "lang": "en"}).encode(),
        b"",
        b"{not json",
        json.dumps([1, 2]).encode(),
        b'{"id": "b", "text": "caf\xff", "source": "web"}',
        json.dumps({"id": "c", "source": "web"}).encode(),
        json.dumps({"id": None, "text": "no id", "source": "web"}).encode(),
        json.dumps({"id": "d", "text": "fine too"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    input_config = InputConfig(path=str(path), columns={"id": "id", "text": "text", "source": "source"})
    _, tasks = plan_reads(input_config)
    expected = [
        (0, "a", "fine", "web", None, {"lang": "en"}),
        (2, None, None, "default", ("invalid_json", "Expecting property name enclosed in double quotes"), {}),
        (3, None, None, "default", ("not_an_object", "a JSON list"), {}),
        (4, None, None, "default", ("invalid_utf8", "byte 24 of the line"), {}),
        (5, "c", None, "web", ("missing_text", "no 'text' field"), {}),
        (6, None, None, "web", ("missing_id", "column 'id' is null or empty"), {}),
        (7, "d", "fine too", "default", None, {}),
    ]
    records = [record for task in tasks for record in jsonl_records(task, input_config)]
    assert [(r["input_row"], r["id"], r["text"], r["source"], r["problem"], r["extra"]) for r in records] == expected
