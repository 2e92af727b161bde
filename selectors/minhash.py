"""Exact and MinHash near-duplicate detection on Arrow string arrays (docs/ALGORITHMS.md section 7).

Normalisation (Arrow compute over the whole array): `none`; `whitespace` (runs of whitespace -> one space, ends
trimmed); `datatrove` (DataTrove 0.10.1's `simplify_text` with its defaults, step for step: lower case, numbers
with an optional decimal part folded to 0, its punctuation list -> space, whitespace collapsed, accents
stripped).

Words and shingles (one compiled pass over the UTF-8 bytes), `kind="words"`: a word is a run of characters
between spaces, and every CJK, kana or hangul character is a word of its own (Chinese and Japanese have no
spaces). A shingle is `n` consecutive words, hashed to 64 bits. `kind="datatrove"`: DataTrove's English tokens
and xxhash64 shingles (selectors/datatrove_shingles.py). A text with fewer than `n` words has no shingle and no
signature, so it can only be an exact duplicate (an empty signature must never match another empty one).

Signatures: DataTrove's universal hashing, `((a * s + b) mod 2^64) mod (2^61 - 1)` with `a`, `b` drawn by
`numpy.random.RandomState(seed)` as it draws them, the minimum over a text's shingles, `bands x rows` values.
Bands hash their `rows` values to one 64-bit key; texts sharing a key in a band are candidates. Components are
connected components of the accepted pairs (union-find, the smallest key as root).
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from winnow.selectors import datatrove_shingles
from winnow.selectors.datatrove_shingles import _char_at, _is_space

MERSENNE = np.uint64((1 << 61) - 1)
NORMALISATIONS = ("none", "whitespace", "datatrove")
SHINGLE_KINDS = ("words", "datatrove")
_NUMBERS = r"\p{Nd}+([.,،٫⎖⎗⎘]\p{Nd}+)?"
# datatrove.utils.text.PUNCTUATION (0.10.1): these characters and the control characters but tab and newline
_DATATROVE_PUNCTUATION = "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»" + \
    "".join(chr(code) for low, high in ((0, 9), (11, 13), (13, 32), (127, 160)) for code in range(low, high))
_PUNCTUATION = "[" + "".join(f"\\x{{{ord(char):x}}}" for char in _DATATROVE_PUNCTUATION) + "]"
_WHITESPACE = r"[\s\v\p{Z}\x{1c}-\x{1f}\x{85}]+"  # Python's str `\s`


def normalise(texts: pa.Array | pa.ChunkedArray, mode: str) -> pa.Array:
    """The texts as a normalisation sees them (see the module docstring)."""
    if mode not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {mode!r} (one of {', '.join(NORMALISATIONS)})")
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if mode == "none":
        return texts
    if mode == "datatrove":
        texts = pc.utf8_lower(texts)
        texts = pc.replace_substring_regex(texts, _NUMBERS, "0")
        texts = pc.replace_substring_regex(texts, _PUNCTUATION, " ")
        texts = pc.utf8_trim_whitespace(pc.replace_substring_regex(texts, _WHITESPACE, " "))
        texts = pc.utf8_normalize(texts, "NFD")
        texts = pc.replace_substring_regex(texts, r"\p{Mn}+", "")
        return pc.utf8_trim_whitespace(texts)
    texts = pc.replace_substring_regex(texts, r"[\s\v\p{Z}]+", " ")
    return pc.utf8_trim_whitespace(texts)


def text_buffers(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    texts = texts.cast(pa.large_string()) if not pa.types.is_large_string(texts.type) else texts
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset:texts.offset + len(texts) + 1]
    data = texts.buffers()[2]
    return (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)), offsets.copy()


@numba.njit(inline="always")
def _fmix(h):
    """MurmurHash3's 64-bit finaliser: every input bit reaches every output bit."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@numba.njit(inline="always")
def _is_cjk(code):
    return (0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF
            or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x2FFFF)


