"""Running many independent tasks on a Dask cluster, or inline when there is none.

:class:`Execution` is where an engine function's tasks run and who hears of their progress;
:func:`run_tasks` and :func:`start_task` are what it does with them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: ``progress(phase, done, total)``: a phase's count of finished tasks.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Execution:
    """Where tasks run and who hears of their progress.

    ``client``: a ``distributed.Client`` (``None``: each task runs inline, in this process, in order).
    ``progress``: told ``(phase, done, total)`` as tasks finish. ``gpu_on_demand``: the cluster starts
    GPU workers when GPU tasks wait for them (a SLURM ``gpu`` pool), so GPU tasks ask for the GPU
    resource before any GPU worker exists. ``task_slots``: the most long tasks worth submitting at
    once (a fixed cluster's worker threads; ``None``: all, where waiting tasks start workers).
    """

    client: Any = None
    progress: Progress | None = None
    gpu_on_demand: bool = False
    task_slots: int | None = None

    def report(self, phase: str, done: int, total: int) -> None:
        """Tell ``progress`` that ``done`` of ``total`` tasks of ``phase`` are finished."""
        if self.progress is not None:
            self.progress(phase, done, total)

    def map(self, func: Callable, items: Iterable, *, long: bool = False) -> Iterator[tuple[Any, Any]]:
        """``func(item)`` for every item as tasks (:func:`run_tasks`), yielding ``(item, result)`` as each
        finishes. ``long`` tasks (training, attribution) run on a GPU where the cluster has or starts one, at
        most ``task_slots`` submitted at once."""
        if not long:
            return run_tasks(func, items, client=self.client)
        return run_tasks(func, items, client=self.client, resources=gpu_resources(self.client, self.gpu_on_demand),
                         in_flight=self.task_slots)

    def start(self, func: Callable, item) -> Callable[[], Any]:
        """``func(item)`` started as one task while this process goes on (:func:`start_task`)."""
        return start_task(func, item, client=self.client)


#: Every task in this process, in order, without progress reports.
INLINE = Execution()


def run_tasks(
    func: Callable,
    items: Iterable,
    *,
    client=None,
    resources: dict | None = None,
    in_flight: int | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Run ``func(item)`` for every item and yield ``(item, result)`` as each finishes.

    With a ``distributed.Client`` the calls are Dask tasks spread over its workers (retried
    once if a worker dies); without one they run inline, in order. A task's exception is
    raised here, after the tasks that finished before it were yielded. ``in_flight`` caps the
    tasks submitted at once, the next going out as one finishes: with as many as the workers have
    threads, each long task starts on whichever worker frees first (Dask assigns a few tasks to
    workers up front, so one worker may queue two long trainings while another idles). ``items`` may be a
    ``deque`` the caller appends to while iterating: a finished task's follow-up goes out when a slot frees.
    """
    queue = items if isinstance(items, deque) else deque(items)
    if client is None:
        while queue:
            item = queue.popleft()
            yield item, func(item)
        return

    from distributed import as_completed

    running: dict = {}
    finished = as_completed()

    def submit_waiting() -> None:
        while queue and (in_flight is None or len(running) < in_flight):
            item = queue.popleft()
            future = _submit(client, func, item, resources)
            running[future] = item
            finished.add(future)

    submit_waiting()
    try:
        for future in finished:
            result = future.result()
            item = running.pop(future)
            submit_waiting()  # the next task goes out before this one's result is used
            yield item, result
            submit_waiting()  # and those the caller queued on hearing of it
    finally:
        client.cancel(list(running))


def start_task(func: Callable, item, *, client=None) -> Callable[[], Any]:
    """``func(item)`` started as one Dask task (as :func:`run_tasks` runs each), while this process goes on;
    call the returned function for its result. Without a client ``func(item)`` runs when the result is asked for."""
    if client is None:
        return lambda: func(item)
    return _submit(client, func, item).result


def _submit(client, func: Callable, item, resources: dict | None = None):
    """The future of ``func(item)`` as a task of its own (a unique key), retried once if its worker dies."""
    from uuid import uuid4

    from dask.utils import funcname

    return client.submit(_in_one_process, func, item, resources=resources, retries=1,
                         key=f"{funcname(func)}-{uuid4().hex}")


def _in_one_process(func: Callable, item):
    """``func(item)`` with any Dask work inside it (reading the store) done in this task's thread.

    Otherwise those reads would go back through the scheduler to other workers: the task would
    depend on them (a worker dying elsewhere disturbs it) and, while it waits, the worker may
    start another task in the same process, and two trainings then share torch's global RNG.
    """
    import dask

    with dask.config.set(scheduler="synchronous"):
        return func(item)


def gpu_resources(client, gpu_on_demand: bool = False) -> dict | None:
    """``{"GPU": 1}`` when any of the client's workers advertises a GPU resource, else ``None``.

    Also ``{"GPU": 1}`` with ``gpu_on_demand``: the cluster starts GPU workers when GPU tasks wait
    for them (a SLURM ``gpu`` pool, see ``cluster.pooled``).
    """
    if client is None:
        return None
    if gpu_on_demand:
        return {"GPU": 1}
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(worker.get("resources", {}).get("GPU", 0) > 0 for worker in workers) else None


def torch_device():
    """The device for torch work in this process: CUDA when available, else CPU.

    Inside a Dask worker, CPU torch uses as many threads as the worker has (not every core).
    """
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    try:
        from distributed import get_worker

        torch.set_num_threads(get_worker().state.nthreads)
    except ValueError:
        pass  # not in a worker
    return torch.device("cpu")
