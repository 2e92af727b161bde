"""Stage caching and resume: stages are reused while their input, config, code and models are unchanged; a run
killed mid-stage (SIGKILL) resumes from the finished stages and ends with the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import job_config

from winnow.pipelines.config import build_config
from winnow.pipelines.engine.stage_cache import StageCache, StageEntry, source_hash, stage_key
from winnow.pipelines.job import plan_job, run_job

PIPELINE = {"embed": {"enabled": True}, "prune": {"enabled": True, "keep_fraction": 0.6},
            "mix": {"enabled": True, "shards": 2}}


@pytest.fixture
def quick_pipeline(quick_embed) -> dict:
    """PIPELINE with the quick embedding model (conftest.quick_embed)."""
    return {**PIPELINE, "embed": quick_embed}


def run(config: dict, force: bool = False) -> dict:
    return run_job(plan_job(build_config(config), []), force=force)


def stages(manifest: dict) -> list[tuple[str, bool]]:
    return [(entry["stage"], entry["reused"]) for entry in manifest["stages"]]


@pytest.fixture
def block_writes(monkeypatch) -> list[tuple[str, str]]:
    """(path, compression) of every block the job writes."""
    from winnow.pipelines.io import blocks

    seen = []
    original = blocks.write_parquet

    def spy(uri, table, row_group_rows, compression="zstd", dictionary=True):
        seen.append((str(uri), compression))
        return original(uri, table, row_group_rows, compression, dictionary)

    monkeypatch.setattr(blocks, "write_parquet", spy)
    return seen


def stage_compressions(writes: list[tuple[str, str]]) -> dict[str, set[str]]:
    """{stage: compressions of the blocks it wrote}, the stage named by the cache entry's folder."""
    found: dict[str, set[str]] = {}
    for path, compression in writes:
        stage = next(name for name in (part.lstrip(".").split("-")[0] for part in Path(path).parts)
                     if name in ("validate", "embed", "prune"))
        found.setdefault(stage, set()).add(compression)
    return found


def output_bytes(output: Path) -> dict[str, bytes]:
    """Every data file of an output (shards, ledger, embeddings) by relative path."""
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*.parquet"))}


@pytest.mark.slow
def test_changing_only_the_mix_reuses_every_stage_and_embeds_nothing(sample_slice, tmp_path, quick_pipeline,
                                                                     block_writes):
    output = tmp_path / "out"
    config = job_config(sample_slice / "*", output, **quick_pipeline)
    first = run(config)
    assert stages(first) == [("validate", False), ("embed", False), ("prune", False)]
    assert stage_compressions(block_writes) == {stage: {"zstd"} for stage in ("validate", "embed", "prune")}
    assert first["embeddings"]["computed_rows"] == 260
    first_bytes = output_bytes(output)

    reseeded = json.loads(json.dumps(config))
    reseeded["mix"]["seed"] = 99
    second = run(reseeded)
    assert stages(second) == [("validate", True), ("embed", True), ("prune", True)]
    assert second["embeddings"]["computed_rows"] == 0 and second["embeddings"]["reused_rows"] == 260
    assert second["timings"]["embed_s"] == 0.0
    assert second["counts"] == first["counts"], "the same records reach the mix"

    again = run(config)
    assert stages(again) == [("validate", True), ("embed", True), ("prune", True)]
    assert output_bytes(output) == first_bytes, "reused stages give the same bytes as computed ones"


def cache_entries(root: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in root.iterdir() if p.name != "history.json")


