"""Compiled loops over Arrow string buffers, for work that Arrow compute cannot do and Python would do per
record: BLAKE2b digests and whitespace token counts (numba, nopython, without the GIL: two worker threads run
them at once).

BLAKE2b: the same digests as `hashlib.blake2b(value, digest_size=n)`. winnow's ids, shuffles and samples are
BLAKE2b digests (content ids of the text, 64-bit hashes of ids with a seed); their values are part of the
output, so only a faster way to compute the same digests helps. Called once per record from Python, hashlib
spends most of its time on the call, not the hash (about 1 µs a call, five calls a record in validate + mix).
Here one compiled loop hashes every value of an Arrow string array from its UTF-8 buffer, with no Python object
per record. The compression function is RFC 7693's; `tests/test_native.py` checks it against hashlib on every
length from 0 to 400 bytes and on the sample.

Token counts: `len(text.split())` of every text, one pass over the UTF-8 bytes (`tests/test_blocks.py` checks
every code point). Text flags: validate's two questions of every text (a character that is not whitespace? a
control character?) in one pass whose control test compiles to vector instructions, 5x as fast as the two
regular expressions (`tests/test_native.py` checks every code point against them).
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_IV = np.array([
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
], dtype=np.uint64)

_SIGMA = np.array([
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
], dtype=np.int64)

@numba.njit(inline="always")
def _rotr(x, n):
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@numba.njit(inline="always")
def _mix(a, b, c, d, x, y):
    """RFC 7693's G."""
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


_GROUPS = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))


def _compress_source() -> str:
    """RFC 7693's F with its 12 rounds written out, each G taking its message words by name (SIGMA resolved
    here): the words and the state stay in registers, 1.4x as fast as the rounds as a loop over SIGMA."""
    lines = ["def _compress(h, words, counter, last):",
             "    " + ", ".join(f"m{i}" for i in range(16)) + " = " + ", ".join(f"words[{i}]" for i in range(16)),
             "    v0, v1, v2, v3, v4, v5, v6, v7 = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]",
             "    " + ", ".join(f"v{i + 8}" for i in range(8)) + " = " + ", ".join(f"_IV[{i}]" for i in range(8)),
             "    v12 ^= counter",
             "    if last:",
             "        v14 = ~v14"]
    for sigma in _SIGMA:
        for index, (a, b, c, d) in enumerate(_GROUPS):
            x, y = sigma[2 * index], sigma[2 * index + 1]
            lines.append(f"    v{a}, v{b}, v{c}, v{d} = _mix(v{a}, v{b}, v{c}, v{d}, m{x}, m{y})")
    lines += [f"    h[{i}] ^= v{i} ^ v{i + 8}" for i in range(8)]
    return "\n".join(lines)


_generated: dict = {"_mix": _mix, "_IV": _IV}
exec(_compress_source(), _generated)  # noqa: S102 - our own source, made above from SIGMA
_compress = numba.njit(inline="always")(_generated["_compress"])


@numba.njit(nogil=True, cache=True)
def _digests(data, offsets, digest_size):
    """BLAKE2b (unkeyed) of data[offsets[i]:offsets[i + 1]] for every i: (n, digest_size) bytes."""
    count = len(offsets) - 1
    out = np.empty((count, digest_size), dtype=np.uint8)
    h = np.empty(8, dtype=np.uint64)
    block = np.zeros(128, dtype=np.uint8)
    words = block.view(np.uint64)
    state = h.view(np.uint8)
    param = np.uint64(0x01010000) ^ np.uint64(digest_size)
    for i in range(count):
        start, stop = offsets[i], offsets[i + 1]
        for j in range(8):
            h[j] = _IV[j]
        h[0] ^= param
        length = stop - start
        position = 0
        while length - position > 128:  # every block but the last
            for k in range(128):
                block[k] = data[start + position + k]
            position += 128
            _compress(h, words, np.uint64(position), False)
        tail = length - position
        for k in range(128):
            block[k] = data[start + position + k] if k < tail else 0
        _compress(h, words, np.uint64(length), True)
        for k in range(digest_size):
            out[i, k] = state[k]
    return out


