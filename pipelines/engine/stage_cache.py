"""Stage caching: each stage's output is kept under a key of everything that determines it, and reused.

A stage's output is its records (what the next stage reads), the ledger rows of the records it removed, and the
metadata of any files it wrote (summaries, embeddings, centroids). It is stored in `.OUT.cache/STAGE-KEY/`:
  records/part-FFFFF-BBBBB.parquet   pickled records, one file per block of 10,000 input rows (file F, block B)
  records/block-FFFFF-GGGGG.parquet  or typed blocks (blocks.py), one per row group G of input file F (validate;
                                     embed writes the same files with their vectors, in its `embed/` step folder:
                                     its last step writes only the embeddings output beside them)
  removed/part-FFFFF-BBBBB.parquet   pickled ledger rows, likewise
  STEP/...                           an earlier step of the stage (e.g. prune's `clusters`): the same layout
                                     and its own step.json, so that it can be reused when only later steps change
  stage.json                         the key and what it was made of, file list with rows and bytes, counts, steps
The key chains: a step's key hashes the previous step's key, its config values, the source of its stage's
module and every winnow module that imports (module_closure), the versions of the libraries it relies on and
the fingerprints of its models. So a changed input file (size or modification time), config value, model or
code invalidates that step and every later one, and nothing earlier.

A stage is written into a temporary directory and renamed into place only when it finished and `stage.json` is
written (on an object store, which has no rename, into the entry's own emptied prefix with `stage.json` written
last as its marker); a run killed mid-stage leaves no entry that lookup accepts, and the next run recomputes
that stage only, taking the files that its model steps had finished from
`.STAGE-STEP-KEY.resume/` (engine/file_resume.py).

The cache remembers a sweep: after a successful run, entries of earlier runs are kept while the whole cache fits
in `output.cache_max_bytes`, and dropped least recently used first beyond it (`history.json` records the run
that last used each entry). So a decision switched back (keep_fraction 0.6 -> 0.4 -> 0.6) finds its first
entry; the latest run's own entries are always kept.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import json
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from winnow.pipelines.io.cache_files import RECORDS, REMOVED
from winnow.pipelines.io.storage import (
    delete_file,
    delete_tree,
    is_remote,
    join,
    list_files,
    matching,
    read_json,
    split,
    write_bytes,
)

STAGE_FILE = "stage.json"
STEP_FILE = "step.json"
HISTORY_FILE = "history.json"  # the run that last used each entry, for dropping the least recently used
CACHE_FORMAT = 3


def read_source(path: str) -> bytes:
    return Path(path).read_bytes()


def _module_spec(name: str):
    """A module's spec, found without running it or its parents (`find_spec` imports the parent of a dotted
    name: the names `from winnow.pipelines.engine.dask_plugin import X` yields ran that module, whose import of
    distributed took 0.4 s of every job's plan)."""
    parent, _, leaf = name.rpartition(".")
    if not parent:
        return importlib.util.find_spec(name)
    found = _module_spec(parent)
    if found is None or found.submodule_search_locations is None:
        return None
    return importlib.machinery.PathFinder.find_spec(leaf, list(found.submodule_search_locations))


def _module_file(name: str) -> str | None:
    try:
        spec = _module_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imported(name: str, source: bytes, package: str) -> set[str]:
    """The modules of `package` that a module's source imports, at any depth of its code (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {module for module in found if module.split(".")[0] == package and _module_file(module)}


def module_closure(roots: Iterable[str], package: str = "winnow") -> list[str]:
    """The named modules and every module of `package` they import, transitively, sorted."""
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            raise ImportError(f"{name}: no Python source to hash")
        pending.extend(_imported(name, read_source(path), package) - seen)
    return sorted(seen)


def source_hash(modules: Iterable[str]) -> str:
    """SHA-256 over the source files of the named modules."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode() + b"\0" + read_source(_module_file(name)) + b"\0")
    return digest.hexdigest()


def code_hash(roots: Iterable[str], package: str = "winnow") -> str:
    """The code version of a stage: the source of its module and of every winnow module it imports,
    transitively. Derived, so it cannot go stale when a stage starts using another helper."""
    return source_hash(module_closure(roots, package))


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in sorted(names):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def input_fingerprint(paths: list[str]) -> list[dict[str, Any]]:
    """Path, size and modification time of each input file (what `make` and `rsync` compare by default)."""
    entries = []
    for result in FileSystems.match(paths):
        for item in result.metadata_list:
            entries.append({"path": item.path, "bytes": item.size_in_bytes, "mtime": item.last_updated_in_seconds})
    return sorted(entries, key=lambda entry: entry["path"])


