"""Wrong results cannot pass for right ones: each stage's manifest summary is checked against the ledger when
the run ends (a mismatch fails the run and publishes nothing) and again by `winnow verify`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import job_config, targets_file

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.outputs.selfcheck import SelfCheckError
from winnow.pipelines.outputs.verify import verify
from winnow.pipelines.stages.select import decide as select_decide

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory, quick_embed):
    """A real prune + select (bm25, 40 of the pool) output on the sample slice."""
    import pyarrow.parquet as pq
    from conftest import SAMPLE

    root = tmp_path_factory.mktemp("selfcheck")
    (root / "input").mkdir()
    pq.write_table(pq.read_table(SAMPLE / "debian_descriptions.parquet").slice(900, 200), root / "input" / "a.parquet")
    select = {"enabled": True, "method": "bm25", "targets": str(targets_file(root)), "count": 40}
    config = job_config(root / "input" / "*", root / "out", embed=quick_embed, select=select,
                        prune={"enabled": True, "keep_fraction": 0.7})
    run_job(plan_job(build_config(config), []))
    return root / "out"


def tampered(finished, tmp_path, change) -> list[str]:
    target = tmp_path / "out"
    shutil.copytree(finished, target)
    manifest = json.loads((target / "manifest.json").read_text())
    change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return verify(target)


def test_a_fresh_output_passes_every_stage_check(finished):
    manifest = json.loads((finished / "manifest.json").read_text())
    assert manifest["select"]["selected"] == 40
    assert manifest["prune"]["centroids"] == {"k": manifest["prune"]["k"], "dimension": 384}
    assert verify(finished) == []


def test_a_selected_count_the_ledger_does_not_bear_out_is_named(finished, tmp_path):
    def claim_more(manifest):
        manifest["select"]["selected"] = 42
    pool = json.loads((finished / "manifest.json").read_text())["select"]["pool"]
    assert tampered(finished, tmp_path, claim_more) == [
        f"self-check select: selected 42 of a pool of {pool}, but the ledger has {pool - 40} not_selected rows "
        "(select)",
        f"self-check select: selected 42, the config asks for 40 of {pool}",
    ]


def test_quotas_that_disagree_with_the_pruned_rows_are_named(finished, tmp_path):
    def shift_quota(manifest):
        manifest["prune"]["clusters"][0]["quota"] -= 1
    problems = tampered(finished, tmp_path, shift_quota)
    assert len(problems) == 1 and problems[0].startswith("self-check prune: ") and "pruned rows" in problems[0]


def test_empty_centroids_are_named(finished, tmp_path):
    def no_centroids(manifest):
        manifest["prune"]["centroids"] = {"k": 0, "dimension": 0}
    assert tampered(finished, tmp_path, no_centroids) == [
        "self-check prune: centroids 0 x 0, embeddings of dimension 384"]


def test_a_run_whose_decision_lost_its_threshold_fails_and_publishes_nothing(sample_slice, tmp_path, monkeypatch):
    """What a runner that miscomputes a global value did: every record kept while the summary says 40."""
    def keep_everything(scores, ids, threshold, seed):
        return np.ones(len(ids), dtype=bool)

    monkeypatch.setattr(select_decide, "selected", keep_everything)
    select = {"enabled": True, "method": "bm25", "targets": str(targets_file(tmp_path)), "count": 40}
    config = job_config(sample_slice / "*", tmp_path / "out", select=select)
    with pytest.raises(SelfCheckError, match=r"self-check select: selected 40 of a pool of 260, but the ledger "
                                             r"has 0 not_selected rows \(select\)"):
        run_job(plan_job(build_config(config), []))
    assert not (tmp_path / "out").exists()
    cache = tmp_path / ".out.cache"
    assert not any(path.name.startswith("select-") for path in cache.iterdir())
