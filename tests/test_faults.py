"""Bad input end to end: a corpus with injected faults runs through validate, embed, prune and mix; every input
row gets exactly one ledger row with the expected reason, the counts reconcile and `winnow verify` passes. What
makes a run impossible (a truncated or empty Parquet file, a wrongly typed or missing column, no input) stops it
before it starts with one line naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, job_config

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.outputs.verify import verify

pytestmark = pytest.mark.slow

FIVE_MB = "x" * 5_000_000


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A Parquet string column holding bytes that are not UTF-8 (pyarrow would refuse to build it)."""
    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


def fault_corpus(directory: Path) -> dict[tuple[str, int], tuple[str, str | None]]:
    """Writes the corpus; returns {(file, row): (ledger id, expected rejection reason or None for kept)}; rows
    too broken to have an id are known by FILE#ROW, rejected duplicates by the id they repeat."""
    directory.mkdir()
    texts = pq.read_table(SAMPLE / "docs_paragraphs.parquet").column("text").to_pylist()[:20]
    expected: dict[tuple[str, int], tuple[str, str | None]] = {}
    rows = [{"id": f"d{i}", "text": text} for i, text in enumerate(texts)]
    faults = [
        ({"id": "null", "text": None}, "null_text"),
        ({"id": "empty", "text": ""}, "empty_text"),
        ({"id": "blank", "text": "  \n\t "}, "empty_text"),
        ({"id": "nul", "text": "abc\x00def"}, "control_characters"),
        ({"id": "ansi", "text": "colour \x1b[31mred\x1b[0m"}, "control_characters"),
        ({"id": "huge", "text": FIVE_MB}, "text_too_long"),
        ({"id": "d3", "text": "another text under an id already used"}, "duplicate_id"),
        ({"id": None, "text": "a text without an id"}, "missing_id"),
        ({"id": "formfeed", "text": "page one\fpage two, with a form feed that is kept"}, None),
    ]
    rows += [row for row, _ in faults]
    pq.write_table(pa.Table.from_pylist(rows), directory / "a_mixed.parquet", row_group_size=8)
    for index, row in enumerate(rows[:20]):
        expected[("a_mixed.parquet", index)] = (row["id"], None)
    for index, (row, reason) in enumerate(faults, start=20):
        expected[("a_mixed.parquet", index)] = (row["id"] or f"a_mixed.parquet#{index}", reason)

    pq.write_table(pa.table({"id": ["b0", "b1"], "text": [b"bytes that are UTF-8", b"caf\xe9 latin-1"]}),
                   directory / "b_binary.parquet")
    expected.update({("b_binary.parquet", 0): ("b0", None), ("b_binary.parquet", 1): ("b1", "invalid_utf8")})

    table = pa.table({"id": ["c0", "c1"], "text": invalid_utf8_strings([b"a good row", b"bad \xff byte"])})
    pq.write_table(table, directory / "c_bad_strings.parquet")
    expected.update({("c_bad_strings.parquet", 0): ("c0", None),
                     ("c_bad_strings.parquet", 1): ("c_bad_strings.parquet#1", "invalid_utf8")})

    lines = [
        json.dumps({"id": "j0", "text": "a fine JSON line"}).encode(),
        b'{"id": "j1", "text": "caf\xe9"}',
        b'{"id": "j2", "text": ',
        b"[1, 2]",
        json.dumps({"id": "j4", "text": 42}).encode(),
        json.dumps({"id": "j5", "text": ["a", "list"]}).encode(),
        json.dumps({"id": "j6"}).encode(),
        json.dumps({"id": 1.5, "text": "a float id"}).encode(),
        b'{"id": "j8", "text": "\\ud800 lone surrogate"}',
        json.dumps({"id": "j9", "text": "bell \u0007"}).encode(),
        b"",
        b'{"id": "j11", "text": "cut off mid-wri',
    ]
    (directory / "d_faults.jsonl").write_bytes(b"\n".join(lines))
    reasons = [None, "invalid_utf8", "invalid_json", "not_an_object", "non_string_text", "non_string_text",
               "missing_text", "invalid_id", "invalid_utf8", "control_characters", "skip", "invalid_json"]
    for row, reason in enumerate(reasons):
        if reason != "skip":
            named = reason in (None, "non_string_text", "missing_text", "invalid_utf8", "control_characters")
            record_id = f"j{row}" if named and row != 1 else f"d_faults.jsonl#{row}"
            expected[("d_faults.jsonl", row)] = (record_id, reason)

    (directory / "e_empty.jsonl").write_bytes(b"")

    damaged = pa.table({"id": [f"f{i}" for i in range(10)], "text": [f"row {i} of a damaged file" for i in range(10)]})
    pq.write_table(damaged, directory / "f_damaged.parquet", row_group_size=5, compression="none")
    data = bytearray((directory / "f_damaged.parquet").read_bytes())
    offset = pq.ParquetFile(directory / "f_damaged.parquet").metadata.row_group(0).column(1).data_page_offset
    data[offset:offset + 40] = b"\xff" * 40  # the first row group's text page header: unreadable
    (directory / "f_damaged.parquet").write_bytes(bytes(data))
    for row in range(10):
        expected[("f_damaged.parquet", row)] = \
            (f"f_damaged.parquet#{row}", "unreadable_row_group") if row < 5 else (f"f{row}", None)
    return expected


