"""`winnow verify OUT` passes a fresh output and names what is wrong in a damaged one."""

from __future__ import annotations

import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import job_config

from winnow.pipelines.cli import main as cli_main
from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.outputs.verify import verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from conftest import SAMPLE

    root = tmp_path_factory.mktemp("verify")
    (root / "input").mkdir()
    pq.write_table(pq.read_table(SAMPLE / "docs_paragraphs.parquet").slice(0, 90), root / "input" / "a.parquet")
    pq.write_table(pq.read_table(SAMPLE / "docs_paragraphs.parquet").slice(0, 10), root / "input" / "b.parquet")
    config = job_config(root / "input" / "*", root / "out", mix={"enabled": True, "shards": 3})
    config["output"]["shard_rows"] = 40
    run_job(plan_job(build_config(config), []))
    return root / "out"


@pytest.fixture
def copy(finished, tmp_path):
    target = tmp_path / "out"
    shutil.copytree(finished, target)
    return target


def test_a_fresh_output_verifies(finished, capsys):
    assert verify(finished) == []
    assert cli_main(["verify", str(finished)]) == 0
    assert "counts reconcile" in capsys.readouterr().out


def test_a_deleted_shard_is_named(copy, capsys):
    (copy / "shards" / "part-00001.parquet").unlink()
    problems = verify(copy)
    assert problems == ["shards/part-00001.parquet: listed in the manifest (shards) but missing"]
    assert cli_main(["verify", str(copy)]) == 1
    assert "part-00001.parquet: listed in the manifest" in capsys.readouterr().err


def test_a_modified_shard_is_named(copy):
    path = copy / "shards" / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(1), path)
    assert verify(copy) == ["shards/part-00000.parquet: content differs from the manifest (SHA-256 or size)"]


def test_a_ledger_missing_an_id_fails_the_reconciliation(copy):
    path = copy / "ledger" / "part-00000.parquet"
    table = pq.read_table(path)
    copies = table.column("copies").to_pylist()
    drop = copies.index(max(copies))  # a record that is in the shards
    pq.write_table(pa.concat_tables([table.slice(0, drop), table.slice(drop + 1)]), path)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["ledger"][0]  # re-sign the damaged file, so only the reconciliation can catch it
    entry.update(rows=table.num_rows - 1, bytes=path.stat().st_size,
                 sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(copy)
    assert any(p.startswith(f"ledger: {table.num_rows - 1} input records, the manifest counts 100") for p in problems)
    assert any(p.startswith("ledger: records") and "copies in the shards" in p for p in problems)


def test_a_directory_without_a_manifest_is_not_an_output(tmp_path):
    assert verify(tmp_path) == [f"{tmp_path}: no manifest.json (not a finished winnow output)"]
