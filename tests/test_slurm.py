"""The SLURM profile against a real one-node SLURM on 127.0.0.1 (see tests/slurm.py), and the pools' scaling
against stand-ins for sbatch, scancel and squeue that only record their calls.

Installs Debian's slurm-wlm and munge when missing (as root); skips with the reason where that
is impossible, except in CI (``CI=true``), where it fails instead.
"""

from __future__ import annotations

import json
import operator
import os
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from cluster import SlurmProfile
from pipelines.catalog import CatalogError, load_catalog
from pipelines.runner import run_catalog
from tests.helpers import SMALL_RUN, assert_same_results, wait_for, write_small_catalog
from tests.slurm import LocalSlurm, ensure_installed

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the SLURM tests: {reason}")
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm


def slurm_profile(tmp_path, **options) -> dict:
    return {"profile": "slurm", "interface": "lo", "dashboard": False, "walltime": "00:20:00",
            "log_directory": str(tmp_path / "jobs"),
            "cpu": {"cores": 1, "memory": "2GiB", "max_jobs": 1},
            "gpu": {"cores": 1, "memory": "2GiB", "gpus": 1, "max_jobs": 1}, **options}


def test_job_scripts_carry_the_pools_resources_over_site_defaults(tmp_path):
    import dask

    site = {"jobqueue.slurm.queue": "site-partition", "jobqueue.slurm.account": "site-account",
            "jobqueue.slurm.cores": 8, "jobqueue.slurm.memory": "32GiB",
            "jobqueue.slurm.job-script-prologue": ["module load site-python"],
            "jobqueue.slurm.job-extra-directives": ["--constraint=site"]}
    catalog = write_small_catalog(tmp_path / "catalog.yaml", "ws", {
        "profile": "slurm", "account": "lab", "walltime": "02:00:00", "setup": ["source /lab/venv/bin/activate"],
        "cpu": {"memory": "8GiB", "max_jobs": 10},
        "gpu": {"queue": "gpu", "cores": 4, "memory": "64GiB", "gpus": 2, "job_directives": ["--qos=gpu"]}})
    profile = load_catalog(catalog)[0].cluster
    with dask.config.set(site):
        cpu, gpu = profile.job_options("cpu"), profile.job_options("gpu")
    assert cpu["account"] == gpu["account"] == "lab" and cpu["walltime"] == "02:00:00"
    assert "queue" not in cpu and gpu["queue"] == "gpu"  # the CPU pool keeps the site's partition
    assert "cores" not in cpu and cpu["memory"] == "8GiB"  # only what the catalog sets overrides the site
    assert gpu["cores"] == 4 and gpu["processes"] == 1
    assert gpu["job_extra_directives"] == ["--constraint=site", "--qos=gpu", "--gres=gpu:2"]
    assert gpu["worker_extra_args"] == ["--resources", "GPU=2"]
    # one malloc arena in every worker (cluster.running.WORKER_ENVIRONMENT), before the site's and the catalog's lines
    assert cpu["job_script_prologue"] == ["export MALLOC_ARENA_MAX=1", "module load site-python",
                                          "source /lab/venv/bin/activate"]

    from dask_jobqueue.slurm import SLURMJob

    with dask.config.set(site):
        script = SLURMJob("tcp://127.0.0.1:1", name="gpu-0", **gpu).job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --gres=gpu:2", "#SBATCH --qos=gpu", "--resources GPU=2", "module load site-python"):
        assert line in script, line

    with pytest.raises(ValueError, match=r"cluster.cpu.cores: not set in the catalog nor in the site's dask config"):
        SlurmProfile().job_options("cpu")
    bad = write_small_catalog(tmp_path / "bad.yaml", "ws", {
        "profile": "slurm", "walltime": "2h", "cpu": {"memory": "lots", "min_jobs": 2}, "gpu": {"gpus": 0}})
    with pytest.raises(CatalogError) as failure:
        load_catalog(bad)
    text = str(failure.value)
    assert "cluster.slurm.walltime: '2h' is not a SLURM time limit" in text
    assert "cluster.slurm.cpu.memory: 'lots' is not a memory size" in text and "cluster.slurm.gpu.gpus" in text


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """``sbatch``, ``scancel`` and ``squeue`` first on PATH, that only record: each submitted job script is kept as
    ``submitted/<id>.sh`` of the returned folder, every call is a line of its ``calls``; ``squeue`` lists no job."""
    folder = tmp_path
    commands = folder / "bin"
    commands.mkdir()
    calls, submitted = folder / "calls", folder / "submitted"
    submitted.mkdir()
    scripts = {
        "sbatch": f'n=$(($(ls {submitted} | wc -l) + 1))\ncp "$1" {submitted}/$n.sh\necho "sbatch $n" >> {calls}\n'
                  'echo "Submitted batch job $n"\n',
        "scancel": f'echo "scancel $*" >> {calls}\n',
        "squeue": f'echo "squeue $*" >> {calls}\n',
    }
    for name, text in scripts.items():
        path = commands / name
        path.write_text("#!/bin/sh\n" + text)
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{commands}:{os.environ['PATH']}")
    return folder


