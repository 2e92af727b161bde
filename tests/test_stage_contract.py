"""The stage contract: the job is the configured list of declared stages, keys are derived from each stage's
imports, scores are cached apart from decisions, and a new stage (quality) goes through the interface."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, job_config

from winnow.pipelines.config import ConfigError, build_config
from winnow.pipelines.engine import stage_cache
from winnow.pipelines.engine.stage_cache import module_closure
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.stages import STAGES, job_stages


def names(config: dict) -> list[str]:
    return [stage.name for stage in job_stages(build_config(config))]


def test_the_default_order_and_a_configured_one(tmp_path):
    base = job_config("x.parquet", tmp_path / "out", embed={"enabled": "auto"})
    assert [stage.name for stage in STAGES] == ["validate", "quality", "dedup", "embed", "prune", "select",
                                                  "rephrase"]
    everything = {"prune": {"enabled": True}, "quality": {"enabled": True}, "dedup": {"enabled": True},
                  "select": {"enabled": True, "method": "bm25", "targets": "t.jsonl"}}
    assert names({**base, **everything}) == ["validate", "quality", "dedup", "embed", "prune", "select"]
    assert names({**base, "pipeline": ["validate", "select", "quality"], "quality": {"enabled": True},
                  "select": {"enabled": True, "method": "bm25", "targets": "t.jsonl"}}) == \
        ["validate", "select", "quality"]


def test_embed_is_put_before_the_first_stage_that_reads_embeddings(tmp_path):
    base = {**job_config("x.parquet", tmp_path / "out"), "pipeline": ["validate", "quality", "prune"],
            "quality": {"enabled": True}, "prune": {"enabled": True}}
    base["embed"]["enabled"] = "auto"
    assert names(base) == ["validate", "quality", "embed", "prune"]


@pytest.mark.parametrize(("pipeline", "extra", "says"), [
    (["validate", "qualty"], {}, r"^pipeline: unknown stage 'qualty' \(stages: validate, quality"),
    (["quality", "validate"], {"quality": {"enabled": True}}, r"^pipeline: must start with validate"),
    (["validate"], {"quality": {"enabled": True}}, r"^pipeline: quality is enabled but not in the list"),
    (["validate", "prune", "embed"], {"prune": {"enabled": True}},
     r"^pipeline: prune reads embeddings, so embed must come before it"),
    (["validate", "validate"], {}, r"^pipeline: a stage is listed twice"),
    (None, {"prune": {"enabled": True}, "embed": {"enabled": False}},
     r"^embed.enabled: false, but prune reads embeddings"),
])
def test_a_pipeline_list_that_cannot_run_is_a_config_error(tmp_path, pipeline, extra, says):
    config = {**job_config("x.parquet", tmp_path / "out", embed={"enabled": "auto"}), "pipeline": pipeline, **extra}
    with pytest.raises(ConfigError, match=says):
        names(config)


def test_code_keys_follow_each_stage_imports():
    closure = module_closure(["winnow.pipelines.stages.prune"])
    assert {"winnow.selectors.semdedup", "winnow.selectors.dbp", "winnow.selectors.clustering",
            "winnow.pipelines.io.records"} <= set(closure)
    assert "winnow.pipelines.stages" not in closure, "a stage's key never depends on the other stages"
    assert "winnow.pipelines.stages.select" not in closure
    assert "winnow.selectors.semdedup" not in module_closure(["winnow.pipelines.stages.embed"])


def test_editing_a_helper_changes_that_stage_key_and_no_earlier_one(sample_slice, tmp_path, monkeypatch,
                                                                     quick_embed):
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"text": "a kernel module"}) + "\n")
    config = build_config(job_config(sample_slice / "*", tmp_path / "out", embed=quick_embed,
                                     prune={"enabled": True},
                                     select={"enabled": True, "method": "bm25", "targets": str(targets)}))

    def keys() -> dict[str, list[str]]:
        return {planned.name: [step.key for step in planned.steps] for planned in plan_job(config, []).stages}

    before = keys()
    read = stage_cache.read_source
    monkeypatch.setattr(stage_cache, "read_source",
                        lambda path: read(path) + (b"\n# edited\n" if path.endswith("semdedup.py") else b""))
    after = keys()
    assert after["validate"] == before["validate"] and after["embed"] == before["embed"]
    assert after["prune"][0] != before["prune"][0] and after["prune"][1] != before["prune"][1]
    assert after["select"] != before["select"], "later keys chain on the changed one"


def data_bytes(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*.parquet"))
            if p.parts[len(output.parts)] in ("shards", "ledger", "embeddings")}


def steps_of(manifest: dict, stage: str) -> list[tuple[str, bool]]:
    entry = next(entry for entry in manifest["stages"] if entry["stage"] == stage)
    return [(step["step"], step["reused"]) for step in entry["steps"]]


@pytest.mark.parametrize(("pipeline", "changes", "reused_steps"), [
    (None, {"select": {"count": 40, "seed": 3, "top_features": 2}}, {"select": [("scores", True), ("decide", False)]}),
    (["validate", "embed", "select", "prune"], {"prune": {"keep_fraction": 0.5, "keep": "easy", "tau": 0.3}},
     {"prune": [("clusters", True), ("decide", False)]}),
])
@pytest.mark.slow
def test_a_changed_decision_reuses_the_scores_and_equals_a_cold_run(sample_slice, tmp_path, pipeline, changes,
                                                                     reused_steps, quick_embed):
    targets = tmp_path / "targets.jsonl"
    texts = pq.read_table(SAMPLE / "docs_paragraphs.parquet").column("text").to_pylist()[200:203]
    targets.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    config = job_config(sample_slice / "*", tmp_path / "out", embed=quick_embed,
                        prune={"enabled": True, "keep_fraction": 0.7},
                        select={"enabled": True, "method": "bm25", "targets": str(targets), "count": 60},
                        mix={"enabled": True, "shards": 2})
    config["pipeline"] = pipeline
    run_job(plan_job(build_config(config), []))
    for section, values in changes.items():
        config[section].update(values)
    changed = run_job(plan_job(build_config(config), []))
    changed_stage = next(iter(reused_steps))
    assert [(e["stage"], e["reused"]) for e in changed["stages"]] == \
        [(e["stage"], e["stage"] != changed_stage) for e in changed["stages"]], "only the changed stage computes"
    assert {changed_stage: steps_of(changed, changed_stage)} == reused_steps
    config["output"].update(path=str(tmp_path / "cold"), cache=False)
    run_job(plan_job(build_config(config), []))
    assert data_bytes(tmp_path / "out") == data_bytes(tmp_path / "cold")


@pytest.mark.slow
def test_the_quality_stage_records_each_rejection_with_its_rule(sample_slice, tmp_path):
    config = job_config(sample_slice / "*", tmp_path / "out", quality={"enabled": True, "languages": ["en"]})
    manifest = run_job(plan_job(build_config(config), []))
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pandas()
    rejected = ledger[ledger["stage"] == "quality"]
    assert len(rejected) == manifest["quality"]["rejected"] > 0
    assert set(rejected["fate"]) == {"rejected"}
    assert rejected["reason"].value_counts().to_dict() == manifest["quality"]["rejected_by_rule"]
    assert rejected["detail"].str.contains(r"\(threshold ").all()
    sources = ledger.groupby("source").size().to_dict()
    assert manifest["quality"]["unchecked_by_source"] == {s: n for s, n in sources.items() if s != "en"}
    assert manifest["quality"]["checked"] == sources["en"]
    assert "id='quality'" in (tmp_path / "out" / "report" / "index.html").read_text()
