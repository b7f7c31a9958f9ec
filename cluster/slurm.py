"""The SLURM profile: the catalog's ``cluster: {profile: slurm, ...}`` and its pools' settings.

:class:`SlurmProfile` starts one scheduler in the ``relcohort run`` process and workers as SLURM
jobs from a CPU pool and an optional GPU pool (:class:`cluster.pooled.PooledSLURMCluster`). Site
defaults (queue, account, walltime, cores, memory, set-up lines, ...) come from dask's
``jobqueue.slurm`` configuration (``~/.config/dask/jobqueue.yaml``); the catalog overrides only
the fields it sets, and its lists (job directives, set-up lines) are added to the site's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from cluster.running import WORKER_ENVIRONMENT, RunningCluster

if TYPE_CHECKING:
    from cluster.pooled import JobPool

WALLTIME = r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$"


class ClusterSetupError(ValueError):
    """A cluster profile cannot start with the settings it has; the message names the field."""


def _walltime(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(WALLTIME, value):
        raise ValueError(f"{value!r} is not a SLURM time limit such as '02:00:00', '90:00' or '1-00:00:00'")
    return value


def memory_size(value: str | None) -> str | None:
    """``value`` if dask reads it as a size in bytes (``'16GiB'``, ``'4 GB'``); ``None`` passes."""
    from dask.utils import parse_bytes

    if value is not None:
        try:
            parse_bytes(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a memory size such as '16GiB'") from None
    return value


Walltime = Annotated[str | None, AfterValidator(_walltime)]
Memory = Annotated[str | None, AfterValidator(memory_size)]


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

    profile: Literal["slurm"] = Field("slurm", description="workers as SLURM jobs")
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
    queue_check_interval: float = Field(10.0, gt=0, description="seconds between checks of SLURM's queue (squeue) "
                                        "for jobs that vanished before their worker joined (cancelled, failed to "
                                        "start): they are submitted again")

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
        prologue = [*(f"export {name}={value}" for name, value in WORKER_ENVIRONMENT.items()),
                    *(site.get("job-script-prologue") or []), *self.setup, *spec.setup]
        worker_args = list(site.get("worker-extra-args") or [])
        if isinstance(spec, SlurmGpuPool):
            options["processes"] = 1
            directives.append(f"--gres=gpu:{spec.gpus}")
            worker_args += ["--resources", f"GPU={spec.gpus}"]
        options.update(job_extra_directives=directives, job_script_prologue=prologue, worker_extra_args=worker_args)
        for field in ("cores", "memory"):
            if options.get(field, site.get(field)) is None:
                raise ClusterSetupError(f"cluster.{pool}.{field}: not set in the catalog nor in the site's dask "
                                        f"config (jobqueue.slurm.{field} in ~/.config/dask/jobqueue.yaml)")
        return options

    def pools(self) -> dict[str, JobPool]:
        from cluster.pooled import JobPool  # imports dask-jobqueue: only when a SLURM profile starts

        pools = {"cpu": JobPool(self.job_options("cpu"), self.cpu.min_jobs, self.cpu.max_jobs)}
        if self.gpu is not None:
            pools["gpu"] = JobPool(self.job_options("gpu"), self.gpu.min_jobs, self.gpu.max_jobs,
                                   gpu=True)
        return pools

    @contextlib.contextmanager
    def start(self) -> Iterator[RunningCluster]:
        import dask
        from distributed import Client

        from cluster.pooled import PooledSLURMCluster

        pools = self.pools()  # raises a clear error for missing cores/memory before anything is submitted
        settings = {"distributed.scheduler.worker-saturation": 1.0}
        # off: the scheduler still serves HTTP (health checks), so on a free port, not on 8787
        scheduler_options = {"dashboard_address": ":8787" if self.dashboard else ":0"}
        if self.interface is not None:
            scheduler_options["interface"] = self.interface
        with dask.config.set(settings), PooledSLURMCluster(
                pools, interface=self.interface, scheduler_options=scheduler_options,
                scale_interval=self.scale_interval, idle_timeout=self.idle_timeout,
                queue_check_interval=self.queue_check_interval) as cluster, \
                Client(cluster) as client:
            yield RunningCluster(client, gpu_on_demand="gpu" in pools, usage=cluster.usage)

    def describe(self) -> str:
        def pool(name: str, spec: SlurmPool) -> str:
            size = f"{spec.cores or 'site'} core(s), {spec.memory or 'site'} memory"
            gpus = f", {spec.gpus} GPU(s)" if isinstance(spec, SlurmGpuPool) else ""
            return f"{name} pool {spec.min_jobs}–{spec.max_jobs} job(s) × {size}{gpus}"

        where = ", ".join(f"{field} {getattr(self, field)}" for field in ("queue", "account", "walltime")
                          if getattr(self, field))
        pools = "; ".join(pool(name, spec) for name, spec in (("cpu", self.cpu), ("gpu", self.gpu)) if spec)
        return f"SLURM (dask-jobqueue){': ' + where if where else ''}; {pools}"
