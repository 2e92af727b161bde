"""The output: checked before a run, locked while one runs, published when it is done.

A local output is written into a hidden sibling directory and renamed into place. An object store has no
rename: the run writes its files under a prefix of its own inside the output (`OUT/run-ID/`), and
`OUT/manifest.json`, written last, is the commit point: it lists every file of the output by its path relative
to OUT, readers (`verify`, the report, `embed.reuse`) go by it, and files that no manifest lists are not output.
The previous run's prefix is removed once the new manifest is there."""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from apache_beam.io.filesystem import BeamIOError

from winnow.pipelines.io.storage import (
    create_if_absent,
    delete_file,
    delete_files,
    is_remote,
    join,
    list_files,
    read_json,
    sibling,
    split,
    write_bytes,
)

MANIFEST = "manifest.json"


class OutputError(ValueError):
    """The output directory cannot be written as asked; one line."""


RUN_PREFIX = "run-"


def check_output(output: str) -> None:
    if is_remote(output):
        prefix = output.rstrip("/") + "/"
        listed = [path for path in list_files(output) if not path[len(prefix):].startswith(RUN_PREFIX)]
        if listed and join(output, MANIFEST) not in listed:  # run-* prefixes without one: killed runs' files
            raise OutputError(f"{output}: output.path holds objects but no {MANIFEST}: not a winnow output; "
                              "refusing to replace it")
        return
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: output.path exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).exists():
        raise OutputError(
            f"{output}: output.path is a non-empty directory that is not a winnow output; refusing to replace it"
        )


def publish(work_dir: str, output: str, manifest: bytes) -> None:
    """Write the manifest, last, and put the finished run in place; the old output survives until the new one
    is there."""
    if is_remote(output):
        write_bytes(join(output, MANIFEST), manifest)
        keep = split(work_dir)[1] + "/"
        prefix = output.rstrip("/") + "/"
        delete_files(sorted(path for path in list_files(output)
                            if not path[len(prefix):].startswith(keep) and path[len(prefix):] != MANIFEST))
        return
    work_dir, output = Path(work_dir), Path(output)
    write_bytes(str(work_dir / MANIFEST), manifest)
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
def output_lock(output: str):
    """One run at a time per output: `.NAME.lock` beside it holds the running job's host and pid. A lock left
    by a killed run (its process gone) is taken over; a live one stops this run with one line. The lock is
    created atomically on a local filesystem (O_EXCL) and on S3 (a conditional PUT); on other object stores
    (gs://) it is checked, then written, so two runs started at the same moment can both pass there: keep one
    writer per output."""
    lock = sibling(output, f".{split(output)[1]}.lock")
    me = {"host": platform.node(), "pid": os.getpid()}
    for _ in range(2):
        if _create_lock(lock, me):
            break
        try:
            holder = read_json(lock)
        except (OSError, ValueError, BeamIOError):
            holder = {}
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                and not _process_alive(holder["pid"]):
            delete_file(lock)  # left by a killed run
            continue
        raise OutputError(
            f"{output}: another winnow run (host {holder.get('host')}, pid {holder.get('pid')}) is writing "
            f"it; if none is, remove {lock}"
        )
    try:
        yield
    finally:
        delete_file(lock)


def _create_lock(lock: str, holder: dict) -> bool:
    """Create the lock holding `holder`; False when it exists."""
    return create_if_absent(lock, json.dumps(holder).encode())
