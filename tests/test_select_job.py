"""The select stage inside the job: exactly n kept, the same records the in-memory reference picks, a score
in the ledger for every record, and the manifest naming model, layer and SAE."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SAE_LAYER, SAMPLE, job_config

from winnow.pipelines.cli import main as cli_main
from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.stages.embed import read_embeddings
from winnow.selectors import embedding, lm, task_selection
from winnow.selectors import sae as sae_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """36 real BIG-bench rows (12 each of addition, text-to-SQL, summarisation) and 4 other SQL targets."""
    root = tmp_path_factory.mktemp("select")
    table = pq.read_table(SAMPLE / "bigbench_tasks.parquet").to_pandas()
    parts = [group.iloc[12:24] for _, group in table.groupby("source")]
    import pandas as pd

    pool = pd.concat(parts).reset_index(drop=True)
    pq.write_table(pq.read_table(SAMPLE / "bigbench_tasks.parquet").take(
        [int(i) for i in table.index[table["id"].isin(pool["id"])]]), root / "pool.parquet")
    targets = table[table["source"] == "semantic_parsing_spider"].iloc[30:34]
    with open(root / "targets.jsonl", "w") as handle:
        for text in targets["text"]:
            handle.write(json.dumps({"text": text}) + "\n")
    return root, pq.read_table(root / "pool.parquet").to_pandas(), targets["text"].tolist()


def run(root, name, **select):
    config = job_config(root / "pool.parquet", root / name,
                        select={"enabled": True, "targets": str(root / "targets.jsonl"), **select})
    config["embed"]["enabled"] = "auto"  # on only for method embedding
    return run_job(plan_job(build_config(config), [])), root / name


def ledger_of(output):
    return pq.read_table(output / "ledger").to_pandas().set_index("id")


def test_mona_selects_exactly_the_reference_top_n(pool, tiny_sae, smollm):
    root, table, targets = pool
    manifest, output = run(root, "mona", method="mona", sae=str(tiny_sae), count=12, max_tokens=64)
    ledger = ledger_of(output)
    assert len(ledger) == 36 and ledger.index.is_unique
    assert (ledger["fate"] == "kept").sum() == 12
    assert set(ledger.loc[ledger["fate"] == "not_selected", "stage"]) == {"select"}
    assert ledger["sae_score"].notna().all() and (ledger["sae_score"] == ledger["select_score"]).all()

    model, tokenizer = smollm
    sae = sae_lib.load_sae(tiny_sae)
    codes = sae_lib.sample_codes(model, tokenizer, sae, table["text"].tolist(), SAE_LAYER, 64, 16)
    proto = task_selection.prototype(sae_lib.sample_codes(model, tokenizer, sae, targets, SAE_LAYER, 64, 16))
    scores = task_selection.jaccard_to_prototype(codes, proto)
    expected = set(table["id"].iloc[task_selection.select_top(scores, table["id"].tolist(), 12, 0)])
    assert set(ledger.index[ledger["fate"] == "kept"]) == expected
    np.testing.assert_allclose(ledger.loc[table["id"], "sae_score"].to_numpy(), scores, rtol=1e-6)
    kept_sources = table.set_index("id").loc[sorted(expected), "source"]
    assert (kept_sources == "semantic_parsing_spider").sum() >= 10, kept_sources.value_counts()

    section = manifest["select"]
    assert section["pool"] == 36 and section["selected"] == 12 and section["layer"] == SAE_LAYER
    assert section["model"] == lm.PACKAGED_LM and section["d_sae"] == 256 and section["sae_k"] == 8
    assert section["sae_fingerprint"] == sae_lib.sae_fingerprint(tiny_sae)
    assert section["threshold_score"] == pytest.approx(np.sort(scores)[-12])
    features = section["prototype_top_features"]
    assert [f["feature"] for f in features] == np.argsort(-proto, kind="stable")[: len(features)].tolist()
    for feature in features:
        values = [r["value"] for r in feature["top_records"]]
        assert values == sorted(values, reverse=True) and len(values) <= 3
    assert manifest["counts"]["by_fate"] == {"kept": 12, "not_selected": 24}


def test_mona_on_a_bm25_shortlist_scores_only_the_shortlist(pool, tiny_sae, smollm, tmp_path):
    """select.shortlist: BM25 keeps the exact top multiple x n, MONA scores only those, the rest are
    `not_selected` as outside the shortlist with no SAE score; a new multiple reuses the shortlist step."""
    root, table, targets = pool
    manifest, output = run(root, "shortlist", method="mona", sae=str(tiny_sae), count=6, max_tokens=64,
                           shortlist="bm25", shortlist_multiple=2)
    ledger = ledger_of(output)
    ids = table["id"].tolist()
    bm25 = task_selection.bm25_scores(table["text"].tolist(), task_selection.Bm25Query.from_targets(targets))
    shortlist = task_selection.select_top(bm25, ids, 12, 0)
    model, tokenizer = smollm
    sae = sae_lib.load_sae(tiny_sae)
    texts = table["text"].iloc[shortlist].tolist()
    proto = task_selection.prototype(sae_lib.sample_codes(model, tokenizer, sae, targets, SAE_LAYER, 64, 16))
    scores = task_selection.jaccard_to_prototype(sae_lib.sample_codes(model, tokenizer, sae, texts, SAE_LAYER, 64, 16),
                                                 proto)
    shortlisted = [ids[i] for i in shortlist]
    expected = {shortlisted[i] for i in task_selection.select_top(scores, shortlisted, 6, 0)}
    assert set(ledger.index[ledger["fate"] == "kept"]) == expected
    np.testing.assert_allclose(ledger.loc[shortlisted, "sae_score"].to_numpy(), scores, rtol=1e-6)
    outside = ledger.drop(index=shortlisted)
    assert len(outside) == 24 and set(outside["reason"]) == {"outside_shortlist_bm25"}
    assert outside["sae_score"].isna().all() and outside["select_score"].isna().all()
    assert outside["detail"].str.contains("outside the shortlist of the top 12 \\(2 x 6\\)").all()
    below = ledger.loc[shortlisted][lambda frame: frame["fate"] == "not_selected"]
    assert len(below) == 6 and set(below["reason"]) == {"below_threshold_mona"}
    section = manifest["select"]
    assert (section["shortlist"], section["shortlist_multiple"], section["shortlisted"]) == ("bm25", 2, 12)
    assert section["pool"] == 36 and section["selected"] == 6
    assert "Only the 12 records of a bm25 shortlist" in (output / "report" / "index.html").read_text()

    again, _ = run(root, "shortlist", method="mona", sae=str(tiny_sae), count=6, max_tokens=64,
                   shortlist="bm25", shortlist_multiple=3)
    select_steps = [s for s in again["stages"] if s["stage"] == "select"][0]["steps"]
    assert [step["reused"] for step in select_steps] == [True, False, False], "BM25 is not rescored"
    assert again["select"]["shortlisted"] == 18


@pytest.mark.parametrize("method", ["bm25", "random", "embedding"])
def test_baselines_select_the_reference_top_n(pool, method):
    root, table, targets = pool
    manifest, output = run(root, method, method=method, ratio=0.25, seed=3)
    ledger = ledger_of(output)
    ids = table["id"].tolist()
    if method == "bm25":
        scores = task_selection.bm25_scores(table["text"].tolist(), task_selection.Bm25Query.from_targets(targets))
    elif method == "random":
        scores = np.array([task_selection.random_score(3, i) for i in ids])
    else:
        embedded_ids, vectors = read_embeddings(output)
        assert embedded_ids == ids
        model = embedding.load_model(embedding.resolve_model_path(embedding.PACKAGED_MODEL))
        scores = vectors @ task_selection.embedding_prototype(embedding.encode(model, targets))
    expected = set(np.array(ids)[task_selection.select_top(scores, ids, 9, 3)])
    assert set(ledger.index[ledger["fate"] == "kept"]) == expected
    assert ledger["sae_score"].isna().all()
    np.testing.assert_allclose(ledger.loc[ids, "select_score"].to_numpy(), scores, rtol=1e-5, atol=1e-7)
    assert manifest["select"]["selected"] == 9 and manifest["select"]["method"] == method


def test_select_config_errors_are_one_line(pool, tmp_path, capsys):
    root, _, _ = pool
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(job_config(root / "pool.parquet", tmp_path / "o",
                                            select={"enabled": True, "targets": str(root / "targets.jsonl")})))
    assert cli_main(["run", str(config)]) == 2
    assert "select.sae: required for method mona" in capsys.readouterr().err
    assert cli_main(["run", str(config), "--set", "select.sae=/nowhere"]) == 2
    assert "/nowhere: not an SAE directory" in capsys.readouterr().err
    assert cli_main(["run", str(config), "--set", "select.method=bm25", "--set", "select.targets=/no/t.jsonl"]) == 2
    assert "no input files match" in capsys.readouterr().err
    assert cli_main(["run", str(config), "--set", "select.method=bm25", "--set", "select.shortlist=bm25"]) == 2
    assert "select.shortlist: only for method mona (method is bm25)" in capsys.readouterr().err
