"""Cluster profiles as pydantic models: settings plus ``start()``, which yields a :class:`RunningCluster`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cluster.running import WORKER_ENVIRONMENT, RunningCluster
from cluster.slurm import SlurmProfile, memory_size

#: A per-worker memory limit: a size such as '4GiB', or 'auto' (the machine's memory split over the workers).
MemoryLimit = Annotated[str, AfterValidator(lambda value: value if value == "auto" else memory_size(value))]


class LocalProfile(BaseModel):
    """A ``distributed.LocalCluster`` on this machine (worker processes bound to 127.0.0.1)."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["local"] = Field("local", description="this machine's worker processes")
    n_workers: int = Field(2, ge=1, description="worker processes")
    threads_per_worker: int = Field(1, ge=1, description="threads in each worker")
    memory_limit: MemoryLimit = Field("auto", description="per worker, e.g. '4GiB'; 'auto' splits the machine's memory")
    dashboard: bool = Field(False, description="serve the Dask dashboard on 127.0.0.1:8787")
    gpus_per_worker: int = Field(0, ge=0, description="advertise this many GPU resources on every worker")
    malloc_trim_threshold: int | None = Field(
        None, ge=0, description="MALLOC_TRIM_THRESHOLD_ for worker processes; None keeps glibc's adaptive default "
        "(Dask's 65536 makes every whole-volume array a fresh mmap, which slows ingest)")

    @contextlib.contextmanager
    def start(self) -> Iterator[RunningCluster]:
        import dask
        from distributed import Client, LocalCluster

        resources = {"GPU": self.gpus_per_worker} if self.gpus_per_worker else None
        settings = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": self.malloc_trim_threshold,
                    **{f"distributed.nanny.pre-spawn-environ.{name}": value
                       for name, value in WORKER_ENVIRONMENT.items()},
                    # one queued task per thread: a large group of tasks spreads over idle workers instead of
                    # two landing on one single-threaded worker (the default 1.1 rounds up to 2); groups of at
                    # most twice the threads are not queued but assigned up front, so long ones are capped by
                    # task_slots (engine.tasks.run_tasks's in_flight)
                    "distributed.scheduler.worker-saturation": 1.0}
        with dask.config.set(settings), LocalCluster(
            n_workers=self.n_workers,
            threads_per_worker=self.threads_per_worker,
            memory_limit=self.memory_limit,
            host="127.0.0.1",
            # off: the scheduler still serves HTTP (health checks), so on a free port, not on 8787
            dashboard_address="127.0.0.1:8787" if self.dashboard else "127.0.0.1:0",
            resources=resources,
            silence_logs=40,  # logging.ERROR
        ) as cluster, Client(cluster) as client:
            yield RunningCluster(client, task_slots=self.n_workers * self.threads_per_worker)

    def describe(self) -> str:
        return (f"LocalCluster: {self.n_workers} worker(s) × {self.threads_per_worker} thread(s), "
                f"memory {self.memory_limit}")


#: Every profile the catalog accepts, told apart by ``profile:``.
ClusterProfile = Annotated[Union[LocalProfile, SlurmProfile], Field(discriminator="profile")]  # noqa: UP007

#: Profile name → its class with defaults, for ``relcohort run --cluster NAME``.
PROFILES = {"local": LocalProfile, "slurm": SlurmProfile}
