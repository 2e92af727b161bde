"""The stage contract: what a stage declares, so that the job is a loop over a list of stages.

A stage (validate, quality, embed, prune, select, rephrase) is one `Stage` object exported by its module as
`STAGE`; `winnow.pipelines.stages` lists them in their default order. A stage says:
  name, section     its name (ledger `stage`, manifest, cache) and its config section
  enabled           whether the config switches it on
  reads_embeddings  whether it needs the embed stage before it (the job adds embed, or the config is refused)
  plan              driver-side decisions made before anything runs (models resolved, targets read)
  steps             one or more cached steps; each is a Beam pipeline of its own, so a step can start from
                    constants the driver read off the previous step's output (centroids, counts, thresholds)
  manifest          its manifest section(s), from the summaries its steps wrote
  report            its section of the HTML report
  ledger_stages     the ledger `stage` values it writes, in funnel order
  output_dirs       folders of files its steps write that belong in OUT (embeddings)
  check             what its manifest summary must satisfy given the ledger's counts (outputs/selfcheck.py)

A value computed from the whole of a step's input (a count, a fit sample, a threshold) is never a Beam side
input: the step declares `passes` (winnow.pipelines.engine.passes), small pipelines run first whose results its graph
gets as constants (`StepContext.constants`).

A step's graph takes the previous step's records (a PCollection of record dicts; `None` for the first step,
which reads the input; for a step with `reads_files`, the paths of the previous step's record files, which it
reads and writes as blocks itself) and returns a `StepOutput`: the records that go on, the ledger rows of the records it
removed, and metadata dicts (summaries, files it wrote). The cache key of a step is derived: the previous
key, the step's settings, the source of the stage module and every winnow module it imports (see
stage_cache.code_hash), the versions of the libraries it declares and its models' fingerprints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from winnow.pipelines.config import WinnowConfig
    from winnow.pipelines.engine.passes import Pass
    from winnow.pipelines.engine.stage_cache import StageEntry


@dataclass
class StepOutput:
    """What a step's graph returns: records going on, removed records' ledger rows, metadata dicts."""

    records: Any
    removed: list[Any] = field(default_factory=list)
    metadata: list[Any] = field(default_factory=list)


@dataclass
class StepContext:
    """What a step's graph may use besides its records: where it writes, and the previous step of its stage
    (finished, on the driver) for constants read off its output, and the results of the step's passes."""

    job: Any
    directory: str
    previous: StageEntry | None = None
    constants: dict[str, Any] = field(default_factory=dict)
    drops_vectors: bool = False  # no later step reads the embeddings: a files step writes its records without
    scratch: str = ""  # a folder for the step's temporary files (its passes' too), deleted when the step is done
    compression: str = "zstd"  # of the blocks the step writes (blocks.block_compression)
    resume: str = ""  # a `resumes_files` step's folder of files finished by an earlier attempt (file_resume.py)


StepBuild = Callable[[Any, Any, StepContext], StepOutput]


@dataclass
class Step:
    """One cached Beam pipeline of a stage. `settings` and `models` are the parts of the cache key that the
    step's config and models contribute."""

    name: str
    build: StepBuild
    settings: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    reads_vectors: bool = False
    adds_vectors: bool = False
    reads_input: bool = False
    reads_files: bool = False  # the graph gets the previous step's record files (paths), not records, and
    # returns the metadata of the record files it wrote (`dir` records) among its metadata
    passes: tuple[Pass, ...] = ()
    writes_records: bool = True  # False: a last step that only writes files beside the records (embeddings);
    # the stage's records are the previous step's, read by the next stage where that step wrote them
    resumes_files: bool = False  # a files step that writes one file per input file, through file_resume: a
    # killed run's next attempt takes the files it finished instead of computing them again


@dataclass
class PlanContext:
    """What planning a stage may look at: the config, worker count, the output path, the input's expected
    rows, the plans of the stages before it and the input's read tasks."""

    config: WinnowConfig
    workers: int
    output: Any
    input_paths: list[str]
    expected_records: int | None
    plans: dict[str, Any]
    tasks: list[Any] = field(default_factory=list)


@dataclass
class ManifestContext:
    """What a stage's manifest section is made of: its plan, its finished steps, the run's file metadata."""

    job: Any
    plan: Any
    result: Any
    files: list[dict[str, Any]]


def summary_meta(files: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A step's summary section (metadata with `dir` NAME); a step that no record reached writes none."""
    found = [f for f in files if f["dir"] == name]
    if not found:
        return {"records": 0, "note": "no record reached this stage"}
    return {k: v for k, v in found[0].items() if k != "dir"}


def config_section(config: WinnowConfig, name: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config section as JSON-able data, without the keys that do not change results (threads, ...)."""
    section = getattr(config, name).model_dump(mode="json", by_alias=True)
    return {k: v for k, v in section.items() if k not in exclude}


@dataclass
class Stage:
    """A stage as the job sees it (see the module docstring)."""

    name: str
    module: str
    plan: Callable[[PlanContext], Any]
    steps: Callable[[Any, WinnowConfig], list[Step]]
    enabled: Callable[[WinnowConfig], bool]
    section: str | None = None
    reads_embeddings: Callable[[WinnowConfig], bool] = lambda config: False
    libraries: tuple[str, ...] = ()
    manifest: Callable[[ManifestContext], dict[str, Any]] | None = None
    report: str | None = None  # "module:function" building its report section; named, not imported, so
    # the report's code is not part of the stage's cache key
    ledger_stages: tuple[str, ...] = ()
    output_dirs: tuple[str, ...] = ()
    on_force: Callable[[Any], Any] | None = None
    check: Callable[[Any], list[str]] | None = None  # selfcheck.CheckContext -> problems with its summary
