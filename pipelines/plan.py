"""Planning on the driver: inputs, output and models are checked, each stage planned and its steps keyed,
before anything runs."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from winnow.pipelines.config import WinnowConfig
from winnow.pipelines.engine.options import beam_options, worker_processes
from winnow.pipelines.engine.stage import PlanContext, Stage, Step
from winnow.pipelines.engine.stage_cache import code_hash, library_versions, stage_key
from winnow.pipelines.io.read import InputError, ReadTask, error_text, expected_rows, plan_reads
from winnow.pipelines.io.storage import is_remote, join, resolve, s3_problem, sibling, split
from winnow.pipelines.outputs.publish import RUN_PREFIX, OutputError, check_output
from winnow.pipelines.stages import job_stages

STEP_RUNNER = "winnow.pipelines.engine.stage_run"  # wraps every step in cache reading and writing: part of its code


@dataclass
class PlannedStep:
    """A step with its cache key and whether its cached records keep the embeddings (a later step reads them)."""

    step: Step
    key: str
    material: dict[str, Any]
    keeps_vectors: bool = False
    drops_vectors: bool = False

    @property
    def name(self) -> str:
        return self.step.name


@dataclass
class PlannedStage:
    stage: Stage
    plan: Any
    steps: list[PlannedStep]
    job: JobPlan | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def key(self) -> str:
        return self.steps[-1].key


@dataclass
class JobPlan:
    """Everything decided on the driver before the first pipeline is built. Paths are URIs (local ones
    absolute): `work_dir` is where this run writes its output (a hidden sibling of `output` on a local
    filesystem, `output/run-ID` on an object store, see publish.py)."""

    config: WinnowConfig
    input_paths: list[str]
    tasks: list[ReadTask]
    output: str
    work_dir: str
    beam_args: list[str]
    cache_dir: str
    stages: list[PlannedStage] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def plan_of(self, name: str) -> Any:
        """A stage's driver-side plan (None when the stage does not run)."""
        return next((planned.plan for planned in self.stages if planned.name == name), None)


def plan_job(config: WinnowConfig, beam_args: list[str]) -> JobPlan:
    """Check inputs, output, config and models before anything runs; raises InputError, OutputError,
    ConfigError, ModelNotFound."""
    started = time.perf_counter()
    stages = job_stages(config)
    options = beam_options(beam_args)
    FileSystems.set_options(options)  # credentials and endpoints for s3:// or gs:// input, output and cache
    output = resolve(config.output.path)
    if is_remote(output) and not split(output)[1]:
        raise OutputError(f"output.path {config.output.path}: name a folder inside the bucket, not its root (the "
                          "stage cache and the lock go beside it)")
    if str(options.get_all_options().get("runner") or "").endswith("DataflowRunner") and not is_remote(output):
        raise OutputError(f"output.path {output}: DataflowRunner's workers cannot write the driver's disk; give "
                          "an object-store output.path (gs://...), where the stage cache goes too")
    for role, uri, error in (("input.path", config.input.path, InputError), ("output.path", output, OutputError),
                             ("select.targets", config.select.targets or "", InputError)):
        problem = s3_problem(uri, options) if uri else None
        if problem:
            raise error(f"{role} {uri}: {problem}")
    paths, tasks = plan_reads(config.input)
    try:
        check_output(output)
    except BeamIOError as error:
        raise OutputError(f"{output}: cannot list the output ({error_text(error)})") from None
    workers = worker_processes(beam_options(beam_args))
    context = PlanContext(config, workers, output, paths, expected_rows(tasks), {}, tasks)
    planned = []
    for stage in stages:
        plan = stage.plan(context)
        context.plans[stage.name] = plan
        planned.append(PlannedStage(stage, plan, [PlannedStep(step, "", {}) for step in stage.steps(plan, config)]))
    run_id = uuid.uuid4().hex[:12]
    name = split(output)[1]
    work_dir = join(output, f"{RUN_PREFIX}{run_id}") if is_remote(output) else sibling(output, f".{name}.tmp-{run_id}")
    job = JobPlan(config, paths, tasks, output, work_dir, list(beam_args), sibling(output, f".{name}.cache"), planned)
    for stage in planned:
        stage.job = job
    key_steps(planned)
    job.timings["plan_s"] = time.perf_counter() - started
    return job


def key_steps(stages: list[PlannedStage]) -> None:
    """Chain the cache keys: a step's key hashes the previous step's key, the step's settings and models, the
    code of its stage (the stage module and every winnow module it imports), the libraries it declares and
    whether its cached records keep the embeddings."""
    steps = [(planned.stage, step) for planned in stages for step in planned.steps]
    previous, vectors = "", False
    codes: dict[str, str] = {}
    for index, (stage, planned) in enumerate(steps):
        step = planned.step
        if stage.module not in codes:
            codes[stage.module] = code_hash((stage.module, STEP_RUNNER))
        vectors = vectors or step.adds_vectors
        read_later = any(later.step.reads_vectors for _, later in steps[index + 1:])
        planned.keeps_vectors = vectors and read_later
        planned.drops_vectors = vectors and not read_later
        vectors = planned.keeps_vectors
        planned.material = {
            "stage": stage.name, "step": step.name, "previous": previous, "keeps_vectors": planned.keeps_vectors,
            "code": codes[stage.module], "libraries": library_versions(stage.libraries),
            **step.settings, **step.models,
        }
        planned.key = previous = stage_key(planned.material)
