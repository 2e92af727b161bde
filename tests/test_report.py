"""The HTML run report: written at the end of a run, sections only for stages that ran, numbers that match the
manifest and the ledger; and the console progress lines."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE, job_config

from winnow.pipelines.cli import main as cli_main
from winnow.pipelines.config import build_config
from winnow.pipelines.engine.progress import Progress
from winnow.pipelines.job import plan_job, run_job


def sections(page: str) -> list[str]:
    return re.findall(r"<h2 id='([a-z]+)'>", page)


@pytest.mark.slow
def test_report_of_the_default_stages(sample_slice, tmp_path, quick_embed):
    config = job_config(sample_slice / "*", tmp_path / "out", embed=quick_embed,
                        prune={"enabled": True, "keep_fraction": 0.7}, mix={"enabled": True, "shards": 3})
    manifest = run_job(plan_job(build_config(config), []))
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert sections(page) == ["funnel", "prune", "mix", "timings"]
    assert not re.search(r"<script|<link|<img|src=|href=[\"']?https?:|url\((?!#)", page), "the page fetches nothing"
    counts = manifest["counts"]
    assert f"{counts['input_records']:,} input records" in page
    for fate, rows in counts["by_fate"].items():
        assert f"{rows:,} {fate}" in page
    prune = manifest["prune"]
    assert f"{prune['records']:,} records in {prune['k']} clusters; {prune['survivors']:,} survive" in page
    assert f"{manifest['mix']['total']:,} records in 3 shards" in page
    assert page.count("<svg") == 3  # funnel, prune (one figure, two panels), mix
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pandas()
    deduplicated = ledger[ledger["fate"] == "deduplicated"]
    if len(deduplicated):
        assert re.search(re.escape(deduplicated.iloc[0]["detail"]), page)


@pytest.mark.slow
def test_report_with_every_stage(tmp_path, tiny_sae, capsys, quick_embed):
    table = pq.read_table(SAMPLE / "bigbench_tasks.parquet").to_pandas()
    docs = pq.read_table(SAMPLE / "docs_paragraphs.parquet").slice(0, 6)
    (tmp_path / "in").mkdir()
    pq.write_table(pq.read_table(SAMPLE / "bigbench_tasks.parquet").slice(0, 60), tmp_path / "in" / "a.parquet")
    pq.write_table(docs, tmp_path / "in" / "b.parquet")
    targets = tmp_path / "targets.jsonl"
    spider = table[table["source"] == "semantic_parsing_spider"]["text"].tolist()[-3:]
    targets.write_text("".join(json.dumps({"text": t}) + "\n" for t in spider))
    config = job_config(
        tmp_path / "in" / "*", tmp_path / "out", embed=quick_embed,
        prune={"enabled": True, "keep_fraction": 0.9},
        select={"enabled": True, "targets": str(targets), "sae": str(tiny_sae), "ratio": 0.5, "max_tokens": 64},
        rephrase={"enabled": True, "styles": ["medium"], "greedy": True, "max_new_tokens": 24, "max_records": 3,
                  "cache": False},
        mix={"enabled": True, "shards": 2},
    )
    manifest = run_job(plan_job(build_config(config), []))
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert sections(page) == ["funnel", "prune", "select", "rephrase", "mix", "timings"]
    select = manifest["select"]
    assert f"{select['selected']:,} of {select['pool']:,} records kept" in page
    assert f"layer {select['layer']}" in page and select["sae_fingerprint"][:12] in page
    for feature in select["prototype_top_features"][:3]:
        assert f"<td>{feature['feature']}</td><td>{feature['prototype_value']:.4f}</td>" in page
    summary = manifest["rephrase"]["styles_summary"]["medium"]
    assert f"<td>medium</td><td>{summary['generated']}</td>" in page
    made = manifest["counts"]["synthetic"]
    assert f"Rephrasings: {made['generated']:,} generated" in page
    assert page.count("<svg") == 4
    # the report command rebuilds the same page from the output directory alone
    (tmp_path / "out" / "report" / "index.html").unlink()
    assert cli_main(["report", str(tmp_path / "out")]) == 0
    assert sections((tmp_path / "out" / "report" / "index.html").read_text()) == sections(page)
    assert "report/index.html" in capsys.readouterr().out


def test_progress_lines_carry_count_rate_and_eta(monkeypatch, capsys):
    monkeypatch.setenv("WINNOW_PROGRESS", "1")
    progress = Progress("embed", total=100, unit="texts", every_s=0)
    line = progress.advance(25)
    assert re.fullmatch(r"winnow \[embed\] 25/100 texts, [\d,.]+/s, ETA \d+s", line)
    assert progress.advance(75).startswith("winnow [embed] 100/100 texts")
    assert capsys.readouterr().err.count("winnow [embed]") == 2
    monkeypatch.setenv("WINNOW_PROGRESS", "0")
    quiet = Progress("read", every_s=0)
    assert quiet.advance(3).startswith("winnow [read] 3 records, ")
    assert capsys.readouterr().err == ""


def test_progress_is_quiet_in_ci(monkeypatch):
    monkeypatch.delenv("WINNOW_PROGRESS", raising=False)
    monkeypatch.setenv("CI", "1")
    assert not Progress("read").on