def stage_key(material: dict[str, Any]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **material}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@dataclass
class StageEntry:
    """A finished stage in the cache."""

    name: str
    key: str
    directory: str
    files: list[dict[str, Any]]
    records: int
    removed: int
    seconds: float
    reused: bool = False
    material: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    def paths(self, kind: str) -> list[str]:
        """The files of a kind written by the stage's last step (its records go on to the next stage)."""
        return [join(self.directory, f["file"]) for f in self.files if f["dir"] == kind and "step" not in f]

    def all_paths(self, kind: str) -> list[str]:
        """The files of a kind written by any step (the removed rows of every step reach the ledger)."""
        return [join(self.directory, f["file"]) for f in self.files if f["dir"] == kind]

    def metas(self) -> list[dict[str, Any]]:
        """Metadata of the files other than the cached records and ledger rows (summaries, embeddings)."""
        return [f for f in self.files if f["dir"] not in (RECORDS, REMOVED)]

    def summary(self) -> dict[str, Any]:
        entry = {
            "stage": self.name, "key": self.key, "reused": self.reused, "records_out": self.records,
            "removed": self.removed, "seconds": round(self.seconds, 3),
        }
        if len(self.steps) > 1:
            entry["steps"] = self.steps
        return entry


class StageCache:
    """The directory (or object prefix) of stage entries beside the output.

    On a local filesystem a stage is written into a temporary directory that is renamed into place once its
    `stage.json` is written. An object store has no rename: the entry's prefix is emptied first (its marker
    first of all), the stage is written into it, and `stage.json`, written last, is the commit point; files
    that no `stage.json` lists are never read. One writer at a time (the output's lock) keeps that safe."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.remote = is_remote(self.root)

    def directory(self, name: str, key: str) -> str:
        return join(self.root, f"{name}-{key}")

    def lookup(self, name: str, key: str) -> StageEntry | None:
        """The finished entry for (stage, key), or None when there is none or a file is missing or resized."""
        directory = self.directory(name, key)
        try:
            info = read_json(join(directory, STAGE_FILE))
        except (OSError, ValueError, BeamIOError):
            return None
        if info.get("key") != key or info.get("format") != CACHE_FORMAT:
            return None
        if not _files_present(directory, info["files"]):
            return None
        return StageEntry(
            name, key, directory, info["files"], info["records"], info["removed"], info["seconds"], reused=True,
            material=info.get("material", {}), metrics=info.get("metrics", {}),
            steps=[{**step, "reused": True} for step in info.get("steps", [])],
        )

    def find_step(self, stage: str, step: str, key: str) -> str | None:
        """A finished earlier step (not the last) of this stage with this key, in any entry of the stage: its
        scores, reusable when only a later step's settings changed."""
        for marker in matching(join(self.root, f"{stage}-*", step, STEP_FILE)):
            try:
                info = read_json(marker)
            except (OSError, ValueError, BeamIOError):
                continue
            if info.get("key") != key or info.get("format") != CACHE_FORMAT:
                continue
            directory = split(marker)[0]
            if _files_present(directory, info["files"]):
                return directory
        return None

    @staticmethod
    def commit_step(directory: str, key: str, files: list[dict[str, Any]], seconds: float,
                    material: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Mark an earlier step of a stage finished (its directory stays inside the stage's)."""
        info = {"format": CACHE_FORMAT, "key": key, "seconds": seconds, "material": material, "metrics": metrics,
                "records": sum(f["rows"] for f in files if f["dir"] == RECORDS),
                "files": sorted(files, key=lambda f: (f["dir"], f.get("file", "")))}
        write_bytes(join(directory, STEP_FILE), (json.dumps(info, indent=1, default=str) + "\n").encode())

    @staticmethod
    def read_step(directory: str) -> dict[str, Any]:
        return read_json(join(directory, STEP_FILE))

    def resume_folder(self, stage: str, step: str, key: str) -> str:
        """Where a `resumes_files` step keeps the files it finished while it runs (engine/file_resume.py); a
        leftover, not an entry, for `remember`."""
        return join(self.root, f".{stage}-{step}-{key}.resume")

    def begin(self, name: str, key: str) -> str:
        """Where to write the stage: a fresh temporary directory, or on an object store the entry's own prefix,
        emptied (marker first, so that no half-replaced entry can pass for a finished one)."""
        if self.remote:
            directory = self.directory(name, key)
            delete_file(join(directory, STAGE_FILE))
            delete_tree(directory)
            return directory
        Path(self.root).mkdir(parents=True, exist_ok=True)
        temporary = Path(self.root) / f".{name}-{key}.tmp-{uuid.uuid4().hex[:12]}"
        temporary.mkdir()
        return str(temporary)

    def commit(self, name: str, key: str, temporary: str, files: list[dict[str, Any]], seconds: float,
               material: dict[str, Any], metrics: dict[str, Any], steps: list[dict[str, Any]] | None = None
               ) -> StageEntry:
        """Write stage.json into the finished stage's directory, last; a local one is then renamed into place."""
        records = sum(f["rows"] for f in files if f["dir"] == RECORDS and "step" not in f)
        removed = sum(f["rows"] for f in files if f["dir"] == REMOVED)
        steps = steps or []
        info = {
            "format": CACHE_FORMAT, "stage": name, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": seconds, "records": records, "removed": removed, "material": material,
            "metrics": metrics, "files": sorted(files, key=lambda f: (f["dir"], f.get("file", ""))),
            "steps": [{k: v for k, v in step.items() if k != "reused"} for step in steps],
        }
        write_bytes(join(temporary, STAGE_FILE), (json.dumps(info, indent=1, default=str) + "\n").encode())
        final = self.directory(name, key)
        if not self.remote:
            final_path = Path(final)
            if final_path.exists():
                stale = Path(self.root) / f".{final_path.name}.old-{uuid.uuid4().hex[:12]}"
                final_path.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            Path(temporary).rename(final_path)
        return StageEntry(name, key, final, info["files"], records, removed, seconds, material=material,
                          metrics=metrics, steps=steps)

    def discard(self, directory: str) -> None:
        """Remove a stage's directory (a failed or unfinished one), its marker first."""
        delete_file(join(directory, STAGE_FILE))
        delete_tree(directory)

    def remember(self, entries: list[StageEntry], max_bytes: int) -> CacheUse:
        """After a successful run: mark the run's entries the most recently used, remove what killed runs left
        (temporary directories), and drop entries of earlier runs, least recently used first, until the cache
        holds at most `max_bytes`. The run's own entries are always kept, so the cache exceeds the bound when
        one run's stages alone do. Returns what the cache holds and what was dropped."""
        sizes = self._sizes()
        history = self._history()
        run = history["runs"] + 1
        used = {split(entry.directory)[1] for entry in entries}
        last_used = {name: history["used"].get(name, 0) for name in sizes}
        last_used.update(dict.fromkeys(used, run))
        names = [name for name in sizes if _is_entry(name)]
        total = sum(sizes[name] for name in names)
        dropped = []
        for name in sorted((name for name in names if name not in used), key=lambda name: (last_used[name], name)):
            if total <= max_bytes:
                break
            total -= sizes[name]
            dropped.append(name)
        for name in dropped:
            self.discard(join(self.root, name))
        for name in sizes:
            if not _is_entry(name) and name != HISTORY_FILE:
                self._remove_leftover(name)
        kept = {name: last_used[name] for name in names if name not in dropped}
        write_bytes(join(self.root, HISTORY_FILE),
                    (json.dumps({"runs": run, "used": dict(sorted(kept.items()))}, indent=1) + "\n").encode())
        return CacheUse(len(kept), total, sorted(dropped), sum(sizes[name] for name in dropped))

    def _sizes(self) -> dict[str, int]:
        """{name: bytes} of everything at the cache's top: entries, leftovers and the history file (a file
        hard-linked into two entries counts in both)."""
        if not self.remote:
            if not Path(self.root).is_dir():
                return {}
            return {path.name: _local_size(path) for path in Path(self.root).iterdir()}
        prefix = self.root.rstrip("/") + "/"
        sizes: dict[str, int] = {}
        for path, size in list_files(self.root).items():
            name = path[len(prefix):].split("/", 1)[0]
            sizes[name] = sizes.get(name, 0) + size
        return sizes

    def _history(self) -> dict[str, Any]:
        """The runs counted so far and the run that last used each entry; an absent or unreadable history
        counts every entry as used before any run."""
        try:
            history = read_json(join(self.root, HISTORY_FILE))
            return {"runs": int(history["runs"]), "used": dict(history["used"])}
        except (OSError, ValueError, KeyError, TypeError, BeamIOError):
            return {"runs": 0, "used": {}}

    def _remove_leftover(self, name: str) -> None:
        path = join(self.root, name)
        if self.remote:
            delete_tree(path)
        elif Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)


@dataclass(frozen=True)
class CacheUse:
    """What the cache holds after a run and what it dropped to stay within its bound."""

    entries: int
    bytes: int
    dropped: list[str]
    dropped_bytes: int


def _is_entry(name: str) -> bool:
    """A stage entry (STAGE-KEY), not a temporary (.STAGE-KEY.tmp-*, .old-*) or the history file."""
    return not name.startswith(".") and name != HISTORY_FILE


def _local_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _files_present(directory: str, files: list[dict[str, Any]]) -> bool:
    """Every listed file is there with its recorded size (one listing, not a request per file)."""
    sizes = list_files(directory)
    for entry in files:
        if "file" not in entry:
            continue  # a plan's metadata, not a file
        size = sizes.get(join(directory, entry["file"]))
        if size is None or ("bytes" in entry and size != entry["bytes"]):
            return False
    return True
