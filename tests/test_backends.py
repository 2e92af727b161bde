"""Embedding backends: ONNX (fp32, int8), OpenVINO (fp32, int8) and static exports of the packaged model, made once by
fingerprint, their vectors against torch's, the embed stage on each backend (never reusing another backend's
vectors), and the errors a user gets for a bad backend, an unexportable model folder or a GPU setting without a
GPU."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import job_config

from winnow.pipelines.cli import main
from winnow.pipelines.config import ConfigError, build_config
from winnow.pipelines.job import plan_job, run_job
from winnow.pipelines.stages.embed import read_embeddings
from winnow.selectors import backends, embedding

pytestmark = pytest.mark.slow

TEXTS = ["libc6-dev: GNU C Library: development libraries and header files",
         "The Python interpreter, version 3.11, with its standard library.",
         "a short one", "Ein deutscher Satz über Pakete und Abhängigkeiten.", ""]


@pytest.fixture(scope="module")
def packaged():
    path = embedding.resolve_model_path(embedding.PACKAGED_MODEL)
    return path, embedding.model_fingerprint(path)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def reference(packaged):
    return backends.load_encoder("torch", packaged[0]).encode(TEXTS)


def test_a_choice_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="embed.backend: 'tensorrt'"):
        backends.check_choice("tensorrt", "fp32")
    with pytest.raises(ValueError, match="int8 needs embed.backend onnx or openvino"):
        backends.check_choice("static", "int8")


@pytest.mark.parametrize(("overrides", "key"), [
    ({"backend": "tensorrt"}, "embed.backend"),
    ({"precision": "int8"}, "embed.precision"),  # torch has no int8 here
    ({"backend": "onnx", "device": "cuda"}, "embed.device"),
])
def test_config_names_the_key_of_a_bad_backend_setting(overrides, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(job_config(tmp_path / "in.parquet", tmp_path / "out", embed={"enabled": True, **overrides}))


def test_onnx_fp32_is_the_torch_model_and_int8_stays_close(packaged, export_dir, reference):
    path, fingerprint = packaged
    fp32 = backends.ensure_export(path, fingerprint, "onnx", "fp32", export_dir)
    assert fp32 == backends.export_path(export_dir, fingerprint, "onnx", "fp32")
    vectors = backends.load_encoder("onnx", fp32, threads=1).encode(TEXTS, batch_size=2)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.sum(vectors * reference, axis=1), 1.0, atol=1e-4)
    int8 = backends.ensure_export(path, fingerprint, "onnx", "int8", export_dir)
    quantised = backends.load_encoder("onnx", int8, threads=1).encode(TEXTS, batch_size=2)
    cosine = np.sum(quantised * reference, axis=1)
    assert cosine.min() > 0.97 and not np.allclose(cosine, 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(quantised, axis=1), 1.0, atol=1e-5)


def test_openvino_is_the_torch_model_whatever_its_threads(packaged, export_dir, reference):
    path, fingerprint = packaged
    folder = backends.ensure_export(path, fingerprint, "openvino", "fp32", export_dir)
    assert folder == backends.export_path(export_dir, fingerprint, "openvino", "fp32")
    assert (folder / "openvino_model.xml").exists() and not (folder / "model.onnx").exists()
    vectors = backends.load_encoder("openvino", folder, threads=1).encode(TEXTS, batch_size=2)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    two_threads = backends.load_encoder("openvino", folder, threads=2).encode(TEXTS, batch_size=2)
    assert np.array_equal(two_threads, vectors)  # one worker or two: the same bytes on every runner


def test_openvino_int8_is_quantised_on_the_packaged_calibration_set(packaged, export_dir, reference):
    path, fingerprint = packaged
    assert len(backends.calibration_texts()) == 300
    folder = backends.ensure_export(path, fingerprint, "openvino", "int8", export_dir)
    assert folder.name.endswith(f"-c{backends.CALIBRATION_SHA256[:8]}")  # a new calibration set, a new export
    assert folder == backends.export_path(export_dir, fingerprint, "openvino", "int8")
    import openvino

    model = openvino.Core().read_model(str(folder / "openvino_model.xml"))
    products = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
    assert len(products) == 48 and all(  # the six layers' eight MatMuls, each fed through a quantiser
        any(port.get_source_output().get_node().get_type_name() == "FakeQuantize" for port in op.inputs())
        for op in products)
    vectors = backends.load_encoder("openvino", folder, threads=1).encode(TEXTS, batch_size=2)
    cosine = np.sum(vectors * reference, axis=1)
    assert cosine[:-1].min() > 0.99 and cosine[-1] > 0.9  # the empty text ([CLS] [SEP] alone) moves most
    assert not np.allclose(cosine, 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    two_threads = backends.load_encoder("openvino", folder, threads=2).encode(TEXTS, batch_size=2)
    assert np.array_equal(two_threads, vectors)


def test_a_changed_calibration_set_is_refused(tmp_path, monkeypatch):
    changed = tmp_path / "calibration.jsonl"
    changed.write_bytes(backends.CALIBRATION_FILE.read_bytes() + b'{"text": "one more"}\n')
    monkeypatch.setattr(backends, "CALIBRATION_FILE", changed)
    with pytest.raises(backends.ExportFailed, match="not the calibration set"):
        backends.calibration_texts()


def test_an_export_is_made_once_and_found_by_fingerprint(packaged, export_dir, monkeypatch):
    path, fingerprint = packaged
    folder = backends.ensure_export(path, fingerprint, "onnx", "fp32", export_dir)

    def refuse(*_):
        raise AssertionError("exported again")

    monkeypatch.setattr(backends, "_export_onnx", refuse)
    assert backends.ensure_export(path, fingerprint, "onnx", "fp32", export_dir) == folder
    assert not [p for p in export_dir.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_batch_order_does_not_change_a_text_vector(packaged, export_dir):
    folder = backends.ensure_export(*packaged, "onnx", "fp32", export_dir)
    encoder = backends.load_encoder("onnx", folder, threads=1)
    together = encoder.encode(TEXTS, batch_size=8)
    np.testing.assert_allclose(encoder.encode(TEXTS[::-1], batch_size=8)[::-1], together, atol=1e-5)


class _Recording(backends._GraphEncoder):
    """The graph encoder's batching over a stand-in graph that records each batch's shape and gives each text the
    one-hot vector of the batch it ran in (first batch: dimension 0)."""

    def __init__(self, folder):
        super().__init__(folder, None)
        self.shapes: list[tuple[int, int]] = []

    def run(self, feed):
        self.shapes.append(feed["input_ids"].shape)
        vectors = np.zeros((len(feed["input_ids"]), 3), dtype=np.float32)
        vectors[:, len(self.shapes) - 1] = 1.0
        return vectors


def test_graph_batches_are_cut_from_the_shortest_text_and_run_longest_first(packaged, export_dir):
    """The runtime sizes its buffers once, for the longest batch (OpenVINO grew them batch after batch when the
    lengths rose: docs/NOTES.md); the batches themselves, and so the vectors, are the ones cut from the shortest
    text."""
    encoder = _Recording(backends.ensure_export(*packaged, "onnx", "fp32", export_dir))
    texts = [" ".join(["word"] * n) for n in (7, 1, 30, 4, 12, 2, 20, 9)]
    vectors = encoder.encode(texts, batch_size=3)
    assert [size for size, _ in encoder.shapes] == [2, 3, 3], "the partial batch holds the longest texts"
    lengths = [tokens for _, tokens in encoder.shapes]
    assert lengths == sorted(lengths, reverse=True), lengths
    # by length: [1, 2, 4] words, [7, 9, 12], [20, 30]; the last of these runs first
    assert vectors.argmax(axis=1).tolist() == [1, 2, 0, 2, 1, 2, 0, 1]


def test_static_model_is_distilled_locally_and_gives_256_dimensions(packaged, export_dir, reference):
    folder = backends.ensure_export(*packaged, "static", "fp32", export_dir)
    vectors = backends.load_encoder("static", folder).encode(TEXTS)
    assert vectors.shape == (len(TEXTS), backends.STATIC_DIMS) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:-1], axis=1), 1.0, atol=1e-5)
    assert np.all(vectors[-1] == 0)  # an empty text has no token: a zero row, never NaN
    static_similarity = vectors[:2] @ vectors[:2].T
    assert static_similarity[0, 1] < 0.99  # two different texts stay apart


def test_unexportable_model_folder_is_one_line_naming_the_key(tmp_path, sample_slice, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code = main(["run", str(_config_file(tmp_path, sample_slice)), "--set", f"embed.model={tmp_path / 'model'}",
                 "--set", "embed.backend=onnx", "--set", f"embed.export_dir={tmp_path / 'exports'}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("winnow: error: embed.backend: onnx fp32: cannot")


@pytest.mark.skipif(embedding.choose_device("auto") == "cuda", reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line_naming_the_key(tmp_path, sample_slice, capsys):
    code = main(["run", str(_config_file(tmp_path, sample_slice)), "--set", "embed.device=cuda"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error == ["winnow: error: embed.device: cuda, but torch sees no CUDA device here "
                                   "(use auto or cpu)"]


def _config_file(tmp_path, sample_slice):
    import yaml

    config = job_config(sample_slice / "b_docs.parquet", tmp_path / "out", embed={"enabled": True})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_stage_on_each_backend_never_reuses_another_backends_vectors(sample_slice, export_dir, tmp_path):
    output = tmp_path / "out"
    embed = {"enabled": True, "window": 16, "export_dir": str(export_dir)}
    config = job_config(sample_slice / "b_docs.parquet", output, embed=embed)
    torch_run = run_job(plan_job(build_config(config), []))
    _, torch_vectors = read_embeddings(output)
    config["embed"] = {**embed, "backend": "onnx", "precision": "int8"}
    onnx_run = run_job(plan_job(build_config(config), []))
    ids, onnx_vectors = read_embeddings(output)
    assert torch_run["embeddings"]["computed_rows"] == onnx_run["embeddings"]["computed_rows"] == 60
    assert onnx_run["embeddings"]["reused_rows"] == 0  # the torch run's vectors are the same texts, not reused
    assert onnx_run["embeddings"]["backend"] == "onnx" and onnx_run["embeddings"]["precision"] == "int8"
    assert ids == pq.read_table(output / "shards").column("id").to_pylist()
    cosine = np.sum(torch_vectors * onnx_vectors, axis=1)
    assert cosine.min() > 0.97 and cosine.max() < 1.0 - 1e-6
    again = run_job(plan_job(build_config(config), []))  # the same backend: its own vectors are reused
    assert [s["reused"] for s in again["stages"]] == [True, True]
    config["embed"] = {**embed, "backend": "static"}
    run_job(plan_job(build_config(config), []))
    assert read_embeddings(output)[1].shape == (60, backends.STATIC_DIMS)
    config["embed"] = {**embed, "backend": "openvino"}
    openvino_run = run_job(plan_job(build_config(config), []))
    assert openvino_run["embeddings"]["computed_rows"] == 60 and openvino_run["embeddings"]["backend"] == "openvino"
    np.testing.assert_allclose(read_embeddings(output)[1], torch_vectors, atol=1e-5)


def test_embed_export_command_makes_the_export_a_run_then_finds(tmp_path, sample_slice, packaged, export_dir,
                                                                capsys):
    config = _config_file(tmp_path, sample_slice)
    code = main(["embed", "export", str(config), "--set", "embed.backend=onnx", "--set",
                 f"embed.export_dir={export_dir}"])
    folder = backends.export_path(export_dir, packaged[1], "onnx", "fp32")
    assert code == 0 and capsys.readouterr().out.strip().endswith(str(folder))
    assert (folder / "winnow-export.json").exists()
    assert main(["embed", "export", str(config), "--set", "embed.backend=tensorrt"]) == 2
    assert "embed.backend" in capsys.readouterr().err


def test_embedding_selection_embeds_its_targets_with_the_pools_backend(sample_slice, export_dir, tmp_path):
    """The pool's vectors come from embed.backend; the targets must too (a static pool has 256 dimensions)."""
    from conftest import targets_file

    select = {"enabled": True, "method": "embedding", "targets": str(targets_file(tmp_path)), "count": 10}
    config = job_config(sample_slice / "b_docs.parquet", tmp_path / "out", select=select,
                        embed={"enabled": True, "backend": "static", "export_dir": str(export_dir)})
    manifest = run_job(plan_job(build_config(config), []))
    assert manifest["select"]["selected"] == 10 and manifest["select"]["embed_backend"] == "static"


