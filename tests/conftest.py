"""Shared fixtures: small synthetic cohorts (generated once per session) and a Dask client."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from engine.data.inputs import Modality
from engine.data.synth import MODALITY_PATHS, generate_cohort

HAND_SHAPE = (6, 5, 4)
HAND_AFFINE = np.diag([-3.0, 3.0, 3.0, 1.0])

MODALITIES = [Modality(name, template, "uint8" if name == "WMH" else "float32")
              for name, template in MODALITY_PATHS.items()]


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """24 participants on an 8 mm grid: fast, for store and pipeline tests. Do not modify."""
    out = tmp_path_factory.mktemp("tiny") / "cohort"
    generate_cohort(out, 24, voxel_size=8.0, seed=11)
    return out


@pytest.fixture(scope="session")
def effects_cohort(tmp_path_factory) -> Path:
    """60 participants on a 6 mm grid: enough to see the planted age effects. Do not modify."""
    out = tmp_path_factory.mktemp("effects") / "cohort"
    generate_cohort(out, 60, voxel_size=6.0, seed=5)
    return out


@pytest.fixture
def cohort_copy(tiny_cohort, tmp_path) -> Path:
    """A private copy of the tiny cohort that a test may break."""
    return Path(shutil.copytree(tiny_cohort, tmp_path / "cohort"))


@pytest.fixture(scope="session")
def client():
    """An in-process Dask cluster (threads), shared by the tests that run tasks on one."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as dask_client:
        yield dask_client


@pytest.fixture
def hand_atlas(tmp_path):
    """A label image with four named regions (two hemispheres of two structures) and a mask."""
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 3, 4, 7, 9], size=HAND_SHAPE).astype(np.int16)
    mask = rng.random(HAND_SHAPE) > 0.25
    nib.save(nib.Nifti1Image(labels, HAND_AFFINE), tmp_path / "labels.nii.gz")
    pd.DataFrame({"index": [3, 4, 7, 9, 11], "name": ["Left_Hippocampus", "Right_Hippocampus", "Precentral_L",
                                                     "Precentral_R", "Unused"]}).to_csv(
        tmp_path / "labels.tsv", sep="\t", index=False)
    return labels, mask, tmp_path


@pytest.fixture(scope="session")
def tiny_workspace(tiny_cohort, tmp_path_factory) -> Path:
    """A whole `relcohort run` (features, 2 members × 2 epochs, 2 methods scored, the report) on the tiny
    cohort: for the report and notebook tests. Do not modify; copy it."""
    import yaml

    from engine.data.synth import FOCAL_TRUTH_LABELS, TRUTH_REGIONS
    from pipelines.runner import run_catalog

    folder = tmp_path_factory.mktemp("workspace")
    modalities = yaml.safe_load((Path(__file__).parents[1] / "catalog.yaml").read_text())["modalities"]
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({
        "workspace": "ws", "cohort": {"directory": str(tiny_cohort)}, "modalities": modalities,
        "features": {"gray_matter": "GM", "lesions": "WMH"},
        "train": {"modalities": ["T1"], "members": 2, "epochs": 2, "batch_size": 4},
        "explain": {"methods": ["lrp", "gradient"], "truth": str(tiny_cohort / TRUTH_REGIONS),
                    "truth_labels": FOCAL_TRUTH_LABELS},
        "cluster": {"n_workers": 1, "threads_per_worker": 2},
        "report": {"age_bands": [40, 60], "top_k": 5},
    }))
    return run_catalog(catalog)
