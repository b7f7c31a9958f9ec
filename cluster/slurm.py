"""SLURM through dask-jobqueue: one scheduler, workers from a CPU pool and an optional GPU pool.

:class:`SlurmProfile` is the catalog's ``cluster: {profile: slurm, ...}``. Site defaults (queue,
account, walltime, cores, memory, set-up lines, ...) come from dask's ``jobqueue.slurm``
configuration (``~/.config/dask/jobqueue.yaml``); the catalog overrides only the fields it sets,
and its lists (job directives, set-up lines) are added to the site's.

:class:`PooledSLURMCluster` is a ``SLURMCluster`` whose jobs come from named pools. Each pool
is kept between its ``min_jobs`` and ``max_jobs``: it grows with the tasks waiting for it (GPU
tasks, those restricted to the ``GPU`` resource, wait for the GPU pool), shrinks when its jobs
have been idle a while, and replaces jobs that die (``scancel``, walltime, node failure), whose
tasks the scheduler then runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

WALLTIME = r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$"


class ClusterSetupError(ValueError):
    """A cluster profile cannot start with the settings it has; the message names the field."""


def _walltime(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(WALLTIME, value):
        raise ValueError(f"{value!r} is not a SLURM time limit such as '02:00:00', '90:00' or '1-00:00:00'")
    return value


def _memory(value: str | None) -> str | None:
    from dask.utils import parse_bytes

    if value is not None:
        try:
            parse_bytes(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a memory size such as '16GiB'") from None
    return value


Walltime = Annotated[str | None, AfterValidator(_walltime)]
Memory = Annotated[str | None, AfterValidator(_memory)]


class SlurmPool(BaseModel):
    """One kind of SLURM job; each job runs Dask worker process(es). Unset fields: site defaults."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(None, description="partition (sbatch -p); default: the profile's, then the site's")
    account: str | None = Field(None, description="account (sbatch -A)")
    walltime: Walltime = Field(None, description="job time limit, e.g. '02:00:00' or '1-00:00:00'")
    cores: int | None = Field(None, ge=1, description="cores per job (worker threads in all)")
    processes: int | None = Field(None, ge=1, description="worker processes per job (default: dask-jobqueue's)")
    memory: Memory = Field(None, description="memory per job, e.g. '16GiB'")
    job_directives: list[str] = Field([], description="extra #SBATCH options, e.g. ['--qos=short']")
    setup: list[str] = Field([], description="shell lines run before the worker starts (module load, venv)")
    min_jobs: int = Field(0, ge=0, description="jobs kept even when idle")
    max_jobs: int = Field(4, ge=1, description="most jobs at once")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_jobs > self.max_jobs:
            raise ValueError(f"min_jobs ({self.min_jobs}) is larger than max_jobs ({self.max_jobs})")
        return self


class SlurmGpuPool(SlurmPool):
    """Jobs for GPU work: ``gpus: n`` asks SLURM for ``--gres=gpu:n`` and the worker advertises ``GPU=n``."""

    processes: Literal[1] = Field(1, description="one worker process per GPU job (it holds the job's GPUs)")
    gpus: int = Field(1, ge=1, description="GPUs per job")


