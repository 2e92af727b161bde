"""The default runner, and the same job on multi-processing workers (Dask and the portable runner:
test_distributed.py)."""

from __future__ import annotations

import os

import pytest
from apache_beam.options.pipeline_options import DirectOptions
from conftest import job_config, outputs_equal, targets_file

from winnow.pipelines.config import build_config
from winnow.pipelines.job import beam_options, plan_job, run_job

pytestmark = pytest.mark.slow


def run(config: dict, beam_args: list[str]) -> dict:
    return run_job(plan_job(build_config(config), beam_args))


def test_default_runner_is_in_process_and_never_the_prism_download():
    assert beam_options([]).get_all_options()["runner"] == "FnApiRunner"
    assert beam_options(["--runner=DaskRunner"]).get_all_options()["runner"].endswith("dask_runner.DaskRunner")


def test_in_process_runner_has_a_thread_per_core_unless_told_otherwise():
    direct = beam_options([]).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("in_memory", os.cpu_count())
    direct = beam_options(["--direct_num_workers=1"]).view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("in_memory", 1)
    direct = beam_options(["--direct_running_mode", "multi_processing"]).view_as(DirectOptions)
    assert direct.direct_running_mode == "multi_processing" and direct.direct_num_workers == 1
    dask = beam_options(["--runner=DaskRunner"]).get_all_options()
    assert dask["direct_running_mode"] == "in_memory" and dask["direct_num_workers"] == 1


def test_one_thread_and_a_thread_per_core_give_the_same_output(sample_slice, tmp_path):
    config = job_config(sample_slice / "*", tmp_path / "a", mix={"enabled": True, "shards": 3})
    run(config, ["--direct_num_workers=1"])
    config["output"]["path"] = str(tmp_path / "b")
    run(config, [])
    outputs_equal(tmp_path / "a", tmp_path / "b")


@pytest.mark.distributed  # 73 s: make test-distributed; the in-process thread modes are compared above
def test_multi_processing_gives_the_same_output(sample_slice, tmp_path):
    select = {"enabled": True, "method": "bm25", "targets": str(targets_file(tmp_path)), "ratio": 0.3}
    config = job_config(sample_slice / "*", tmp_path / "a", embed={"enabled": True, "window": 64}, select=select,
                        prune={"enabled": True, "keep_fraction": 0.8}, mix={"enabled": True, "shards": 2})
    run(config, [])
    config["output"]["path"] = str(tmp_path / "b")
    run(config, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    outputs_equal(tmp_path / "a", tmp_path / "b")
