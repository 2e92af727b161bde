"""The prune stage inside the job decides exactly what the in-memory reference (prune_pool) decides, and the
ledger explains every removal."""

from __future__ import annotations

import collections
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import job_config

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.stages.embed import read_embeddings
from winnow.pipelines.stages.prune.common import settings_from
from winnow.selectors.pruning import prune_pool

pytestmark = pytest.mark.slow

PRUNE = {"enabled": True, "keep_fraction": 0.4, "semdedup": {"eps": 0.15}, "kmeans": {"niter": 30}}


def run(config):
    return run_job(plan_job(build_config(config), []))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from conftest import SAMPLE

    root = tmp_path_factory.mktemp("prune")
    (root / "input").mkdir()
    debian = pq.read_table(SAMPLE / "debian_descriptions.parquet")
    pq.write_table(debian.slice(0, 240), root / "input" / "a.parquet")
    output = root / "out"
    manifest = run(job_config(root / "input" / "*", output, embed={"enabled": True}, prune=PRUNE))
    return root, output, manifest


@pytest.mark.parametrize("recluster", [False, True])
def test_stage_matches_the_in_memory_reference(pruned, recluster, tmp_path):
    root, output, manifest = pruned
    if recluster:
        manifest = run(job_config(root / "input" / "*", tmp_path / "re", embed={"enabled": True, "model":
                                  "all-MiniLM-L6-v2"}, prune={**PRUNE, "recluster": True}))
        output = tmp_path / "re"
    ids, vectors = read_embeddings(output)
    config = build_config(job_config("x", output, prune={**PRUNE, "recluster": recluster}))
    reference = prune_pool(vectors, settings_from(config.prune))
    ledger = {row["id"]: row for row in pq.read_table(output / "ledger").to_pylist()}
    assert [ledger[i]["cluster"] for i in ids] == reference["labels"].tolist()
    assert [ledger[i]["fate"] == "deduplicated" for i in ids] == reference["deduplicated"].tolist()
    assert [ledger[i]["fate"] == "kept" for i in ids] == reference["kept"].tolist()
    assert [c["quota"] for c in manifest["prune"]["clusters"]] == reference["cluster_quota"].tolist()
    np.testing.assert_allclose([ledger[i]["dist_to_centroid"] for i in ids], reference["dist"], atol=1e-5)


def test_ledger_explains_every_removal(pruned):
    _, output, manifest = pruned
    ledger = pq.read_table(output / "ledger").to_pylist()
    by_id = {row["id"]: row for row in ledger}
    fates = collections.Counter(row["fate"] for row in ledger)
    plan = manifest["prune"]
    assert sum(fates.values()) == 240 == plan["records"]
    assert plan["budget"] == 96 == fates["kept"]
    assert fates["deduplicated"] == 240 - plan["survivors"] > 0
    assert fates["pruned"] == plan["survivors"] - plan["budget"]
    assert plan["k"] == 15 and len(plan["clusters"]) == 15
    for row in ledger:
        if row["fate"] == "deduplicated":
            earlier = by_id[row["duplicate_of"]]
            assert earlier["cluster"] == row["cluster"] and row["detail"].startswith("cosine ")
        if row["fate"] == "pruned":
            quota = plan["clusters"][row["cluster"]]["quota"]
            assert row["reason"] == "dbp" and f"keeps {quota} of" in row["detail"]
    shards = pq.read_table(output / "shards")
    assert sorted(shards.column("id").to_pylist()) == sorted(r["id"] for r in ledger if r["fate"] == "kept")


@pytest.mark.parametrize("strategy", ["ssp", "random", "none"])
def test_baseline_strategies_keep_the_budget(pruned, strategy):
    root, output, first = pruned
    manifest = run(job_config(root / "input" / "*", output, embed={"enabled": True},
                              prune={**PRUNE, "strategy": strategy}))
    assert manifest["embeddings"]["reused_rows"] == 240, "the second run reuses the embeddings"
    kept = manifest["counts"]["by_fate"]["kept"]
    survivors = manifest["prune"]["survivors"]
    assert kept == (survivors if strategy == "none" else 96)
    assert survivors == first["prune"]["survivors"]


