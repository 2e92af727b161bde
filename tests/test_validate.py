"""Validation rules and ids, without Beam."""

from __future__ import annotations

from winnow.pipelines.io.records import content_id, position_id
from winnow.pipelines.io.text_checks import check_text
from winnow.pipelines.stages.validate.checks import first_of_duplicates


def test_content_id_is_blake2b_128_of_the_utf8_text():
    assert content_id("hello") == "46fb7408d4f285228f4af516ea25851b"
    assert content_id("héllo") == content_id("héllo") != content_id("hello")
    assert len(content_id("")) == 32


def test_position_id_names_file_and_row():
    assert position_id("gs://bucket/dir/part-1.jsonl", 7) == "part-1.jsonl#7"


def test_usable_text_passes_unchanged():
    assert check_text("  some text ", 100) == ("  some text ", None)
    assert check_text(b"caf\xc3\xa9", 100) == ("café", None)


def test_each_rejection_reason():
    assert check_text(None, 100)[1][0] == "null_text"
    assert check_text(5, 100)[1] == ("non_string_text", "text is a int")
    assert check_text(["a"], 100)[1] == ("non_string_text", "text is a list")
    assert check_text(" \n\t", 100)[1][0] == "empty_text"
    assert check_text("", 100)[1][0] == "empty_text"
    assert check_text(b"\xff\xfe", 100)[1] == ("invalid_utf8", "undecodable byte at offset 0")
    assert check_text("a\ud800b", 100)[1] == ("invalid_utf8", "unpaired surrogate at character 1")
    assert check_text("é" * 51, 100)[1] == ("text_too_long", "102 bytes > validate.max_text_bytes=100")
    assert check_text("é" * 50, 100)[1] is None


def _record(file_index, row, name="f.parquet"):
    return {"id": "x", "source": "s", "input_file": name, "input_row": row, "file_index": file_index}


def test_first_of_duplicates_keeps_the_first_in_input_order():
    later, first, middle = _record(1, 0, "b.parquet"), _record(0, 5, "a.parquet"), _record(0, 9, "a.parquet")
    kept, rejected = first_of_duplicates([later, first, middle])
    assert kept is first
    assert [(r["input_file"], r["input_row"]) for r in rejected] == [("a.parquet", 9), ("b.parquet", 0)]
    assert {r["reason"] for r in rejected} == {"duplicate_id"}
    assert {r["detail"] for r in rejected} == {"same id as a.parquet#5"}
    assert {r["fate"] for r in rejected} == {"rejected"}


def test_strip_removes_ansi_escape_sequences_and_other_controls():
    from winnow.pipelines.io.text_checks import strip_controls

    coloured = "\x1b[1;31m错误\x1b[0m: 文件 \x1b]0;title\x07未找到\x1b(B\x07"
    assert strip_controls(coloured) == ("错误: 文件 未找到", 4, 1)
    assert strip_controls("tab\tnew\nline\r\n\v\f") == ("tab\tnew\nline\r\n\v\f", 0, 0), "whitespace is text"
    assert strip_controls("a\x00b\x7fc\x1b") == ("abc", 0, 3), "a lone ESC is a control character"
