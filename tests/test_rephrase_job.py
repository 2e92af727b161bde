"""The rephrase stage end to end with greedy decoding on real documentation paragraphs: provenance, ledger,
determinism, the window cache (resume) and the real:synthetic share in the mixture."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import job_config, shared_file

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.rephrase import clean, generate, prompts
from winnow.selectors import lm

pytestmark = pytest.mark.slow
REPHRASE = {"enabled": True, "styles": ["medium", "qa"], "greedy": True, "max_new_tokens": 48,
            "max_segment_tokens": 60, "batch_size": 8}


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Four short real paragraphs of the kernel and Python docs (one long enough for two segments)."""
    table = pq.read_table(shared_file("docs_paragraphs.parquet"))
    texts = table.column("text").to_pylist()
    short = [i for i, t in enumerate(texts[:400]) if 120 < len(t) < 260][:3]
    long = next(i for i, t in enumerate(texts[:400]) if 400 < len(t) < 520)
    root = tmp_path_factory.mktemp("rephrase")
    pq.write_table(table.take(sorted([*short, long])), root / "docs.parquet")
    return root


def run(root, name, **sections):
    config = job_config(root / "docs.parquet", root / name, **sections)
    return run_job(plan_job(build_config(config), [])), root / name


def test_greedy_rephrasing_is_deterministic_and_matches_plain_generate(docs):
    manifest, output = run(docs, "a", rephrase={**REPHRASE, "cache": False})
    _, again = run(docs, "b", rephrase={**REPHRASE, "cache": False})
    first, second = pq.read_table(output / "shards"), pq.read_table(again / "shards")
    assert first.drop(["generation"]).equals(second.drop(["generation"]))
    assert pq.read_table(output / "ledger").equals(pq.read_table(again / "ledger"))

    ledger = pq.read_table(output / "ledger").to_pandas()
    inputs = ledger[ledger["parent_id"].isna()]
    made = ledger[ledger["parent_id"].notna()]
    assert len(inputs) == 4 and set(inputs["fate"]) == {"kept"}
    assert manifest["counts"]["input_records"] == 4
    assert set(made["fate"]) <= {"synthetic", "rejected"}
    assert set(made.loc[made["fate"] == "rejected", "stage"]) <= {"rephrase"}
    section = manifest["rephrase"]
    segments = section["segments_generated"]
    path = lm.resolve_lm_path(lm.PACKAGED_LM)
    generator = generate.TransformersGenerator(path)
    from winnow.rephrase.segment import segment

    texts = pq.read_table(docs / "docs.parquet").column("text").to_pylist()
    pieces = sum(len(segment(text, generator.tokenizer, 60)) for text in texts)
    assert pieces > len(texts), "one paragraph is long enough for two segments"
    assert segments == len(made) == 2 * pieces
    assert section["segments_reused_from_cache"] == 0
    assert manifest["counts"]["synthetic"]["generated"] == segments

    rows = first.to_pandas()
    synthetic = rows[rows["parent_id"].notna()]
    assert len(synthetic) == (made["fate"] == "synthetic").sum()
    for _, row in synthetic.iterrows():
        style = row["style"]
        assert row["id"] == f"{row['parent_id']}#{style}#{int(row['segment_index'])}"
        assert row["source"].split(":", 1)[0] == {"medium": "wiki", "qa": "qa"}[style]
        assert json.loads(row["generation"])["do_sample"] is False

    # the stage's text is the plain generate() output of the same prompt, cleaned
    parent = rows.set_index("id").loc[synthetic.iloc[0]["parent_id"]]
    style = prompts.STYLES[synthetic.iloc[0]["style"]]
    piece = segment(parent["text"], generator.tokenizer, 60)[int(synthetic.iloc[0]["segment_index"])]
    out = generator.generate([prompts.build_prompt(generator.tokenizer, style, piece)],
                             generate.GenerationParams(max_new_tokens=48, do_sample=False))[0]
    assert clean.clean(out.text, piece, style.name, out.finished)[0] == synthetic.iloc[0]["text"]


def test_a_rerun_reuses_finished_windows_from_the_cache(docs):
    manifest, output = run(docs, "cached", rephrase=REPHRASE)
    generated = manifest["rephrase"]["segments_generated"]
    assert generated > 0
    cache = docs / ".cached.rephrase-cache"
    assert len(list(cache.glob("*.json"))) == 2  # one window per style
    first = pq.read_table(output / "shards")
    manifest, output = run(docs, "cached", rephrase=REPHRASE)
    assert [(s["stage"], s["reused"]) for s in manifest["stages"]] == [("validate", True), ("rephrase", True)]
    assert manifest["rephrase"]["segments_generated"] == 0 and manifest["rephrase"]["stage_reused"]
    assert manifest["rephrase"]["segments_reused_from_cache"] == generated
    assert pq.read_table(output / "shards").equals(first)

    shutil.rmtree(docs / ".cached.cache")  # without the stage cache, the window cache still saves the work
    manifest, output = run(docs, "cached", rephrase=REPHRASE)
    assert [(s["stage"], s["reused"]) for s in manifest["stages"]] == [("validate", False), ("rephrase", False)]
    assert manifest["rephrase"]["segments_generated"] == 0 and not manifest["rephrase"]["stage_reused"]
    assert manifest["rephrase"]["segments_reused_from_cache"] == generated
    assert pq.read_table(output / "shards").equals(first)


def test_the_mixture_gives_synthetic_sources_their_configured_share(docs):
    manifest, output = run(docs, "mixed", rephrase=REPHRASE,
                           mix={"enabled": True, "shards": 2, "total_records": 40, "synthetic_share": 0.25})
    rows = pq.read_table(output / "shards").to_pandas()
    assert len(rows) == 40
    assert rows["parent_id"].notna().sum() == 10  # 25% of every position
    assert manifest["mix"]["sources"]


def test_a_killed_run_resumes_without_regenerating_finished_windows(docs, tmp_path):
    """SIGKILL in the middle of generation, then the same command again: finished windows come from the cache
    and the output equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rephrase = {**REPHRASE, "styles": ["medium"], "window": 1}  # one window per input row: four windows
    config = job_config(docs / "docs.parquet", tmp_path / "out", rephrase=rephrase)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    cache = tmp_path / ".out.rephrase-cache"
    job = subprocess.Popen([sys.executable, "-m", "winnow.pipelines", "run", str(path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(cache.glob("*.json"))) < 2 and job.poll() is None:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    finished = len(list(cache.glob("*.json")))
    assert finished >= 2, "the run was killed after some windows were cached"
    assert not (tmp_path / "out").exists(), "a killed run publishes nothing"

    manifest = run_job(plan_job(build_config(config), []))
    assert [(s["stage"], s["reused"]) for s in manifest["stages"]] == [("validate", True), ("rephrase", False)]
    reused = manifest["rephrase"]["segments_reused_from_cache"]
    generated = manifest["counts"]["synthetic"]["generated"]
    assert reused >= 2 and manifest["rephrase"]["segments_generated"] + reused == generated
    _, uninterrupted = run(docs, "uninterrupted", rephrase={**rephrase, "cache": False})
    for part in ("shards", "ledger"):
        resumed_files = sorted((tmp_path / "out" / part).glob("*.parquet"))
        assert [p.read_bytes() for p in resumed_files] == \
            [p.read_bytes() for p in sorted((uninterrupted / part).glob("*.parquet"))], part
