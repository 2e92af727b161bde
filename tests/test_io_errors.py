"""Errors that say what is wrong: a file a worker cannot open stops the run naming it and the underlying
message (its rows are not 'damaged'); outputs that cannot work are refused before anything runs."""

from __future__ import annotations

import re

import pytest
from conftest import job_config

from winnow.pipelines.config import build_config
from winnow.pipelines.io.read import InputError, absolute_uri, expand_paths
from winnow.pipelines.job import OutputError, plan_job, run_job


def test_a_relative_local_path_becomes_absolute_and_a_uri_stays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("data/*.parquet") == f"{tmp_path}/data/*.parquet"
    assert absolute_uri("s3://bucket/data/*.parquet") == "s3://bucket/data/*.parquet"


def test_no_match_names_the_absolute_pattern(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"^{tmp_path}/missing/\\*.parquet: no input files match$"):
        expand_paths("missing/*.parquet")


@pytest.mark.parametrize("root", ["s3://bucket", "s3://bucket/"])
def test_a_bucket_root_output_is_refused_before_anything_runs(sample_slice, root):
    config = build_config(job_config(sample_slice / "*", root))
    with pytest.raises(OutputError, match=f"^output.path {root}: name a folder inside the bucket, not its root"):
        plan_job(config, [])


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize("where", ["input", "output"])
def test_s3_without_credentials_stops_at_planning_naming_the_path(sample_slice, tmp_path, no_aws_credentials, where):
    """Beam's S3 client retries a request without credentials for minutes (a listing took 470 s here); the
    planner says what is missing at once."""
    pytest.importorskip("boto3")
    source, output = (("s3://bucket/in/*.parquet", tmp_path / "out") if where == "input"
                      else (sample_slice / "*", "s3://bucket/out"))
    error = InputError if where == "input" else OutputError
    role = "input.path s3://bucket/in/*.parquet" if where == "input" else "output.path s3://bucket/out"
    with pytest.raises(error, match=f"^{re.escape(role)}: no S3 credentials: give --s3_access_key_id"):
        plan_job(build_config(job_config(source, output)), [])


def test_dataflow_with_a_local_output_is_refused_before_anything_runs(sample_slice, tmp_path):
    config = build_config(job_config(sample_slice / "*", tmp_path / "out"))
    with pytest.raises(OutputError, match=f"^output.path {tmp_path}/out: DataflowRunner's workers cannot write the "
                                          "driver's disk; give an object-store output.path"):
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

    from winnow.pipelines.outputs.selfcheck import SelfCheckError

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


def test_deleting_a_local_tree_removes_every_file_and_folder_and_leaves_its_neighbours(tmp_path):
    from winnow.pipelines.io.storage import delete_tree

    root = tmp_path / "work"
    for index in range(30):
        path = root / f"dir-{index % 3}" / f"sub-{index % 2}" / f"part-{index}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * index)
    (root / "empty").mkdir()
    (root / "link").symlink_to(tmp_path / "kept", target_is_directory=True)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "file").write_text("stays")
    delete_tree(str(root))
    assert not root.exists()
    assert (tmp_path / "kept" / "file").read_text() == "stays", "a link inside is removed, not followed"
    delete_tree(str(root))  # what is already gone is no error
    delete_tree(str(tmp_path / "never"))
