"""Errors that say what is wrong: a file a worker cannot open stops the run naming it and the underlying
message (its rows are not 'damaged'), and an object-store output is refused before anything runs."""

from __future__ import annotations

import pytest
from conftest import job_config

from winnow.pipelines.config import build_config
from winnow.pipelines.job import OutputError, plan_job, run_job
from winnow.pipelines.read import InputError, absolute_uri, expand_paths


def test_a_relative_local_path_becomes_absolute_and_a_uri_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("data/*.parquet") == f"{tmp_path}/data/*.parquet"
    assert absolute_uri("s3://bucket/data/*.parquet") == "s3://bucket/data/*.parquet"


def test_no_match_names_the_absolute_pattern(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"^{tmp_path}/missing/\\*.parquet: no input files match$"):
        expand_paths("missing/*.parquet")


def test_an_object_store_output_is_refused_before_anything_runs(sample_slice):
    config = build_config(job_config(sample_slice / "*", "s3://bucket/out"))
    with pytest.raises(OutputError, match="^output.path s3://bucket/out: object-store outputs are not supported"):
        plan_job(config, [])


def test_dataflow_is_refused_before_anything_runs(sample_slice, tmp_path):
    config = build_config(job_config(sample_slice / "*", tmp_path / "out"))
    with pytest.raises(OutputError, match="^--runner=DataflowRunner: not supported yet"):
        plan_job(config, ["--runner=DataflowRunner"])


@pytest.mark.slow
def test_a_file_that_vanishes_after_planning_stops_the_run_naming_it(sample_slice, tmp_path):
    plan = plan_job(build_config(job_config(sample_slice / "*", tmp_path / "out")), [])
    vanished = sample_slice / "b_docs.parquet"
    vanished.unlink()
    with pytest.raises(Exception, match=f"{vanished}: a worker cannot open this input file \\(") as raised:
        run_job(plan)
    assert "No such file or directory" in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_whose_every_record_is_unreadable_fails(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from winnow.pipelines.selfcheck import SelfCheckError

    path = tmp_path / "in" / "damaged.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "text": [f"row {i}" for i in range(6)]}), path,
                   row_group_size=3, compression="none")
    data = bytearray(path.read_bytes())
    for group in range(2):
        offset = pq.ParquetFile(path).metadata.row_group(group).column(1).data_page_offset
        data[offset:offset + 20] = b"\xff" * 20  # each row group's text page header: unreadable
    path.write_bytes(bytes(data))
    config = job_config(path, tmp_path / "out")
    config["input"]["columns"] = {"id": "id", "text": "text"}
    with pytest.raises(SelfCheckError, match="^self-check read: every one of the 6 input records was rejected as "
                                             "unreadable_row_group: the input files cannot be read where the "
                                             "workers run"):
        run_job(plan_job(build_config(config), []))
    assert not (tmp_path / "out").exists()
