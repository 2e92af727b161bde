"""The command line contract: exit codes, one-line errors, --set and arguments after -- for Beam."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, job_config

from winnow.pipelines.cli import main, split_beam_args


def write_config(tmp_path, config) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_split_beam_args_at_the_first_double_dash():
    argv = ["run", "c.yaml", "--", "--runner=X", "--", "y"]
    assert split_beam_args(argv) == (["run", "c.yaml"], ["--runner=X", "--", "y"])
    assert split_beam_args(["run", "c.yaml"]) == (["run", "c.yaml"], [])


def test_bad_config_key_exits_2_with_one_line(tmp_path, capsys):
    config = job_config(tmp_path / "*.parquet", tmp_path / "out")
    config["output"]["shardrows"] = 5
    assert main(["run", write_config(tmp_path, config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "winnow: error: output.shardrows: unknown key"


def test_missing_input_exits_2_naming_the_path(tmp_path, capsys):
    config = job_config(tmp_path / "nothing" / "*.parquet", tmp_path / "out")
    assert main(["run", write_config(tmp_path, config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("winnow: error: ") and "nothing/*.parquet: no input files match" in err
    assert len(err.splitlines()) == 1


def test_missing_column_exits_2_naming_the_file(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["1"], "body": ["x"]}), tmp_path / "in.parquet")
    config = job_config(tmp_path / "in.parquet", tmp_path / "out")
    assert main(["run", write_config(tmp_path, config)]) == 2
    assert "in.parquet: missing column 'text'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_with_set_and_beam_options_in_a_subprocess(sample_slice, tmp_path):
    config = job_config(sample_slice / "b_docs.parquet", tmp_path / "ignored")
    result = subprocess.run(
        [sys.executable, "-m", "winnow.pipelines", "run", write_config(tmp_path, config),
         "--set", f"output.path={tmp_path / 'out'}", "--set", "output.shard_rows=25",
         "--", "--runner=FnApiRunner"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "60 records -> 60 kept; 3 shard(s)" in result.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["output"]["shard_rows"] == 25
    assert manifest["beam_args"] == ["--runner=FnApiRunner"]
    assert not (tmp_path / "ignored").exists()
