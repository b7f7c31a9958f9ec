"""Lesion filling: lesion voxels take intensities of the participant's own normal-appearing white matter, every
other voxel keeps its value bit for bit; as a derived modality of the store, kept current row by row."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from engine.data.lesion_filling import LesionFilling, derive_filled, fill_lesions
from engine.data.store import open_cohort
from tests.helpers import cli, write_catalog


def test_lesion_voxels_are_drawn_from_the_scans_own_normal_white_matter():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (3, 200)).astype(np.float32)
    image[1] += 500  # another participant's intensities: never drawn for the first
    lesions = np.zeros((3, 200), bool)
    lesions[0, :20] = lesions[1, 50:60] = True
    white_matter = np.zeros(200, bool)
    white_matter[10:120] = True  # lesions 10–19 of scan 0 lie inside it: not normal-appearing
    filled = fill_lesions(image, lesions, white_matter, ["sub-a", "sub-b", "sub-c"], seed=3)
    np.testing.assert_array_equal(filled[~lesions], image[~lesions])
    for row in range(3):
        normal = white_matter & ~lesions[row]
        assert np.isin(filled[row, lesions[row]], image[row, normal]).all()
    np.testing.assert_array_equal(filled[2], image[2])  # no lesions: untouched
    again = fill_lesions(image, lesions, white_matter, ["sub-a", "sub-b", "sub-c"], seed=3)
    np.testing.assert_array_equal(filled, again)  # seeded by the scan: a rerun fills alike
    with pytest.raises(ValueError, match="sub-a: no normal-appearing white matter"):
        fill_lesions(image, lesions, np.zeros(200, bool), ["sub-a", "sub-b", "sub-c"])


def test_a_filled_modality_is_derived_in_the_store_and_kept_current(tiny_cohort, tmp_path):
    catalog = write_catalog(
        tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"), cohort={"directory": str(tiny_cohort),
                                                                         "mask": "mask.nii.gz"},
        ingest={"fill_lesions": {"FLAIR_FILLED": {"image": "FLAIR", "lesions": "WMH"}}},
        features=None, train=None, explain=None, associate=None, report=None,
        cluster={"profile": "local", "n_workers": 1})
    result = cli("run", catalog)
    assert result.exit_code == 0, result.stderr + result.stdout
    store = tmp_path / "ws/images.zarr"
    images = open_cohort(store)
    flair, filled, lesions = (images[name].values for name in ("FLAIR", "FLAIR_FILLED", "WMH"))
    lesions = lesions >= 0.5
    assert lesions.any(axis=1).sum() >= 5
    np.testing.assert_array_equal(filled[~lesions], flair[~lesions])
    from engine.data.lesion_filling import _mni152_white_matter

    white_matter = _mni152_white_matter(str(store), 0.5)
    before, after = [], []  # lesion voxels in SDs of the scan's normal-appearing white matter
    for row in np.flatnonzero(lesions.any(axis=1)):
        normal = white_matter & ~lesions[row]
        assert np.isin(filled[row, lesions[row]], flair[row, normal]).all()
        centre, spread = flair[row, normal].mean(), flair[row, normal].std()
        before += list((flair[row, lesions[row]] - centre) / spread)
        after += list((filled[row, lesions[row]] - centre) / spread)
    assert np.mean(before) > 1 and abs(np.mean(after)) < 0.3  # bright FLAIR lesions, filled as white matter
    settings = LesionFilling(image="FLAIR", lesions="WMH")
    assert derive_filled(str(store), "FLAIR_FILLED", settings) == 0  # current: nothing recomputed
    assert derive_filled(str(store), "FLAIR_FILLED", settings.model_copy(update={"seed": 1})) == len(flair)
    shutil.copytree(store, tmp_path / "copy.zarr")
    with pytest.raises(ValueError, match=r"sources \['T2'\] are not in"):
        derive_filled(str(tmp_path / "copy.zarr"), "T2_FILLED", LesionFilling(image="T2", lesions="WMH"))
    assert "T2_FILLED" not in zarr.open_group(tmp_path / "copy.zarr", mode="r")


def test_a_filled_modality_must_name_modalities_and_a_new_name():
    from pipelines.catalog import CatalogError, load_catalog

    for fill, message in (({"FLAIR": {"image": "FLAIR", "lesions": "WMH"}}, "not one of the modalities"),
                          ({"FILLED": {"image": "T2", "lesions": "WMH"}}, "'T2' is not one of the modalities")):
        with pytest.raises(CatalogError, match=message):
            load_catalog(write_catalog(_path(), ingest={"fill_lesions": fill}))


def _path():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "catalog.yaml"
