"""`winnow eval train` (issue #29): the proxy recipe, its metrics, equal budgets and determinism."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from winnow.pipelines.cli import main
from winnow.pipelines.evaluation import train_eval
from winnow.proxy import metrics, recipe


def test_token_stream_puts_end_of_text_after_each_document_and_cuts_to_the_budget():
    docs = [np.array([5, 6], dtype=np.int32), np.array([7], dtype=np.int32), np.array([8, 9, 10], dtype=np.int32)]
    assert recipe.stream_tokens(docs) == 9
    assert recipe.token_stream(docs, 6).tolist() == [5, 6, 0, 7, 0, 8]
    assert recipe.documents_in_budget(docs, 6) == 3
    assert recipe.documents_in_budget(docs, 5) == 2
    assert recipe.documents_in_budget(docs, 3) == 1
    with pytest.raises(ValueError, match="fewer than the budget"):
        recipe.token_stream(docs, 10)


def test_training_steps_are_the_preset_tokens_or_max_epochs_over_the_budget():
    preset = recipe.PRESETS["cpu"]  # 16 x 256 tokens a step, 4,000,000 tokens, 4 epochs at most
    assert recipe.training_steps(10_000_000, preset) == 4_000_000 // 4096
    assert recipe.training_steps(100_000, preset) == (100_000 // 256) * 4 * 256 // 4096
    with pytest.raises(ValueError, match="fewer than one batch"):
        recipe.training_steps(256 * 15, preset)


def test_batch_order_is_a_new_permutation_each_epoch_or_the_arm_order_when_kept():
    order = recipe.batch_order(10, steps=5, batch_size=4, seed=3, keep_order=False)
    assert order.shape == (5, 4)
    flat = order.reshape(-1)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10].tolist() != list(range(10))
    assert np.array_equal(order, recipe.batch_order(10, 5, 4, seed=3, keep_order=False))
    kept = recipe.batch_order(10, steps=5, batch_size=4, seed=3, keep_order=True).reshape(-1)
    assert kept.tolist() == list(range(10)) * 2


def test_learning_rate_warms_up_linearly_then_decays_to_a_tenth():
    preset = dataclasses.replace(recipe.PRESETS["tiny"], lr=1.0, warmup_fraction=0.1)
    assert recipe.learning_rate(0, 100, preset) == pytest.approx(0.1)
    assert recipe.learning_rate(9, 100, preset) == pytest.approx(1.0)
    assert recipe.learning_rate(10, 100, preset) == pytest.approx(1.0)
    assert recipe.learning_rate(100, 100, preset) == pytest.approx(0.1)


def test_presets_build_the_documented_llama_shapes():
    """Parameters of a tied-embedding Llama: V*d + layers * (4d^2 attention + 3 * d * 4d SwiGLU + 2d norms) + d."""
    for name, preset in recipe.PRESETS.items():
        d, vocab = preset.d_model, preset.vocab_size
        model = recipe.build_model(dataclasses.replace(preset, seq_len=32), vocab, seed=0)
        assert recipe.parameter_count(model) == vocab * d + preset.layers * (16 * d * d + 2 * d) + d, name


@pytest.mark.slow
def test_gpu_presets_train_at_a_tiny_size_on_cpu():
    """The GPU presets' shapes, at 32-token sequences and batches of 2, take optimiser steps without error."""
    rng = np.random.default_rng(0)
    for name in ("gpu-4m", "gpu-10m", "gpu-20m"):
        preset = dataclasses.replace(recipe.PRESETS[name], seq_len=32, batch_size=2, tokens=128)
        model = recipe.build_model(preset, preset.vocab_size, seed=0)
        stream = rng.integers(1, preset.vocab_size, size=256).astype(np.int32)
        losses = recipe.train(model, stream, preset, steps=2, seed=0)
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), name


