"""A local Dask cluster of separate processes (`dask scheduler` and `dask worker`s) on 127.0.0.1, as a real
cluster is run: each worker in its own working directory, so nothing works by sharing the driver's.

Used by `make run-dask` (python -m winnow.pipelines.engine.dask_cluster -- winnow run ...) and by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


def _dask_command() -> list[str]:
    """The `dask` command of this Python's environment (installed with distributed)."""
    return [str(Path(sys.executable).parent / "dask")]


@contextmanager
def local_cluster(workers: int = 2, threads: int = 1, directory: str | Path | None = None,
                  timeout_s: float = 120.0):
    """Start a scheduler and `workers` worker processes of `threads` threads each; yields the scheduler's
    address; stops them all on exit."""
    with tempfile.TemporaryDirectory(prefix="winnow-dask-") as scratch:
        root = Path(directory or scratch)
        root.mkdir(parents=True, exist_ok=True)
        scheduler_file = root / "scheduler.json"
        log = (root / "cluster.log").open("ab")
        dask = _dask_command()
        processes = [subprocess.Popen(
            [*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--no-show",
             "--scheduler-file", str(scheduler_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=root)]
        try:
            address = _wait_for_scheduler(scheduler_file, processes[0], timeout_s, root)
            for index in range(workers):
                folder = root / f"worker-{index}"
                folder.mkdir(exist_ok=True)
                processes.append(subprocess.Popen(
                    [*dask, "worker", address, "--nthreads", str(threads), "--nworkers", "1", "--no-dashboard",
                     "--host", "127.0.0.1", "--local-directory", str(folder), "--name", f"worker-{index}"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=folder))
            _wait_for_workers(address, workers, timeout_s, root)
            yield address
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            log.close()


def _wait_for_scheduler(scheduler_file: Path, process: subprocess.Popen, timeout_s: float, root: Path) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {process.returncode}; see {root / 'cluster.log'}")
        if scheduler_file.exists():
            try:
                return json.loads(scheduler_file.read_text())["address"]
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.2)
    raise RuntimeError(f"dask scheduler did not start in {timeout_s:.0f} s; see {root / 'cluster.log'}")


def _wait_for_workers(address: str, workers: int, timeout_s: float, root: Path) -> None:
    from distributed import Client

    with Client(address, timeout=timeout_s) as client:
        try:
            client.wait_for_workers(workers, timeout=timeout_s)
        except TimeoutError:
            raise RuntimeError(f"{workers} dask workers did not join in {timeout_s:.0f} s; see "
                               f"{root / 'cluster.log'}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a local Dask scheduler and workers, run a command with DASK_SCHEDULER_ADDRESS set "
                    "(and `{address}` in its arguments replaced), then stop them.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (also its torch threads)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    with local_cluster(args.workers, args.threads) as address:
        print(f"dask cluster: scheduler {address}, {args.workers} workers x {args.threads} threads", flush=True)
        command = [part.replace("{address}", address) for part in command]
        return subprocess.call(command, env={**os.environ, "DASK_SCHEDULER_ADDRESS": address})


if __name__ == "__main__":
    sys.exit(main())
