"""The exact global top n of a score, placed by passes without gathering the pool (select's decision and its
shortlist). Three small pipelines read the records: a histogram of the top 16 bits of each score's
order-preserving 64-bit key finds the bucket holding the n-th score, a histogram of the next 16 bits inside it
narrows it, and the keys of that last bucket are gathered; the driver places the smallest kept rank key
(score key, seeded id hash, id), which a record file is then compared with where it is read."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import apache_beam as beam
import numpy as np

from winnow.pipelines.engine.passes import Pass, gather
from winnow.selectors import task_selection

RankKeys = Callable[[Any, dict[str, Any]], Any]  # (records, constants) -> PCollection of rank keys
Wanted = Callable[[int, dict[str, Any]], int]  # (pool, constants) -> how many to keep


def score_key(score: float) -> int:
    """An unsigned 64-bit integer with the same order as the float64 score."""
    bits = struct.unpack(">Q", struct.pack(">d", score))[0]
    return bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)


def score_of_key(key: int) -> float:
    bits = key ^ (1 << 63) if key >> 63 else key ^ 0xFFFFFFFFFFFFFFFF
    return struct.unpack(">d", struct.pack(">Q", bits))[0]


def rank_key(record: dict[str, Any], seed: int, column: str = "select_score") -> tuple[int, int, str]:
    return score_key(record[column]), task_selection.tiebreak(seed, record["id"]), record["id"]


def score_keys(scores: np.ndarray) -> np.ndarray:
    """score_key of each float64 score, as uint64."""
    bits = np.ascontiguousarray(scores, dtype=np.float64).view(np.uint64)
    negative = (bits >> np.uint64(63)) == np.uint64(1)
    return np.where(negative, bits ^ np.uint64(0xFFFFFFFFFFFFFFFF), bits | np.uint64(1 << 63))


def selected(scores: np.ndarray, ids: list[str], threshold: tuple | None, seed: int) -> np.ndarray:
    """Whether each rank key (score, seeded tiebreak, id) is at or above `threshold`; the tiebreak is hashed
    only for the rows whose score equals the threshold's."""
    kept = np.zeros(len(ids), dtype=bool)
    if threshold is None:
        return kept
    keys = score_keys(scores)
    kept |= keys > np.uint64(threshold[0])
    for index in np.flatnonzero(keys == np.uint64(threshold[0])).tolist():
        kept[index] = (task_selection.tiebreak(seed, ids[index]), ids[index]) >= tuple(threshold[1:])
    return kept


class _PrefixCountFn(beam.CombineFn):
    """How many rank keys share each top-`bits` prefix of the score key (at most 2^16 entries)."""

    def __init__(self, shift: int):
        self.shift = shift

    def create_accumulator(self):
        return Counter()

    def add_input(self, accumulator, key):
        accumulator[key[0] >> self.shift] += 1
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = Counter()
        for counts in accumulators:
            merged.update(counts)
        return merged

    def extract_output(self, accumulator):
        return dict(accumulator)


def boundary(counts: dict[int, int], wanted: int) -> tuple[int, int] | None:
    """(prefix holding the `wanted`-th largest key, how many to take from it); None when nothing is wanted."""
    if wanted <= 0:
        return None
    above = 0
    for prefix in sorted(counts, reverse=True):
        if above + counts[prefix] >= wanted:
            return prefix, wanted - above
        above += counts[prefix]
    raise RuntimeError(f"internal error: {wanted} wanted from {above} scored records")


def _in_bucket(key, level, shift: int):
    return level is not None and key[0] >> shift == level[0]


def _last_key(last: list, level) -> tuple | None:
    """The smallest kept rank key: the level[1]-th largest of the last bucket."""
    if level is None:
        return None
    if len(last) < level[1]:
        raise RuntimeError(f"internal error: {len(last)} keys in the last bucket, {level[1]} wanted")
    return sorted(last, reverse=True)[level[1] - 1]


@dataclass(frozen=True)
class Threshold:
    """A decision's constants, placed on the driver from the passes' results."""

    pool: int
    wanted: int
    level1: tuple[int, int] | None
    level2: tuple[int, int] | None = None
    key: tuple | None = None

    @property
    def score(self) -> float | None:
        return None if self.key is None else score_of_key(self.key[0])


@dataclass(frozen=True)
class TopN:
    """The three passes of one exact top n, their results named `{prefix}histogram`, `inner` and `last`."""

    prefix: str
    keys: RankKeys
    wanted: Wanted
    reads_vectors: bool = False

    def _level1(self, constants: dict[str, Any]) -> Threshold:
        histogram = constants[f"{self.prefix}histogram"]
        wanted = self.wanted(histogram["pool"], constants)
        return Threshold(histogram["pool"], wanted, boundary(histogram["counts"], wanted))

    def _level2(self, constants: dict[str, Any]) -> Threshold:
        first = self._level1(constants)
        level2 = boundary(constants[f"{self.prefix}inner"], first.level1[1]) if first.level1 else None
        return replace(first, level2=level2)

    def place(self, constants: dict[str, Any]) -> Threshold:
        """The smallest kept rank key, from the three passes' results."""
        second = self._level2(constants)
        return replace(second, key=_last_key([tuple(k) for k in constants[f"{self.prefix}last"]], second.level2))

    def _histogram(self, records, constants):
        keys = self.keys(records, constants)
        return gather({"pool": keys | "Pool" >> beam.combiners.Count.Globally(),
                       "counts": keys | "Prefix48" >> beam.CombineGlobally(_PrefixCountFn(48))})

    def _inner(self, records, constants):
        return (
            self.keys(records, constants)
            | "In48" >> beam.Filter(_in_bucket, self._level1(constants).level1, 48)
            | "Prefix32" >> beam.CombineGlobally(_PrefixCountFn(32))
        )

    def _last(self, records, constants):
        levels = self._level2(constants)
        return (
            self.keys(records, constants)
            | "In48" >> beam.Filter(_in_bucket, levels.level1, 48)
            | "In32" >> beam.Filter(_in_bucket, levels.level2, 32)
            | "LastBucket" >> beam.combiners.ToList()
        )

    def passes(self) -> tuple[Pass, ...]:
        return tuple(Pass(f"{self.prefix}{name}", build, reads_vectors=self.reads_vectors)
                     for name, build in (("histogram", self._histogram), ("inner", self._inner),
                                         ("last", self._last)))
