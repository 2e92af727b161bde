"""The job end to end on the in-process runner: ledger and shards reconcile with the input; output is atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import job_config, read_output

from winnow.pipelines.config import build_config
from winnow.pipelines.job import OutputError, plan_job, run_job

pytestmark = pytest.mark.slow

BROKEN_LINES = [
    json.dumps({"id": "j-ok", "text": "A fine JSON Lines record.", "source": "jsonl"}),
    json.dumps({"id": "j-null", "text": None, "source": "jsonl"}),
    json.dumps({"id": "j-empty", "text": "   ", "source": "jsonl"}),
    json.dumps({"id": "j-number", "text": 42, "source": "jsonl"}),
    json.dumps({"id": "j-long", "text": "x" * 3000, "source": "jsonl"}),
    "{broken json",
    json.dumps({"id": "j-ok", "text": "Same id as the first line.", "source": "jsonl"}),
    json.dumps({"id": "j-notext", "source": "jsonl"}),
]


def run(config: dict, beam_args: list[str] | None = None) -> dict:
    return run_job(plan_job(build_config(config), beam_args or []))


@pytest.fixture
def mixed_input(sample_slice: Path) -> Path:
    undecodable = b'{"id": "j-bytes", "text": "\xff"}\n'
    (sample_slice / "c_broken.jsonl").write_bytes(("\n".join(BROKEN_LINES) + "\n").encode() + undecodable)
    return sample_slice


def test_ledger_and_shards_reconcile_with_the_input(mixed_input, tmp_path):
    output = tmp_path / "out"
    manifest = run(job_config(mixed_input / "*", output, validate={"max_text_bytes": 2000}))
    result = read_output(output)
    ledger, shards = result["ledger"], result["shards"]

    inputs = 200 + 60 + len(BROKEN_LINES) + 1
    assert ledger.num_rows == inputs == manifest["counts"]["input_records"]
    positions = list(zip(ledger.column("input_file").to_pylist(), ledger.column("input_row").to_pylist(), strict=True))
    assert len(set(positions)) == inputs, "every input record appears exactly once"
    assert positions == sorted(positions, key=lambda p: (Path(p[0]).name, p[1])), "ledger is in input order"

    rejected = {row["input_row"]: (row["id"], row["reason"]) for row in ledger.to_pylist() if row["fate"] == "rejected"}
    assert rejected == {
        1: ("j-null", "null_text"),
        2: ("j-empty", "empty_text"),
        3: ("j-number", "non_string_text"),
        4: ("j-long", "text_too_long"),
        5: ("c_broken.jsonl#5", "invalid_json"),
        6: ("j-ok", "duplicate_id"),
        7: ("j-notext", "missing_text"),
        8: ("c_broken.jsonl#8", "invalid_utf8"),
    }
    assert all(row["detail"] for row in ledger.to_pylist() if row["fate"] == "rejected")

    kept_ids = [row["id"] for row in ledger.to_pylist() if row["fate"] == "kept"]
    assert shards.column("id").to_pylist() == kept_ids, "shards hold the kept records in input order"
    assert len(kept_ids) == inputs - 8 == manifest["counts"]["by_fate"]["kept"]
    assert len(set(kept_ids)) == len(kept_ids)
    assert manifest["counts"]["by_fate"] == {"kept": inputs - 8, "rejected": 8}
    assert [s["rows"] for s in manifest["shards"]] == [100, 100, 61]
    assert {"label", "md5"} <= set(shards.schema.names), "other input columns pass through"
    by_source = manifest["counts"]["by_source"]
    assert by_source["jsonl"] == {"kept": 1, "rejected": 6}
    assert by_source["default"] == {"rejected": 2}
    assert sum(f.get("kept", 0) for f in by_source.values()) == shards.num_rows

    assert manifest["embeddings"] is None and not (output / "embeddings").exists(), "nothing asked for embeddings"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.cache", "input", "out"], "no temporary directories"
    assert sorted(p.name.split("-")[0] for p in (tmp_path / ".out.cache").iterdir()) == ["history.json", "validate"], \
        "no temporary stages"
    for entry in manifest["shards"] + manifest["ledger"]:
        assert pq.read_metadata(output / entry["file"]).num_rows == entry["rows"]


def test_content_hash_ids_when_the_input_has_none(sample_slice, tmp_path):
    config = job_config(sample_slice / "b_docs.parquet", tmp_path / "out")
    config["input"]["columns"] = {"text": "text"}
    manifest = run(config)
    shards = read_output(tmp_path / "out")["shards"]
    from winnow.pipelines.io.records import content_id

    assert shards.column("id").to_pylist() == [content_id(t) for t in shards.column("text").to_pylist()]
    assert set(shards.column("source").to_pylist()) == {"default"}
    assert manifest["counts"]["by_fate"] == {"kept": 60}


def test_failed_run_keeps_the_previous_output_and_leaves_no_partial_one(sample_slice, tmp_path):
    output = tmp_path / "out"
    first = run(job_config(sample_slice / "b_docs.parquet", output))
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README").write_text("no weights here")
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the job
        run(job_config(sample_slice / "b_docs.parquet", output, embed={"enabled": True, "model": str(not_a_model)}))
    assert json.loads((output / "manifest.json").read_text())["config_hash"] == first["config_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.cache", "input", "not-a-model", "out"]
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / ".out.cache").iterdir())
    assert cached == ["history.json", "validate"], "the failed embed stage left no directory in the cache"


def test_refuses_to_replace_a_directory_that_is_not_a_winnow_output(sample_slice, tmp_path):
    output = tmp_path / "precious"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not a winnow output; refusing to replace it"):
        plan_job(build_config(job_config(sample_slice / "*", output)), [])
    assert (output / "thesis.tex").read_text() == "years of work"


def test_default_config_runs_on_the_bundled_sample(tmp_path, monkeypatch):
    from conftest import ROOT

    from winnow.pipelines.config import load_config

    monkeypatch.chdir(ROOT)
    overrides = [f"output.path={tmp_path / 'out'}", "embed.enabled=auto", "prune.enabled=false"]
    config = load_config(ROOT / "configs" / "default.yaml", overrides)
    manifest = run_job(plan_job(config, []))
    assert manifest["counts"]["input_records"] == 1840
    assert sum(manifest["counts"]["by_fate"].values()) == 1840
    assert set(manifest["counts"]["by_fate"]) == {"kept", "not_selected"}
    assert [s["rows"] for s in manifest["shards"]] == [460] * 4
    assert manifest["mix"]["sources"]["sk"]["repeated"] and manifest["embeddings"] is None
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    import re

    assert re.findall(r"<h2 id='([a-z]+)'>", page) == ["funnel", "mix", "timings"]
    assert "1,840 input records: " in page and f"{manifest['mix']['total']:,} records in 4 shards" in page
    for source, entry in manifest["mix"]["sources"].items():
        assert f"<td>{source}</td><td>{entry['size']:,}</td><td>{entry['rows']:,}</td>" in page


def test_duplicate_ids_keep_the_first_in_input_order_within_and_across_blocks_files_and_formats(tmp_path):
    """Duplicate ids meet by hash range; the blocks that hold one are written again without it: within a
    block, across row groups and files, a block of nothing but duplicates, and a JSON Lines record."""
    import pyarrow as pa

    source = tmp_path / "input"
    source.mkdir()
    files = {"a.parquet": (["u1", "d1", "u2", "d1", "d2", "d1"], 3), "b.parquet": (["d2", "d3", "d1", "d3"], 2)}
    for name, (ids, row_group) in files.items():
        texts = [f"text {row} of {name}" for row in range(len(ids))]
        pq.write_table(pa.table({"id": ids, "text": texts, "source": ["s"] * len(ids)}), source / name,
                       row_group_size=row_group)
    (source / "c.jsonl").write_text("".join(json.dumps({"id": i, "text": f"line {i}", "source": "s"}) + "\n"
                                            for i in ("d3", "u3")))
    output = tmp_path / "out"
    manifest = run(job_config(source / "*", output))
    result = read_output(output)
    rows = [(Path(r["input_file"]).name, r["input_row"], r["fate"], r["reason"], r["detail"])
            for r in result["ledger"].to_pylist()]
    assert [row[:3] for row in rows if row[2] == "kept"] == [
        ("a.parquet", 0, "kept"), ("a.parquet", 1, "kept"), ("a.parquet", 2, "kept"), ("a.parquet", 4, "kept"),
        ("b.parquet", 1, "kept"), ("c.jsonl", 1, "kept")]
    assert [row for row in rows if row[2] != "kept"] == [
        ("a.parquet", 3, "rejected", "duplicate_id", "same id as a.parquet#1"),
        ("a.parquet", 5, "rejected", "duplicate_id", "same id as a.parquet#1"),
        ("b.parquet", 0, "rejected", "duplicate_id", "same id as a.parquet#4"),
        ("b.parquet", 2, "rejected", "duplicate_id", "same id as a.parquet#1"),
        ("b.parquet", 3, "rejected", "duplicate_id", "same id as b.parquet#1"),
        ("c.jsonl", 0, "rejected", "duplicate_id", "same id as b.parquet#1"),
    ]
    assert result["shards"].column("id").to_pylist() == ["u1", "d1", "u2", "d2", "d3", "u3"]
    assert result["shards"].column("text").to_pylist()[:2] == ["text 0 of a.parquet", "text 1 of a.parquet"]
    assert manifest["counts"]["by_fate"] == {"kept": 6, "rejected": 6}
    assert manifest["metrics"]["winnow.validate.duplicate_id"] == 6
