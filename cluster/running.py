"""What every cluster profile's ``start()`` yields: the one interface the runner and the stages use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: Set in every worker process before it starts. One malloc arena: a task thread's memory comes from
#: glibc's main heap, where ``engine.models.heap.heap_kept`` keeps large blocks for reuse. A thread's
#: own arena grows in heaps of at most 64 MiB and serves larger blocks as fresh mappings whatever
#: ``mallopt`` says, so every training step on a worker thread would fault its pages in anew.
WORKER_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1"}


@dataclass(frozen=True)
class RunningCluster:
    """A started cluster profile.

    ``client``: the ``distributed.Client`` of its scheduler (``None``: run tasks inline, in this
    process). ``gpu_on_demand``: GPU workers start when GPU tasks wait for them (a SLURM ``gpu``
    pool), so training and attribution ask for the GPU resource before any GPU worker exists.
    ``usage()``: per pool, the jobs, workers and tasks the run used (empty where the profile
    keeps none). ``task_slots``: the worker threads of a cluster of fixed size, the most long tasks
    (training, attribution) worth submitting at once; ``None`` where waiting tasks start workers.
    """

    client: object | None
    gpu_on_demand: bool = False
    task_slots: int | None = None
    usage: Callable[[], dict] = field(default=dict)