def test_a_corpus_with_injected_faults_runs_and_every_row_is_accounted_for(tmp_path):
    expected = fault_corpus(tmp_path / "faults")
    output = tmp_path / "out"
    config = job_config(tmp_path / "faults" / "*", output, embed={"enabled": True},
                        prune={"enabled": True, "keep_fraction": 1.0}, mix={"enabled": True, "shards": 2})
    config["input"]["columns"] = {"id": "id", "text": "text"}
    manifest = run_job(plan_job(build_config(config), []))

    ledger = pq.read_table(output / "ledger").to_pylist()
    got = {(Path(row["input_file"]).name, row["input_row"]): row for row in ledger}
    assert len(got) == len(ledger) == len(expected) == 54
    for key, (record_id, reason) in expected.items():
        row = got[key]
        assert row["id"] == record_id, key
        if reason is None:
            assert row["fate"] != "rejected", key
        else:
            assert (row["fate"], row["stage"], row["reason"]) == ("rejected", "validate", reason), key
            assert row["detail"], key
    counts = manifest["counts"]
    assert counts["input_records"] == 54
    assert sum(counts["by_fate"].values()) == counts["input_records"], "input = kept + every other fate"
    rejected = Counter(reason for _, reason in expected.values() if reason)
    assert {r["reason"]: r["rows"] for r in counts["by_stage_reason"] if r["fate"] == "rejected"} == rejected
    assert counts["by_fate"]["rejected"] == 25 and counts["by_fate"]["kept"] == 29
    shards = pq.read_table(output / "shards")
    assert shards.num_rows == sum(row["copies"] for row in ledger) == counts["by_fate"].get("kept", 0)
    assert verify(output) == []


def _impossible(tmp_path: Path, name: str, write, columns: dict | None = None) -> str:
    directory = tmp_path / name
    directory.mkdir()
    write(directory)
    config = job_config(directory / "*", tmp_path / f"out-{name}")
    if columns:
        config["input"]["columns"] = columns
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "winnow.pipelines", "run", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("winnow: error: "), result.stderr
    assert not (tmp_path / f"out-{name}").exists()
    return lines[0]


def _good(directory: Path) -> None:
    pq.write_table(pa.table({"id": ["g0"], "text": ["fine"], "source": ["s"]}), directory / "a_good.parquet")