@numba.njit(nogil=True, cache=True)
def _words(data, offsets):
    """(word hashes, per-text word offsets): FNV-1a over each word's bytes, finalised."""
    count = len(offsets) - 1
    hashes = np.empty(len(data) + 1, dtype=np.uint64)
    word_offsets = np.zeros(count + 1, dtype=np.int64)
    total = 0
    for i in range(count):
        j, stop = offsets[i], offsets[i + 1]
        h = np.uint64(0xCBF29CE484222325)
        inside = False
        while j < stop:
            code, width = _char_at(data, j)
            space = _is_space(code)
            if space or _is_cjk(code):
                if inside:
                    hashes[total] = _fmix(h)
                    total += 1
                    inside = False
                    h = np.uint64(0xCBF29CE484222325)
                if not space:
                    for k in range(width):
                        h = (h ^ np.uint64(data[j + k])) * np.uint64(0x100000001B3)
                    hashes[total] = _fmix(h)
                    total += 1
                    h = np.uint64(0xCBF29CE484222325)
            else:
                for k in range(width):
                    h = (h ^ np.uint64(data[j + k])) * np.uint64(0x100000001B3)
                inside = True
            j += width
        if inside:
            hashes[total] = _fmix(h)
            total += 1
        word_offsets[i + 1] = total
    return hashes[:total], word_offsets


@numba.njit(nogil=True, cache=True)
def _shingles(word_hashes, word_offsets, n):
    """(shingle hashes, per-text shingle offsets): n consecutive word hashes chained through the finaliser."""
    count = len(word_offsets) - 1
    offsets = np.zeros(count + 1, dtype=np.int64)
    for i in range(count):
        words = word_offsets[i + 1] - word_offsets[i]
        offsets[i + 1] = offsets[i] + max(words - n + 1, 0)
    out = np.empty(offsets[count], dtype=np.uint64)
    for i in range(count):
        start = word_offsets[i]
        for s in range(offsets[i + 1] - offsets[i]):
            h = np.uint64(n)
            for k in range(n):
                h = _fmix(h * np.uint64(0x9E3779B97F4A7C15) + word_hashes[start + s + k])
            out[offsets[i] + s] = h
    return out, offsets


def shingles(texts: pa.Array, n: int, kind: str = "words") -> tuple[np.ndarray, np.ndarray]:
    """(shingle hashes uint64, offsets int64 of each text's shingles) of already normalised texts."""
    if kind not in SHINGLE_KINDS:
        raise ValueError(f"unknown shingles {kind!r} (one of {', '.join(SHINGLE_KINDS)})")
    data, offsets = text_buffers(texts)
    if kind == "datatrove":
        return datatrove_shingles.shingles(data, offsets, n)
    words, word_offsets = _words(data, offsets)
    return _shingles(words, word_offsets, n)


