"""MinHash near-duplicate detection as functions on arrays (selectors/minhash.py), without Beam."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from winnow.selectors import minhash


def test_normalisations_are_the_documented_ones():
    texts = pa.array(["  Héllo,   WORLD!\n 3.14 apples\t", "a\u00a0b"])
    assert minhash.normalise(texts, "none").to_pylist() == texts.to_pylist()
    assert minhash.normalise(texts, "whitespace").to_pylist() == ["Héllo, WORLD! 3.14 apples", "a b"]
    assert minhash.normalise(texts, "datatrove").to_pylist() == ["hello world 0 apples", "a b"]
    with pytest.raises(ValueError, match="unknown normalisation"):
        minhash.normalise(texts, "lower")


def test_shingles_are_n_consecutive_words_and_short_texts_have_none():
    texts = minhash.normalise(pa.array(["one two three four", "one two three", "two three four", "", "one"]),
                              "datatrove")
    hashes, offsets = minhash.shingles(texts, 3)
    assert np.diff(offsets).tolist() == [2, 1, 1, 0, 0]
    first = hashes[offsets[0]:offsets[1]]
    assert hashes[offsets[1]] == first[0], "'one two three' hashes the same in both texts"
    assert hashes[offsets[2]] == first[1]
    assert len(set(first.tolist())) == 2


def test_chinese_characters_are_words_of_their_own():
    texts = pa.array(["我们今天去公园", "我们 今天 去 公园", "we go"])
    hashes, offsets = minhash.shingles(texts, 2)
    assert np.diff(offsets).tolist() == [6, 6, 1], "7 characters give 6 bigrams, spaced or not"
    assert np.array_equal(hashes[offsets[0]:offsets[1]], hashes[offsets[1]:offsets[2]])


def test_signatures_follow_datatrove_universal_hashing():
    hashes = np.array([1, 2**40 + 7, 2**63 + 5, 12345], dtype=np.uint64)
    offsets = np.array([0, 2, 4, 4])
    signatures = minhash.signatures(hashes, offsets, bands=2, rows=3, seed=1)
    a, b = minhash.permutations(6, 1)
    with np.errstate(over="ignore"):
        expected = (hashes[:, None] * a[None, :] + b[None, :]) % minhash.MERSENNE  # DataTrove's numpy form
    assert np.array_equal(signatures[0], expected[:2].min(axis=0))
    assert np.array_equal(signatures[1], expected[2:].min(axis=0))
    assert (signatures[2] == np.uint64(2**64 - 1)).all(), "no shingle, no signature"


def test_estimated_jaccard_tracks_the_true_jaccard():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 400, dtype=np.uint64)
    for keep in (100, 200, 300):
        other = np.concatenate([base[:keep], rng.integers(0, 2**63, 400 - keep, dtype=np.uint64)])
        true = minhash.jaccard(np.unique(base), np.unique(other))
        signatures = minhash.signatures(np.concatenate([base, other]), np.array([0, 400, 800]), 16, 16, 1)
        estimate = minhash.estimated_jaccard(signatures[:1], signatures[1:])[0]
        assert abs(estimate - true) < 0.1, (keep, true, estimate)


def test_identical_texts_share_every_band_and_different_ones_none():
    texts = minhash.normalise(pa.array(["the quick brown fox jumps over the lazy dog today"] * 2
                                       + ["completely different words make up this other sentence here"]),
                              "datatrove")
    hashes, offsets = minhash.shingles(texts, 5)
    keys = minhash.band_keys(minhash.signatures(hashes, offsets, 14, 8, 1), 14, 8)
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).any()


def test_the_s_curve():
    assert minhash.lsh_probability(0.8, 14, 8) == pytest.approx(1 - (1 - 0.8**8) ** 14)
    assert minhash.lsh_probability(1.0, 14, 8) == 1.0 and minhash.lsh_probability(0.0, 14, 8) == 0.0


def test_star_edges_link_every_later_member_to_the_first_of_its_group():
    groups = np.array([5, 5, 5, 7, 9, 9], dtype=np.uint64)
    keys = np.array([10, 11, 40, 3, 2, 8])
    first, second = minhash.star_edges(groups, keys)
    assert first.tolist() == [10, 10, 2] and second.tolist() == [11, 40, 8]


def test_components_are_rooted_at_their_smallest_key_whatever_the_edge_order():
    first, second = np.array([9, 4, 30, 31]), np.array([4, 7, 31, 32])
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        keys, roots = minhash.components(first[order], second[order])
        assert keys.tolist() == [4, 7, 9, 30, 31, 32]
        assert roots.tolist() == [4, 4, 4, 30, 30, 30]


def test_jaccard_of_sets():
    assert minhash.jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == 0.5
    assert minhash.jaccard(np.array([], np.uint64), np.array([], np.uint64)) == 0.0
