"""Runs that survive faults: a worker killed mid-stage, the runner killed and rerun, two runs on
one workspace, and inputs that must not execute code. (A SLURM job cancelled mid-stage: test_slurm.py.)
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from safetensors.torch import load_file

from engine.layout import Layout
from engine.models.ensembles import train_ensemble
from engine.models.training import TrainingConfig
from engine.tasks import Execution
from pipelines.runner import WorkspaceBusy, run_catalog, workspace_lock
from tests.helpers import assert_same_results, cohort_split, relcohort_process, wait_for, write_small_catalog

REPO = Path(__file__).parents[1]


# ---------------------------------------------------------------------------------------
# A Dask worker killed with SIGKILL while it trains a member


@pytest.mark.slow
def test_a_worker_killed_mid_training_is_replaced_and_the_results_equal_an_undisturbed_run(tiny_store, tmp_path):
    from distributed import Client, LocalCluster

    store = tiny_store
    split = cohort_split(store)
    config = TrainingConfig(modalities=("T1",), epochs=4, batch_size=4, seed=3)

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        undisturbed = train_ensemble(store, config, 2, tmp_path / "undisturbed", split, Execution(client))
        pids = client.run(os.getpid)
        killed = {}

        def kill_a_training_worker():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                running = {address: keys for address, keys in client.processing().items() if keys}
                training = [address for address, keys in running.items()
                            if any("_train_or_combine" in str(key) for key in keys)]  # combining waits for both
                if training:
                    killed.update(address=training[0], pid=pids[training[0]], tasks=running[training[0]])
                    os.kill(pids[training[0]], signal.SIGKILL)  # a real kill -9 of the worker process
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_a_training_worker)
        killer.start()
        disturbed = train_ensemble(store, config, 2, tmp_path / "disturbed", split, Execution(client))
        killer.join()
        assert killed, "no worker was seen training"
        with pytest.raises(ProcessLookupError):
            os.kill(killed["pid"], 0)  # that process is gone ...
        client.wait_for_workers(2, timeout=60)
        assert killed["pid"] not in client.run(os.getpid).values()  # ... and its nanny started a new one

    assert disturbed["trained"] == undisturbed["trained"] == 2
    for member in (0, 1):
        weights = load_file(tmp_path / f"disturbed/member_{member}.safetensors")
        expected = load_file(tmp_path / f"undisturbed/member_{member}.safetensors")
        assert all((weights[name] == expected[name]).all() for name in expected)
    pd.testing.assert_frame_equal(disturbed["predictions"], undisturbed["predictions"])
    pd.testing.assert_frame_equal(disturbed["metrics"], undisturbed["metrics"])


# ---------------------------------------------------------------------------------------
# ``relcohort run`` killed midway; a second run at the same time


def explained_blocks(workspace: Path) -> np.ndarray | None:
    """relevance.zarr's (member, subject) flags of rows already explained, or None before it exists."""
    import zarr

    try:
        return zarr.open_group(workspace / "relevance.zarr", mode="r")["explained"][:]
    except Exception:  # not created yet, or being created
        return None


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_work_and_a_concurrent_run_is_refused(small_reference,
                                                                                               tmp_path):
    catalog = write_small_catalog(tmp_path / "catalog.yaml", "ws", {"profile": "local", "n_workers": 1})
    workspace = tmp_path / "ws"
    first = relcohort_process(catalog)
    try:
        wait_for(lambda: Layout(workspace).lock.exists() and Layout(workspace).lock.read_text(), "lock", process=first)
        assert json.loads(Layout(workspace).lock.read_text())["pid"] == first.pid
        second = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(catalog)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run must still be running"
        assert second.returncode == 1
        assert f"PID {first.pid}" in second.stderr and str(Layout(workspace).lock) in second.stderr
        assert "in use by another relcohort run" in second.stderr and "Traceback" not in second.stderr

        wait_for(lambda: (workspace / "models/member_0.json").exists(), "member 0", process=first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the runner and its Dask workers, at once
        first.communicate()
    assert first.returncode == -9
    assert not (workspace / "models/member_1.json").exists(), "the kill must land between the two members"
    kept = {path: path.stat().st_mtime_ns for path in (workspace / "models").glob("member_0*")}
    assert len(kept) == 3  # weights, card, predictions
    assert Layout(workspace).lock.exists()  # left behind by the killed run ...

    printed = io.StringIO()
    run_catalog(catalog, Console(file=printed, soft_wrap=True))
    assert f"taking over the lock of a run that ended without finishing (PID {first.pid}" in printed.getvalue()
    assert not Layout(workspace).lock.exists()  # ... and not held by it
    provenance = json.loads((workspace / "provenance.json").read_text())
    killed = provenance["runs"][-2]  # it never got to record its end
    assert killed["finished"] is None and killed["state"] is None and "train" not in killed["stages"]
    assert provenance["runs"][-1]["state"] == "complete"
    stages = provenance["runs"][-1]["stages"]
    assert stages["synth"]["generated"] == 0 and stages["ingest"]["appended"] == 0
    assert stages["train"]["trained"] == 1  # member 1 only
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # member 0 was not redone
    assert explained_blocks(workspace).all()
    assert_same_results(workspace, small_reference)


def test_the_workspace_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    from rich.console import Console

    with workspace_lock(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        with pytest.raises(WorkspaceBusy, match=rf"PID {os.getpid()} on .*lock file {re.escape(str(path))}"), \
                workspace_lock(tmp_path):
            pass
    assert not path.exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
    console = Console(file=sys.stdout, soft_wrap=True)
    with workspace_lock(tmp_path, console):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that ended without finishing (PID {int(dead.stdout)} on elsewhere" in \
        capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# Safety of inputs


def test_a_catalog_cannot_build_objects_or_run_code(tmp_path):
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("workspace: !!python/object/apply:os.system ['touch pwned']\n"
                      "cohort: {demo: {subjects: 2}}\nmodalities: {T1: '{participant_id}.nii.gz'}\n")
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(unsafe)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "invalid YAML" in result.stderr and "python/object" in result.stderr
    assert not (tmp_path / "pwned").exists() and "Traceback" not in result.stderr


#: Calls that can execute code from a file: unpickling, unsafe YAML, eval/exec.
UNSAFE_CALLS = [r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\bjoblib\.load\(", r"yaml\.load\(",
                r"yaml\.unsafe_load", r"yaml\.(Full|Unsafe)?Loader\b", r"allow_pickle\s*=\s*True", r"(?<![.\w])eval\(",
                r"(?<![.\w])exec\(", r"\.read_pickle\("]


def test_no_code_reads_workspace_files_with_pickle_or_unsafe_loaders():
    sources = [path for folder in ("engine", "pipelines", "cluster") for path in (REPO / folder).rglob("*.py")]
    assert len(sources) > 10
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in sources
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if any(re.search(pattern, line) for pattern in UNSAFE_CALLS)]
    assert found == []
    torch_loads = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in sources
                   for match in re.finditer(r"torch\.load\([^)]*\)", path.read_text())
                   if "weights_only=True" not in match.group(0)]
    assert torch_loads == []  # checkpoints are safetensors, or torch.load(..., weights_only=True)
