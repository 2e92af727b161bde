"""Console progress for long local runs: records done, rate and ETA per stage, printed from inside the DoFns.

Quiet unless stderr is a terminal and CI is not set (WINNOW_PROGRESS=1 forces it on, 0 off), so CI logs and
redirected runs stay clean; the same numbers always go to Beam metrics (counters per stage), which Dataflow's
UI shows. Each worker process reports its own share; the total is the input's row count when the driver knows
it (Parquet metadata), and stages after a filter reach less than the total, so their ETA is an upper bound.
"""

from __future__ import annotations

import os
import sys
import time

EVERY_S = 5.0


def enabled() -> bool:
    forced = os.environ.get("WINNOW_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """Throttled progress lines for one stage in one worker process."""

    def __init__(self, stage: str, total: int | None = None, unit: str = "records", every_s: float = EVERY_S):
        self.stage, self.total, self.unit, self.every_s = stage, total, unit, every_s
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.on = enabled()

    def advance(self, count: int, note: str = "") -> str | None:
        """Count `count` more done; returns (and prints, when on) a line at most every `every_s` seconds, with
        an optional note (e.g. tokens/s)."""
        self.done += count
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if now - self.last < self.every_s and not finished:
            return None
        self.last = now
        line = self.line(now) + (f", {note}" if note else "")
        if self.on:
            print(line, file=sys.stderr, flush=True)
        return line

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = max(self.total - self.done, 0)
            eta = f", ETA {_duration(left / rate) if rate > 0 else '?'}"
            return f"winnow [{self.stage}] {self.done:,}/{self.total:,} {self.unit}, {rate:,.1f}/s{eta}"
        return f"winnow [{self.stage}] {self.done:,} {self.unit}, {rate:,.1f}/s"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