class SlurmProfile(BaseModel):
    """Dask workers as SLURM jobs (dask-jobqueue); the scheduler runs in the ``relcohort run`` process."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["slurm"] = "slurm"
    queue: str | None = Field(None, description="partition for both pools (a pool's own queue wins)")
    account: str | None = Field(None, description="account for both pools")
    walltime: Walltime = Field(None, description="time limit for both pools")
    job_directives: list[str] = Field([], description="extra #SBATCH options for both pools")
    setup: list[str] = Field([], description="shell lines run in both pools' jobs before the worker")
    cpu: SlurmPool = Field(SlurmPool(), description="the pool for CPU work (every task without a GPU)")
    gpu: SlurmGpuPool | None = Field(None, description="the pool for GPU work (training, attribution)")
    interface: str | None = Field(None, description="network interface of scheduler and workers, e.g. 'ib0' "
                                  "('lo' for a one-node test); default: the site's")
    python: str | None = Field(None, description="python on the nodes (default: this one, sys.executable)")
    log_directory: str | None = Field(None, description="folder for the jobs' stdout/stderr files")
    dashboard: bool = Field(True, description="serve the Dask dashboard from the scheduler (port 8787 or free)")
    scale_interval: float = Field(1.0, gt=0, description="seconds between checks of each pool's size")
    idle_timeout: float = Field(60.0, ge=0, description="seconds a pool stays larger than it needs before shrinking")

    def job_options(self, pool: str) -> dict:
        """dask-jobqueue ``SLURMJob`` keywords for ``pool`` ('cpu' or 'gpu'): the catalog over the site."""
        import dask

        site = dask.config.get("jobqueue.slurm", {})
        spec: SlurmPool = getattr(self, pool)
        options: dict = {"job_name": f"relcohort-{pool}"}
        for field in ("queue", "account", "walltime"):
            value = getattr(spec, field) or getattr(self, field)
            if value is not None:
                options[field] = value
        for field in ("cores", "memory", "processes"):
            if field in spec.model_fields_set and getattr(spec, field) is not None:
                options[field] = getattr(spec, field)
        for field in ("python", "log_directory"):
            if getattr(self, field) is not None:
                options[field] = getattr(self, field)
        directives = [*(site.get("job-extra-directives") or []), *self.job_directives, *spec.job_directives]
        prologue = [*(site.get("job-script-prologue") or []), *self.setup, *spec.setup]
        worker_args = list(site.get("worker-extra-args") or [])
        if isinstance(spec, SlurmGpuPool):
            options["processes"] = 1
            directives.append(f"--gres=gpu:{spec.gpus}")
            worker_args += ["--resources", f"GPU={spec.gpus}"]
        options.update(job_extra_directives=directives, job_script_prologue=prologue, worker_extra_args=worker_args)
        for field in ("cores", "memory"):
            if options.get(field, site.get(field)) is None:
                raise ClusterSetupError(f"cluster.{pool}.{field}: not set in the catalog nor in the site's dask config "
                                 f"(jobqueue.slurm.{field} in ~/.config/dask/jobqueue.yaml)")
        return options

    def pools(self) -> dict[str, JobPool]:
        pools = {"cpu": JobPool(self.job_options("cpu"), self.cpu.min_jobs, self.cpu.max_jobs)}
        if self.gpu is not None:
            pools["gpu"] = JobPool(self.job_options("gpu"), self.gpu.min_jobs, self.gpu.max_jobs,
                                   gpu=True)
        return pools

    @contextlib.contextmanager
    def start(self) -> Iterator:
        import dask
        from distributed import Client

        pools = self.pools()  # raises a clear error for missing cores/memory before anything is submitted
        settings = {"distributed.scheduler.worker-saturation": 1.0}
        scheduler_options = {"dashboard_address": ":8787" if self.dashboard else None}
        if self.interface is not None:
            scheduler_options["interface"] = self.interface
        with dask.config.set(settings), pooled_cluster_class()(
                pools, interface=self.interface, scheduler_options=scheduler_options,
                scale_interval=self.scale_interval, idle_timeout=self.idle_timeout) as cluster, \
                Client(cluster) as client:
            yield client

    def describe(self) -> str:
        def pool(name: str, spec: SlurmPool) -> str:
            size = f"{spec.cores or 'site'} core(s), {spec.memory or 'site'} memory"
            gpus = f", {spec.gpus} GPU(s)" if isinstance(spec, SlurmGpuPool) else ""
            return f"{name} pool {spec.min_jobs}–{spec.max_jobs} job(s) × {size}{gpus}"

        where = ", ".join(f"{field} {getattr(self, field)}" for field in ("queue", "account", "walltime")
                          if getattr(self, field))
        pools = "; ".join(pool(name, spec) for name, spec in (("cpu", self.cpu), ("gpu", self.gpu)) if spec)
        return f"SLURM (dask-jobqueue){': ' + where if where else ''}; {pools}"


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


@functools.cache
def pooled_cluster_class():
    """The :class:`PooledSLURMCluster` class (built on first use: importing this module skips dask-jobqueue)."""
    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob
    from distributed.core import Status
    from distributed.diagnostics.plugin import SchedulerPlugin

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
                     **cluster_options):
            self.pools = pools
            self.scale_interval, self.idle_timeout = scale_interval, idle_timeout
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
                    if time.monotonic() - last_queue_check > 10:
                        last_queue_check = time.monotonic()
                        await self._forget_vanished_jobs()
                    await self._rescale()
                except Exception as error:  # keep scaling whatever one round met; say so in the log
                    import logging

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

    return PooledSLURMCluster


def __getattr__(name: str):
    if name == "PooledSLURMCluster":
        return pooled_cluster_class()
    raise AttributeError(name)
