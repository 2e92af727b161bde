"""Shared fixtures: small real slices of the bundled sample and of ../shared/data, and job helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARED_DATA = ROOT.parent / "shared" / "data"
SAE_LAYER = 6  # a low layer keeps the tests' forward passes short


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs ../shared/data (see data/sample/README.md)")
    return path


@pytest.fixture
def sample_slice(tmp_path: Path) -> Path:
    """A few hundred real rows of the bundled sample, in two Parquet files (sources of different sizes)."""
    directory = tmp_path / "input"
    directory.mkdir()
    debian = pq.read_table(SAMPLE / "debian_descriptions.parquet")
    docs = pq.read_table(SAMPLE / "docs_paragraphs.parquet")
    pq.write_table(debian.slice(900, 200), directory / "a_debian.parquet", row_group_size=64)
    pq.write_table(docs.slice(0, 60), directory / "b_docs.parquet")
    return directory


def job_config(input_path: Path | str, output: Path, **sections) -> dict:
    config = {
        "input": {"path": str(input_path), "columns": {"id": "id", "text": "text", "source": "source"}},
        "output": {"path": str(output), "shard_rows": 100},
        "embed": {"enabled": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def read_output(output: Path) -> dict:
    manifest = json.loads((output / "manifest.json").read_text())
    return {
        "manifest": manifest,
        "shards": pq.read_table(output / "shards") if (output / "shards").exists() else pa.table({}),
        "ledger": pq.read_table(output / "ledger"),
    }


@pytest.fixture(scope="session")
def quick_embed(tmp_path_factory) -> dict:
    """An embed section for the tests of the pipeline's mechanics (the cache, the stage contract, reports,
    faults), not of embedding quality: the packaged MiniLM cut to its first transformer layer and 128 tokens,
    saved as a sentence-transformers folder and run by the stage's real loading and encoding code. On the
    260-row sample slice its embed stage takes about a quarter of the full model's time (3.8 s against 14.9 s)."""
    from winnow.selectors import embedding

    folder = tmp_path_factory.mktemp("quick-minilm") / "model"
    model = embedding.load_model(embedding.resolve_model_path(embedding.PACKAGED_MODEL))
    transformer = model[0].auto_model
    del transformer.encoder.layer[1:]
    transformer.config.num_hidden_layers = 1
    model.max_seq_length = 128
    model.save(str(folder))
    return {"enabled": True, "model": str(folder)}


@pytest.fixture(scope="session")
def smollm():
    from winnow.selectors import lm

    return lm.load_lm(lm.resolve_lm_path(lm.PACKAGED_LM))


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    table = pq.read_table(SAMPLE / "bigbench_tasks.parquet").to_pandas()
    return [t for _, group in table.groupby("source") for t in group["text"].head(12)]


@pytest.fixture(scope="session")
def tiny_sae(smollm, sample_texts, tmp_path_factory):
    """A TopK SAE (256 features, k 8) trained briefly on the sample's activations and saved by sae-lens."""
    from winnow.selectors import lm
    from winnow.selectors import sae as sae_lib

    model, tokenizer = smollm
    acts = np.concatenate(lm.token_activations(model, tokenizer, sample_texts, [SAE_LAYER], 64)[SAE_LAYER])
    settings = sae_lib.SaeTrainingSettings(d_sae=256, k=8, steps=30, batch_tokens=256)
    trained = sae_lib.train_sae(acts, settings, {"winnow_layer": SAE_LAYER})
    return sae_lib.save_sae(trained, tmp_path_factory.mktemp("sae") / "sae")


def outputs_equal(first: Path, second: Path) -> None:
    """Shards, ledger and embeddings byte for byte, and the same counts."""
    for part in ("shards", "ledger", "embeddings"):
        files = sorted(p.name for p in (first / part).glob("*.parquet"))
        assert files == sorted(p.name for p in (second / part).glob("*.parquet")), part
        for name in files:
            assert (first / part / name).read_bytes() == (second / part / name).read_bytes(), f"{part}/{name}"
    assert read_output(first)["manifest"]["counts"] == read_output(second)["manifest"]["counts"]


def targets_file(directory: Path) -> Path:
    """Three real documentation paragraphs of the sample as select targets (JSON Lines)."""
    path = directory / "targets.jsonl"
    texts = pq.read_table(SAMPLE / "docs_paragraphs.parquet").column("text").to_pylist()[200:203]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


@pytest.fixture(scope="session")
def dask_address(tmp_path_factory):
    """A Dask cluster of separate processes on 127.0.0.1 (a scheduler and two single-threaded workers, each in
    its own working directory), shared by the tests that run on it."""
    pytest.importorskip("distributed")
    from winnow.pipelines.engine.dask_cluster import local_cluster

    with local_cluster(workers=2, threads=1, directory=tmp_path_factory.mktemp("dask")) as address:
        yield address
