"""Every stage on a real Dask cluster (a `dask scheduler` and two `dask worker` processes started by the test on
127.0.0.1, each worker in its own working directory) and on Beam's portable runner (LOOPBACK) gives the
in-process FnApiRunner's output byte for byte: shards, ledger, embeddings and the manifest's stage summaries.

The fast slice (in `make test`) runs one job that crosses every stage that once needed a global value (prune's
fit and quotas, select's BM25 statistics and exact threshold, the shards' column schema) on both runners; the
whole matrix (`make test-distributed`) runs each stage alone: embed, prune (dbp, semdedup, recluster), select
(mona with a tiny SAE, embedding, bm25, random), rephrase (a tiny greedy generation), mix and dedup (its
components on the driver and in large-star/small-star rounds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAE_LAYER, job_config, outputs_equal, targets_file

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job

pytestmark = pytest.mark.slow

EMBED = {"enabled": True, "window": 64}
MIX = {"enabled": True, "shards": 3}
PORTABLE = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]


def runner_args(runner: str, address: str | None) -> list[str]:
    return ["--runner=DaskRunner", f"--dask_client_address={address}"] if runner == "dask" else PORTABLE


def run(config: dict, beam_args: list[str]) -> dict:
    return run_job(plan_job(build_config(config), beam_args))


def same_as_in_process(input_path, tmp_path: Path, beam_args: list[str], **sections) -> dict:
    """Run the job in-process and on the runner; assert equal outputs; the runner's manifest."""
    local = job_config(input_path, tmp_path / "local", **sections)
    expected = run(local, [])
    other = job_config(input_path, tmp_path / "other", **sections)
    manifest = run(other, beam_args)
    outputs_equal(tmp_path / "local", tmp_path / "other")
    for section in ("prune", "select", "rephrase", "mix", "dedup"):
        if section in expected:
            assert _comparable(manifest[section]) == _comparable(expected[section]), section
    return manifest


def _comparable(section: dict) -> dict:
    """A stage summary without what differs between runners by design (reuse flags, torch threads: 0 on Dask,
    where each worker sizes itself)."""
    kept = {k: v for k, v in section.items() if k not in ("stage_reused", "torch_threads")}
    return json.loads(json.dumps(kept, default=str))


def combined(tmp_path: Path, embed: dict) -> dict:
    select = {"enabled": True, "method": "bm25", "targets": str(targets_file(tmp_path)), "ratio": 0.3}
    return {"embed": {**EMBED, **embed}, "prune": {"enabled": True, "keep_fraction": 0.8}, "select": select, "mix": MIX}


# Dask runs in make test-distributed; the portable runner keeps the check in make test (the quick embedding
# model: what is checked is the runners' global values, not the vectors' quality)
@pytest.mark.parametrize("runner", [pytest.param("dask", marks=pytest.mark.distributed), "portable"])
def test_every_global_value_is_right_on_another_runner(runner, request, sample_slice, tmp_path, quick_embed):
    address = request.getfixturevalue("dask_address") if runner == "dask" else None
    sections = combined(tmp_path, quick_embed)
    manifest = same_as_in_process(sample_slice / "*", tmp_path, runner_args(runner, address), **sections)
    if runner == "dask":
        assert manifest["metrics_unavailable"].startswith("Beam 2.77's DaskRunner")


def test_relative_input_path_is_made_absolute_for_workers_elsewhere(dask_address, sample_slice, tmp_path,
                                                                     monkeypatch):
    """The workers run in their own directories: a relative input path must reach them absolute."""
    monkeypatch.chdir(sample_slice.parent)
    local = run(job_config("input/*", tmp_path / "local"), [])
    remote = run(job_config("input/*", tmp_path / "other"),
                 ["--runner=DaskRunner", f"--dask_client_address={dask_address}"])
    assert remote["counts"] == local["counts"]
    outputs_equal(tmp_path / "local", tmp_path / "other")


