"""Selection algorithms without Beam or models: Jaccard, prototypes, BM25, top-n, the stage's threshold keys."""

from __future__ import annotations

import math

import numpy as np
import pytest

from winnow.pipelines.stages.select.threshold import boundary, rank_key, score_key, score_keys, selected
from winnow.selectors.sae import SparseCodes
from winnow.selectors.task_selection import (
    Bm25Query,
    bm25_scores,
    generalised_jaccard,
    jaccard_to_prototype,
    prototype,
    select_top,
    selection_size,
)


def test_generalised_jaccard_hand_computed():
    # min: 0 + 1 + 0 + 0 = 1; max: 1 + 2 + 1 + 0 = 4
    assert generalised_jaccard(np.array([0, 2, 1, 0]), np.array([1, 1, 0, 0])) == 0.25
    assert generalised_jaccard(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 1.0
    assert generalised_jaccard(np.zeros(3), np.zeros(3)) == 0.0
    assert generalised_jaccard(np.zeros(3), np.array([0, 1.0, 0])) == 0.0


def test_sparse_jaccard_to_prototype_hand_computed():
    codes = SparseCodes.from_rows(
        [
            (np.array([1, 2]), np.array([2.0, 1.0])),  # dense [0, 2, 1, 0]
            (np.array([], dtype=np.int32), np.array([], dtype=np.float32)),  # all zero
            (np.array([0, 3]), np.array([1.0, 3.0])),  # dense [1, 0, 0, 3]
        ],
        dim=4,
    )
    proto = np.array([1.0, 1.0, 0.0, 0.0])
    scores = jaccard_to_prototype(codes, proto)
    # row 0: min 0+1+0+0 = 1, max 1+2+1+0 = 4; row 1: 0 / 2; row 2: min 1, max 1+1+0+3 = 5
    np.testing.assert_allclose(scores, [0.25, 0.0, 0.2])
    assert jaccard_to_prototype(codes, np.zeros(4))[1] == 0.0


def test_sparse_jaccard_equals_dense_definition_on_random_rows():
    rng = np.random.default_rng(3)
    dense = rng.random((20, 50)) * (rng.random((20, 50)) < 0.1)
    dense[4] = 0
    proto = rng.random(50) * (rng.random(50) < 0.3)
    expected = [generalised_jaccard(row, proto) for row in dense]
    np.testing.assert_allclose(jaccard_to_prototype(SparseCodes.from_dense(dense), proto), expected, atol=1e-6)


def test_prototype_is_the_mean_of_the_target_codes():
    dense = np.array([[0, 2, 0], [1, 0, 0], [0, 1, 3]], dtype=np.float32)
    np.testing.assert_allclose(prototype(SparseCodes.from_dense(dense)), [1 / 3, 1.0, 1.0])
    with pytest.raises(ValueError, match="no target examples"):
        prototype(SparseCodes.from_rows([], 3))


def test_sparse_codes_round_trip_and_take():
    dense = np.array([[0, 2, 0], [0, 0, 0], [4, 0, 1]], dtype=np.float32)
    codes = SparseCodes.from_dense(dense)
    np.testing.assert_array_equal(codes.to_dense(), dense)
    np.testing.assert_array_equal(codes.take([2, 0]).to_dense(), dense[[2, 0]])
    assert codes.indptr.tolist() == [0, 1, 1, 3]


def test_bm25_hand_computed():
    # query words: "cat" x1; corpus of three documents, mean length (2 + 1 + 3) / 3 = 2
    scores = bm25_scores(["cat dog", "dog", "cat cat bird"], Bm25Query.from_targets(["Cat!"]))
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    k1, b = 1.5, 0.75
    first = idf * 1 * (k1 + 1) / (1 + k1 * (1 - b + b * 2 / 2))
    third = idf * 2 * (k1 + 1) / (2 + k1 * (1 - b + b * 3 / 2))
    np.testing.assert_allclose(scores, [first, 0.0, third])


def test_select_top_picks_exactly_n_best_first_with_seeded_ties():
    scores = np.array([0.1, 0.9, 0.5, 0.5, 0.5, 0.2])
    ids = [f"r{i}" for i in range(6)]
    chosen = select_top(scores, ids, 3, seed=0)
    assert len(chosen) == 3 and chosen[0] == 1
    assert set(chosen[1:]) < {2, 3, 4}
    assert len(select_top(scores, ids, 0)) == 0
    assert sorted(select_top(scores, ids, 10).tolist()) == list(range(6))
    ties = {tuple(select_top(scores, ids, 2, seed=s)) for s in range(20)}
    assert len(ties) > 1, "the seed decides among equal scores"


def test_selection_size():
    assert selection_size(1000, 0.05, None) == 50
    assert selection_size(10, 0.05, None) == 1  # rounds to 0.5 -> at least one
    assert selection_size(10, None, 4) == 4
    assert selection_size(3, None, 4) == 3
    assert selection_size(0, 0.5, None) == 0


def test_score_key_orders_like_the_float():
    values = [-2.5, -1e-300, -0.0, 0.0, 1e-300, 0.25, 0.2500001, 1.0, 7e10]
    keys = [score_key(v) for v in values]
    assert keys == sorted(keys)
    assert len(set(keys[3:])) == len(values) - 3


def test_vectorised_score_keys_and_threshold_equal_the_per_record_rank_keys():
    rng = np.random.default_rng(4)
    values = np.concatenate([[-2.5, -1e-300, -0.0, 0.0, 1e-300, 0.25, np.inf, -np.inf],
                             np.round(rng.standard_normal(300), 1)])  # many ties at the threshold score
    assert score_keys(values).tolist() == [score_key(float(v)) for v in values]
    ids = [f"r{i}" for i in range(len(values))]
    keys = sorted(rank_key({"id": i, "select_score": float(v)}, 9) for i, v in zip(ids, values, strict=True))
    for threshold in (keys[0], keys[150], keys[151], keys[-1]):
        expected = [rank_key({"id": i, "select_score": float(v)}, 9) >= threshold
                    for i, v in zip(ids, values, strict=True)]
        assert selected(values, ids, threshold, 9).tolist() == expected
    assert not selected(values, ids, None, 9).any()


def test_boundary_finds_the_bucket_of_the_nth_largest():
    counts = {9: 2, 7: 5, 3: 10}
    assert boundary(counts, 1) == (9, 1)
    assert boundary(counts, 2) == (9, 2)
    assert boundary(counts, 3) == (7, 1)
    assert boundary(counts, 17) == (3, 10)
    assert boundary(counts, 0) is None
    with pytest.raises(RuntimeError):
        boundary(counts, 18)


def test_rank_key_matches_select_top_order():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 2)  # many ties
    ids = [f"id{i}" for i in range(200)]
    records = [{"id": i, "select_score": float(s)} for i, s in zip(ids, scores, strict=True)]
    by_key = sorted(range(200), key=lambda i: rank_key(records[i], 5), reverse=True)
    assert by_key[:37] == select_top(scores, ids, 37, seed=5).tolist()