def test_the_random_strategy_matches_the_reference_whatever_keep_says(pruned, tmp_path):
    """`strategy: random` with the default `keep: hard` keeps a uniform sample of each cluster (issue 16): the
    stage decides what the in-memory reference decides, and the kept records are not the hardest ones."""
    root, output, _ = pruned
    out = tmp_path / "random"
    shutil.copytree(output, out)  # its embeddings are reused
    run(job_config(root / "input" / "*", out, embed={"enabled": True}, prune={**PRUNE, "strategy": "random"}))
    ids, vectors = read_embeddings(out)
    config = build_config(job_config("x", out, prune={**PRUNE, "strategy": "random"}))
    reference = prune_pool(vectors, settings_from(config.prune))
    ledger = {row["id"]: row for row in pq.read_table(out / "ledger").to_pylist()}
    assert [ledger[i]["fate"] == "kept" for i in ids] == reference["kept"].tolist()
    survivors = ~reference["deduplicated"]
    hardest = np.zeros(len(ids), dtype=bool)
    for cluster in np.unique(reference["labels"]):
        members = np.flatnonzero((reference["labels"] == cluster) & survivors)
        quota = int(reference["kept"][members].sum())
        hardest[members[np.argsort(-reference["dist"][members], kind="stable")[:quota]]] = True
    assert (reference["kept"] & ~hardest).sum() > 0.3 * reference["kept"].sum(), "not the hardest of each cluster"


def _blocks(directory, sizes, dim, rng):
    """Embed-stage blocks of `sizes` rows (row groups of 5,000), input rows numbered across the files."""
    import pyarrow as pa

    from winnow.pipelines.io.blocks import embedded_block, write_block

    paths, start = [], 0
    for number, size in enumerate(sizes):
        rows = np.arange(start, start + size)
        core = {"file_index": pa.array(np.zeros(size, dtype=np.int64)), "input_row": pa.array(rows),
                "id": [f"r{row}" for row in rows.tolist()], "text": [f"text {row}" for row in rows.tolist()],
                "source": ["s"] * size, "input_file": ["in.parquet"] * size,
                "text_hash": [f"{row:032x}" for row in rows.tolist()], "note": [None] * size}
        write_block(str(directory), f"records/block-{number:05d}.parquet",
                    embedded_block(core, rng.standard_normal((size, dim)).astype(np.float32)))
        paths.append(str(directory / "records" / f"block-{number:05d}.parquet"))
        start += size
    return paths


def test_the_fit_sample_through_scratch_files_is_the_smallest_rows_of_all(tmp_path):
    """The fit sample's vectors no longer travel as pipeline elements: fit-keys' bound, each file's rows at or
    under it written apart, and the driver's merge give exactly the n smallest (hash, order key) rows of all the
    files with their vectors, and every row counted, as one pass over all the rows at once does."""
    from winnow.pipelines.io.cached_rows import CachedRows
    from winnow.pipelines.stages.prune.clusters import _write_candidates, read_sample
    from winnow.pipelines.stages.prune.common import (
        SmallestRows,
        candidates,
        file_candidates,
        sample_bound,
        smallest_of,
    )

    paths = _blocks(tmp_path / "up", [7_000, 0, 5_500, 300], 4, np.random.default_rng(0))
    n, seed = 1_000, 3
    keys_only = smallest_of([file_candidates(path, seed, n, vectors=False) for path in paths], n)
    assert keys_only[2].shape == (n, 0) and keys_only[3] == 12_800
    parts = [_write_candidates(path, seed, n, sample_bound(keys_only), str(tmp_path / "fit")) for path in paths]
    assert sum(len(np.load(part)["hashes"]) for part, _ in parts) == n  # only the sample's rows were written
    sample = read_sample(parts, n)

    whole = [CachedRows.read(path) for path in paths]
    reference = smallest_of([candidates(rows.keys(), rows.ids(), rows.vectors(), seed, n) for rows in whole
                             if len(rows)] + [SmallestRows(n).extract_output(None)], n)
    assert sample[3] == reference[3] == 12_800
    for got, expected in zip(sample[:3], reference[:3], strict=True):
        np.testing.assert_array_equal(got, expected)
