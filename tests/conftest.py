"""Shared fixtures, each made once per session: small synthetic cohorts, their stores, a trained ensemble, whole
runs of a catalog, and a Dask client. Tests read them and never modify them; a test that changes one copies it."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from engine.data.synth import generate_cohort
from tests.helpers import (
    HAND_AFFINE,
    HAND_SHAPE,
    REPO,
    cohort_split,
    quiet,
    run_ingest,
    write_catalog,
    write_small_catalog,
)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """24 participants on an 8 mm grid: fast, for store and pipeline tests."""
    out = tmp_path_factory.mktemp("tiny") / "cohort"
    generate_cohort(out, 24, voxel_size=8.0, seed=11)
    return out


@pytest.fixture(scope="session")
def effects_cohort(tmp_path_factory) -> Path:
    """60 participants on a 6 mm grid: enough to see the planted age effects."""
    out = tmp_path_factory.mktemp("effects") / "cohort"
    generate_cohort(out, 60, voxel_size=6.0, seed=5)
    return out


@pytest.fixture(scope="session")
def tiny_store(tiny_cohort, tmp_path_factory) -> Path:
    """The tiny cohort's ``images.zarr`` (8 subjects per chunk)."""
    path = tmp_path_factory.mktemp("tiny_store") / "images.zarr"
    run_ingest(tiny_cohort, path)
    return path


@pytest.fixture(scope="session")
def effects_store(effects_cohort, tmp_path_factory) -> Path:
    """The effects cohort's ``images.zarr``."""
    path = tmp_path_factory.mktemp("effects_store") / "images.zarr"
    run_ingest(effects_cohort, path)
    return path


@pytest.fixture(scope="session")
def trained(tiny_store, tmp_path_factory):
    """A 2-member MRInet ensemble on the tiny store's T1 (2 epochs): the store, the models folder and the
    participants outside the training split."""
    from engine.models.ensembles import train_ensemble
    from engine.models.training import TrainingConfig

    split = cohort_split(tiny_store)
    models = tmp_path_factory.mktemp("trained") / "models"
    train_ensemble(tiny_store, TrainingConfig(modalities=("T1",), epochs=2, batch_size=4, seed=3), 2, models, split)
    return tiny_store, models, list(split.index[split != "train"])


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


# ---------------------------------------------------------------------------------------
# Whole runs of a catalog, in this process


@pytest.fixture(scope="session")
def tiny_workspace(tiny_cohort, tmp_path_factory) -> Path:
    """A whole run of one unnamed ensemble on the tiny cohort (features, 2 members × 2 epochs, 2 methods scored,
    the report): for the report and notebook tests."""
    from engine.data.synth import FOCAL_TRUTH_LABELS, TRUTH_REGIONS
    from pipelines.runner import run_catalog

    folder = tmp_path_factory.mktemp("workspace")
    modalities = yaml.safe_load((REPO / "catalog.yaml").read_text())["modalities"]
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({
        "workspace": "ws", "cohort": {"directory": str(tiny_cohort)}, "modalities": modalities,
        "features": {"gray_matter": "GM", "lesions": "WMH"},
        "train": {"modalities": ["T1"], "members": 2, "epochs": 2, "batch_size": 4},
        "explain": {"methods": ["lrp", "gradient"], "truth": str(tiny_cohort / TRUTH_REGIONS),
                    "truth_labels": FOCAL_TRUTH_LABELS},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
        "report": {"age_bands": [40, 60], "top_k": 5},
    }))
    return run_catalog(catalog, quiet())


