"""Input, select targets, output and stage cache on object storage, against a real S3-compatible server: moto's
standalone server (PyPI moto[server], test-only) started by the test on 127.0.0.1. Beam's S3 filesystem lists,
reads and writes them with the options given after `--`, on the driver and in every worker; the output equals
the run over the same files on local disk, `winnow verify s3://...` passes, and a run killed mid-stage resumes
from the stage cache on S3."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import job_config, targets_file

from winnow.pipelines.config import build_config
from winnow.pipelines.io.filesystems import share_filesystem_options
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.outputs.verify import verify

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


def client(url: str):
    return boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                        region_name="us-east-1")


def upload(url: str, bucket: str, files: dict[str, object]) -> None:
    s3 = client(url)
    s3.create_bucket(Bucket=bucket)
    for key, path in files.items():
        s3.upload_file(str(path), bucket, key)


def keys(url: str, bucket: str, prefix: str) -> list[str]:
    pages = client(url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def download_output(url: str, bucket: str, prefix: str, target) -> dict:
    """An object-store output's manifest, and the files it lists (shards, ledger, embeddings) downloaded into
    `target` under their paths without the run's prefix: comparable with a local output."""
    s3 = client(url)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    listed = [*manifest["shards"], *manifest["ledger"], *((manifest.get("embeddings") or {}).get("files", []))]
    for entry in listed:
        local = target / entry["file"].split("/", 1)[1]
        local.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"{prefix}/{entry['file']}", str(local))
    return manifest


@pytest.mark.parametrize("runner", ["in-process", pytest.param("multi_processing", marks=pytest.mark.distributed),
                                    pytest.param("dask", marks=pytest.mark.distributed)])