def matrix_cases(tmp_path: Path, tiny_sae: Path | None) -> dict[str, dict]:
    targets = str(targets_file(tmp_path))
    cases = {
        "embed": {"embed": EMBED},
        "embed_onnx_int8": {"embed": {**EMBED, "backend": "onnx", "precision": "int8",
                                      "export_dir": str(tmp_path / "exports")}},
        "embed_openvino": {"embed": {**EMBED, "backend": "openvino", "export_dir": str(tmp_path / "exports")}},
        "embed_openvino_int8": {"embed": {**EMBED, "backend": "openvino", "precision": "int8",
                                          "export_dir": str(tmp_path / "exports")}},
        "embed_static": {"embed": {**EMBED, "backend": "static", "export_dir": str(tmp_path / "exports")}},
        "prune_dbp_mix": {"embed": EMBED, "prune": {"enabled": True, "strategy": "dbp", "keep_fraction": 0.6},
                          "mix": MIX},
        "prune_semdedup": {"embed": EMBED, "prune": {"enabled": True, "strategy": "none",
                                                     "semdedup": {"enabled": True, "eps": 0.2}}},
        "prune_recluster": {"embed": EMBED, "prune": {"enabled": True, "keep_fraction": 0.7, "recluster": True}},
        "select_embedding": {"embed": EMBED, "select": {"enabled": True, "method": "embedding", "targets": targets,
                                                        "count": 40}},
        "select_bm25": {"select": {"enabled": True, "method": "bm25", "targets": targets, "count": 40}},
        "select_random": {"select": {"enabled": True, "method": "random", "targets": targets, "count": 40}},
        "rephrase": {"rephrase": {"enabled": True, "styles": ["medium"], "greedy": True, "max_new_tokens": 8,
                                  "max_records": 2, "max_segment_tokens": 60, "batch_size": 2, "cache": False}},
        "mix": {"mix": MIX},
        "dedup": {"dedup": {"enabled": True, "threshold": 0.5}, "mix": MIX},
        "dedup_graph": {"dedup": {"enabled": True, "threshold": 0.5, "components": "graph"}, "mix": MIX},
        "prune_two_tier": {"embed": {**EMBED, "backend": "static", "export_dir": str(tmp_path / "exports")},
                           "prune": {"enabled": True, "keep_fraction": 0.8,
                                     "semdedup": {"confirm": "torch", "candidate_eps": 0.15}}},
    }
    if tiny_sae is not None:
        cases["select_mona"] = {"select": {"enabled": True, "method": "mona", "targets": targets, "count": 40,
                                           "sae": str(tiny_sae), "layer": SAE_LAYER, "max_tokens": 64}}
        shortlist = {"shortlist": "embedding", "shortlist_multiple": 2}
        cases["select_mona_shortlist"] = {"embed": EMBED, "select": {**cases["select_mona"]["select"], **shortlist}}
    return cases


CASE_NAMES = ["embed", "embed_onnx_int8", "embed_openvino", "embed_openvino_int8", "embed_static",
              "prune_dbp_mix", "prune_semdedup", "prune_recluster", "prune_two_tier",
              "select_mona", "select_mona_shortlist", "select_embedding",
              "select_bm25", "select_random", "rephrase", "mix", "dedup", "dedup_graph"]


@pytest.mark.distributed
@pytest.mark.parametrize("runner", ["dask", "portable"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_matrix(case, runner, request, sample_slice, tmp_path):
    address = request.getfixturevalue("dask_address") if runner == "dask" else None
    sae = request.getfixturevalue("tiny_sae") if case.startswith("select_mona") else None
    sections = matrix_cases(tmp_path, sae)[case]
    manifest = same_as_in_process(sample_slice / "*", tmp_path, runner_args(runner, address), **sections)
    if "select" in sections:
        assert manifest["select"]["selected"] == 40
    if "rephrase" in sections:
        assert manifest["rephrase"]["records_chosen"] == 2
    if "dedup" in sections:
        assert manifest["dedup"]["removed"] > 0, "the slice's Debian siblings are near duplicates"


def test_a_dask_worker_gives_torch_its_own_thread_count(dask_address, tmp_path):
    """Auto torch threads are left to the worker (0 from the driver); a Dask worker answers its --nthreads."""
    import apache_beam as beam

    from winnow.pipelines.engine.options import beam_options, run_pipeline, worker_processes
    from winnow.selectors.embedding import threads_per_worker, worker_threads

    options = beam_options(["--runner=DaskRunner", f"--dask_client_address={dask_address}"])
    assert worker_processes(options) == 0 and threads_per_worker(0, 0) == 0 and threads_per_worker(3, 0) == 3
    seen = tmp_path / "threads.json"
    run_pipeline(options, lambda pipeline: (
        pipeline | beam.Create([0, 1, 2, 3]) | beam.Map(lambda _: worker_threads())
        | beam.combiners.ToList() | beam.Map(lambda found: seen.write_text(json.dumps(sorted(found))))))
    assert json.loads(seen.read_text()) == [1, 1, 1, 1]
