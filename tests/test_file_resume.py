"""Resuming inside a model step: a run that dies while embedding (or scoring) keeps the files it finished, and
the same command computes only the others, ending with the bytes of an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import job_config, targets_file

from winnow.pipelines.config import build_config
from winnow.pipelines.engine import file_resume
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.stages import embed as embed_stage
from winnow.pipelines.stages.select import scores as select_scores

SLICE_FILES = [f"block-00000-0000{group}.parquet" for group in range(4)] + ["block-00001-00000.parquet"]
FILES = len(SLICE_FILES)  # the sample slice's record files: a_debian's four row groups, b_docs


class PowerCut(RuntimeError):
    pass


ONE_WORKER = ["--direct_num_workers=1"]  # the failing run: no second worker thread goes on after the failure


def run(config: dict, force: bool = False, beam_args: list[str] | None = None) -> dict:
    return run_job(plan_job(build_config(config), beam_args or []), force=force)


def output_bytes(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*.parquet"))}


def computing(monkeypatch, cls, method: str, fail_after: int | None = None) -> list[str]:
    """The record files a step's DoFn computes (their names); with `fail_after`, the first file it starts once
    that many files are kept fails."""
    original = getattr(cls, method)
    seen: list[str] = []

    def spy(self, path, relative):
        if fail_after is not None and len(list(Path(self.resume).rglob("*" + file_resume.META_SUFFIX))) >= fail_after:
            raise PowerCut(f"the machine went down while computing {relative}")
        seen.append(Path(path).name)
        return original(self, path, relative)

    monkeypatch.setattr(cls, method, spy)
    return seen


def kept_files(cache: Path) -> dict[str, set[str]]:
    """{resume folder: names of the files kept in it}."""
    return {folder.name: {p.name[: -len(file_resume.META_SUFFIX)] for p in folder.rglob("*" + file_resume.META_SUFFIX)}
            for folder in cache.glob(".*.resume")}


def step_of(manifest: dict, stage: str, step: str) -> dict:
    entry = next(e for e in manifest["stages"] if e["stage"] == stage)
    return next(s for s in entry["steps"] if s["step"] == step)


@pytest.mark.parametrize("step", ["embed", "scores"])
def test_a_step_that_died_takes_the_files_it_finished_and_ends_with_an_uninterrupted_runs_bytes(
        step, sample_slice, quick_embed, tmp_path, monkeypatch):
    sections = {"embed": quick_embed, "prune": {"enabled": True, "keep_fraction": 0.6}}
    if step == "scores":
        sections = {"select": {"enabled": True, "method": "bm25", "targets": str(targets_file(tmp_path)),
                               "count": 40}}
    stage, cls, method = ("embed", embed_stage._EmbedFileFn, "_embed_file") if step == "embed" else \
        ("select", select_scores._ScoreFileFn, "_score_file")
    config = job_config(sample_slice / "*", tmp_path / "out", **sections)
    cache = tmp_path / ".out.cache"

    with monkeypatch.context() as patch:
        computing(patch, cls, method, fail_after=2)
        with pytest.raises(Exception, match="the machine went down"):
            run(config, beam_args=ONE_WORKER)
    [(folder, kept)] = kept_files(cache).items()
    assert folder.startswith(f".{stage}-{step}-") and len(kept) == 2
    assert not (tmp_path / "out").exists()

    with monkeypatch.context() as patch:
        computed = computing(patch, cls, method)
        manifest = run(config)
    assert sorted(computed) == sorted(set(SLICE_FILES) - kept), \
        "only the files not kept are computed again (by two workers: the key does not hold the worker count)"
    assert step_of(manifest, stage, step)["resumed_files"] == len(kept)
    assert kept_files(cache) == {}, "the folder goes when the step is done"

    uninterrupted = {**config, "output": {**config["output"], "path": str(tmp_path / "plain"), "cache": False}}
    plain = run(uninterrupted)
    assert "resumed_files" not in step_of(plain, stage, step)
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "plain")


def test_force_computes_every_file_again(sample_slice, quick_embed, tmp_path, monkeypatch):
    config = job_config(sample_slice / "*", tmp_path / "out", embed=quick_embed)
    with monkeypatch.context() as patch:
        computing(patch, embed_stage._EmbedFileFn, "_embed_file", fail_after=1)
        with pytest.raises(Exception, match="the machine went down"):
            run(config, beam_args=ONE_WORKER)
    assert sum(len(kept) for kept in kept_files(tmp_path / ".out.cache").values()) == 1
    with monkeypatch.context() as patch:
        computed = computing(patch, embed_stage._EmbedFileFn, "_embed_file")
        manifest = run(config, force=True)
    assert sorted(computed) == SLICE_FILES and "resumed_files" not in step_of(manifest, "embed", "embed")


def test_a_kept_file_of_the_wrong_size_is_computed_again(tmp_path):
    """A marker is written after its file; a file that is not the size its marker records (a folder someone
    edited) is not taken."""
    step, folder = tmp_path / "step", str(tmp_path / ".embed-embed-k.resume")
    for name, payload in (("a.parquet", b"12345"), ("b.parquet", b"678")):
        (step / "records").mkdir(parents=True, exist_ok=True)
        (step / "records" / name).write_bytes(payload)
        file_resume.keep(folder, str(step), f"records/{name}", {"dir": "records", "file": f"records/{name}",
                                                                 "rows": 1, "bytes": len(payload)})
    (Path(folder) / "records" / "b.parquet").unlink()
    (Path(folder) / "records" / "b.parquet").write_bytes(b"67")
    assert file_resume.prepare(folder) == 1
    other = tmp_path / "next"
    assert file_resume.take(folder, str(other), "records/b.parquet") is None
    meta = file_resume.take(folder, str(other), "records/a.parquet")
    assert meta == {"dir": "records", "file": "records/a.parquet", "rows": 1, "bytes": 5}
    assert (other / "records" / "a.parquet").read_bytes() == b"12345"
    assert json.loads((Path(folder) / "records" / "a.parquet.meta.json").read_text()) == meta
    assert file_resume.take("", str(other), "records/a.parquet") is None, "a step run without resuming"