def _truncated(directory: Path) -> None:
    _good(directory)
    pq.write_table(pa.table({"id": ["t0", "t1"], "text": ["one", "two"], "source": ["s", "s"]}),
                   directory / "b_cut.parquet")
    data = (directory / "b_cut.parquet").read_bytes()
    (directory / "b_cut.parquet").write_bytes(data[: len(data) // 2])


def _empty_parquet(directory: Path) -> None:
    _good(directory)
    (directory / "b_empty.parquet").write_bytes(b"")


def _wrong_text_type(directory: Path) -> None:
    pq.write_table(pa.table({"id": ["w0"], "text": [17], "source": ["s"]}), directory / "w.parquet")


def _wrong_id_type(directory: Path) -> None:
    pq.write_table(pa.table({"id": [1.5], "text": ["x"], "source": ["s"]}), directory / "w.parquet")


def _missing_column(directory: Path) -> None:
    pq.write_table(pa.table({"id": ["m0"], "body": ["x"], "source": ["s"]}), directory / "m.parquet")


def _missing_in_jsonl(directory: Path) -> None:
    (directory / "m.jsonl").write_text(json.dumps({"id": "m0", "body": "x", "source": "s"}) + "\n")


@pytest.mark.parametrize(("name", "write", "says"), [
    ("truncated", _truncated, "b_cut.parquet: not a readable Parquet file"),
    ("empty_parquet", _empty_parquet, "b_empty.parquet: not a readable Parquet file"),
    ("wrong_text_type", _wrong_text_type, "w.parquet: column 'text' (input.columns.text) is int64, not a text"),
    ("wrong_id_type", _wrong_id_type, "w.parquet: column 'id' (input.columns.id) is double, not a text"),
    ("missing_column", _missing_column, "m.parquet: missing column 'text'"),
    ("missing_in_jsonl", _missing_in_jsonl, "m.jsonl: missing column 'text' in the first record"),
    ("no_files", lambda directory: None, "no input files match"),
])
def test_what_makes_a_run_impossible_stops_it_with_one_line(tmp_path, name, write, says):
    assert says in _impossible(tmp_path, name, write)


def test_a_corpus_where_every_record_is_rejected_still_gives_a_verified_output(tmp_path, quick_embed):
    """No record reaches embed, prune, select or mix: the run finishes with no shards, every row in the ledger,
    and each stage's section saying that no record reached it."""
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
        {"id": "a", "text": ""}, {"id": "b", "text": None}, {"id": "c", "text": "\u0000"})))
    (tmp_path / "targets.jsonl").write_text(json.dumps({"text": "a target"}) + "\n")
    select = {"enabled": True, "method": "bm25", "targets": str(tmp_path / "targets.jsonl"), "count": 1}
    config = job_config(tmp_path / "in.jsonl", tmp_path / "out", embed=quick_embed,
                        prune={"enabled": True}, select=select, mix={"enabled": True})
    config["input"]["columns"] = {"id": "id", "text": "text"}
    manifest = run_job(plan_job(build_config(config), []))
    assert manifest["counts"]["by_fate"] == {"rejected": 3}
    assert manifest["shards"] == [] and manifest["prune"]["records"] == 0
    assert manifest["select"]["pool"] == 0 and manifest["select"]["selected"] == 0
    assert verify(tmp_path / "out") == []
    assert "no record reached this stage" in (tmp_path / "out" / "report" / "index.html").read_text()


def test_strip_keeps_records_with_ansi_escapes_and_says_what_changed(tmp_path):
    """Issue 16: Chinese records carrying ANSI colour escapes were all rejected; `strip` keeps them without the
    escapes, each kept row's detail says what went, and the manifest and report count them per source."""
    directory = tmp_path / "input"
    directory.mkdir()
    texts = ["\x1b[32m安装\x1b[0m 软件包", "plain text", "\x1b[0m\x07", "bell\x07 only"]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": texts, "source": ["zh", "en", "zh", "en"]}),
                   directory / "x.parquet")
    config = job_config(directory / "*", tmp_path / "out", validate={"control_characters": "strip"})
    manifest = run_job(plan_job(build_config(config), []))
    ledger = {row["id"]: row for row in pq.read_table(tmp_path / "out" / "ledger").to_pylist()}
    shards = {row["id"]: row["text"] for row in pq.read_table(tmp_path / "out" / "shards").to_pylist()}
    assert shards == {"a": "安装 软件包", "b": "plain text", "d": "bell only"}
    assert ledger["a"]["detail"] == "control characters stripped: 2 escape sequences, 0 other"
    assert ledger["d"]["detail"] == "control characters stripped: 0 escape sequences, 1 other"
    assert ledger["b"]["detail"] is None
    assert (ledger["c"]["fate"], ledger["c"]["reason"]) == ("rejected", "empty_text")
    assert manifest["validate"] == {"control_characters": "strip", "changed_by_source": {"en": 1, "zh": 2}}
    assert "records changed" in (tmp_path / "out" / "report" / "index.html").read_text()
    assert verify(tmp_path / "out") == []