@pytest.mark.slow
def test_a_decision_switched_back_reuses_the_first_runs_entry(sample_slice, tmp_path, quick_pipeline):
    output = tmp_path / "out"
    config = job_config(sample_slice / "*", output, **quick_pipeline)
    first = run(config)
    first_bytes = output_bytes(output)
    config["prune"]["keep_fraction"] = 0.4
    second = run(config)
    assert stages(second) == [("validate", True), ("embed", True), ("prune", False)]
    assert [step["reused"] for step in second["stages"][2]["steps"]] == [True, False], "only the decision runs"
    assert second["counts"]["by_fate"]["kept"] < first["counts"]["by_fate"]["kept"]
    assert cache_entries(tmp_path / ".out.cache") == ["embed", "prune", "prune", "validate"], \
        "the cache remembers the sweep: both decisions are kept"
    assert second["cache"]["dropped"] == []
    config["prune"]["keep_fraction"] = 0.6
    third = run(config)
    assert stages(third) == [("validate", True), ("embed", True), ("prune", True)], "0.6's decision is reused"
    assert third["counts"] == first["counts"]
    assert output_bytes(output) == first_bytes


@pytest.mark.slow
def test_a_cache_bound_of_zero_keeps_only_the_latest_runs_entries(sample_slice, tmp_path):
    config = job_config(sample_slice / "*", tmp_path / "out", quality={"enabled": True})
    config["output"]["cache_max_bytes"] = 0
    run(config)
    config["quality"]["min_doc_words"] = 10
    second = run(config)
    assert stages(second) == [("validate", True), ("quality", False)]
    assert cache_entries(tmp_path / ".out.cache") == ["quality", "validate"], \
        "entries the latest run did not use are removed"
    assert [name.split("-")[0] for name in second["cache"]["dropped"]] == ["quality"]


def fake_entry(cache: StageCache, name: str, key: str, size: int) -> StageEntry:
    """A committed entry holding one file of `size` bytes (plus its stage.json)."""
    directory = cache.begin(name, key)
    (Path(directory) / "records").mkdir()
    (Path(directory) / "records" / "part.parquet").write_bytes(b"x" * size)
    return cache.commit(name, key, directory, [{"dir": "records", "file": "records/part.parquet", "rows": 1,
                                                "bytes": size}], 0.1, {}, {})