def test_each_pool_submits_jobs_for_its_waiting_tasks_within_its_bounds_and_cancels_idle_ones(tmp_path, fake_slurm):
    """The pools' scaling without SLURM (sbatch and scancel only recorded; no worker ever joins): GPU tasks start
    one GPU job (its max_jobs), a CPU task a CPU job, and once no task waits each job is cancelled."""
    submitted, calls = fake_slurm / "submitted", fake_slurm / "calls"
    profile = SlurmProfile.model_validate(slurm_profile(tmp_path, idle_timeout=0.5, scale_interval=0.1))
    with profile.start() as running:
        client = running.client
        gpu_tasks = [client.submit(time.sleep, 1, resources={"GPU": 1}, pure=False) for _ in range(3)]
        wait_for(lambda: len(list(submitted.iterdir())) == 1, "GPU job", timeout=30)
        script = (submitted / "1.sh").read_text()
        assert "--gres=gpu:1" in script and "relcohort-gpu" in script
        cpu_task = client.submit(operator.add, 1, 2, pure=False)
        wait_for(lambda: len(list(submitted.iterdir())) == 2, "CPU job", timeout=30)
        script = (submitted / "2.sh").read_text()
        assert "--gres" not in script and "relcohort-cpu" in script
        time.sleep(1)  # three GPU tasks wait, yet the GPU pool stays at its max_jobs
        assert len(list(submitted.iterdir())) == 2
        client.cancel([*gpu_tasks, cpu_task])
        wait_for(lambda: {"scancel 1", "scancel 2"} <= set(calls.read_text().splitlines()), "idle jobs cancelled",
                 timeout=30)
        usage = running.usage()
    assert usage["cpu"]["jobs_submitted"] == usage["gpu"]["jobs_submitted"] == 1
    assert usage["gpu"]["workers_joined"] == usage["gpu"]["tasks_done"] == 0


def test_a_job_that_vanishes_from_the_queue_before_its_worker_joins_is_submitted_again(tmp_path, fake_slurm):
    """SLURM lists no job (the stand-in squeue prints nothing: cancelled, or failed before its worker joined): at
    the next queue check the waiting task's job is submitted again, and counted as replaced."""
    submitted, calls = fake_slurm / "submitted", fake_slurm / "calls"
    profile = SlurmProfile.model_validate(slurm_profile(tmp_path, scale_interval=0.1, queue_check_interval=0.5))
    with profile.start() as running:
        task = running.client.submit(operator.add, 1, 2, pure=False)
        wait_for(lambda: len(list(submitted.iterdir())) >= 2, "the vanished job submitted again", timeout=30)
        assert any(line.startswith("squeue -h -o %i -j 1") for line in calls.read_text().splitlines())
        assert "relcohort-cpu" in (submitted / "2.sh").read_text()
        usage = running.usage()["cpu"]
        assert usage["jobs_replaced"] >= 1 and usage["jobs_submitted"] == usage["jobs_replaced"] + 1
        running.client.cancel(task)


