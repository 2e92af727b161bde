"""The native BLAKE2b gives hashlib's digests, so ids, shuffles and samples stay what they were."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from winnow.pipelines.io import native
from winnow.pipelines.io.blocks import id_hashes
from winnow.pipelines.io.records import content_id, content_ids, seeded_hash, seeded_hashes

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def _texts(count: int, seed: int) -> list[str]:
    alphabet = "ab \u00e9\u4e2d\U0001f600\n"
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(length)) for length in range(count)]


@pytest.mark.parametrize("digest_size", [1, 8, 16, 33, 64])
def test_digests_equal_hashlib_on_every_length_across_block_boundaries(digest_size):
    texts = _texts(400, digest_size)  # 0 .. 399 characters: up to ~1,600 bytes, 0 to 13 blocks of 128
    found = native.digests(pa.array(texts), digest_size)
    assert found.shape == (400, digest_size)
    for row, text in enumerate(texts):
        assert bytes(found[row]) == hashlib.blake2b(text.encode(), digest_size=digest_size).digest(), row


def test_exact_block_multiples_and_sliced_arrays():
    texts = ["x" * 127, "y" * 128, "z" * 129, "w" * 256, ""]
    array = pa.array(["skip", *texts, "skip"]).slice(1, len(texts))  # an offset into the buffers
    assert native.hexdigests(array, 16).to_pylist() == [content_id(text) for text in texts]
    assert native.digests(pa.array(texts, pa.large_string()), 8).tolist() == [
        list(hashlib.blake2b(text.encode(), digest_size=8).digest()) for text in texts]


def test_null_values_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="null"):
        native.digests(pa.array(["a", None]), 8)
    with pytest.raises(ValueError, match="digest size"):
        native.digests(pa.array(["a"]), 65)


def test_record_hashes_equal_the_per_record_functions_on_the_sample():
    table = pq.read_table(sorted(SAMPLE.glob("*.parquet"))[0])
    texts = table.column("text").combine_chunks()
    ids = pa.array([f"{text[:12]}#{row}" for row, text in enumerate(texts.to_pylist())])
    assert content_ids(texts).to_pylist() == [content_id(text) for text in texts.to_pylist()]
    assert seeded_hashes(42, ids).tolist() == [seeded_hash(42, value) for value in ids.to_pylist()]
    assert seeded_hashes(7, ids, "fit").tolist() == [seeded_hash(7, value, "fit") for value in ids.to_pylist()]
    epochs = [f"{row % 3}\0shuffle" for row in range(len(ids))]
    assert seeded_hashes(7, ids.to_pylist(), epochs).tolist() == [
        seeded_hash(7, value, row % 3, "shuffle") for row, value in enumerate(ids.to_pylist())]
    assert id_hashes(ids).tolist() == [
        int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") for value in ids.to_pylist()]
    assert seeded_hashes(1, []).dtype == np.uint64 and id_hashes([]).size == 0


def test_text_flags_equal_strip_and_the_control_rule_on_every_code_point():
    import sys

    from winnow.pipelines.io.text_checks import CONTROL_CHARACTERS

    characters = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    texts = [*characters, *(f" {c}\u3000" for c in characters), *(f"\x1b{c}" for c in characters[:300]),
             "", "   ", "\u2028\u2029\u00a0\u0085", "ok\tline\r\n", "x" * 200 + "\x7f"]
    chunked = pa.chunked_array([pa.array(texts[:5000]), pa.array(texts[5000:] + [None]), pa.array([], pa.string())])
    text, control = native.text_flags(chunked)
    assert text.tolist() == [bool(t.strip()) for t in texts] + [False]
    assert control.tolist() == [bool(CONTROL_CHARACTERS.search(t)) for t in texts] + [False]
    large = native.text_flags(pa.array(["a\x01", " "], pa.large_string()))
    assert large[0].tolist() == [True, False] and large[1].tolist() == [True, False]
