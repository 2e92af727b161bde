"""One thread for the numeric kernels whose results are stored: the same bits on every runner.

BLAS and OpenMP split a matrix product across threads and the sums come out differently in the last bit with 1
and with 2 threads (169 of 1,000 faiss distances; numpy's sgemm likewise). Worker processes of a Dask cluster
run with one BLAS thread (the nanny sets OMP_NUM_THREADS=1) and the in-process runner with every core, so the
ledger's distances and cosines, and decisions at a threshold, differed between runners. Inside `one_thread()`
every BLAS and OpenMP pool of the process has one thread, whatever the process had.

The threads of one process take turns in these sections: BLAS's thread count is process-wide, so a thread
leaving its section (restoring the count it found) would give another thread's kernel, still running, its
threads back, and threadpoolctl's own bookkeeping is not safe across threads either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SECTION = threading.RLock()


@contextmanager
def one_thread() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with _SECTION, threadpool_limits(limits=1):
        yield
