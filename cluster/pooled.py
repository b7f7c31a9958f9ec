"""The pooled SLURM cluster: one dask-jobqueue ``SLURMCluster`` whose jobs come from named pools.

Each pool (``cpu``, ``gpu``; see :class:`JobPool`) is kept between its ``min_jobs`` and
``max_jobs``: it grows with the tasks waiting for it (GPU tasks, those restricted to the ``GPU``
resource, wait for the GPU pool), shrinks when its jobs have been idle a while, and replaces jobs
that die (``scancel``, walltime, node failure), whose tasks the scheduler then runs again.
:class:`PoolUsage` counts per pool the jobs, workers and tasks for the run's provenance.

Imported only when a SLURM profile starts (it imports dask-jobqueue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter

from dask_jobqueue import SLURMCluster
from dask_jobqueue.slurm import SLURMJob
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin


class JobPool:
    """A pool's job options and bounds; ``gpu`` pools serve the tasks that need the GPU resource."""

    def __init__(self, options: dict, min_jobs: int, max_jobs: int, gpu: bool = False):
        self.options, self.min_jobs, self.max_jobs, self.gpu = options, min_jobs, max_jobs, gpu

    @property
    def slots(self) -> int:
        """Tasks one job runs at once: its cores (threads over all its worker processes)."""
        import dask

        return int(self.options.get("cores") or dask.config.get("jobqueue.slurm.cores") or 1)


def _of_job(worker, job) -> bool:
    """Whether Dask worker ``worker`` (a name) runs in job ``job`` (``<job>`` or ``<job>-<k>`` in a group)."""
    worker, job = str(worker), str(job)
    return worker == job or worker.startswith(job + "-")


class PoolJob(SLURMJob):
    """A SLURM job that also marks itself closed once cancelled (``SLURMJob.close`` only scancels it)."""

    async def close(self):
        await super().close()
        self.status = Status.closed
        self._event_finished.set()


class PoolUsage(SchedulerPlugin):
    """Counts finished tasks and workers per pool, and the time to each pool's first worker."""

    name = "relcohort-pool-usage"

    def __init__(self, cluster):
        self.cluster = cluster
        self.pool_at: dict[str, str] = {}  # worker address → pool

    def add_worker(self, scheduler, worker):
        pool = self.pool_at[worker] = self.cluster.pool_of(scheduler.workers[worker].name)
        self.cluster.workers_seen[pool] += 1
        self.cluster.first_worker_seconds.setdefault(pool, round(time.monotonic() - self.cluster.started, 2))

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "processing" and finish == "memory":
            worker = kwargs.get("worker")
            state = self.cluster.scheduler.workers.get(worker) if worker else None
            if state is not None:
                self.cluster.tasks_done[self.cluster.pool_of(state.name)] += 1

    def remove_worker(self, scheduler, worker, *, stimulus_id, **kwargs):
        pool = self.pool_at.pop(worker, None)
        removals = [event for _, event in scheduler.get_events(worker)
                    if isinstance(event, dict) and event.get("action") == "remove-worker"]
        if pool is not None and removals and self.cluster.status == Status.running:
            self.cluster.tasks_rerun[pool] += len(removals[-1].get("processing-tasks", ()))


