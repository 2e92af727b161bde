"""Input and select targets on object storage, against a real S3-compatible server: moto's standalone server
(PyPI moto[server], test-only) started by the test on 127.0.0.1. Beam's S3 filesystem lists and reads them with
the options given after `--`, on the driver and in every read worker; the output equals the run over the same
files on local disk. (An object-store output is refused: tests/test_io_errors.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import job_config, targets_file

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job

pytestmark = pytest.mark.slow
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_server():
    """(endpoint URL, Beam S3 options) of a moto server on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        yield url, [f"--s3_endpoint_url={url}", "--s3_access_key_id=test", "--s3_secret_access_key=test",
                    "--s3_region_name=us-east-1"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def same_but_paths(local, remote, local_prefix: str, remote_prefix: str) -> None:
    """Shards and ledger equal, row for row, once `input_file` (the file's own URI) is mapped across."""
    for part in ("shards", "ledger"):
        files = sorted(p.name for p in (local / part).glob("*.parquet"))
        assert files == sorted(p.name for p in (remote / part).glob("*.parquet")), part
        for name in files:
            expected = pq.read_table(local / part / name).to_pylist()
            for row in expected:
                row["input_file"] = row["input_file"].replace(local_prefix, remote_prefix)
            assert pq.read_table(remote / part / name).to_pylist() == expected, f"{part}/{name}"


def upload(url: str, bucket: str, files: dict[str, object]) -> None:
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for key, path in files.items():
        client.upload_file(str(path), bucket, key)


@pytest.mark.parametrize("runner", ["in-process", pytest.param("multi_processing", marks=pytest.mark.distributed),
                                    pytest.param("dask", marks=pytest.mark.distributed)])
def test_input_and_targets_on_s3_give_the_local_output(runner, s3_server, sample_slice, tmp_path, request):
    url, s3_args = s3_server
    bucket = f"corpus-{runner.replace('_', '-')}"
    targets = targets_file(tmp_path)
    upload(url, bucket, {f"in/{p.name}": p for p in sample_slice.glob("*.parquet")} | {"targets.jsonl": targets})
    select = {"enabled": True, "method": "bm25", "count": 40}
    local = job_config(sample_slice / "*", tmp_path / "local", select={**select, "targets": str(targets)},
                       mix={"enabled": True, "shards": 2})
    remote = job_config(f"s3://{bucket}/in/*.parquet", tmp_path / "remote",
                        select={**select, "targets": f"s3://{bucket}/targets.jsonl"},
                        mix={"enabled": True, "shards": 2})
    run_job(plan_job(build_config(local), []))
    extra = {"in-process": [], "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]}
    if runner == "dask":
        extra["dask"] = ["--runner=DaskRunner", f"--dask_client_address={request.getfixturevalue('dask_address')}"]
    manifest = run_job(plan_job(build_config(remote), [*s3_args, *extra[runner]]))
    assert manifest["select"]["selected"] == 40
    same_but_paths(tmp_path / "local", tmp_path / "remote", f"{sample_slice}/", f"s3://{bucket}/in/")


def test_a_missing_object_is_named_with_the_underlying_message(s3_server, sample_slice, tmp_path):
    from winnow.pipelines.read import InputError

    _, s3_args = s3_server
    config = build_config(job_config("s3://no-such-bucket/in/*.parquet", tmp_path / "out"))
    with pytest.raises(InputError, match=r"^s3://no-such-bucket/in/\*\.parquet: (no input files match|cannot list "
                                         r"input files \(.+\))$"):
        plan_job(config, s3_args)