def test_the_cache_drops_entries_of_earlier_runs_least_recently_used_first_within_its_bound(tmp_path):
    cache = StageCache(tmp_path / "cache")
    a, b, c = (fake_entry(cache, "prune", key, 10_000) for key in "abc")
    size = {entry.key: sum(f.stat().st_size for f in Path(entry.directory).rglob("*") if f.is_file())
            for entry in (a, b, c)}
    assert cache.remember([a], 10**9).dropped == []
    assert cache.remember([b], 10**9).dropped == []
    assert cache.remember([c], 10**9).dropped == []
    assert cache.remember([a], 10**9).dropped == [], "a reused entry becomes the most recently used"
    # last used: b (run 2), c (run 3), a (run 4); a bound of two entries drops b, the least recently used
    (tmp_path / "cache" / ".prune-d.tmp-123").mkdir()  # what a killed run left
    use = cache.remember([a], size["a"] + size["c"])
    assert use.dropped == [split_name(b)] and use.dropped_bytes == size["b"]
    assert use.entries == 2 and use.bytes == size["a"] + size["c"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["history.json", split_name(a), split_name(c)]
    assert cache.lookup("prune", "b") is None and cache.lookup("prune", "c") is not None
    use = cache.remember([c, a], 0)
    assert use.dropped == [] and use.entries == 2, "the latest run's entries stay, whatever the bound"
    assert cache.remember([a], size["a"] + size["c"] - 1).dropped == [split_name(c)], "one byte over drops c"
    assert cache.lookup("prune", "a") is not None


def split_name(entry: StageEntry) -> str:
    return Path(entry.directory).name


def test_a_cache_size_may_be_given_with_a_unit():
    from winnow.pipelines.config import ConfigError

    base = {"input": {"path": "x.parquet"}, "output": {"path": "out"}}
    sizes = {"500MB": 500 * 10**6, "20GiB": 20 * 2**30, "1.5 kib": 1536, "0": 0, 1234: 1234}
    for given, expected in sizes.items():
        config = build_config({**base, "output": {"path": "out", "cache_max_bytes": given}})
        assert config.output.cache_max_bytes == expected
    assert build_config(base).output.cache_max_bytes == 10 * 2**30
    with pytest.raises(ConfigError, match="output.cache_max_bytes"):
        build_config({**base, "output": {"path": "out", "cache_max_bytes": "lots"}})


@pytest.mark.slow
def test_force_recomputes_every_stage_with_identical_output(sample_slice, tmp_path, quick_pipeline):
    output = tmp_path / "out"
    config = job_config(sample_slice / "*", output, **quick_pipeline)
    run(config)
    first_bytes = output_bytes(output)
    forced = run(config, force=True)
    assert stages(forced) == [("validate", False), ("embed", False), ("prune", False)]
    assert forced["embeddings"]["computed_rows"] == 260, "force does not reuse embeddings of the old output"
    assert output_bytes(output) == first_bytes


@pytest.mark.slow
def test_a_changed_input_file_invalidates_every_stage(sample_slice, tmp_path, quick_pipeline):
    config = job_config(sample_slice / "*", tmp_path / "out", **quick_pipeline)
    run(config)
    table = pq.read_table(sample_slice / "b_docs.parquet")
    pq.write_table(table.slice(0, 59), sample_slice / "b_docs.parquet")
    second = run(config)
    assert stages(second) == [("validate", False), ("embed", False), ("prune", False)]
    assert second["counts"]["input_records"] == 259
    assert second["embeddings"]["reused_rows"] == 259, "unchanged texts still reuse the old output's vectors"


@pytest.mark.slow
def test_a_damaged_cache_entry_is_recomputed_not_read(sample_slice, tmp_path, quick_pipeline):
    config = job_config(sample_slice / "*", tmp_path / "out", **quick_pipeline)
    first = run(config)
    embed_dir = next((tmp_path / ".out.cache").glob("embed-*"))
    next((embed_dir / "embed" / "records").glob("*.parquet")).unlink()  # the stage's records
    second = run(config)
    assert stages(second) == [("validate", True), ("embed", False), ("prune", True)]
    assert second["counts"] == first["counts"]


@pytest.mark.slow
def test_without_the_cache_nothing_is_kept_beside_the_output(sample_slice, tmp_path, quick_pipeline, block_writes):
    config = job_config(sample_slice / "*", tmp_path / "out", **quick_pipeline)
    config["output"]["cache"] = False
    run(config)
    assert stage_compressions(block_writes) == {stage: {"none"} for stage in ("validate", "embed", "prune")}, \
        "blocks read once by the same job are written plain"
    first_bytes = output_bytes(tmp_path / "out")
    second = run(config)
    assert stages(second) == [("validate", False), ("embed", False), ("prune", False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "out"]
    config["output"].update(cache=True, path=str(tmp_path / "cached"))
    run(config)
    assert output_bytes(tmp_path / "cached") == first_bytes, "plain blocks give the bytes zstd blocks give"


def test_stage_keys_follow_code_and_chain(tmp_path, monkeypatch):
    module = tmp_path / "winnow_probe_module.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = source_hash(["winnow_probe_module"])
    module.write_text("VALUE = 2\n")
    sys.modules.pop("winnow_probe_module", None)
    assert source_hash(["winnow_probe_module"]) != before, "a code change changes the stage's code version"
    assert stage_key({"a": 1, "previous": "x"}) == stage_key({"previous": "x", "a": 1})
    assert stage_key({"a": 1, "previous": "x"}) != stage_key({"a": 1, "previous": "y"})


def test_only_steps_whose_records_carry_vectors_keep_them(sample_slice, tmp_path):
    """Whether a step's cached records keep the embeddings is in its key; validate's records never carry any,
    so its key (and its cache entry) is the same whether or not later stages embed and read vectors."""
    def steps(**sections) -> dict[str, tuple[str, bool, bool]]:
        job = plan_job(build_config(job_config(sample_slice / "*", tmp_path / "out", **sections)), [])
        return {f"{stage.stage.name}.{step.name}": (step.key, step.keeps_vectors, step.drops_vectors)
                for stage in job.stages for step in stage.steps}

    alone, embedded, pruned = steps(), steps(embed={"enabled": True}), steps(**PIPELINE)
    assert alone["validate.validate"] == embedded["validate.validate"] == pruned["validate.validate"]
    assert alone["validate.validate"][1:] == (False, False)
    assert embedded["embed.embed"][1:] == (True, False), "the embeddings step reads the embed step's vectors"
    assert embedded["embed.embeddings"][1:] == (False, True), "nothing after it reads them"
    assert pruned["embed.embeddings"][1:] == (True, False), "prune reads them"
    assert pruned["prune.clusters"][1:] == (False, True), "the last reader drops them"
    assert pruned["prune.decide"][1:] == (False, False)


def test_lookup_rejects_entries_without_their_stage_file(tmp_path):
    cache = StageCache(tmp_path / "cache")
    temporary = cache.begin("embed", "abc")
    assert cache.lookup("embed", "abc") is None, "an unfinished stage is never read as complete"
    entry = cache.commit("embed", "abc", temporary, [], 1.0, {}, {})
    assert cache.lookup("embed", "abc").directory == entry.directory
    assert cache.lookup("embed", "abd") is None


def _wait_for(predicate, seconds: float, job: subprocess.Popen) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and job.poll() is None:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_run_killed_mid_stage_resumes_with_finished_stages_and_identical_output(sample_slice, tmp_path):
    """SIGKILL while the embed stage runs, once it finished a record file, then the same command: validate comes
    from the cache, embed takes the files the killed run finished and computes the others, prune is computed,
    and shards, ledger and embeddings equal an uninterrupted run's byte for byte."""
    config = job_config(sample_slice / "*", tmp_path / "out", **PIPELINE)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "winnow.pipelines", "run", str(path)]
    cache = tmp_path / ".out.cache"
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(lambda: any(cache.glob(".embed-embed-*.resume/records/*.meta.json")), 300, job), \
            "the embed stage finished a file"
        assert job.poll() is None, "the job is still embedding when it is killed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not (tmp_path / "out").exists(), "a killed run publishes nothing"
    assert [p.name.split("-")[0] for p in cache.glob("validate-*")] == ["validate"]
    assert not list(cache.glob("embed-*")), "the interrupted stage has no finished entry"

    kept = len(list(cache.glob(".embed-embed-*.resume/records/*.meta.json")))
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "winnow: validate: reused from the cache" in resumed.stdout
    assert "winnow: embed: computed" in resumed.stdout and "winnow: prune: computed" in resumed.stdout
    assert f"(took {kept} files of its embed from an interrupted run)" in resumed.stdout
    assert cache_entries(cache) == ["embed", "prune", "validate"], \
        "the killed run's temporary directory is gone"
    assert not list(cache.glob(".*")), "and so are its kept files"

    uninterrupted = json.loads(json.dumps(config))
    uninterrupted["output"] = {**config["output"], "path": str(tmp_path / "uninterrupted"), "cache": False}
    run(uninterrupted)
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "uninterrupted")
    check = subprocess.run([sys.executable, "-m", "winnow.pipelines", "verify", str(tmp_path / "out")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_while_the_first_lives(sample_slice, tmp_path):
    """`.NAME.lock` names the running job; a live holder stops the run with one line (exit 2), a lock left by
    a killed run is taken over."""
    import platform

    config = job_config(sample_slice / "b_docs.parquet", tmp_path / "out")
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    lock = tmp_path / ".out.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": platform.node(), "pid": sleeper.pid}))
        refused = subprocess.run([sys.executable, "-m", "winnow.pipelines", "run", str(path)],
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            f"winnow: error: {tmp_path / 'out'}: another winnow run (host {platform.node()}, pid {sleeper.pid}) "
            f"is writing it; if none is, remove {lock}"
        )
        assert not (tmp_path / "out").exists() and lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    manifest = run(config)  # the holder is gone: its lock is taken over
    assert manifest["counts"]["input_records"] == 60
    assert not lock.exists(), "the lock is released after the run"