def test_input_targets_output_and_cache_on_s3_give_the_local_output(runner, s3_server, sample_slice, tmp_path,
                                                                     request):
    """Everything on S3: the output equals the local run's, it is committed by its manifest (the run's files
    under one `run-ID/` prefix, nothing else), it verifies, and a second run reuses every stage from the S3
    cache and replaces the first run's prefix."""
    url, s3_args = s3_server
    bucket = f"corpus-{runner.replace('_', '-')}"
    targets = targets_file(tmp_path)
    upload(url, bucket, {f"in/{p.name}": p for p in sample_slice.glob("*.parquet")} | {"targets.jsonl": targets})
    select = {"enabled": True, "method": "bm25", "count": 40}
    local = job_config(sample_slice / "*", tmp_path / "local", select={**select, "targets": str(targets)},
                       mix={"enabled": True, "shards": 2})
    remote = job_config(f"s3://{bucket}/in/*.parquet", f"s3://{bucket}/out",
                        select={**select, "targets": f"s3://{bucket}/targets.jsonl"},
                        mix={"enabled": True, "shards": 2})
    run_job(plan_job(build_config(local), []))
    extra = {"in-process": [], "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]}
    if runner == "dask":
        extra["dask"] = ["--runner=DaskRunner", f"--dask_client_address={request.getfixturevalue('dask_address')}"]
    args = [*s3_args, *extra[runner]]
    first = run_job(plan_job(build_config(remote), args))
    assert first["select"]["selected"] == 40
    manifest = download_output(url, bucket, "out", tmp_path / "remote")
    same_but_paths(tmp_path / "local", tmp_path / "remote", f"{sample_slice}/", f"s3://{bucket}/in/")
    runs = {key.split("/")[1] for key in keys(url, bucket, "out/") if key != "out/manifest.json"}
    assert len(runs) == 1 and runs.pop().startswith("run-"), "one run's prefix beside the manifest"
    assert all(entry["file"].startswith(manifest["shards"][0]["file"].split("/")[0] + "/")
               for entry in manifest["ledger"])
    share_filesystem_options(s3_args)
    assert verify(f"s3://{bucket}/out") == []

    second = run_job(plan_job(build_config(remote), args))
    assert [entry["reused"] for entry in second["stages"]] == [True] * len(second["stages"])
    assert [s["file"] for s in second["shards"]] != [s["file"] for s in first["shards"]], "a new run prefix"
    runs = {key.split("/")[1] for key in keys(url, bucket, "out/") if key != "out/manifest.json"}
    assert runs == {second["shards"][0]["file"].split("/")[0]}, "the first run's prefix is gone"
    assert {key.split("/")[1].rsplit("-", 1)[0] for key in keys(url, bucket, ".out.cache/")} == \
        {"validate", "select", "history.json"}, "the run's entries and the cache's history"
    assert keys(url, bucket, ".out.lock") == [], "the lock is released"


@pytest.mark.distributed
def test_dedup_with_its_cache_on_s3_gives_the_local_output(s3_server, sample_slice, tmp_path):
    """The dedup stage's fragments, pairs and decisions on an object store (75 s of moto requests: in
    make test-distributed, not make test)."""
    url, s3_args = s3_server
    upload(url, "dedup", {f"in/{p.name}": p for p in sample_slice.glob("*.parquet")})
    dedup = {"enabled": True, "threshold": 0.5}
    run_job(plan_job(build_config(job_config(sample_slice / "*", tmp_path / "local", dedup=dedup)), []))
    remote = run_job(plan_job(build_config(job_config("s3://dedup/in/*.parquet", "s3://dedup/out", dedup=dedup)),
                              s3_args))
    assert remote["dedup"]["removed"] > 0
    download_output(url, "dedup", "out", tmp_path / "remote")
    same_but_paths(tmp_path / "local", tmp_path / "remote", f"{sample_slice}/", "s3://dedup/in/")


@pytest.mark.distributed
@pytest.mark.parametrize(("backend", "precision"), [("onnx", "int8"), ("openvino", "fp32"), ("openvino", "int8"),
                                                     ("static", "fp32")])
def test_embedding_backends_with_the_cache_on_s3_give_the_local_output(backend, precision, s3_server, sample_slice,
                                                                        tmp_path):
    """The exported backends (their exports on local disk, the stage cache and output on S3) embed and prune
    exactly as the local run does."""
    url, s3_args = s3_server
    bucket = f"embed-{backend}"
    upload(url, bucket, {f"in/{p.name}": p for p in sample_slice.glob("*.parquet")})
    sections = {"embed": {"enabled": True, "backend": backend, "precision": precision,
                          "export_dir": str(tmp_path / "exports")},
                "prune": {"enabled": True, "keep_fraction": 0.6}}
    run_job(plan_job(build_config(job_config(sample_slice / "*", tmp_path / "local", **sections)), []))
    remote = run_job(plan_job(build_config(job_config(f"s3://{bucket}/in/*.parquet", f"s3://{bucket}/out",
                                                      **sections)), s3_args))
    assert remote["embeddings"]["backend"] == backend and remote["embeddings"]["precision"] == precision
    download_output(url, bucket, "out", tmp_path / "remote")
    same_but_paths(tmp_path / "local", tmp_path / "remote", f"{sample_slice}/", f"s3://{bucket}/in/")


def test_the_lock_is_a_conditional_create_on_s3_and_on_disk(s3_server, tmp_path):
    from winnow.pipelines.io.storage import create_if_absent

    url, s3_args = s3_server
    upload(url, "locks", {})
    share_filesystem_options(s3_args)
    assert create_if_absent("s3://locks/.out.lock", b"first") is True
    assert create_if_absent("s3://locks/.out.lock", b"second") is False, "a second create fails"
    assert client(url).get_object(Bucket="locks", Key=".out.lock")["Body"].read() == b"first"
    assert create_if_absent(str(tmp_path / ".out.lock"), b"first") is True
    assert create_if_absent(str(tmp_path / ".out.lock"), b"second") is False
    assert (tmp_path / ".out.lock").read_bytes() == b"first"


def test_a_missing_bucket_or_an_endpoint_that_does_not_answer_stops_at_planning(s3_server, sample_slice, tmp_path):
    """One request without retries names the problem at once (Beam's own client retries for minutes)."""
    from winnow.pipelines.io.read import InputError
    from winnow.pipelines.outputs.publish import OutputError

    url, s3_args = s3_server
    missing = build_config(job_config("s3://no-such-bucket/in/*.parquet", tmp_path / "out"))
    with pytest.raises(InputError, match=r"^input.path s3://no-such-bucket/in/\*\.parquet: bucket no-such-bucket "
                                         r"does not exist$"):
        plan_job(missing, s3_args)
    output = build_config(job_config(sample_slice / "*", "s3://no-such-bucket/out"))
    with pytest.raises(OutputError, match=r"^output.path s3://no-such-bucket/out: bucket no-such-bucket does not "
                                          r"exist$"):
        plan_job(output, s3_args)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    elsewhere = [arg if not arg.startswith("--s3_endpoint_url") else f"--s3_endpoint_url=http://127.0.0.1:{closed}"
                 for arg in s3_args]
    started = time.monotonic()
    with pytest.raises(OutputError, match=r"^output.path s3://no-such-bucket/out: cannot reach S3 "
                                          r"\(EndpointConnectionError: .*127\.0\.0\.1:\d+"):
        plan_job(output, elsewhere)
    assert time.monotonic() - started < 60, "no minutes of retries"


def _wait_for(predicate, seconds: float, job: subprocess.Popen) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and job.poll() is None:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.distributed  # 114 s: make test-distributed; tests/test_stage_cache.py kills and resumes on disk
def test_a_run_killed_mid_stage_resumes_from_the_cache_on_s3(s3_server, sample_slice, tmp_path):
    """SIGKILL while the embed stage runs on S3, once it finished a file, then the same command: the lock left
    behind is taken over, validate comes from the S3 cache, embed takes the killed run's finished files (server-side
    copies) and computes the others, prune is computed, the output equals an uninterrupted local
    run's, `winnow verify s3://...` passes, and a shard changed behind the manifest's back is caught."""
    url, s3_args = s3_server
    bucket = "resume"
    upload(url, bucket, {f"in/{p.name}": p for p in sample_slice.glob("*.parquet")})
    sections = {"embed": {"enabled": True}, "prune": {"enabled": True, "keep_fraction": 0.6},
                "mix": {"enabled": True, "shards": 2}}
    config = job_config(f"s3://{bucket}/in/*.parquet", f"s3://{bucket}/out", **sections)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "winnow.pipelines", "run", str(path), "--", *s3_args]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(lambda: any(k.endswith(".meta.json") for k in keys(url, bucket, ".out.cache/.embed-embed-")),
                         300, job), "the embed stage finished a file (kept for a resumed run)"
        assert job.poll() is None, "the job is still embedding when it is killed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert keys(url, bucket, "out/manifest.json") == [], "a killed run publishes nothing"
    assert keys(url, bucket, ".out.lock") == [".out.lock"], "the killed run's lock is left behind"
    assert not [k for k in keys(url, bucket, ".out.cache/embed-") if k.endswith("/stage.json")]

    kept = len([k for k in keys(url, bucket, ".out.cache/.embed-embed-") if k.endswith(".meta.json")])
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "winnow: validate: reused from the cache" in resumed.stdout
    assert "winnow: embed: computed" in resumed.stdout and "winnow: prune: computed" in resumed.stdout
    assert f"(took {kept} files of its embed from an interrupted run)" in resumed.stdout
    assert keys(url, bucket, ".out.cache/.") == [], "the kept files and the killed run's leftovers are gone"
    markers = [k for k in keys(url, bucket, ".out.cache/") if k.endswith("/stage.json")]
    assert sorted(k.split("/")[1].split("-")[0] for k in markers) == ["embed", "prune", "validate"]

    local = job_config(sample_slice / "*", tmp_path / "local", **sections)
    run_job(plan_job(build_config({**local, "output": {**local["output"], "cache": False}}), []))
    download_output(url, bucket, "out", tmp_path / "remote")
    same_but_paths(tmp_path / "local", tmp_path / "remote", f"{sample_slice}/", f"s3://{bucket}/in/")
    for name in sorted(p.name for p in (tmp_path / "local" / "embeddings").glob("*.parquet")):
        assert (tmp_path / "remote" / "embeddings" / name).read_bytes() == \
            (tmp_path / "local" / "embeddings" / name).read_bytes()

    verified = subprocess.run([sys.executable, "-m", "winnow.pipelines", "verify", f"s3://{bucket}/out", "--",
                               *s3_args], capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0, verified.stderr
    reported = subprocess.run([sys.executable, "-m", "winnow.pipelines", "report", f"s3://{bucket}/out", "--",
                               *s3_args], capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr
    manifest = json.loads(client(url).get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    assert reported.stdout.strip() == f"winnow report: s3://{bucket}/out/{manifest['report']}"
    page = client(url).get_object(Bucket=bucket, Key=f"out/{manifest['report']}")["Body"].read().decode()
    assert "id='prune'" in page and "id='mix'" in page
    shard = next(k for k in keys(url, bucket, "out/run-") if "/shards/" in k)
    client(url).put_object(Bucket=bucket, Key=shard, Body=b"not the shard")
    broken = subprocess.run([sys.executable, "-m", "winnow.pipelines", "verify", f"s3://{bucket}/out", "--",
                             *s3_args], capture_output=True, text=True, timeout=300)
    assert broken.returncode == 1
    assert f"winnow verify: {shard.removeprefix('out/')}: content differs from the manifest (SHA-256 or size)" \
        in broken.stderr
