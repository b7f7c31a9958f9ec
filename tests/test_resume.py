"""An ingest killed midway (SIGKILL of the process and its Dask workers) resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.data.inputs import read_participants
from engine.data.store import open_cohort
from tests.helpers import MODALITIES, run_ingest

KILLED_INGEST = textwrap.dedent("""
    import os, signal, sys
    from distributed import Client, LocalCluster
    from engine.data.store import ingest
    from engine.data.inputs import read_participants
    from engine.tasks import Execution
    from tests.helpers import MODALITIES

    cohort, store = sys.argv[1], sys.argv[2]

    def progress(phase, done, total):
        if phase == "write" and done >= 5:
            os.killpg(os.getpgid(0), signal.SIGKILL)  # the driver and its worker processes, at once

    if __name__ == "__main__":
        with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0") as cluster, \\
                Client(cluster) as client:
            ingest(store, read_participants(f"{cohort}/participants.tsv"), cohort, MODALITIES,
                   f"{cohort}/mask.nii.gz", subjects_per_chunk=1, execution=Execution(client, progress))
""")


@pytest.mark.slow
def test_killed_ingest_resumes_without_redoing_committed_rows(tiny_cohort, tmp_path):
    store = tmp_path / "images.zarr"
    script = tmp_path / "killed_ingest.py"
    script.write_text(KILLED_INGEST)
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    killed = subprocess.run([sys.executable, str(script), str(tiny_cohort), str(store)], start_new_session=True,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert killed.returncode == -9, killed.stderr[-2000:]

    group = zarr.open_group(store, mode="r")
    # each modality commits its row's hash after its data: the kill may fall between two modalities of a row
    committed = {modality.name: int((group[f"ingest/{modality.name}"][:] != "").sum()) for modality in MODALITIES}
    whole = min(committed.values())
    assert whole >= 5 and max(committed.values()) < 24, "the kill must land midway"
    assert group.attrs["ingest"]["state"] == "in progress"
    assert open_cohort(store).sizes["subject"] == whole  # only whole rows are visible

    report = run_ingest(tiny_cohort, store, subjects_per_chunk=1)
    assert report.unchanged == whole and report.appended == 0
    assert report.written == {name: 24 - rows for name, rows in committed.items()}  # nothing committed redone

    reference = tmp_path / "reference.zarr"
    run_ingest(tiny_cohort, reference, subjects_per_chunk=1)
    resumed, expected = open_cohort(store), open_cohort(reference)
    assert list(resumed.subject.values) == list(read_participants(tiny_cohort / "participants.tsv").participant_id)
    for name in expected.data_vars:
        np.testing.assert_array_equal(resumed[name].values, expected[name].values)
