"""The fixed training recipe of the proxy-model evaluation: named model presets, a byte-level BPE tokenizer
trained once on a neutral sample, a Llama-style decoder, and AdamW with warm-up and cosine decay.

Every arm of an evaluation trains with the same preset, tokenizer and number of steps, so that the only thing
that differs between arms is their data. The GPU presets follow DataDecide's smallest OLMo ladder sizes (4M,
10M, 20M: width, depth, heads, batch and peak learning rate; ~100 tokens per parameter); with the small
vocabulary trained here their parameter counts are lower than DataDecide's, which used a 50k vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Preset:
    """One model size and its training schedule; `tokens` caps the tokens trained on, `max_epochs` caps how
    often an arm's budget is repeated to reach them (small arms train fewer steps, every arm the same)."""

    name: str
    d_model: int
    layers: int
    heads: int
    vocab_size: int
    seq_len: int
    batch_size: int
    lr: float
    tokens: int
    max_epochs: int = 4
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    curve_points: int = 8

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # a few seconds: the tests
    "tiny": Preset("tiny", d_model=32, layers=2, heads=2, vocab_size=512, seq_len=64, batch_size=8, lr=3e-3,
                   tokens=20_000, max_epochs=2, curve_points=3),
    # ~1.6M parameters, ~7,900 tokens/s on 2 CPU cores: 2.4M tokens (a 600k-token budget, 4 epochs) in ~5 min
    "cpu": Preset("cpu", d_model=128, layers=4, heads=4, vocab_size=4096, seq_len=256, batch_size=16, lr=2e-3,
                  tokens=4_000_000),
    # DataDecide's 4M / 10M / 20M shapes at ~100 tokens per (DataDecide) parameter
    "gpu-4m": Preset("gpu-4m", d_model=64, layers=8, heads=8, vocab_size=8192, seq_len=2048, batch_size=32,
                     lr=1.4e-2, tokens=400_000_000),
    "gpu-10m": Preset("gpu-10m", d_model=144, layers=8, heads=8, vocab_size=8192, seq_len=2048, batch_size=32,
                      lr=1.0e-2, tokens=1_000_000_000),
    "gpu-20m": Preset("gpu-20m", d_model=192, layers=16, heads=8, vocab_size=8192, seq_len=2048, batch_size=64,
                      lr=8.4e-3, tokens=2_000_000_000),
}


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (every string encodes, so bits per byte is defined on any text) with
    `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def encode(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(encoding.ids, dtype=np.int32) for encoding in tokenizer.encode_batch(list(texts))]


def token_stream(documents: Sequence[np.ndarray], budget: int) -> np.ndarray:
    """The documents in order, each followed by end-of-text (id 0), cut to exactly `budget` tokens; an error
    when they hold fewer."""
    if not documents:
        raise ValueError("no documents")
    stream = np.concatenate([np.append(doc, np.int32(0)) for doc in documents])
    if len(stream) < budget:
        raise ValueError(f"the documents hold {len(stream)} tokens, fewer than the budget of {budget}")
    return stream[:budget]


def stream_tokens(documents: Sequence[np.ndarray]) -> int:
    """The length of `token_stream` uncut: the documents' tokens and one end-of-text each."""
    return int(sum(len(doc) + 1 for doc in documents))


def documents_in_budget(documents: Sequence[np.ndarray], budget: int) -> int:
    """How many of the documents (in order) `token_stream` takes some tokens of."""
    ends = np.cumsum([len(doc) + 1 for doc in documents])
    return int(min(len(documents), np.searchsorted(ends, budget) + 1))


def build_model(preset: Preset, vocab_size: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=preset.d_model, intermediate_size=4 * preset.d_model,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.heads,
        max_position_embeddings=preset.seq_len + 1, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def parameter_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def learning_rate(step: int, steps: int, preset: Preset) -> float:
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, round(preset.warmup_fraction * steps))
    if step < warmup:
        return preset.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return preset.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_steps(budget: int, preset: Preset) -> int:
    """Steps every arm trains: the preset's tokens, or `max_epochs` passes over the budget when that is
    less, in whole batches of whole sequences."""
    sequences = budget // preset.seq_len
    if sequences < preset.batch_size:
        raise ValueError(f"a budget of {budget} tokens is fewer than one batch of the {preset.name} preset "
                         f"({preset.batch_size} x {preset.seq_len} tokens)")
    tokens = min(preset.tokens, preset.max_epochs * sequences * preset.seq_len)
    return max(1, tokens // (preset.batch_size * preset.seq_len))


def batch_order(sequences: int, steps: int, batch_size: int, seed: int, keep_order: bool) -> np.ndarray:
    """The sequence index of every example of every step: epochs in a seeded shuffled order (each epoch a
    new permutation), or in the arm's own order with `keep_order` (a cooldown schedule trained as written)."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    epochs = -(-needed // sequences)
    orders = [np.arange(sequences) if keep_order else rng.permutation(sequences) for _ in range(epochs)]
    return np.concatenate(orders)[:needed].reshape(steps, batch_size)


def train(model, stream: np.ndarray, preset: Preset, steps: int, seed: int, keep_order: bool = False,
          device: str = "cpu", evaluate: Callable[[int], None] | None = None) -> list[float]:
    """Train on `stream` (cut into sequences of seq_len) for `steps`; `evaluate(step)` is called at
    `curve_points` evenly spaced steps and after the last. Returns the training loss of every step."""
    import torch

    sequences = torch.from_numpy(stream[: len(stream) // preset.seq_len * preset.seq_len].astype(np.int64))
    sequences = sequences.view(-1, preset.seq_len)
    order = batch_order(len(sequences), steps, preset.batch_size, seed, keep_order)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=preset.lr, betas=(0.9, 0.95))
    checkpoints = set(np.linspace(0, steps, preset.curve_points + 1).round().astype(int)[1:-1].tolist())
    model.to(device)
    losses = []
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, preset)
        batch = sequences[torch.from_numpy(order[step])].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if evaluate is not None and step + 1 in checkpoints:
            evaluate(step + 1)
    if evaluate is not None:
        evaluate(steps)
    return losses
