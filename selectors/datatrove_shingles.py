"""DataTrove 0.10.1's MinHash shingles, reproduced on Arrow arrays (`dedup.shingles: datatrove`).

DataTrove's `MinhashDedupSignature` (English) simplifies a text (`minhash.normalise(..., "datatrove")` is its
`simplify_text`), splits it with spaCy's blank English tokenizer and hashes each n-gram of tokens, joined by
single spaces, with xxhash64 (seed 0). On simplified text (lower case, no punctuation from DataTrove's list,
digits folded to 0) spaCy's tokenizer does four things beyond splitting at spaces, and this module does them in
one compiled pass over the UTF-8 bytes, per word, in spaCy's order:
- its English special cases without punctuation: `cannot` -> `can not`, `im` -> `i m`, `dont` -> `do nt`, ...
  (SPECIAL_CASES, from spaCy 3.8's `spacy.blank("en").tokenizer.rules`; tests/test_minhash.py checks the table
  against spaCy);
- a prefix split off: a currency sign, `§`, a symbol or one of the punctuation marks DataTrove keeps (AFFIXES);
- a suffix split off: a symbol or AFFIXES, or a unit or currency sign after a digit (`0mb` -> `0 mb`);
- symbols (Unicode So: `®`, `©`, `°`, emoji, box drawing) inside a word split off.
On 137,715 real texts of ../shared/data (five corpora, multilingual Debian included) the tokens equal spaCy's
for every text. The signatures are then DataTrove's: the same permutations (`minhash.permutations`) over the
same shingle hashes.
"""

from __future__ import annotations

import functools
import unicodedata

import numba
import numpy as np
import pyarrow as pa

SPECIAL_CASES = """
    ai nt, are nt, can not, ca nt, ca nt ve, could nt, could nt ve, could ve, dare nt, did nt, did nt ve, does nt,
    does nt ve, do nt, do nt ve, gon na, got ta, had nt, had nt ve, has nt, have nt, he d, he d ve, he ll ve, he s,
    how d, how d ve, how ll, how ll ve, how re, how s, how ve, i d, i d ve, i ll ve, i m, i m a, is nt, it d,
    it d ve, it ll, it ll ve, i ve, may nt, may nt ve, might nt, might nt ve, might ve, must nt, must nt ve,
    must ve, need nt, need nt ve, not ve, ought nt, ought nt ve, sha nt, sha nt ve, she d ve, she ll ve, she s,
    should nt, should nt ve, should ve, that d, that d ve, that ll, that ll ve, that s, there d, there d ve,
    there ll, there ll ve, there re, there s, there ve, these d, these d ve, these ll, these ll ve, these re,
    these ve, they d, they d ve, they ll, they ll ve, they re, they ve, this d, this d ve, this ll, this ll ve,
    this s, those d, those d ve, those ll, those ll ve, those re, those ve, was nt, we d, we d ve, we ll ve,
    were nt, we ve, what d, what d ve, what ll, what ll ve, what re, what s, what ve, when d, when d ve, when ll,
    when ll ve, when re, when s, when ve, where d, where d ve, where ll, where ll ve, where re, where s, where ve,
    who d, who d ve, who ll, who ll ve, who s, who ve, why d, why d ve, why ll, why ll ve, why re, why s, why ve,
    wo nt, wo nt ve, would nt, would nt ve, would ve, y all, you d, you d ve, you ll, you ll ve, you re, you ve
"""
UNITS = (  # spaCy's units that a lower-cased text can hold (its `(?<=[0-9])(?:units)` suffix)
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz kmh mph mbar mb "
    "kb gb tb % км км² км³ м м² м³ дм дм² дм³ см см² см³ мм мм² мм³ нм кг г мг мбар кб мб гб тбكم كم² كم³ م م² "
    "م³ سم سم² سم³ مم مم² مم³ كم غرام جرام جم كغ ملغ كوب اكواب"
)
# spaCy's prefixes and suffixes that DataTrove keeps (punctuation and quotes); every other symbol (Unicode So,
# with the degree sign) is split off wherever it stands; currency signs and the section sign are prefixes
AFFIXES = "¡·¿،؛؟٪۔।‘‚⟦⟧『』〔〕"
SYMBOL, AFFIX, PREFIX = 1, 2, 3
# spaCy's currency signs that DataTrove does not remove: a prefix, and a suffix after a digit
CURRENCIES = "£ € ¥ ฿ ₽ ﷼ ₴ ₠ ₡ ₢ ₣ ₤ ₥ ₦ ₧ ₨ ₩ ₪ ₫ ₭ ₮ ₯ ₰ ₱ ₲ ₳ ₵ ₶ ₷ ₸ ₹ ₺ ₻ ₼ ₾ ₿"


