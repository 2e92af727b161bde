"""Task-specific selection: a prototype of the target examples, a score per candidate, the top n.

Beam-free (docs/ALGORITHMS.md section 3). MONA scores a candidate's mean SAE code against the prototype (the mean
of the targets' codes) with the generalised Jaccard similarity; the baselines score embedding cosine to the
targets' mean embedding, BM25 against the targets' words, or a seeded random number. Ties in the top n are
broken by a seeded hash of the id, so the selection is a function of (scores, ids, seed).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from winnow.selectors.sae import SparseCodes
from winnow.selectors.threads import one_thread


def generalised_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """sum min(a, b) / sum max(a, b) of two non-negative vectors; 0 when both are all zero."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denominator = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / denominator) if denominator > 0 else 0.0


def prototype(codes: SparseCodes) -> np.ndarray:
    """The mean code of the target examples, dense (d_sae floats: one row, not one per sample)."""
    if len(codes) == 0:
        raise ValueError("no target examples to build a prototype from")
    total = np.zeros(codes.dim, dtype=np.float64)
    np.add.at(total, codes.indices, codes.values)
    return (total / len(codes)).astype(np.float32)


def jaccard_to_prototype(codes: SparseCodes, proto: np.ndarray) -> np.ndarray:
    """Generalised Jaccard of every sparse row against one dense non-negative prototype, vectorised.

    Off a row's support the row is 0, so min is 0 and max is the prototype: the denominator is
    sum(max over the support) + (sum(proto) - sum(proto over the support))."""
    proto = np.asarray(proto, dtype=np.float64)
    n = len(codes)
    rows = codes.row_ids()
    values = codes.values.astype(np.float64)
    on_support = proto[codes.indices]
    numerator = np.bincount(rows, np.minimum(values, on_support), minlength=n)
    covered = np.bincount(rows, on_support, minlength=n)
    denominator = np.bincount(rows, np.maximum(values, on_support), minlength=n) + (proto.sum() - covered)
    denominator = np.maximum(denominator, 0.0)
    return np.divide(numerator, denominator, out=np.zeros(n), where=denominator > 0)


def cosine_to_prototype_sparse(codes: SparseCodes, proto: np.ndarray) -> np.ndarray:
    """Cosine of sparse rows to a dense prototype (an ablation: the paper's Jaccard vs cosine)."""
    proto = np.asarray(proto, dtype=np.float64)
    rows, values = codes.row_ids(), codes.values.astype(np.float64)
    dots = np.bincount(rows, values * proto[codes.indices], minlength=len(codes))
    norms = np.sqrt(np.bincount(rows, values**2, minlength=len(codes))) * np.linalg.norm(proto)
    return np.divide(dots, norms, out=np.zeros(len(codes)), where=norms > 0)


def embedding_prototype(target_vectors: np.ndarray) -> np.ndarray:
    """The unit mean of the targets' unit embeddings."""
    mean = np.asarray(target_vectors, dtype=np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def cosine_scores(vectors: np.ndarray, proto: np.ndarray) -> np.ndarray:
    """Cosine of unit row vectors to a unit prototype."""
    with one_thread():
        return np.asarray(vectors, dtype=np.float32) @ np.asarray(proto, dtype=np.float32)


_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Bm25Query:
    """The targets as one BM25 query: each distinct word with its count over all targets."""

    terms: tuple[str, ...]
    weights: np.ndarray

    @classmethod
    def from_targets(cls, texts: Iterable[str]) -> Bm25Query:
        counts = Counter(word for text in texts for word in words(text))
        terms = tuple(sorted(counts))
        return cls(terms, np.array([counts[t] for t in terms], dtype=np.float64))


@dataclass(frozen=True)
class Bm25Stats:
    """What BM25 needs from the pool: its size, mean length and each query term's document frequency."""

    documents: int
    mean_length: float
    document_frequency: np.ndarray


def bm25_document(text: str, query: Bm25Query) -> tuple[int, dict[int, int]]:
    """(length in words, {query term index: count}) of one document."""
    index = {term: i for i, term in enumerate(query.terms)}
    tokens = words(text)
    counts: dict[int, int] = {}
    for token in tokens:
        position = index.get(token)
        if position is not None:
            counts[position] = counts.get(position, 0) + 1
    return len(tokens), counts


def bm25_stats(documents: Sequence[tuple[int, dict[int, int]]], terms: int) -> Bm25Stats:
    frequency = np.zeros(terms, dtype=np.int64)
    for _, counts in documents:
        for position in counts:
            frequency[position] += 1
    mean = sum(length for length, _ in documents) / max(1, len(documents))
    return Bm25Stats(len(documents), mean, frequency)


def bm25_score(document: tuple[int, dict[int, int]], query: Bm25Query, stats: Bm25Stats,
               k1: float = 1.5, b: float = 0.75) -> float:
    """Okapi BM25 (Robertson's idf with +1 inside the log, so it is never negative), each query term weighted
    by its count in the targets."""
    length, counts = document
    if not counts:
        return 0.0
    positions = np.fromiter(counts.keys(), dtype=np.int64)
    tf = np.fromiter(counts.values(), dtype=np.float64)
    df = stats.document_frequency[positions].astype(np.float64)
    idf = np.log(1.0 + (stats.documents - df + 0.5) / (df + 0.5))
    norm = k1 * (1.0 - b + b * length / max(stats.mean_length, 1e-9))
    return float(np.sum(query.weights[positions] * idf * tf * (k1 + 1.0) / (tf + norm)))


def bm25_scores(texts: Sequence[str], query: Bm25Query, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    documents = [bm25_document(text, query) for text in texts]
    stats = bm25_stats(documents, len(query.terms))
    return np.array([bm25_score(d, query, stats, k1, b) for d in documents])


def tiebreak(seed: int, record_id: str) -> int:
    """A seeded 63-bit hash of an id: the order among equal scores."""
    digest = hashlib.blake2b(f"{seed}\0select\0{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def random_score(seed: int, record_id: str) -> float:
    """The random baseline's score: a seeded uniform number in [0, 1) per id."""
    return tiebreak(seed, record_id) / float(1 << 63)


def selection_size(pool: int, ratio: float | None, count: int | None) -> int:
    """n = count, or round(ratio * pool) (at least 1 when ratio > 0 and the pool is not empty), at most pool."""
    if count is not None:
        return min(count, pool)
    if ratio is None:
        raise ValueError("give select.ratio or select.count")
    return min(pool, max(1 if ratio > 0 and pool else 0, math.floor(ratio * pool + 0.5)))


def select_top(scores: np.ndarray, ids: Sequence[str], n: int, seed: int = 0) -> np.ndarray:
    """Indices of the n largest (score, seeded id hash, id) keys, best first: the select stage's order."""
    order = sorted(range(len(ids)), key=lambda i: (float(scores[i]), tiebreak(seed, ids[i]), ids[i]), reverse=True)
    return np.array(order[:n], dtype=np.int64)
