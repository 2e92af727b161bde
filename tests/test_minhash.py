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


TRICKY = [
    "  Héllo,   WORLD!\n 3.14 apples\t1,000 ½ ١٢٣ 5°C",
    "I'm sure you CAN'T do it; I cannot. Gonna try, y'all: 10am, 5pm.",
    "The 500MB disk, 3.5GB of RAM, 12km away, 40€ and £30 ¥5 — «quoted» ‘single’ © İstanbul",
    "naïve café résumé coöperate ﬁ ligature ñ İ \u2028line\u00a0nbsp\u3000ideographic",
    "ima dont im id whats 0mb0mb x0g 2kmh 3km² 7in 9ft",
    "",
    "   ",
]


def test_the_datatrove_normalisation_is_datatroves_simplify_text():
    text = pytest.importorskip("datatrove.utils.text")
    assert minhash._DATATROVE_PUNCTUATION == text.PUNCTUATION, "the punctuation list is DataTrove's own"
    assert minhash.normalise(pa.array(TRICKY), "datatrove").to_pylist() == [text.simplify_text(t) for t in TRICKY]


def test_the_special_cases_are_spacys_english_ones_without_punctuation():
    spacy = pytest.importorskip("spacy")
    from spacy.attrs import ORTH

    from winnow.selectors import datatrove_shingles

    rules = spacy.blank("en").tokenizer.rules
    theirs = {key: [piece[ORTH] for piece in rules[key]] for key in rules
              if key.isascii() and key.isalpha() and key.islower() and len(rules[key]) > 1}
    ours = [case.split() for case in datatrove_shingles.SPECIAL_CASES.replace("\n", " ").split(",") if case.strip()]
    assert {"".join(pieces): pieces for pieces in ours} == theirs


def test_datatrove_tokens_are_spacys_on_simplified_text():
    spacy = pytest.importorskip("spacy")
    text = pytest.importorskip("datatrove.utils.text")
    from winnow.selectors import datatrove_shingles

    simplified = [text.simplify_text(t) for t in TRICKY]
    nlp = spacy.blank("en")
    theirs = [[token.text for token in nlp(t) if token.text.strip()] for t in simplified]
    assert datatrove_shingles.tokens(pa.array(simplified)) == theirs
    assert theirs[4][:7] == ["i", "m", "a", "do", "nt", "i", "m"], "the special cases are split"
    assert theirs[4][9:15] == ["what", "s", "0mb0", "mb", "x0", "g"], "a unit after a digit is split off"
    assert theirs[2][-3:] == ["single", "©", "istanbul"] and "€" in theirs[2], "symbols and currency signs stand alone"


def test_xxh64_is_the_xxhash_packages():
    xxhash = pytest.importorskip("xxhash")
    from winnow.selectors import datatrove_shingles

    data = np.frombuffer(bytes(range(256)) * 2, dtype=np.uint8).copy()
    for size in (0, 1, 3, 4, 7, 8, 9, 31, 32, 33, 64, 100, 511):
        assert datatrove_shingles.xxh64(data, size) == xxhash.xxh64_intdigest(bytes(data[:size])), size


def test_datatrove_shingles_and_signatures_are_datatroves_own(monkeypatch):
    xxhash = pytest.importorskip("xxhash")
    dedup = pytest.importorskip("datatrove.pipeline.dedup.minhash")
    import datatrove.utils.hashes.xxhash as datatrove_xxhash

    # DataTrove 0.10.1 hands xxhash a str, which xxhash >= 3 refuses; xxhash 2 hashed its UTF-8 bytes
    monkeypatch.setattr(datatrove_xxhash, "xxhash64", lambda data: xxhash.xxh64_intdigest(data.encode()))
    signer = dedup.MinhashDedupSignature("unused", config=dedup.MinhashConfig())
    texts = [t for t in TRICKY if len(t.split()) >= 5]
    hashes, offsets = minhash.shingles(minhash.normalise(pa.array(texts), "datatrove"), 5, "datatrove")
    signatures = minhash.signatures(hashes, offsets, 14, 8, 1)
    for i, raw in enumerate(texts):
        theirs = signer.get_shingles(raw)
        assert np.array_equal(hashes[offsets[i]:offsets[i + 1]], theirs.reshape(-1)), raw
        assert signatures[i].tolist() == [value for band in signer.get_signature(theirs) for value in band]
    with pytest.raises(ValueError, match="unknown shingles"):
        minhash.shingles(pa.array(texts), 5, "spacy")


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["docs_paragraphs.parquet", "debian_descriptions_en.parquet",
                                  "debian_descriptions_multilingual.parquet", "multiemo_en.parquet"])
def test_datatrove_tokens_are_spacys_on_real_text(name):
    spacy = pytest.importorskip("spacy")
    text = pytest.importorskip("datatrove.utils.text")
    import pyarrow.parquet as pq
    from conftest import shared_file

    from winnow.selectors import datatrove_shingles

    raw = pq.read_table(shared_file(name), columns=["text"]).column("text").to_pylist()[:1000]
    simplified = [text.simplify_text(t) for t in raw]
    assert minhash.normalise(pa.array(raw), "datatrove").to_pylist() == simplified
    nlp = spacy.blank("en")
    theirs = [[token.text for token in nlp(t) if token.text.strip()] for t in simplified]
    assert datatrove_shingles.tokens(pa.array(simplified)) == theirs


def test_component_members_give_root_size_and_strongest_pair_whatever_the_pair_order():
    first = np.array([30, 10, 10, 50, 60], dtype=np.int64)
    second = np.array([40, 20, 30, 60, 70], dtype=np.int64)
    kind = np.array([1, 1, 0, 1, 1], dtype=np.int8)
    similarity = np.array([0.9, 0.85, 1.0, 0.95, 0.95], dtype=np.float32)
    expected = {
        "keys": [10, 20, 30, 40, 50, 60, 70], "roots": [10, 10, 10, 10, 50, 50, 50], "sizes": [4, 4, 4, 4, 3, 3, 3],
        "kinds": [0, 1, 0, 1, 1, 1, 1], "others": [30, 10, 10, 30, 60, 50, 60],
    }
    for order in (np.arange(5), np.array([4, 2, 0, 3, 1])):
        keys, roots, sizes, kinds, similarities, others = minhash.component_members(
            first[order], second[order], kind[order], similarity[order])
        got = {"keys": keys, "roots": roots, "sizes": sizes, "kinds": kinds, "others": others}
        assert {name: values.tolist() for name, values in got.items()} == expected
        assert similarities.tolist() == pytest.approx([1.0, 0.85, 1.0, 0.9, 0.95, 0.95, 0.95])
