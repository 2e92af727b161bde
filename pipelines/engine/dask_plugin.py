"""The Dask worker plugin that hands a job's filesystem options to every worker of a cluster (io/filesystems.py).

Apart from io/filesystems.py so that winnow imports without Dask installed (a GPU machine, a Dataflow worker): only a
job on the DaskRunner imports this module.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from winnow.pipelines.io.filesystems import adopt_filesystem_options


class FileSystemOptionsPlugin(WorkerPlugin):
    """The job's Beam arguments in the worker's environment and filesystems (for workers that join later too)."""

    def __init__(self, args: list[str]):
        self.args = args

    def setup(self, worker) -> None:
        adopt_filesystem_options(self.args)