def _utf8_table(words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [word.encode() for word in words]
    return (np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
            np.cumsum([0] + [len(word) for word in encoded]).astype(np.int64))


@numba.njit(inline="always")
def _fnv(data, start, stop):
    h = np.uint64(0xCBF29CE484222325)
    for j in range(start, stop):
        h = (h ^ np.uint64(data[j])) * np.uint64(0x100000001B3)
    return h


def _special_table() -> tuple[np.ndarray, ...]:
    """(FNV-1a hashes sorted, key bytes, key offsets, cut offsets, cuts): each special case's cut positions."""
    cases = [case.strip().split() for case in SPECIAL_CASES.replace("\n", " ").split(",") if case.strip()]
    keys = ["".join(pieces) for pieces in cases]
    data, offsets = _utf8_table(keys)
    hashes = np.array([_fnv(data, offsets[i], offsets[i + 1]) for i in range(len(keys))], dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    data, offsets = _utf8_table([keys[i] for i in order])
    cuts = [np.cumsum([len(p.encode()) for p in cases[i][:-1]]) for i in order]
    return (hashes[order], data, offsets, np.cumsum([0] + [len(c) for c in cuts]).astype(np.int64),
            np.concatenate(cuts).astype(np.int64))


@numba.njit(inline="always")
def _same(data, start, stop, table, a, b):
    if b - a != stop - start:
        return False
    for k in range(b - a):
        if data[start + k] != table[a + k]:
            return False
    return True


@numba.njit(inline="always")
def _special(data, start, stop, hashes, keys, key_offsets):
    """The index of data[start:stop] among the special cases, or -1."""
    h = _fnv(data, start, stop)
    i = np.searchsorted(hashes, h)
    while i < len(hashes) and hashes[i] == h:
        if _same(data, start, stop, keys, key_offsets[i], key_offsets[i + 1]):
            return i
        i += 1
    return -1


@numba.njit(inline="always")
def _ends_with(data, start, stop, table, offsets):
    """The byte length of the longest table entry data[start:stop] ends with, or 0."""
    best = 0
    for i in range(len(offsets) - 1):
        size = offsets[i + 1] - offsets[i]
        if best < size <= stop - start and _same(data, stop - size, stop, table, offsets[i], offsets[i + 1]):
            best = size
    return best


@numba.njit(inline="always")
def _is_space(byte):
    return byte == 32 or byte == 9 or byte == 10 or byte == 13 or byte == 12 or byte == 11


@numba.njit(inline="always")
def _char_at(data, j):
    """(code point, byte width) of the UTF-8 character starting at j."""
    lead = np.int64(data[j])
    if lead < 0x80:
        return lead, 1
    if lead < 0xE0:
        return ((lead & 0x1F) << 6) | (np.int64(data[j + 1]) & 0x3F), 2
    if lead < 0xF0:
        return ((lead & 0x0F) << 12) | ((np.int64(data[j + 1]) & 0x3F) << 6) | (np.int64(data[j + 2]) & 0x3F), 3
    return (((lead & 0x07) << 18) | ((np.int64(data[j + 1]) & 0x3F) << 12) | ((np.int64(data[j + 2]) & 0x3F) << 6)
            | (np.int64(data[j + 3]) & 0x3F)), 4


@numba.njit(inline="always")
def _class_of(classes, code):
    return classes[code] if code < len(classes) else 0


@numba.njit(nogil=True, cache=True)
def _tokens(data, offsets, hashes, keys, key_offsets, cut_offsets, cuts, units, unit_offsets, signs, sign_offsets,
            classes):
    """(token starts, token ends, per-text token offsets) as spaCy's English tokenizer cuts simplified text:
    per word, special case -> prefix -> suffix (a sign, or a unit or currency after a digit) until none is
    left, then symbols inside split off."""
    count = len(offsets) - 1
    starts = np.empty(len(data) + 1, dtype=np.int64)  # a token holds one byte at least
    ends = np.empty(len(data) + 1, dtype=np.int64)
    token_offsets = np.zeros(count + 1, dtype=np.int64)
    suffixes = np.empty(len(data) + 1, dtype=np.int64)
    total = 0
    for i in range(count):
        j, stop = offsets[i], offsets[i + 1]
        while j < stop:
            while j < stop and _is_space(data[j]):
                j += 1
            if j == stop:
                break
            end = j
            while end < stop and not _is_space(data[end]):
                end += 1
            start, tail, kept, special = j, end, 0, False
            digit = False  # units and currency suffixes follow a digit: most words need no table scan
            for k in range(j, end):
                if 48 <= data[k] <= 57:
                    digit = True
                    break
            while start < tail:
                case = _special(data, start, tail, hashes, keys, key_offsets)
                if case >= 0:
                    base = start
                    for c in range(cut_offsets[case], cut_offsets[case + 1]):
                        starts[total], ends[total] = start, base + cuts[c]
                        total += 1
                        start = base + cuts[c]
                    special = True
                    break
                code, width = _char_at(data, start)
                if _class_of(classes, code) > 0 and width < tail - start:
                    starts[total], ends[total] = start, start + width
                    total += 1
                    start += width
                    continue
                last = tail - 1
                while last > start and (data[last] & 0xC0) == 0x80:
                    last -= 1
                code, width = _char_at(data, last)
                size = width if (_class_of(classes, code) == SYMBOL or _class_of(classes, code) == AFFIX) else 0
                if size == 0 and digit:
                    size = max(_ends_with(data, start, tail, units, unit_offsets),
                               _ends_with(data, start, tail, signs, sign_offsets))
                    if not (size > 0 and tail - size - 1 >= start and 48 <= data[tail - size - 1] <= 57):
                        size = 0
                if 0 < size < tail - start:
                    suffixes[kept] = tail - size
                    kept += 1
                    tail -= size
                    continue
                break
            piece = start
            k = start
            while k < tail and not special:
                code, width = _char_at(data, k)
                if _class_of(classes, code) == SYMBOL and k > start and k + width < tail:
                    if piece < k:
                        starts[total], ends[total] = piece, k
                        total += 1
                    starts[total], ends[total] = k, k + width
                    total += 1
                    piece = k + width
                k += width
            if piece < tail:
                starts[total], ends[total] = piece, tail
                total += 1
            for k in range(kept - 1, -1, -1):
                starts[total], ends[total] = suffixes[k], suffixes[k - 1] if k > 0 else end
                total += 1
            j = end
        token_offsets[i + 1] = total
    return starts[:total], ends[:total], token_offsets


_P1, _P2, _P3 = np.uint64(11400714785074694791), np.uint64(14029467366897019727), np.uint64(1609587929392839161)
_P4, _P5 = np.uint64(9650029242287828579), np.uint64(2870177450012600261)


@numba.njit(inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(inline="always")
def _read64(buf, i):
    value = np.uint64(0)
    for k in range(8):
        value |= np.uint64(buf[i + k]) << np.uint64(8 * k)
    return value


@numba.njit(inline="always")
def _round(acc, value):
    return _rotl(acc + value * _P2, 31) * _P1


@numba.njit(inline="always")
def _merge(acc, value):
    return (acc ^ _round(np.uint64(0), value)) * _P1 + _P4


@numba.njit(nogil=True)
def xxh64(buf, n):
    """XXH64 of buf[:n] with seed 0 (the `xxhash` package's `xxh64_intdigest`)."""
    i = 0
    if n >= 32:
        v1, v2, v3, v4 = _P1 + _P2, _P2, np.uint64(0), np.uint64(0) - _P1
        while i + 32 <= n:
            v1 = _round(v1, _read64(buf, i))
            v2 = _round(v2, _read64(buf, i + 8))
            v3 = _round(v3, _read64(buf, i + 16))
            v4 = _round(v4, _read64(buf, i + 24))
            i += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(_merge(_merge(_merge(h, v1), v2), v3), v4)
    else:
        h = _P5
    h += np.uint64(n)
    while i + 8 <= n:
        h = _rotl(h ^ _round(np.uint64(0), _read64(buf, i)), 27) * _P1 + _P4
        i += 8
    if i + 4 <= n:
        word = np.uint64(0)
        for k in range(4):
            word |= np.uint64(buf[i + k]) << np.uint64(8 * k)
        h = _rotl(h ^ (word * _P1), 23) * _P2 + _P3
        i += 4
    while i < n:
        h = _rotl(h ^ (np.uint64(buf[i]) * _P5), 11) * _P1
        i += 1
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


@numba.njit(nogil=True, cache=True)
def _ngram_hashes(data, starts, ends, token_offsets, n):
    """(xxhash64 of each n tokens joined by one space, per-text offsets)."""
    count = len(token_offsets) - 1
    offsets = np.zeros(count + 1, dtype=np.int64)
    for i in range(count):
        offsets[i + 1] = offsets[i] + max(token_offsets[i + 1] - token_offsets[i] - n + 1, 0)
    out = np.empty(offsets[count], dtype=np.uint64)
    scratch = np.empty(256, dtype=np.uint8)
    for i in range(count):
        first = token_offsets[i]
        for s in range(offsets[i + 1] - offsets[i]):
            size = n - 1
            for t in range(first + s, first + s + n):
                size += ends[t] - starts[t]
            if size > len(scratch):
                scratch = np.empty(2 * size, dtype=np.uint8)
            at = 0
            for t in range(first + s, first + s + n):
                if t > first + s:
                    scratch[at] = 32
                    at += 1
                for j in range(starts[t], ends[t]):
                    scratch[at] = data[j]
                    at += 1
            out[offsets[i] + s] = xxh64(scratch, at)
    return out, offsets


@functools.cache
def _tables() -> tuple[np.ndarray, ...]:
    classes = np.zeros(0x30000, dtype=np.uint8)
    for code in range(len(classes)):
        if unicodedata.category(chr(code)) == "So":
            classes[code] = SYMBOL
    for char in AFFIXES:
        classes[ord(char)] = AFFIX
    for char in CURRENCIES.replace(" ", "") + "§":
        classes[ord(char)] = PREFIX
    return (*_special_table(), *_utf8_table(UNITS.split()), *_utf8_table(CURRENCIES.split()), classes)


def tokens(texts: pa.Array) -> list[list[str]]:
    """Each simplified text's tokens as DataTrove's English tokenizer gives them (for tests and inspection)."""
    from winnow.selectors.minhash import text_buffers

    data, offsets = text_buffers(texts)
    starts, ends, token_offsets = _tokens(data, offsets, *_tables())
    return [[bytes(data[starts[t]:ends[t]]).decode() for t in range(token_offsets[i], token_offsets[i + 1])]
            for i in range(len(texts))]


def shingles(data: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shingle hashes uint64, per-text offsets) of simplified texts' UTF-8 bytes and byte offsets."""
    starts, ends, token_offsets = _tokens(data, offsets, *_tables())
    return _ngram_hashes(data, starts, ends, token_offsets, n)