#: The demo's kinds of analysis over its two named ensembles (see ``demo_workspace``).
DEMO_ANALYSES = [
    {"name": "relevance_age", "outcome": "relevance.t1.lrp.normalised", "predictor": "age",
     "covariates": ["predictions.t1.predicted", "sex", "site"], "correction": ["fwe", "fdr_bh"],
     "permutations": 1000},
    {"name": "relevance_gm", "outcome": "relevance.t1.lrp.normalised", "predictor": "images.GM",
     "covariates": ["age", "sex", "site"]},
    {"name": "relevance_gmv_regions", "scope": "roi", "outcome": "relevance.t1.lrp.normalised",
     "predictor": "features.regional_gm_volume.volume_mm3", "covariates": ["age", "sex", "site"], "robust": True},
    {"name": "subcortical_volume", "scope": "roi", "statistic": "pearson", "outcome": "relevance.t1.lrp",
     "region_statistic": "sum", "labels": "APARC_ASEG", "predictor": "features.freesurfer.volume",
     "regions": {"include": ["subcortical_gray_matter", "*-Lateral-Ventricle"], "exclude": ["*-VentralDC"]},
     "correction": ["bonferroni", "fdr_bh", "fwe"], "permutations": 200},
    {"name": "cortical_thickness", "scope": "roi", "statistic": "pearson", "outcome": "relevance.t1.lrp",
     "region_statistic": "sum", "labels": "APARC_ASEG", "predictor": "features.freesurfer.aparc.thickness_mean",
     "correction": ["bonferroni", "fdr_bh"]},
    {"name": "lesions_gap", "scope": "subject", "outcome": "features.lesion_load.lesion_volume_mm3",
     "predictor": "predictions.flair.brain_age_gap", "covariates": ["age"]},
    {"name": "pvs_age", "scope": "subject", "outcome": "features.pvs_load.pvs_count", "predictor": "age"},
    {"name": "gm_age", "outcome": "images.GM", "predictor": "age", "covariates": ["sex", "site"],
     "correction": ["fwe", "fdr_bh"], "permutations": 1000},
    {"name": "relevance_gm_similarity", "scope": "similarity", "outcome": "relevance.t1.lrp", "predictor": "images.GM"},
    {"name": "flair_lrp_age", "scope": "roi", "statistic": "pearson", "outcome": "relevance.flair.lrp",
     "region_statistic": "sum", "predictor": "age"},
    {"name": "t1_lrp_age", "scope": "roi", "statistic": "pearson", "outcome": "relevance.t1.lrp",
     "region_statistic": "sum", "predictor": "age"},
    {"name": "tract_fa", "scope": "roi", "statistic": "pearson", "outcome": "relevance.t1.lrp",
     "atlas": {"name": "juelich"}, "predictor": "features.tract_fa.fa_mean", "regions": {"include": ["WM_*"]}},
    {"name": "relevance_fa", "outcome": "relevance.t1.lrp.normalised", "predictor": "images.FA",
     "covariates": ["age"], "within": {"name": "juelich"}, "regions": {"include": ["WM_*"]}},
]


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory) -> Path:
    """The demo catalog end to end on 16 participants at 8 mm: two named ensembles (t1: T1, 2 members, three
    methods for every participant; flair: FLAIR, 1 member, LRP for the test split), every kind of analysis, the
    report. Returns the folder with ``catalog.yaml`` and the workspace ``ws``; copy the folder to change it."""
    from pipelines.runner import run_catalog

    folder = tmp_path_factory.mktemp("demo")
    catalog = write_catalog(
        folder / "catalog.yaml", workspace="ws", cohort={"demo": {"subjects": 16, "voxel_size": 8.0, "seed": 3}},
        train={"modalities": ["T1"], "members": 2, "epochs": 2, "batch_size": 4,
               "split": {"fractions": [0.4, 0.2, 0.4]},  # enough test participants for lesions_gap
               "ensembles": {"t1": {}, "flair": {"modalities": ["FLAIR"], "members": 1}}},
        explain={"methods": ["lrp", "gradient", "region_occlusion"], "subjects": "all",
                 "ensembles": {"flair": {"methods": ["lrp"], "subjects": "test"}}},
        associate=DEMO_ANALYSES, cluster={"profile": "local", "n_workers": 2, "threads_per_worker": 1})
    run_catalog(catalog, quiet())
    return folder


@pytest.fixture(scope="session")
def small_reference(tmp_path_factory) -> Path:
    """The workspace of an undisturbed local run of ``tests.helpers.SMALL_RUN``: what a disturbed run (a killed
    worker, runner or SLURM job) must equal."""
    from pipelines.runner import run_catalog

    folder = tmp_path_factory.mktemp("reference")
    return run_catalog(write_small_catalog(folder / "catalog.yaml", "ws", {"profile": "local", "n_workers": 1}),
                       quiet())
