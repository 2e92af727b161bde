"""The output directory: checked before a run, locked while one runs, swapped into place when it is done."""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"


class OutputError(ValueError):
    """The output directory cannot be written as asked; one line."""


def check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: output.path exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).exists():
        raise OutputError(
            f"{output}: output.path is a non-empty directory that is not a winnow output; refusing to replace it"
        )


def publish(work_dir: Path, output: Path) -> None:
    """Swap the finished work directory into place; the old output survives until the new one is there."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:12]}"
        output.rename(old)
    work_dir.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def output_lock(output: Path):
    """One run at a time per output: `.NAME.lock` beside it holds the running job's host and pid. A lock left
    by a killed run (its process gone) is taken over; a live one stops this run with one line."""
    lock = output.parent / f".{output.name}.lock"
    output.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": platform.node(), "pid": os.getpid()}
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _process_alive(holder["pid"]):
                lock.unlink(missing_ok=True)  # left by a killed run
                continue
            raise OutputError(
                f"{output}: another winnow run (host {holder.get('host')}, pid {holder.get('pid')}) is writing "
                f"it; if none is, remove {lock}"
            ) from None
        with os.fdopen(handle, "w") as file:
            json.dump(me, file)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
