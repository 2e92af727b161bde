"""Resuming a step inside a killed run, file by file: what an hours-long model step (embed, select's scores)
finished is not computed again.

A step with `resumes_files` turns each record file of its input into one file of the same name. While it runs,
every file it finishes is also kept in the cache's `.STAGE-STEP-KEY.resume/` folder (a hard link locally, a
server-side copy on an object store), its metadata written last as `NAME.meta.json`. The folder is named by the
step's key, so only a run of the same step (same input, config, code and models) finds it: that run takes each
kept file instead of computing it, and the output is the bytes an uninterrupted run writes. The folder is
deleted when the step finishes; a successful run removes any left by other keys (StageCache.remember).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from winnow.pipelines.io.storage import copy_file, delete_file, exists, join, list_files, read_json, write_json

META_SUFFIX = ".meta.json"


def prepare(folder: str) -> int:
    """On the driver, before the step's pipeline: drop kept files whose file is missing or not its recorded
    size (a marker is written after its file, so this only happens to a folder tampered with); the number of
    files the step will take."""
    sizes = list_files(folder)
    taken = 0
    for marker in [path for path in sizes if path.endswith(META_SUFFIX)]:
        kept = marker[: -len(META_SUFFIX)]
        try:
            meta = read_json(marker)
        except ValueError:  # cut short while written
            meta = {}
        if sizes.get(kept) is None or sizes[kept] != meta.get("bytes"):
            delete_file(marker)
            continue
        taken += 1
    return taken


def take(folder: str, directory: str, relative: str) -> dict[str, Any] | None:
    """The metadata of `relative` when an earlier attempt of this step finished it (its file linked or copied
    into `directory`); None when it is to be computed. `folder` "" (a step run without resuming): None."""
    if not folder:
        return None
    marker = join(folder, relative + META_SUFFIX)
    if not exists(marker):
        return None
    meta = read_json(marker)
    target = join(directory, relative)
    delete_file(target)  # a retried bundle's file: never write through a link into the kept copy
    copy_file(join(folder, relative), target)
    return meta


def keep(folder: str, directory: str, relative: str, meta: dict[str, Any]) -> None:
    """Keep a file the step just finished for a later attempt: the file first, its metadata last."""
    if not folder:
        return
    kept = join(folder, relative)
    delete_file(kept)
    copy_file(join(directory, relative), kept)
    write_json(kept + META_SUFFIX, meta)


def take_or_compute(folder: str, directory: str, relative: str,
                    compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The step's per-file body: the kept file when an earlier attempt finished it, else `compute()`'s file, kept
    for a later attempt. Returns the file's metadata and whether it was taken."""
    finished = take(folder, directory, relative)
    if finished is not None:
        return finished, True
    finished = compute()
    keep(folder, directory, relative, finished)
    return finished, False
