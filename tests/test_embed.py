"""Embed stage: the packaged model, unit vectors equal to a plain encode, and reuse of unchanged texts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import job_config

from winnow.pipelines.config import build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.stages.embed import read_embeddings
from winnow.selectors import embedding

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return embedding.load_model(embedding.resolve_model_path(embedding.PACKAGED_MODEL))


def test_l2_normalise_keeps_zero_rows_zero():
    vectors = embedding.l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, [[0.6, 0.8], [0.0, 0.0]])


def test_threads_per_worker_shares_cores():
    assert embedding.threads_per_worker(3, 2) == 3
    assert embedding.threads_per_worker(0, 1) >= 1


def test_unknown_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(embedding.ModelNotFound, match="no such model directory"):
        embedding.resolve_model_path(str(tmp_path / "nowhere"))


def test_packaged_model_gives_unit_float32_vectors(model):
    vectors = embedding.encode(model, ["a short sentence", "another, somewhat longer sentence about Debian"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_stage_matches_a_plain_encode_and_reuses_unchanged_texts(sample_slice, model, tmp_path):
    output = tmp_path / "out"
    config = job_config(sample_slice / "b_docs.parquet", output, embed={"enabled": True, "window": 16})
    manifest = run_job(plan_job(build_config(config), []))
    ids, vectors = read_embeddings(output)
    shards = pq.read_table(output / "shards")
    assert ids == shards.column("id").to_pylist()
    expected = model.encode(shards.column("text").to_pylist(), normalize_embeddings=True)
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
    assert manifest["embeddings"]["computed_rows"] == 60 and manifest["embeddings"]["reused_rows"] == 0
    assert manifest["embeddings"]["model"] == "all-MiniLM-L6-v2"

    config["validate"] = {"max_text_bytes": 123_456}  # a new validate key: the embed stage runs again
    again = run_job(plan_job(build_config(config), []))
    assert [(s["stage"], s["reused"]) for s in again["stages"]] == [("validate", False), ("embed", False)]
    assert again["embeddings"]["reused_rows"] == 60 and again["embeddings"]["computed_rows"] == 0
    _, reused = read_embeddings(output)
    np.testing.assert_array_equal(reused, vectors)


def test_rows_whose_id_repeats_are_embedded_beside_the_blocks(sample_slice, model, tmp_path):
    """Rows whose id repeats reach the embed stage as pickled records, not in a block; the embeddings output
    merges both kinds of file in input order."""
    import pyarrow as pa

    table = pq.read_table(sample_slice / "b_docs.parquet")
    ids = table.column("id").to_pylist()
    ids[10], ids[40] = ids[3], ids[3]  # row 3 is kept, rows 10 and 40 are rejected as duplicates
    path = tmp_path / "repeats.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids)), path)
    output = tmp_path / "out"
    manifest = run_job(plan_job(build_config(job_config(path, output, embed={"enabled": True, "window": 16})), []))
    got_ids, vectors = read_embeddings(output)
    shards = pq.read_table(output / "shards")
    assert got_ids == shards.column("id").to_pylist() and len(got_ids) == table.num_rows - 2
    np.testing.assert_allclose(vectors, model.encode(shards.column("text").to_pylist(), normalize_embeddings=True),
                               atol=2e-5)
    assert manifest["embeddings"]["computed_rows"] == table.num_rows - 2


def test_embeddings_output_is_written_after_the_model_is_let_go(sample_slice, model, tmp_path, monkeypatch):
    """The embeddings output is a step of its own, built once the embed step's model is gone: at int8
    OpenVINO's 2 GiB would otherwise sit under the write (the whole corpus peaked there). A changed output
    layout reruns only that step, the vectors coming from the cache."""
    import gc
    import weakref

    from winnow.pipelines.engine.embed_model import EmbedHandler
    from winnow.pipelines.stages import embed

    loaded, alive_at_write = [], []
    load = EmbedHandler.load

    def tracked_load(self):
        encoder = load(self)
        loaded.append(weakref.ref(encoder))
        return encoder

    def checked_write(pipeline, files, context):
        gc.collect()
        alive_at_write.append(sum(ref() is not None for ref in loaded))
        return write(pipeline, files, context)

    write = embed._write_embeddings
    monkeypatch.setattr(EmbedHandler, "load", tracked_load)
    monkeypatch.setattr(embed, "_write_embeddings", checked_write)
    output = tmp_path / "out"
    config = job_config(sample_slice / "b_docs.parquet", output, embed={"enabled": True, "window": 16})
    first = run_job(plan_job(build_config(config), []))
    assert len(loaded) == 1 and alive_at_write == [0]
    assert [s["step"] for s in first["stages"][1]["steps"]] == ["embed", "embeddings"]
    ids, vectors = read_embeddings(output)

    config["output"]["row_group_rows"] = 7
    again = run_job(plan_job(build_config(config), []))
    assert [s["reused"] for s in again["stages"][1]["steps"]] == [True, False], "only the output is rewritten"
    assert len(loaded) == 1, "the cached vectors are not embedded again"
    again_ids, again_vectors = read_embeddings(output)
    assert again_ids == ids
    np.testing.assert_array_equal(again_vectors, vectors)
    first_file = output / again["embeddings"]["files"][0]["file"]
    assert pq.ParquetFile(first_file).metadata.row_group(0).num_rows == 7