def test_bits_per_byte_of_a_uniform_model_is_log2_vocabulary_times_tokens_over_bytes():
    import torch

    preset = recipe.PRESETS["tiny"]
    model = recipe.build_model(preset, 300, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()  # tied: every logit is 0, every token has p = 1/300
    texts = ["one two three", "a longer document of a few words, more than one window " * 3]
    docs = [np.arange(1, 40, dtype=np.int32), np.arange(1, 150, dtype=np.int32)]
    expected = math.log2(300) * (39 + 149) / sum(len(t.encode()) for t in texts)
    assert metrics.bits_per_byte(model, docs, texts, seq_len=64) == pytest.approx(expected, rel=1e-6)  # float32 logits


def test_multiple_choice_items_hold_the_true_continuation_among_three_from_other_documents():
    texts = [" ".join(f"w{doc}_{i}" for i in range(30)) for doc in range(10)] + ["too short to use"]
    items = metrics.multiple_choice_items(texts, count=5, seed=0)
    assert len(items) == 5
    for item in items:
        words = item.context.split()
        doc = words[0].split("_")[0]
        assert len(words) == 15 and words == [f"{doc}_{i}" for i in range(15)]
        assert item.choices[item.answer] == " " + " ".join(f"{doc}_{i}" for i in range(15, 23))
        assert len(set(item.choices)) == 4
        assert all(choice.split()[0].split("_")[0] != doc for k, choice in enumerate(item.choices) if k != item.answer)


def test_a_winner_needs_a_gap_over_twice_the_larger_spread_and_two_seeds():
    assert metrics.spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert metrics.winner([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], lower_is_better=True) == 0
    assert metrics.winner([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], lower_is_better=False) == 1
    assert metrics.winner([1.0, 1.5, 0.5], [2.0, 2.1, 1.9], lower_is_better=True) is None  # gap 1.0 = 2 x 0.5
    assert metrics.winner([1.0], [2.0], lower_is_better=True) is None


def test_the_control_draws_uniformly_until_the_budget_is_reached():
    pool = [np.zeros(n, dtype=np.int32) for n in (4, 9, 2, 7, 5)]
    order = np.random.default_rng(7).permutation(5)
    picked = train_eval.control_documents(pool, budget=12, seed=7)
    lengths = [len(pool[i]) + 1 for i in order]
    needed = next(k for k in range(1, 6) if sum(lengths[:k]) >= 12)
    assert picked == order[:needed].tolist()
    with pytest.raises(train_eval.EvalError, match="fewer than the budget"):
        train_eval.control_documents(pool, budget=100, seed=7)


def test_held_out_texts_that_sit_in_an_arm_input_are_refused():
    with pytest.raises(train_eval.EvalError, match="held-out set x: 1 of its 2 texts"):
        train_eval.check_disjoint({"k": ["a b", "c d"]}, {"held-out set x": [" a b ", "e f"]})


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """The sample's Debian descriptions: 1,000 in the pool an arm selects from, the other 420 held out."""
    folder = tmp_path_factory.mktemp("eval_train")
    table = pq.read_table(ROOT / "data" / "sample" / "debian_descriptions.parquet")
    pq.write_table(table.slice(0, 1000), folder / "pool.parquet")
    pq.write_table(table.slice(1000), folder / "heldout.parquet")
    (folder / "arm.yaml").write_text(f"""input:
  path: {folder / 'pool.parquet'}
  columns: {{id: id, text: text, source: source}}
output:
  path: {folder / 'arm'}
select:
  enabled: true
  method: random
  ratio: 0.5
  targets: {ROOT / 'data' / 'sample' / 'select_targets.jsonl'}
""")
    return folder


def _evaluate(folder, out: str, *extra: str) -> dict:
    code = main(["eval", "train", str(folder / "arm.yaml"), "--heldout", f"debian={folder / 'heldout.parquet'}",
                 "--out", str(folder / out), "--preset", "tiny", "--seeds", "2", "--choice-items", "40", *extra])
    assert code == 0
    return json.loads((folder / out / "eval_train.json").read_text())


def _results(report: dict) -> list:
    return [[run["metrics"], run["curve"], run["final_train_loss"]] for arm in report["arms"] for run in arm["runs"]]


@pytest.mark.slow
def test_eval_train_is_deterministic_for_a_seed_and_gives_every_arm_the_same_budget(eval_inputs):
    first = _evaluate(eval_inputs, "first")
    second = _evaluate(eval_inputs, "second")
    assert _results(first) == _results(second)
    assert [arm["name"] for arm in first["arms"]] == ["arm", "random"]
    assert [arm["kind"] for arm in first["arms"]] == ["recipe", "control"]
    runs = [run for arm in first["arms"] for run in arm["runs"]]
    assert {run["budget_tokens"] for run in runs} == {first["budget_tokens"]}
    assert first["budget_tokens"] == min(arm["tokens_available"] for arm in first["arms"])
    assert first["tokens_trained"] == first["steps"] * 8 * 64
    seed0, seed1 = first["arms"][0]["runs"]
    assert seed0["metrics"] != seed1["metrics"]  # seeds vary initialisation and order
    assert len(seed0["curve"]) == recipe.PRESETS["tiny"].curve_points
    assert first["tokenizer"]["sample_texts"] + first["heldout"][0]["texts"] == 420
    assert [row["metric"] for row in first["comparisons"]] == ["bits_per_byte", "accuracy", "correct_probability"]
    assert "Proxy-model evaluation" in (eval_inputs / "first" / "report" / "index.html").read_text()


@pytest.mark.slow
def test_eval_train_refuses_a_held_out_set_taken_from_the_pool(eval_inputs, capsys):
    code = main(["eval", "train", str(eval_inputs / "arm.yaml"), "--heldout", f"pool={eval_inputs / 'pool.parquet'}",
                 "--out", str(eval_inputs / "refused"), "--preset", "tiny", "--seeds", "1"])
    assert code == 2
    assert "held-out set pool" in capsys.readouterr().err
    assert not (eval_inputs / "refused" / "eval_train.json").exists()


def test_a_cuda_device_without_cuda_is_a_clear_error_before_any_arm_runs(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path is for machines without it")
    with pytest.raises(train_eval.EvalError, match="torch sees no CUDA device"):
        train_eval.run_evaluation(["never-run.yaml"], [("x", str(tmp_path / "x.parquet"))], str(tmp_path / "out"),
                                  device="cuda")
    with pytest.raises(train_eval.EvalError, match="unknown preset"):
        train_eval.run_evaluation(["never-run.yaml"], [("x", "x")], str(tmp_path / "out"), preset_name="huge")
