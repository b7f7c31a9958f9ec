"""What several test modules use: small cohorts' catalogs and stores, the command line, runs compared."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from engine.data.grid import Grid
from engine.data.inputs import Modality, read_participants
from engine.data.store import ingest, open_cohort
from engine.data.synth import MODALITY_PATHS
from engine.models.relevance import open_relevance
from engine.models.splits import SplitSettings, stratified_split

REPO = Path(__file__).parents[1]

#: The hand-made grid of the small atlas tests (``hand_atlas``).
HAND_SHAPE = (6, 5, 4)
HAND_AFFINE = np.diag([-3.0, 3.0, 3.0, 1.0])
HAND_GRID = Grid(HAND_SHAPE, HAND_AFFINE, "MNI152NLin2009aSym")

#: The synthetic cohorts' modalities on the template grid.
MODALITIES = [Modality(name, template, "uint8" if name == "WMH" else "float32")
              for name, template in MODALITY_PATHS.items()]


def run_ingest(cohort: Path, store: Path, participants: pd.DataFrame | None = None, **options):
    """:func:`engine.data.store.ingest` of a synthetic cohort's modalities (8 subjects per chunk by default)."""
    table = read_participants(cohort / "participants.tsv") if participants is None else participants
    options.setdefault("subjects_per_chunk", 8)
    return ingest(store, table, cohort, MODALITIES, cohort / "mask.nii.gz", **options)


def cohort_split(store: Path, seed: int = 0) -> pd.Series:
    """Half of the stored participants for training, a quarter each for validation and test."""
    dataset = open_cohort(store)
    table = pd.DataFrame({"participant_id": dataset.subject.values, "age": dataset.age.values,
                          "sex": dataset.sex.values})
    return stratified_split(table, SplitSettings(fractions=(0.5, 0.25, 0.25), seed=seed))


# ---------------------------------------------------------------------------------------
# Catalogs and the command line


def write_catalog(path: Path, **sections) -> Path:
    """The default catalog with some sections replaced (``None`` removes one)."""
    base = yaml.safe_load((REPO / "catalog.yaml").read_text())
    base.update(sections)
    path.write_text(yaml.safe_dump({name: section for name, section in base.items() if section is not None}))
    return path


def relcohort(*args, cwd=None) -> subprocess.CompletedProcess:
    """``relcohort ARGS`` in a process of its own (where the process boundary is what a test is about)."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def relcohort_process(catalog: Path, *args: str) -> subprocess.Popen:
    """``relcohort run CATALOG`` started in a session of its own (to be killed with its workers)."""
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(catalog), *args], cwd=catalog.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def cli(*args):
    """``relcohort ARGS`` in this process (typer's runner): its exit code, stdout and stderr."""
    from pipelines.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def quiet():
    """A console that prints nothing: for runs in this process."""
    from rich.console import Console

    return Console(quiet=True)


def wait_for(condition, what: str, timeout: float = 300, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------
# A small end-to-end run, and two runs compared

#: A small end-to-end catalog: demo cohort, 2-member ensemble (each trained for seconds, so a kill lands between
#: them), 2 attribution methods.
SMALL_RUN = {
    "cohort": {"demo": {"subjects": 16, "voxel_size": 8.0, "seed": 3}},
    "modalities": {"T1": "{participant_id}/anat/{participant_id}_T1w.nii.gz"},
    "train": {"modalities": ["T1"], "members": 2, "epochs": 40, "patience": 40, "batch_size": 4, "seed": 1},
    "explain": {"methods": ["lrp", "gradient"], "subjects": "test", "subjects_per_chunk": 2},
}


def write_small_catalog(path: Path, workspace: str, cluster: dict) -> Path:
    path.write_text(yaml.safe_dump({"workspace": workspace, **SMALL_RUN, "cluster": cluster}))
    return path


def assert_same_results(workspace: Path, reference: Path) -> None:
    """Models, predictions and relevance maps of two runs are identical."""
    for member in range(SMALL_RUN["train"]["members"]):
        weights = load_file(workspace / f"models/member_{member}.safetensors")
        expected = load_file(reference / f"models/member_{member}.safetensors")
        assert weights.keys() == expected.keys()
        for name in weights:
            assert (weights[name] == expected[name]).all(), f"member {member} {name} differs"
    pd.testing.assert_frame_equal(pd.read_parquet(workspace / "models/predictions.parquet"),
                                  pd.read_parquet(reference / "models/predictions.parquet"))
    relevance, expected = open_relevance(workspace / "relevance.zarr"), open_relevance(reference / "relevance.zarr")
    assert list(relevance.subject.values) == list(expected.subject.values)
    np.testing.assert_array_equal(relevance.relevance.values, expected.relevance.values)
    np.testing.assert_array_equal(relevance.relevance_mean.values, expected.relevance_mean.values)


# ---------------------------------------------------------------------------------------
# A study of one's own


class Study:
    """A copy of the tiny cohort with a diagnosis column (AD, CN), and a catalog that classifies it."""

    def __init__(self, cohort: Path, folder: Path):
        self.root = Path(shutil.copytree(cohort, folder / "study"))
        self.folder = folder
        table = pd.read_csv(self.participants, sep="\t")
        table["group"] = np.where(np.arange(len(table)) % 2 == 0, "AD", "CN")
        table.to_csv(self.participants, sep="\t", index=False)
        self.catalog = {
            "workspace": str(folder / "ws"),
            "cohort": {"directory": str(self.root), "space": "MNI152NLin2009aSym"},
            "modalities": {"T1": "{participant_id}/anat/{participant_id}_T1w.nii.gz",
                           "GM": "derivatives/synth/{participant_id}/{participant_id}_label-GM_probseg.nii.gz"},
            "train": {"target": "group", "task": "classification", "positive_class": "AD", "modalities": ["T1"],
                      "members": 1, "epochs": 1, "batch_size": 4},
            "explain": {"methods": ["lrp"]},
            "associate": [{"name": "lrp_age", "outcome": "relevance.lrp", "predictor": "age",
                           "covariates": ["sex"]}],
            "cluster": {"n_workers": 1},
        }

    @property
    def participants(self) -> Path:
        return self.root / "participants.tsv"

    @property
    def workspace(self) -> Path:
        return Path(self.catalog["workspace"])

    def write(self) -> Path:
        path = self.folder / "catalog.yaml"
        path.write_text(yaml.safe_dump(self.catalog))
        return path

    def regrid(self, path: Path, voxel_size: float) -> None:
        """Save an image (or the mask) on a grid of another voxel size."""
        image = nib.load(path)
        affine = image.affine.copy()
        affine[:3, :3] *= voxel_size / np.abs(np.diag(image.affine)[:3])
        data = np.asanyarray(image.dataobj)[::2, ::2, ::2]
        nib.save(nib.Nifti1Image(data, affine), path)
