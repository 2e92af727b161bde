"""The selection model and SAE on real text: activations without position 0 and padding, mean pooling,
SAE save/load, and `winnow sae train`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAE_LAYER as LAYER
from conftest import SAMPLE

from winnow.pipelines.cli import main as cli_main
from winnow.selectors import lm
from winnow.selectors import sae as sae_lib

pytestmark = pytest.mark.slow


def test_activations_drop_position_zero_and_padding(smollm):
    model, tokenizer = smollm
    short, long = "The cat sat.", "A much longer sentence that forces the short one to be padded in its batch."
    alone = lm.token_activations(model, tokenizer, [short], [LAYER, 9], 64)
    batched = lm.token_activations(model, tokenizer, [long, short], [LAYER, 9], 64, batch_size=2)
    tokens = len(tokenizer(short)["input_ids"])
    for layer in (LAYER, 9):
        assert alone[layer][0].shape == (tokens - 1, model.config.hidden_size)
        np.testing.assert_allclose(batched[layer][1], alone[layer][0], atol=2e-4)
    # the rows are hidden_states[layer][1:] of a plain forward pass
    with torch.inference_mode():
        ids = tokenizer([short], return_tensors="pt")
        reference = model(**ids, output_hidden_states=True).hidden_states[LAYER][0, 1:].numpy()
    np.testing.assert_allclose(alone[LAYER][0], reference, atol=1e-5)


def test_sample_codes_are_the_mean_over_real_tokens(smollm, tiny_sae, sample_texts):
    model, tokenizer = smollm
    sae = sae_lib.load_sae(tiny_sae)
    texts = [sample_texts[0], sample_texts[20], sample_texts[30]]  # different lengths: padding in the batch
    codes = sae_lib.sample_codes(model, tokenizer, sae, texts, LAYER, 64, batch_size=3)
    streams = lm.token_activations(model, tokenizer, texts, [LAYER], 64)[LAYER]
    with torch.inference_mode():
        expected = np.stack([sae.encode(torch.from_numpy(s)).mean(dim=0).numpy() for s in streams])
    np.testing.assert_allclose(codes.to_dense(), expected, atol=1e-5)
    assert all(np.count_nonzero(row) <= 8 * len(s) for row, s in zip(expected, streams, strict=True))


def test_sae_round_trips_through_save_and_load(tiny_sae, smollm, sample_texts, tmp_path):
    model, tokenizer = smollm
    first = sae_lib.load_sae(tiny_sae)
    copy = sae_lib.save_sae(first, tmp_path / "copy")
    second = sae_lib.load_sae(copy)
    acts = torch.from_numpy(lm.token_activations(model, tokenizer, sample_texts[:4], [LAYER], 64)[LAYER][3])
    with torch.inference_mode():
        assert torch.equal(first.encode(acts), second.encode(acts))
    assert sae_lib.sae_layer(second) == LAYER
    assert json.loads((copy / "cfg.json").read_text())["d_sae"] == 256


def test_sae_train_command_writes_an_sae_with_its_layer(tmp_path, capsys):
    source = tmp_path / "corpus.parquet"
    table = pq.read_table(SAMPLE / "bigbench_tasks.parquet").slice(0, 30)
    pq.write_table(table, source)
    code = cli_main(["sae", "train", "--input", str(source), "--out", str(tmp_path / "sae"), "--layer", "4",
                     "--d-sae", "128", "--k", "4", "--steps", "5", "--batch-tokens", "128", "--max-tokens", "32"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layer"] == 4 and summary["texts"] == 30 and summary["d_sae"] == 128
    assert sae_lib.sae_layer(sae_lib.load_sae(tmp_path / "sae")) == 4
    assert np.isfinite(summary["explained_variance_held_out"]) and summary["explained_variance_held_out"] <= 1.0


def test_sae_train_command_rejects_a_missing_column(tmp_path, capsys):
    source = tmp_path / "corpus.parquet"
    pq.write_table(pq.read_table(SAMPLE / "bigbench_tasks.parquet").slice(0, 3), source)
    code = cli_main(["sae", "train", "--input", str(source), "--out", str(tmp_path / "sae"), "--text-column", "body"])
    assert code == 2
    assert "no column 'body'" in capsys.readouterr().err


def test_mean_codes_of_a_large_pool_stay_sparse():
    """10^5 samples with a 16k-feature SAE: a dense (samples, d_sae) matrix would take 6.5 GB."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16384, k=4))
    samples = 100_000
    owners = np.repeat(np.arange(samples), 2)
    tokens = torch.randn(len(owners), 8)
    codes = sae_lib.mean_codes(sae, tokens, owners, samples)
    assert len(codes) == samples and codes.dim == 16384
    assert codes.values.nbytes < 8 * samples * 4 * 2  # at most k x tokens non-zeros per sample
    with torch.inference_mode():
        expected = sae.encode(tokens[6:8]).mean(dim=0).numpy()
    indices, values = codes.row(3)
    np.testing.assert_allclose(values, expected[indices], rtol=1e-6)
    assert set(indices.tolist()) == set(np.flatnonzero(expected).tolist())