class PooledSLURMCluster(SLURMCluster):
    """A ``SLURMCluster`` whose jobs come from named pools, each kept between its bounds.

    ``pools`` maps a name (``cpu``, ``gpu``) to a :class:`JobPool`; the first pool's options
    are also the cluster's own (what ``job_script()`` shows). Jobs are named ``<pool>-<n>``.
    """

    job_cls = PoolJob

    def __init__(self, pools: dict[str, JobPool], scale_interval: float = 1.0, idle_timeout: float = 60.0,
                 queue_check_interval: float = 10.0, **cluster_options):
        self.pools = pools
        self.scale_interval, self.idle_timeout = scale_interval, idle_timeout
        self.queue_check_interval = queue_check_interval
        self.started = time.monotonic()
        self.jobs_submitted: Counter = Counter()
        self.jobs_replaced: Counter = Counter()
        self.workers_seen: Counter = Counter()
        self.tasks_done: Counter = Counter()
        self.tasks_rerun: Counter = Counter()
        self.first_worker_seconds: dict[str, float] = {}
        self._above_need_since: dict[str, float | None] = dict.fromkeys(pools)
        self._numbers: Counter = Counter()
        self._counted_jobs: dict[str, object] = {}
        first = next(iter(pools.values()))
        super().__init__(**cluster_options, **first.options)

    # -- pools

    def pool_of(self, name) -> str:
        pool = str(name).split("-", 1)[0]
        return pool if pool in self.pools else next(iter(self.pools))

    def pool_spec(self, pool: str) -> dict:
        options = {**self._job_kwargs, **self.pools[pool].options}
        spec = {"cls": PoolJob, "options": options}
        processes = options.get("processes") or self._dummy_job.worker_processes
        if processes > 1:
            spec["group"] = [f"-{index}" for index in range(processes)]
        return spec

    def pool_jobs(self, pool: str) -> list[str]:
        return [name for name in self.worker_spec if self.pool_of(name) == pool]

    def usage(self) -> dict:
        """Per pool: jobs submitted and replaced, workers that joined, tasks finished and tasks that had
        to run again (their worker left while running them), seconds from start to the first worker."""
        return {pool: {"jobs_submitted": self.jobs_submitted[pool], "jobs_replaced": self.jobs_replaced[pool],
                       "workers_joined": self.workers_seen[pool], "tasks_done": self.tasks_done[pool],
                       "tasks_rerun": self.tasks_rerun[pool],
                       "first_worker_seconds": self.first_worker_seconds.get(pool)} for pool in self.pools}

    def job_ids(self) -> dict[str, str]:
        """SLURM job ID of every job started: job name → ID."""
        return {name: job.job_id for name, job in self.workers.items() if getattr(job, "job_id", None)}

    def scale(self, n=None, jobs=0, memory=None, cores=None):
        if n or jobs or memory or cores:
            raise NotImplementedError("a PooledSLURMCluster sizes each pool between its min_jobs and max_jobs")
        return super().scale(0)  # closing

    def adapt(self, *args, **kwargs):
        raise NotImplementedError("a PooledSLURMCluster is adaptive already (each pool within its bounds)")

    # -- the scaling loop

    async def _start(self):
        await super()._start()
        self.scheduler.add_plugin(PoolUsage(self))
        self._scaling = asyncio.ensure_future(self._keep_pools())

    async def _close(self):
        scaling = getattr(self, "_scaling", None)
        if scaling is not None:
            scaling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await scaling
        await super()._close()

    async def _keep_pools(self) -> None:
        last_queue_check = 0.0
        while self.status == Status.running:
            try:
                if time.monotonic() - last_queue_check > self.queue_check_interval:
                    last_queue_check = time.monotonic()
                    await self._forget_vanished_jobs()
                await self._rescale()
            except Exception as error:  # keep scaling whatever one round met; say so in the log
                logging.getLogger(__name__).warning("pool scaling: %s", error)
            await asyncio.sleep(self.scale_interval)

    def _waiting_tasks(self) -> Counter:
        """Tasks ready or running, per pool that should run them."""
        demand: Counter = Counter()
        gpu_pool = next((name for name, pool in self.pools.items() if pool.gpu), None)
        cpu_pool = next((name for name, pool in self.pools.items() if not pool.gpu), gpu_pool)
        for task in self.scheduler.tasks.values():
            if task.state in ("processing", "queued", "no-worker"):
                needs_gpu = bool(task.resource_restrictions and task.resource_restrictions.get("GPU"))
                demand[gpu_pool if needs_gpu and gpu_pool else cpu_pool] += 1
        return demand

    async def _rescale(self) -> None:
        demand = self._waiting_tasks()
        busy = {state.name for state in self.scheduler.workers.values() if state.processing}
        changed = False
        for name, pool in self.pools.items():
            jobs = self.pool_jobs(name)
            need = min(max(math.ceil(demand[name] / pool.slots), pool.min_jobs), pool.max_jobs)
            if need > len(jobs):
                for _ in range(need - len(jobs)):
                    job = f"{name}-{self._numbers[name]}"
                    self._numbers[name] += 1
                    self.worker_spec[job] = self.pool_spec(name)
                changed = True
                self._above_need_since[name] = None
            elif need < len(jobs):
                since = self._above_need_since[name] = self._above_need_since[name] or time.monotonic()
                if time.monotonic() - since >= self.idle_timeout:
                    idle = [job for job in jobs if not any(_of_job(worker, job) for worker in busy)]
                    for job in idle[:len(jobs) - need]:
                        del self.worker_spec[job]
                        changed = True
                    self._above_need_since[name] = None
            else:
                self._above_need_since[name] = None
        if changed or set(self.worker_spec) - set(self.workers):  # new jobs, or jobs that died
            await self._correct_state()
        self._count_jobs()

    def _count_jobs(self) -> None:
        for name, job in list(self.workers.items()):
            counted = self._counted_jobs.get(name)
            if counted is not job and getattr(job, "job_id", None):
                self.jobs_submitted[self.pool_of(name)] += 1
                if counted is not None:
                    self.jobs_replaced[self.pool_of(name)] += 1
                self._counted_jobs[name] = job

    async def _forget_vanished_jobs(self) -> None:
        """Jobs SLURM no longer lists (cancelled or failed before their worker joined) are resubmitted."""
        ids = self.job_ids()
        if not ids:
            return
        process = await asyncio.create_subprocess_exec(
            "squeue", "-h", "-o", "%i", "-j", ",".join(ids.values()),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await process.communicate()
        if process.returncode not in (0, 1):  # 1: every listed job ID is unknown (all finished)
            return
        listed = set(out.decode().split())
        connected = {str(state.name) for state in self.scheduler.workers.values()}
        vanished = [name for name, job_id in ids.items()
                    if job_id not in listed and not any(_of_job(worker, name) for worker in connected)]
        async with self._lock:
            for name in vanished:
                job = self.workers.pop(name, None)
                if job is not None:
                    with contextlib.suppress(Exception):
                        await job.close()