@pytest.mark.slow
def test_pools_start_jobs_for_waiting_tasks_and_replace_a_cancelled_one(local_slurm, tmp_path):
    """The pooled cluster on its own: a CPU job for a CPU task, a GPU job for a GPU task, a cancelled job
    replaced and its task run again, every job gone at the end (the whole pipeline on SLURM: the slow test below)."""
    profile = SlurmProfile.model_validate(slurm_profile(tmp_path, idle_timeout=2.0))
    with profile.start() as running:
        client = running.client
        assert client.submit(operator.add, 1, 2, pure=False).result(timeout=180) == 3  # a CPU job started for it
        sleeping = client.submit(time.sleep, 3, resources={"GPU": 1}, pure=False)  # a GPU job starts for it
        deadline, cancelled = time.monotonic() + 180, None
        while cancelled is None and time.monotonic() < deadline:
            processing = [worker for worker, keys in client.processing().items() if keys and
                          running.client.scheduler_info(n_workers=-1)["workers"][worker]["name"].startswith("gpu-")]
            jobs = [job for job, (name, state) in local_slurm.jobs().items()
                    if name == "relcohort-gpu" and state == "RUNNING"]
            if processing and jobs:
                local_slurm.cancel(jobs[0])
                cancelled = jobs[0]
            time.sleep(0.2)
        assert cancelled, "the GPU task never ran on a GPU job"
        assert sleeping.result(timeout=240) is None  # on the job that replaced it
        usage = running.usage()
    assert usage["cpu"]["jobs_submitted"] >= 1 and usage["cpu"]["tasks_done"] >= 1
    assert usage["gpu"]["jobs_replaced"] >= 1 and usage["gpu"]["tasks_rerun"] >= 1
    assert usage["gpu"]["first_worker_seconds"] is not None
    assert cancelled not in local_slurm.jobs()
    deadline = time.monotonic() + 30  # closing the cluster cancels its jobs; SLURM lists them while they end
    while [job for job, (name, _) in local_slurm.jobs().items() if name.startswith("relcohort-")]:
        assert time.monotonic() < deadline, local_slurm.jobs()
        time.sleep(0.2)


@pytest.mark.slow
def test_pipeline_tasks_on_slurm_workers_equal_a_local_run_and_a_cancelled_job_is_replaced(local_slurm,
                                                                                         small_reference, tmp_path):
    quiet = Console(quiet=True)
    catalog = write_small_catalog(tmp_path / "slurm.yaml", "on_slurm", slurm_profile(tmp_path))
    workspace = tmp_path / "on_slurm"
    cancelled = {}

    def cancel_the_gpu_job_while_it_trains():
        """scancel the GPU pool's job once its worker has joined and the members are training."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not cancelled:
            running = [job for job, (name, state) in local_slurm.jobs().items()
                       if name == "relcohort-gpu" and state == "RUNNING"]
            joined = [job for job in running if "Registered to" in _job_log(tmp_path / "jobs", job)]
            if joined and (workspace / "models/split.tsv").exists():
                time.sleep(1.0)  # the worker has its first member
                if not (workspace / "models/member_0.json").exists():
                    local_slurm.cancel(joined[0])
                    cancelled["job"] = joined[0]
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_the_gpu_job_while_it_trains)
    canceller.start()
    started = time.monotonic()
    run_catalog(catalog, quiet)
    seconds = time.monotonic() - started
    canceller.join()

    assert cancelled, "the GPU job was not cancelled mid-training"
    assert cancelled["job"] not in local_slurm.jobs()
    run = json.loads((workspace / "provenance.json").read_text())["runs"][-1]
    usage = run["cluster_usage"]
    print(f"\nSLURM run: {seconds:.1f} s; usage per pool: {json.dumps(usage)}; "
          f"stage seconds: { {name: stage['seconds'] for name, stage in run['stages'].items()} }")
    assert run["state"] == "complete" and run["cluster"].startswith("SLURM")
    assert usage["gpu"]["jobs_replaced"] >= 1 and usage["gpu"]["jobs_submitted"] >= 2
    assert usage["gpu"]["tasks_rerun"] >= 1  # the member that was training on the cancelled job
    explain_blocks = SMALL_RUN["train"]["members"] * -(-run["stages"]["explain"]["subjects"] //
                                                        SMALL_RUN["explain"]["subjects_per_chunk"])
    assert usage["gpu"]["tasks_done"] >= SMALL_RUN["train"]["members"] + explain_blocks
    assert usage["cpu"]["tasks_done"] > 0 and usage["cpu"]["jobs_submitted"] >= 1
    assert_same_results(workspace, small_reference)
    assert not [job for job, (name, _) in local_slurm.jobs().items() if name.startswith("relcohort-")]


def _job_log(folder, job: str) -> str:
    text = ""
    for path in folder.glob(f"*-{job}.*"):
        text += path.read_text(errors="replace")
    return text
