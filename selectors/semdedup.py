"""SemDeDup inside one cluster (Abbas et al. 2023; docs/ALGORITHMS.md section 2), exact and blockwise.

rows = members in hardness order; S = E E^T; M[j] = max_{i<j} S[i, j]; drop j iff M[j] > 1 - eps (strict, the
reference) or >= (NeMo Curator). Not transitive: j is dropped when it is close to ANY earlier row, even one that
was itself dropped, as published. S is computed in column blocks so memory stays bounded, but every pair of
the cluster is compared (unlike the reference's advance_semdedup.py, which only compares inside chunks).
"""

from __future__ import annotations

import numpy as np

from winnow.selectors.threads import one_thread

_BLOCK_FLOATS = 1 << 24


def hardness_order(dist: np.ndarray, keep: str = "hard", seed: int = 0) -> np.ndarray:
    """Indices in the order rows are considered: hard = farthest from the centroid first, easy = closest
    first, random = a seeded permutation. Ties keep the original index order."""
    dist = np.asarray(dist)
    if keep == "hard":
        return np.argsort(-dist, kind="stable")
    if keep == "easy":
        return np.argsort(dist, kind="stable")
    if keep == "random":
        return np.random.default_rng(seed).permutation(len(dist))
    raise ValueError(f"keep must be hard, easy or random, not {keep!r}")


def semdedup(
    embeddings: np.ndarray, order: np.ndarray, eps: float, strict: bool = True, block: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide duplicates among the rows of one cluster.

    Returns (keep, duplicate_of, max_similarity), indexed like `embeddings`: keep is a bool mask;
    duplicate_of[j] is the row (in `embeddings` indexing) most similar to j among those before it in `order`
    (-1 for the first row), max_similarity[j] that similarity.
    """
    rows = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32)[order])
    count = len(rows)
    best = np.full(count, -np.inf, dtype=np.float32)
    best_index = np.full(count, -1, dtype=np.int64)
    if block is None:
        block = max(1, min(count, _BLOCK_FLOATS // max(count, 1)))
    for start in range(1, count, block):
        stop = min(count, start + block)
        with one_thread():
            similarity = rows[:stop] @ rows[start:stop].T
        earlier = np.arange(stop)[:, None] < np.arange(start, stop)[None, :]
        similarity = np.where(earlier, similarity, -np.inf)
        best_index[start:stop] = similarity.argmax(axis=0)
        best[start:stop] = similarity.max(axis=0)
    threshold = np.float32(1.0 - eps)
    dropped = best > threshold if strict else best >= threshold
    keep = np.empty(count, dtype=bool)
    duplicate_of = np.empty(count, dtype=np.int64)
    max_similarity = np.empty(count, dtype=np.float32)
    keep[order] = ~dropped
    duplicate_of[order] = np.where(best_index >= 0, np.asarray(order)[np.maximum(best_index, 0)], -1)
    max_similarity[order] = best
    return keep, duplicate_of, max_similarity


def near_pairs(
    embeddings: np.ndarray, eps: float, strict: bool = True, block: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of one cluster's rows whose cosine passes SemDeDup's threshold, with that cosine.

    The order-independent part of SemDeDup (the similarities): `resolve_pairs` then decides for any order, so
    the pairs are computed once and a changed `prune.keep` order only re-runs the cheap resolution."""
    rows = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    count = len(rows)
    threshold = np.float32(1.0 - eps)
    if block is None:
        block = max(1, min(count, _BLOCK_FLOATS // max(count, 1)))
    first, second, values = [], [], []
    for start in range(0, count, block):
        stop = min(count, start + block)
        with one_thread():
            similarity = rows[start:stop] @ rows.T
        passes = similarity > threshold if strict else similarity >= threshold
        passes &= np.arange(start, stop)[:, None] < np.arange(count)[None, :]
        i, j = np.nonzero(passes)
        first.append(i + start)
        second.append(j)
        values.append(similarity[i, j])
    if not first:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(first).astype(np.int64), np.concatenate(second).astype(np.int64),
            np.concatenate(values).astype(np.float32))


def resolve_pairs(
    count: int, order: np.ndarray, first: np.ndarray, second: np.ndarray, similarity: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup's decision for an order, from `near_pairs`: (keep, duplicate_of, similarity) as `semdedup`
    returns them for the dropped rows: a row is dropped when a pair links it to a row earlier in `order`;
    its duplicate is that earlier row with the largest cosine (ties: the earliest in order)."""
    position = np.empty(count, dtype=np.int64)
    position[np.asarray(order, dtype=np.int64)] = np.arange(count)
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    earlier_is_first = position[first] < position[second]
    earlier = np.where(earlier_is_first, first, second)
    later = np.where(earlier_is_first, second, first)
    keep = np.ones(count, dtype=bool)
    keep[later] = False
    duplicate_of = np.full(count, -1, dtype=np.int64)
    max_similarity = np.full(count, -np.inf, dtype=np.float32)
    if len(later):
        ranked = np.lexsort((position[earlier], -np.asarray(similarity, dtype=np.float64), later))
        best = ranked[np.r_[True, later[ranked][1:] != later[ranked][:-1]]]
        duplicate_of[later[best]] = earlier[best]
        max_similarity[later[best]] = similarity[best]
    return keep, duplicate_of, max_similarity