def one_chunk(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An array as one Arrow array: a chunked array of one chunk is that chunk (combine_chunks copies it)."""
    if not isinstance(values, pa.ChunkedArray):
        return values
    return values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()


def _utf8_buffers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes and int64 offsets of a string or binary array without nulls."""
    values = one_chunk(values)
    if values.null_count:
        raise ValueError("cannot hash null values")
    return _buffers(values)


def _buffers(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The data bytes and int64 offsets of a string or binary array (a null spans no bytes)."""
    large = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64 if large else np.int32)
    offsets = offsets[values.offset:values.offset + len(values) + 1].astype(np.int64)
    data = values.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
    return data, offsets


def digests(values: pa.Array, digest_size: int) -> np.ndarray:
    """`hashlib.blake2b(value, digest_size=digest_size).digest()` of every value: (n, digest_size) uint8."""
    if not 1 <= digest_size <= 64:
        raise ValueError(f"BLAKE2b digest size {digest_size} is not in 1..64")
    data, offsets = _utf8_buffers(values)
    return _digests(data, offsets, digest_size)


def digest_integers(values: pa.Array, byteorder: str = "big") -> np.ndarray:
    """`int.from_bytes(blake2b(value, digest_size=8).digest(), byteorder)` of every value, as uint64."""
    raw = digests(values, 8)
    return raw.view(">u8" if byteorder == "big" else "<u8").reshape(-1).astype(np.uint64)


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def hexdigests(values: pa.Array, digest_size: int) -> pa.Array:
    """`blake2b(value, digest_size=digest_size).hexdigest()` of every value, as an Arrow string array."""
    raw = digests(values, digest_size)
    text = np.empty((len(raw), 2 * digest_size), dtype=np.uint8)
    text[:, 0::2] = _HEX[raw >> 4]
    text[:, 1::2] = _HEX[raw & 15]
    offsets = np.arange(0, text.size + 1, 2 * digest_size, dtype=np.int32)
    return pa.StringArray.from_buffers(len(raw), pa.py_buffer(offsets), pa.py_buffer(text.reshape(-1)))


def joined(parts: list, separator: str = "\0") -> pa.Array:
    """The parts (Arrow string arrays or str, at least one array) joined by `separator`, row by row."""
    columns = [part if not isinstance(part, str) else pa.scalar(part, pa.string()) for part in parts]
    return pc.binary_join_element_wise(*columns, separator)


_ASCII_SPACE = np.zeros(128, dtype=np.bool_)
_ASCII_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_ASCII_SPACE_INT = _ASCII_SPACE.astype(np.int64)  # for arithmetic without a branch


@numba.njit(inline="always")
def _space_at(data, j, stop):
    """(whether the character at byte j is whitespace to str.split, its width in bytes)."""
    lead = data[j]
    if lead < 0x80:
        return _ASCII_SPACE[lead], 1
    if lead < 0xC0:  # a stray continuation byte: not in valid UTF-8
        return False, 1
    if lead < 0xE0:  # U+0085, U+00A0
        return lead == 0xC2 and j + 1 < stop and (data[j + 1] == 0x85 or data[j + 1] == 0xA0), 2
    if lead >= 0xF0:
        return False, 4
    if j + 2 >= stop:
        return False, 3
    second, third = data[j + 1], data[j + 2]
    if lead == 0xE1:  # U+1680
        return second == 0x9A and third == 0x80, 3
    if lead == 0xE2:  # U+2000..U+200A, U+2028, U+2029, U+202F, U+205F
        return (second == 0x80 and (third <= 0x8A or third == 0xA8 or third == 0xA9 or third == 0xAF)) or (
            second == 0x81 and third == 0x9F), 3
    if lead == 0xE3:  # U+3000
        return second == 0x80 and third == 0x80, 3
    return False, 3


@numba.njit(nogil=True, cache=True)
def _token_counts(data, offsets):
    """Starts of runs of characters that are not whitespace, counted without a branch on the data (1.5x as fast
    as `if not space and not inside`, which the CPU mispredicts at every word)."""
    count = len(offsets) - 1
    out = np.zeros(count, dtype=np.int64)
    for i in range(count):
        j, stop = offsets[i], offsets[i + 1]
        tokens, previous = 0, 1
        while j < stop:
            if data[j] < 0x80:
                space = _ASCII_SPACE_INT[data[j]]
                j += 1
            else:
                wide, width = _space_at(data, j, stop)
                space = 1 if wide else 0
                j += width
            tokens += previous & (1 - space)
            previous = space
        out[i] = tokens
    return out


def token_counts(texts: pa.Array) -> np.ndarray:
    """`len(text.split())` of every non-null text of a string array (0 for a null), as int64."""
    data, offsets = _buffers(one_chunk(texts))
    return _token_counts(data, offsets)


@numba.njit(nogil=True, cache=True)
def _text_flags(data, offsets):
    count = len(offsets) - 1
    text = np.zeros(count, dtype=np.bool_)
    control = np.zeros(count, dtype=np.bool_)
    for i in range(count):
        start, stop = offsets[i], offsets[i + 1]
        found = np.uint8(0)
        for j in range(start, stop):  # no branch: vectorised (bytes < 0x80 are ASCII characters in UTF-8)
            b = data[j]
            found |= (b < 9) | ((b >= 14) & (b < 32)) | (b == 127)
        control[i] = found != 0
        j = start
        while j < stop:
            space, width = _space_at(data, j, stop)
            if not space:
                text[i] = True
                break
            j += width
    return text, control


def text_flags(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """For every value of a string array: (whether it has a character that is not whitespace, i.e.
    `text.strip()` is not empty; whether it has a C0 control character other than \\t-\\r, or DEL), as bool
    arrays. A null has neither."""
    chunks = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
    flags = [_text_flags(*_buffers(chunk)) for chunk in chunks]
    if not flags:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    return np.concatenate([f[0] for f in flags]), np.concatenate([f[1] for f in flags])


def compile_all() -> None:
    """Compile (or load from numba's cache) every loop here: `make setup` runs it once after an install, so
    that a job's first run does not spend its first 20 s compiling."""
    from winnow.selectors import minhash

    texts = pa.array(["a b", " \u3000x"])
    minhash.compile_all()
    digests(texts, 8)
    token_counts(texts)
    text_flags(texts)


if __name__ == "__main__":
    import time

    started = time.perf_counter()
    compile_all()
    print(f"winnow.pipelines.io.native: compiled loops ready ({time.perf_counter() - started:.1f} s)")
