"""Atlases on the cohort grid and region reductions, against numpy (float64) and nilearn."""

from __future__ import annotations

import dask.array as da
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from nilearn.maskers import NiftiLabelsMasker

from engine.analysis.atlas import (
    ParticipantLabels,
    cohort_atlas,
    load_atlas,
    region_gain,
    region_reduce,
    region_table,
    top_k_overlap,
    top_regions,
    without_hemisphere,
)
from engine.data.grid import Grid
from engine.data.labels import label_table
from engine.data.masker import Masker
from engine.data.store import open_cohort
from tests.helpers import HAND_AFFINE as AFFINE
from tests.helpers import HAND_GRID as GRID
from tests.helpers import HAND_SHAPE as SHAPE


def test_user_atlas_on_the_same_grid_is_exact(hand_atlas):
    labels, mask, folder = hand_atlas
    indices = np.nonzero(mask)
    atlas = load_atlas(str(folder / "labels.nii.gz"), GRID, indices, folder / "labels.tsv")
    np.testing.assert_array_equal(atlas.voxel_labels, labels[indices])
    assert atlas.region_names == ["Left_Hippocampus", "Right_Hippocampus", "Precentral_L", "Precentral_R", "Unused"]
    assert atlas.voxel_counts()["Unused"] == 0
    assert atlas.voxel_counts()["Precentral_L"] == np.sum(labels[indices] == 7)


@pytest.mark.parametrize("offset", [0.0, 5.0], ids=["signed", "non-negative"])
def test_region_reduce_equals_numpy_float64(hand_atlas, offset):
    labels, mask, folder = hand_atlas
    indices = np.nonzero(mask)
    atlas = load_atlas(str(folder / "labels.nii.gz"), GRID, indices, folder / "labels.tsv")
    rng = np.random.default_rng(2)
    values = (rng.normal(0, 1, (7, len(indices[0]))) + offset).astype(np.float32)
    data = xr.DataArray(da.from_array(values, chunks=(3, 11)), dims=("subject", "voxel"),
                        coords={"subject": [f"s{n}" for n in range(7)], "age": ("subject", np.arange(7.0))},
                        name="R")
    result = region_reduce(data, atlas)
    assert isinstance(result["sum"].data, da.Array)  # lazy until asked
    result = result.compute()
    for label, name in zip(atlas.regions.index, atlas.region_names, strict=True):
        inside = values[:, labels[indices] == label].astype(np.float64)
        np.testing.assert_allclose(result["sum"].sel(region=name), inside.sum(1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result["abs_sum"].sel(region=name), np.abs(inside).sum(1), rtol=1e-12)
        np.testing.assert_allclose(result["pos_sum"].sel(region=name), np.clip(inside, 0, None).sum(1), rtol=1e-12)
        assert int(result["count"].sel(region=name)) == inside.shape[1]
        if inside.shape[1]:
            np.testing.assert_allclose(result["mean"].sel(region=name), inside.mean(1), rtol=1e-12)
        else:
            assert result["mean"].sel(region=name).isnull().all()
    np.testing.assert_array_equal(result["age"], np.arange(7.0))
    table = region_table(result)
    assert list(table.columns) == ["participant_id", "region", "sum", "abs_sum", "pos_sum", "count", "mean"]
    assert len(table) == 7 * len(atlas.regions)
    row = table[(table.participant_id == "s3") & (table.region == "Precentral_R")].iloc[0]
    np.testing.assert_allclose(row["sum"], values[3, labels[indices] == 9].astype(np.float64).sum(), rtol=1e-12)


def test_merging_hemispheres_adds_up(hand_atlas):
    _, mask, folder = hand_atlas
    indices = np.nonzero(mask)
    separate = load_atlas(str(folder / "labels.nii.gz"), GRID, indices, folder / "labels.tsv")
    merged = load_atlas(str(folder / "labels.nii.gz"), GRID, indices, folder / "labels.tsv", merge_hemispheres=True)
    assert merged.region_names == ["Hippocampus", "Precentral", "Unused"]
    values = xr.DataArray(np.random.default_rng(3).normal(size=(4, len(indices[0]))), dims=("subject", "voxel"),
                          coords={"subject": list("abcd")})
    both, one = region_reduce(values, separate).compute(), region_reduce(values, merged).compute()
    np.testing.assert_allclose(one["sum"].sel(region="Hippocampus"),
                               both["sum"].sel(region=["Left_Hippocampus", "Right_Hippocampus"]).sum("region"))
    assert [without_hemisphere(name) for name in ("ctx-lh-cuneus", "Frontal_Sup_2_R", "WM_Callosal_body")] == [
        "ctx-cuneus", "Frontal_Sup_2", "WM_Callosal_body"]


def test_atlas_errors_are_clear(hand_atlas, tmp_path):
    _, mask, folder = hand_atlas
    indices = np.nonzero(mask)
    with pytest.raises(ValueError, match=r"unknown atlas 'brodmann'.*neuromorphometrics"):
        load_atlas("brodmann", GRID, indices)
    short = tmp_path / "short.csv"
    pd.DataFrame({"index": [3, 4], "name": ["a", "b"]}).to_csv(short, index=False)
    with pytest.raises(ValueError, match=r"labels \[7, 9\] that its label table does not name"):
        load_atlas(str(folder / "labels.nii.gz"), GRID, indices, short)
    with pytest.raises(ValueError, match="label table"):
        load_atlas(str(folder / "labels.nii.gz"), GRID, indices)
    native = Grid(SHAPE, AFFINE, "T1w")
    with pytest.raises(ValueError, match="atlas neuromorphometrics is in MNI152 space but the cohort is in T1w"):
        load_atlas("neuromorphometrics", native, indices)
    bad_table = tmp_path / "bad.tsv"
    bad_table.write_text("region\tcolour\nx\tred\n")
    with pytest.raises(ValueError, match="needs an integer label column"):
        load_atlas(str(folder / "labels.nii.gz"), GRID, indices, bad_table)


def test_bundled_atlases_match_nilearn_labels_masker(tiny_cohort, tiny_store):
    ds = open_cohort(tiny_store)
    atlas = cohort_atlas(ds, "neuromorphometrics")
    assert {"Left_Hippocampus", "Right_Thalamus_Proper"} <= set(atlas.region_names)
    result = region_reduce(ds.GM, atlas).compute()

    # nilearn: the same atlas put on the grid, averaged over the same mask, file by file
    label_image = Masker.of(ds).to_nifti(atlas.voxel_labels)
    masker = NiftiLabelsMasker(label_image, strategy="mean", standardize=None,
                               mask_img=nib.load(tiny_cohort / "mask.nii.gz")).fit()
    files = [tiny_cohort / f"derivatives/synth/{pid}/{pid}_label-GM_probseg.nii.gz" for pid in ds.subject.values]
    reference = masker.transform(files)
    present = [int(label) for key, label in masker.region_ids_.items() if key != "background"]
    ours = result["mean"].sel(region=atlas.regions.loc[present, "name"].to_list()).values
    np.testing.assert_allclose(ours, reference, rtol=1e-5)

    for name in ("harvard_oxford", "juelich", "aal", "desikan_killiany"):
        other = cohort_atlas(ds, name, merge_hemispheres=True)
        assert (other.voxel_labels > 0).sum() > 100 and other.voxel_counts().sum() > 100


def test_maximum_probability_labels_equal_numpy_argmax_with_ties_and_threshold():
    from engine.analysis.atlas import _maximum_probability

    rng = np.random.default_rng(2)
    probabilities = rng.integers(0, 40, (6, 5, 4, 7)).astype(np.uint8)
    probabilities[0, 0, 0] = [30, 30, 5, 30, 0, 0, 0]  # a tie: the first volume wins
    table = pd.DataFrame({"name": [f"r{n}" for n in range(7)]})
    image, relabelled = _maximum_probability(nib.Nifti1Image(probabilities, np.eye(4)), table, threshold=25)
    expected = np.where(probabilities.max(axis=3) >= 25, probabilities.argmax(axis=3) + 1, 0)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected)
    assert np.asanyarray(image.dataobj)[0, 0, 0] == 1 and list(relabelled.index) == list(range(1, 8))