def shingle_sets(texts: pa.Array, n: int, kind: str = "words") -> list[np.ndarray]:
    """Each text's distinct shingle hashes, sorted (what the pair check compares)."""
    hashes, offsets = shingles(texts, n, kind)
    return [np.unique(hashes[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]


def permutations(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DataTrove's (a, b) of each of `count` hash functions, drawn the way it draws them."""
    generator = np.random.RandomState(seed)
    a = generator.randint(1, MERSENNE, dtype=np.uint64, size=count)
    b = generator.randint(0, MERSENNE, dtype=np.uint64, size=count)
    return a, b


@numba.njit(nogil=True, cache=True)
def _signatures(hashes, offsets, a, b):
    count, width = len(offsets) - 1, len(a)
    out = np.full((count, width), np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    prime = np.uint64((1 << 61) - 1)
    for i in range(count):
        for s in range(offsets[i], offsets[i + 1]):
            value = hashes[s]
            for j in range(width):
                x = a[j] * value + b[j]  # wraps mod 2^64, as DataTrove's numpy product does
                x = (x & prime) + (x >> np.uint64(61))
                if x >= prime:
                    x -= prime
                if x < out[i, j]:
                    out[i, j] = x
    return out


def signatures(hashes: np.ndarray, offsets: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """(texts, bands * rows) uint64 MinHash signatures; a text without shingles gets all 2^64 - 1 (no band
    key is made of it: see `band_keys`)."""
    a, b = permutations(bands * rows, seed)
    return _signatures(hashes, offsets, a, b)


@numba.njit(nogil=True, cache=True)
def _band_keys(signatures, bands, rows):
    count = signatures.shape[0]
    out = np.empty((count, bands), dtype=np.uint64)
    for i in range(count):
        for band in range(bands):
            h = np.uint64(band + 1)
            for r in range(rows):
                h = _fmix(h * np.uint64(0x9E3779B97F4A7C15) + signatures[i, band * rows + r])
            out[i, band] = h
    return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(texts, bands) uint64: each band's `rows` values hashed to one key."""
    return _band_keys(np.ascontiguousarray(signatures), bands, rows)


def estimated_jaccard(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The share of equal signature values, row by row: an unbiased estimate of the Jaccard similarity."""
    return (first == second).mean(axis=1)


def jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """|A n B| / |A u B| of two sorted arrays of distinct values (0 for two empty sets)."""
    if not len(first) and not len(second):
        return 0.0
    common = len(np.intersect1d(first, second, assume_unique=True))
    return common / (len(first) + len(second) - common)


def lsh_probability(similarity: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """The S-curve: the chance that two texts of this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def star_edges(groups: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (group, key) -> edges (first key of its group, key) for every later row of a group of two
    or more: as many edges as rows, however large a group (a clique would be quadratic)."""
    if len(keys) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.r_[True, groups[1:] != groups[:-1]]
    first = keys[np.maximum.accumulate(np.where(new, np.arange(len(keys)), 0))]
    later = ~new
    return first[later], keys[later]


@numba.njit(cache=True)
def _roots(parent):
    for i in range(len(parent)):
        root = i
        while parent[root] != root:
            root = parent[root]
        j = i
        while parent[j] != root:
            parent[j], j = root, parent[j]
    return parent


@numba.njit(cache=True)
def _union(parent, first, second):
    for e in range(len(first)):
        a, b = first[e], second[e]
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a < b:
            parent[b] = a
        elif b < a:
            parent[a] = b
    return parent


def _joined(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, ...]:
    """(every key in an edge, sorted; each key's root index; each edge's two key indices). One array of the keys
    sorted in place and int32 indices where they fit; union by the smaller index, so the root is the
    component's smallest key whatever the edges' order."""
    keys = np.concatenate([first, second]).astype(np.int64, copy=False)
    keys.sort()
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
    index = np.int32 if len(keys) < 2**31 else np.int64
    at_first, at_second = np.searchsorted(keys, first).astype(index), np.searchsorted(keys, second).astype(index)
    parent = _roots(_union(np.arange(len(keys), dtype=np.int64), at_first, at_second))
    return keys, parent, at_first, at_second


def components(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the edges: (every key in an edge, sorted; the smallest key of its component)."""
    keys, parent, _, _ = _joined(first, second)
    return keys, keys[parent]


@numba.njit(cache=True)
def _strongest(at_first, at_second, first, second, kind, similarity, count):
    """Each key's strongest pair: the lowest kind (exact first), then the highest similarity, then the smallest
    other key; the same whatever the pairs' order."""
    best_kind = np.full(count, 127, np.int8)
    best_similarity = np.full(count, -np.inf, np.float32)
    best_other = np.full(count, np.iinfo(np.int64).max, np.int64)
    for e in range(len(at_first)):
        value = similarity[e] if similarity[e] == similarity[e] else np.float32(-np.inf)
        for side in range(2):
            i = at_first[e] if side == 0 else at_second[e]
            other = second[e] if side == 0 else first[e]
            if kind[e] < best_kind[i] or (kind[e] == best_kind[i] and (
                    value > best_similarity[i] or (value == best_similarity[i] and other < best_other[i]))):
                best_kind[i], best_similarity[i], best_other[i] = kind[e], value, other
    return best_kind, best_similarity, best_other


def component_members(first: np.ndarray, second: np.ndarray, kind: np.ndarray,
                      similarity: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pairs -> every key in a pair, sorted, with its component's root (smallest key) and size and its
    strongest pair (kind, similarity, other key). Sorts one array of the keys in place and walks the pairs in
    compiled loops: a few bytes per key and pair beyond the pairs themselves."""
    keys, parent, at_first, at_second = _joined(first, second)
    sizes = np.bincount(parent, minlength=len(keys))[parent]
    strongest = _strongest(at_first, at_second, first, second, kind, similarity, len(keys))
    return (keys, keys[parent], sizes, *strongest)


def compile_all() -> None:
    """Compile (or load from numba's cache) the loops here; `make setup` runs it once after an install."""
    texts = normalise(pa.array(["a b c d e f", "中文 x"]), "datatrove")
    hashes, offsets = shingles(texts, 2)
    shingles(texts, 2, "datatrove")
    band_keys(signatures(hashes, offsets, 2, 2, 1), 2, 2)
    components(np.array([1, 2]), np.array([2, 3]))
    component_members(np.array([1, 2]), np.array([2, 3]), np.zeros(2, np.int8), np.ones(2, np.float32))
