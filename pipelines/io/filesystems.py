"""A job's filesystem options (credentials, endpoints) in every process that touches its files.

Beam hands a filesystem its options when a pipeline is built, in the driver only; a worker process of
multi_processing or of a Dask cluster never gets them. The driver sets them in an environment variable that
worker subprocesses inherit (`share_filesystem_options`; on a Dask cluster engine/options.py also registers a
worker plugin, engine/dask_plugin.py), and every storage helper calls `worker_filesystems` before its first use.
The lowest module of the record I/O: it imports no other winnow module.
"""

from __future__ import annotations

import json
import os

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

OPTIONS_ENV = "WINNOW_BEAM_ARGS"  # JSON list of the job's Beam arguments, for worker processes
_configured: list[str] | None = None


def share_filesystem_options(beam_args: list[str]) -> None:
    """On the driver: set the filesystems' options here and in the environment worker processes inherit."""
    global _configured
    args = list(beam_args)
    FileSystems.set_options(PipelineOptions(args))
    os.environ[OPTIONS_ENV] = json.dumps(args)
    _configured = args


def worker_filesystems() -> None:
    """In any process: the job's filesystem options, from the driver's environment, once."""
    global _configured
    shared = os.environ.get(OPTIONS_ENV)
    if shared is None or _configured is not None:
        return
    _configured = json.loads(shared)
    FileSystems.set_options(PipelineOptions(_configured))


def configured_options() -> list[str]:
    """The Beam arguments this process's filesystems were given (none when the job shared none)."""
    worker_filesystems()
    return list(_configured or [])


def adopt_filesystem_options(args: list[str]) -> None:
    """In a worker that joins a job (a Dask worker, through engine/dask_plugin.py): take the job's arguments."""
    global _configured
    os.environ[OPTIONS_ENV] = json.dumps(args)
    _configured = None
    worker_filesystems()