def test_gain_and_top_k_helpers_by_hand():
    sums = xr.DataArray([[1.0, 4.0, 2.0], [3.0, 2.0, 2.0], [2.0, 0.0, 1.0], [2.0, 2.0, 3.0]],
                        dims=("subject", "region"), coords={"subject": list("abcd"), "region": ["x", "y", "z"]})
    patients = xr.DataArray([True, True, False, False], dims="subject")
    gain = region_gain(sums, patients, ~patients)
    np.testing.assert_allclose(gain.values, [2.0 / 2.0, 3.0 / 1.0, 2.0 / 2.0])
    assert list(top_regions(sums.isel(subject=0), 2).values) == ["y", "z"]
    per_subject = top_regions(sums, 1)
    assert per_subject.dims == ("subject", "rank") and list(per_subject.values[:, 0]) == ["y", "x", "x", "z"]
    assert top_k_overlap(["x", "y"], ["y", "z"]) == 0.5
    with pytest.raises(ValueError):
        top_k_overlap(["x"], ["x", "y"])


def test_each_participants_own_labels_reduce_like_numpy_float64():
    """Per-participant parcels (FreeSurfer numbers, other chunks and subject order than the maps, one label the
    table lacks) give every statistic of numpy in float64; a participant without labels is named."""
    rng = np.random.default_rng(4)
    table = label_table("freesurfer")
    n_subjects, n_voxels = 9, 500
    values = rng.normal(0.3, 1.0, (n_subjects, n_voxels)).astype(np.float32)
    labels = rng.choice([0, 17, 53, 1028, 2035, 9999], size=(n_subjects + 2, n_voxels)).astype(np.int16)
    label_subjects = [f"s{n}" for n in reversed(range(n_subjects + 2))]  # more participants, another order
    parcels = ParticipantLabels("aparc+aseg", xr.DataArray(
        da.from_array(labels, chunks=(5, 200)), dims=("subject", "voxel"), coords={"subject": label_subjects}), table)
    data = xr.DataArray(da.from_array(values, chunks=(4, 130)), dims=("subject", "voxel"),
                        coords={"subject": [f"s{n}" for n in range(n_subjects)]}, name="R")
    result = region_reduce(data, parcels)
    assert isinstance(result["sum"].data, da.Array)
    result = result.compute()
    assert result.sizes["region"] == len(table)
    for subject in range(n_subjects):
        own = labels[label_subjects.index(f"s{subject}")]
        for label in (17, 53, 1028, 2035, 1001):
            name = table.loc[label, "name"]
            inside = values[subject, own == label].astype(np.float64)
            cell = result.sel(subject=f"s{subject}", region=name)
            np.testing.assert_allclose(cell["sum"], inside.sum(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(cell["abs_sum"], np.abs(inside).sum(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(cell["pos_sum"], np.clip(inside, 0, None).sum(), rtol=1e-12, atol=1e-12)
            assert int(cell["count"]) == inside.size
            if inside.size:
                np.testing.assert_allclose(cell["mean"], inside.mean(), rtol=1e-12)
            else:
                assert np.isnan(cell["mean"])
    missing = data.assign_coords(subject=[f"s{n}" for n in range(n_subjects - 1)] + ["sub-x"])
    with pytest.raises(ValueError, match=r"labels aparc\+aseg: no label volume for participant\(s\) \['sub-x'\]"):
        region_reduce(missing, parcels)


def test_fsaverage5_vertices_carry_their_hemispheres_desikan_killiany_labels():
    from nilearn import datasets

    from engine.analysis.atlas import fsaverage_labels

    mesh = datasets.load_fsaverage("fsaverage5")
    table = label_table("freesurfer")
    for hemisphere, prefix in (("left", "ctx-lh-"), ("right", "ctx-rh-")):
        labels = fsaverage_labels()[hemisphere]
        assert labels.shape == (mesh.inflated.parts[hemisphere].n_vertices,)
        names = set(table.loc[np.unique(labels), "name"])
        assert all(name.startswith(prefix) for name in names) and len(names) == 34  # DK's 34 regions, no others


@pytest.fixture(scope="module")
def jhu_installed():
    """Debian's mricron-data (the JHU white-matter labels), installed with apt when missing and we are root."""
    from engine.analysis.atlas import system_atlas_installed
    from tests.debian import apt_install

    if not system_atlas_installed("jhu"):
        problem = apt_install(("mricron-data",))
        if problem or not system_atlas_installed("jhu"):
            pytest.skip(problem or "mricron-data installed without the JHU labels")


def test_jhu_tracts_come_from_mricron_data_as_nilearn_resamples_them(jhu_installed):
    from nilearn.image import resample_to_img

    from engine.analysis.atlas import SYSTEM_ATLASES, tract_atlas
    from engine.data.grid import mni_grid

    grid = mni_grid(4.0)
    indices = np.nonzero(np.ones(grid.shape, bool))
    atlas = load_atlas("jhu", grid, indices)
    image = nib.load(SYSTEM_ATLASES["jhu"][0])
    expected = resample_to_img(image, nib.Nifti1Image(np.zeros(grid.shape, np.uint8), grid.affine),
                               interpolation="nearest", force_resample=True, copy_header=True)
    np.testing.assert_array_equal(atlas.voxel_labels, np.asanyarray(expected.dataobj)[indices])
    assert len(atlas.regions) == 48 and atlas.regions.loc[3, "name"] == "Genu_of_corpus_callosum"
    assert {"Corticospinal_tract_L", "Corticospinal_tract_R"} <= set(atlas.region_names)
    assert tract_atlas().name == "jhu"  # the FA tracts' default where mricron-data is installed


def test_a_missing_debian_atlas_names_its_package(tmp_path, monkeypatch):
    from engine.analysis import atlas as atlas_module
    from engine.data.grid import mni_grid

    monkeypatch.setitem(atlas_module.SYSTEM_ATLASES, "jhu", (tmp_path / "JHU.nii.gz", tmp_path / "JHU.txt",
                                                             "mricron-data"))
    atlas_module._system_label_image.cache_clear()
    grid = mni_grid(8.0)
    with pytest.raises(FileNotFoundError, match=r"comes with Debian's mricron-data package.*apt-get install"):
        load_atlas("jhu", grid, np.nonzero(np.ones(grid.shape, bool)))
    assert atlas_module.tract_atlas().name == "juelich"
    atlas_module._system_label_image.cache_clear()
