"""The same job on other runners: portable graph, picklable DoFns, multi-processing and a Dask cluster."""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.internal import pickler
from conftest import job_config, read_output

from winnow.pipelines.config import build_config
from winnow.pipelines.job import beam_options, build_output_graph, build_stage_graph, plan_job, run_job

pytestmark = pytest.mark.slow


def run(config: dict, beam_args: list[str]) -> dict:
    return run_job(plan_job(build_config(config), beam_args))


def outputs_equal(first: Path, second: Path) -> None:
    """Shards, ledger and embeddings byte for byte, and the same counts."""
    for part in ("shards", "ledger", "embeddings"):
        files = sorted(p.name for p in (first / part).glob("*.parquet"))
        assert files == sorted(p.name for p in (second / part).glob("*.parquet")), part
        for name in files:
            assert (first / part / name).read_bytes() == (second / part / name).read_bytes(), f"{part}/{name}"
    assert read_output(first)["manifest"]["counts"] == read_output(second)["manifest"]["counts"]


def targets_file(directory: Path) -> Path:
    import json

    import pyarrow.parquet as pq
    from conftest import SAMPLE

    path = directory / "targets.jsonl"
    texts = pq.read_table(SAMPLE / "docs_paragraphs.parquet").column("text").to_pylist()[200:203]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def test_graph_translates_to_the_portable_representation_and_dofns_pickle(sample_slice, tmp_path, tiny_sae):
    select = {"enabled": True, "targets": str(targets_file(tmp_path)), "sae": str(tiny_sae)}
    config = build_config(job_config(sample_slice / "*", tmp_path / "out", embed={"enabled": True},
                                     prune={"enabled": True}, select=select, mix={"enabled": True}))
    plan = plan_job(config, [])
    assert [stage.name for stage in plan.stages] == ["validate", "embed", "prune", "select"]
    pipelines = []
    for stage in plan.stages:
        pipelines.append(beam.Pipeline(options=beam_options([])))
        build_stage_graph(pipelines[-1], stage, ["cached/part-00000-00000.parquet"], str(tmp_path / stage.name))
    pipelines.append(beam.Pipeline(options=beam_options([])))
    build_output_graph(pipelines[-1], plan, ["cached/records.parquet"], ["cached/removed.parquet"])
    names = set()
    for pipeline in pipelines:
        proto = pipeline.to_runner_api()
        names |= {t.unique_name for t in proto.components.transforms.values()}
        assert beam.Pipeline.from_runner_api(proto, pipeline.runner, pipeline._options) is not None
    assert {"Read", "Validate", "Embed", "Prune", "Select", "Mix", "Ledger", "Shards", "CacheRecords"} <= names

    class CollectDoFns(beam.pipeline.PipelineVisitor):
        def __init__(self):
            self.dofns = []

        def visit_transform(self, node):
            if isinstance(node.transform, beam.ParDo):
                self.dofns.append(node.transform.fn)

    visitor = CollectDoFns()
    for pipeline in pipelines:
        pipeline.visit(visitor)
    assert len(visitor.dofns) > 10
    for dofn in visitor.dofns:
        assert pickler.loads(pickler.dumps(dofn)) is not None


def test_default_runner_is_in_process_and_never_the_prism_download():
    assert beam_options([]).get_all_options()["runner"] == "FnApiRunner"
    assert beam_options(["--runner=DaskRunner"]).get_all_options()["runner"].endswith("dask_runner.DaskRunner")


def test_multi_processing_gives_the_same_output(sample_slice, tmp_path):
    select = {"enabled": True, "method": "bm25", "targets": str(targets_file(tmp_path)), "ratio": 0.3}
    config = job_config(sample_slice / "*", tmp_path / "a", embed={"enabled": True, "window": 64}, select=select,
                        prune={"enabled": True, "keep_fraction": 0.8}, mix={"enabled": True, "shards": 2})
    run(config, [])
    config["output"]["path"] = str(tmp_path / "b")
    run(config, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    outputs_equal(tmp_path / "a", tmp_path / "b")


def test_dask_cluster_gives_the_same_output(sample_slice, tmp_path):
    distributed = pytest.importorskip("distributed")
    embed, mix = {"enabled": True, "window": 64}, {"enabled": True, "shards": 3}
    config = job_config(sample_slice / "*", tmp_path / "local", embed=embed, mix=mix)
    run(config, [])
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        config["output"]["path"] = str(tmp_path / "dask")
        manifest = run(config, ["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"])
    assert manifest["runner"].endswith("DaskRunner")
    outputs_equal(tmp_path / "local", tmp_path / "dask")