def test_two_tier_semdedup_confirms_the_static_candidates_with_the_full_model(sample_slice, packaged, export_dir,
                                                                               tmp_path):
    """`prune.semdedup.confirm: torch` on static embeddings: the pairs inside each cluster whose static cosine
    passes 1 - candidate_eps are the candidates; their rows alone are embedded by the packaged model, and the
    pairs whose cosine there passes 1 - eps are SemDeDup's. Counted exactly against the same computation here,
    and every removal's full-model cosine to the record it duplicates passes eps."""

    eps, candidate_eps = 0.05, 0.15
    prune = {"enabled": True, "keep_fraction": 1.0, "strategy": "none", "kmeans": {"k": 4},
             "semdedup": {"eps": eps, "confirm": "torch", "candidate_eps": candidate_eps}}
    embed = {"enabled": True, "backend": "static", "export_dir": str(export_dir)}
    manifest = run_job(plan_job(build_config(job_config(sample_slice / "*", tmp_path / "out", embed=embed,
                                                        prune=prune)), []))
    ids, static = read_embeddings(tmp_path / "out")
    ledger = {row["id"]: row for row in pq.read_table(tmp_path / "out" / "ledger").to_pylist()}
    texts = {row["id"]: row["text"] for path in sorted(sample_slice.glob("*.parquet"))
             for row in pq.read_table(path).to_pylist()}
    clusters = np.array([ledger[i]["cluster"] for i in ids])
    same = clusters[:, None] == clusters[None, :]
    upper = np.triu(np.ones_like(same), 1).astype(bool)
    candidates = same & upper & (static @ static.T > 1 - candidate_eps)
    rows = np.flatnonzero(candidates.any(axis=0) | candidates.any(axis=1))
    full = np.zeros((len(ids), 384), np.float32)
    full[rows] = backends.load_encoder("torch", packaged[0]).encode([texts[ids[r]] for r in rows])
    confirmed = candidates & (full @ full.T > 1 - eps)
    counts = manifest["prune"]["confirm"]
    assert (counts["backend"], counts["precision"]) == ("torch", "fp32")
    assert counts["candidate_pairs"] == int(candidates.sum()) > counts["confirmed_pairs"] == int(confirmed.sum()) > 0
    assert counts["rows_embedded"] == len(rows) < len(ids)
    position = {i: n for n, i in enumerate(ids)}
    removed = [row for row in ledger.values() if row["stage"] == "semdedup"]
    assert removed and all(full[position[row["id"]]] @ full[position[row["duplicate_of"]]] > 1 - eps
                           for row in removed)
