"""What a proxy model is measured by: bits per byte on held-out text, a likelihood-scored multiple-choice set
made from held-out text, and the comparison of arms over seeds.

DataDecide found continuous metrics (probability of the correct answer, bits per byte) far more predictive
than accuracy at small scale, so both are reported; a winner is named only where the gap between two arms'
means exceeds twice the larger of their spreads over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CHOICES = 4
CONTINUATION_WORDS = 8


def _windows(documents: Sequence[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every document as end-of-text + its tokens, cut into windows of seq_len + 1 that overlap by one token
    (each window predicts the tokens after its first): (inputs padded with 0, mask of the predicted tokens)."""
    rows, masks = [], []
    for doc in documents:
        full = np.concatenate([[0], doc]).astype(np.int64)
        for start in range(0, len(doc), seq_len):
            window = full[start:start + seq_len + 1]
            row = np.zeros(seq_len + 1, dtype=np.int64)
            row[: len(window)] = window
            mask = np.zeros(seq_len, dtype=bool)
            mask[: len(window) - 1] = True
            rows.append(row)
            masks.append(mask)
    return np.stack(rows), np.stack(masks)


def _target_logprobs(model, inputs, device: str):
    """log p(token t+1 | tokens <= t) for every position of a batch of rows."""
    import torch

    logits = model(input_ids=inputs[:, :-1].to(device)).logits.float()
    return torch.log_softmax(logits, dim=-1).gather(-1, inputs[:, 1:, None].to(device))[..., 0]


def bits_per_byte(model, documents: Sequence[np.ndarray], texts: Sequence[str], seq_len: int, device: str = "cpu",
                  batch_size: int = 32) -> float:
    """Total negative log-likelihood of the documents' tokens, in bits, over their UTF-8 bytes: comparable
    across tokenizers, and exactly log2(vocabulary) x tokens / bytes for a model that predicts uniformly."""
    import torch

    rows, masks = _windows(documents, seq_len)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            inputs = torch.from_numpy(rows[start:start + batch_size])
            mask = torch.from_numpy(masks[start:start + batch_size]).to(device)
            total -= float((_target_logprobs(model, inputs, device) * mask).double().sum())
    return total / math.log(2) / sum(len(text.encode("utf-8")) for text in texts)


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    answer: int


def multiple_choice_items(texts: Sequence[str], count: int, seed: int) -> list[ChoiceItem]:
    """Items from real held-out text: a document's opening words as context, its next CONTINUATION_WORDS
    words as the right answer, and the same span of three other documents as the wrong ones; the answer's
    position is drawn at random. Documents with fewer than 2 x CONTINUATION_WORDS words are skipped."""
    rng = np.random.default_rng(seed)
    usable = [words for text in texts if len(words := text.split()) >= 2 * CONTINUATION_WORDS]
    if len(usable) < CHOICES:
        return []
    picked = rng.permutation(len(usable))[:count]
    spans = []
    for index in picked:
        words = usable[index]
        cut = min(len(words) - CONTINUATION_WORDS, max(CONTINUATION_WORDS, len(words) // 2))
        spans.append((" ".join(words[:cut]), " " + " ".join(words[cut:cut + CONTINUATION_WORDS])))
    items = []
    for position, (context, right) in enumerate(spans):
        others = [i for i in rng.permutation(len(spans)) if i != position][: CHOICES - 1]
        answer = int(rng.integers(CHOICES))
        choices = [spans[i][1] for i in others]
        choices.insert(answer, right)
        items.append(ChoiceItem(context, tuple(choices), answer))
    return items


def choice_scores(model, tokenizer, items: Sequence[ChoiceItem], seq_len: int, device: str = "cpu",
                  batch_size: int = 32) -> dict[str, float]:
    """Each choice's log-likelihood after its context (the context cut from the left to fit). Accuracy takes
    the choice with the highest log-likelihood per byte; the probability of the correct answer is its share
    of the choices' total likelihood. Both are means over items."""
    import torch

    if not items:
        return {}
    rows, spans = [], []
    for item in items:
        context = tokenizer.encode(item.context).ids
        for choice in item.choices:
            continuation = tokenizer.encode(choice).ids[:seq_len]
            full = ([0] + context)[-(seq_len + 1 - len(continuation)):] + continuation
            rows.append(full)
            spans.append((len(full) - len(continuation), len(full)))
    likelihoods = np.zeros(len(rows))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            inputs = torch.zeros((len(chunk), seq_len + 1), dtype=torch.int64)
            for i, row in enumerate(chunk):
                inputs[i, : len(row)] = torch.tensor(row)
            logprobs = _target_logprobs(model, inputs, device).double().cpu().numpy()
            for i in range(len(chunk)):
                first, end = spans[start + i]
                likelihoods[start + i] = logprobs[i, first - 1:end - 1].sum()
    likelihoods = likelihoods.reshape(len(items), CHOICES)
    byte_counts = np.array([[len(c.encode("utf-8")) for c in item.choices] for item in items])
    answers = np.array([item.answer for item in items])
    picked = np.argmax(likelihoods / byte_counts, axis=1)
    shares = np.exp(likelihoods - likelihoods.max(axis=1, keepdims=True))
    shares /= shares.sum(axis=1, keepdims=True)
    return {"accuracy": float(np.mean(picked == answers)),
            "correct_probability": float(np.mean(shares[np.arange(len(items)), answers]))}


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) over seeds; the deviation is 0 for one seed."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def winner(first: Sequence[float], second: Sequence[float], lower_is_better: bool) -> int | None:
    """0 or 1 for the arm whose mean is better by more than twice the larger spread, else None (a tie at
    this number of seeds, or fewer than two seeds: no spread to judge by)."""
    if min(len(first), len(second)) < 2:
        return None
    (mean_a, spread_a), (mean_b, spread_b) = spread(first), spread(second)
    if abs(mean_a - mean_b) <= 2 * max(spread_a, spread_b):
        return None
    return int((mean_b < mean_a) == lower_is_better)
