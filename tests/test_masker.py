"""The masker against nilearn's NiftiMasker, and its bounding box against world coordinates."""

import nibabel as nib
import numpy as np
import pytest
import xarray as xr

from engine.data.grid import mni_grid
from engine.data.masker import Masker


@pytest.fixture
def cohort():
    """A random mask on the 8 mm MNI grid, its masker and a (subject, voxel) store-like array."""
    rng = np.random.default_rng(3)
    grid = mni_grid(8.0)
    mask = np.zeros(grid.shape, bool)
    mask[3:19, 4:22, 2:17] = rng.random((16, 18, 15)) > 0.3
    indices = np.argwhere(mask)  # C order, as ingest stores the voxels
    masker = Masker(grid, tuple(indices.T))
    rows = xr.DataArray(rng.normal(size=(4, len(indices))).astype(np.float32), dims=("subject", "voxel"),
                        coords={"i": ("voxel", indices[:, 0]), "j": ("voxel", indices[:, 1]),
                                "k": ("voxel", indices[:, 2])}, attrs={"grid": grid.to_attrs()})
    return grid, mask, masker, rows


def test_rows_and_images_round_trip_like_nilearns_masker(cohort):
    from nilearn.maskers import NiftiMasker

    grid, mask, masker, rows = cohort
    mask_image = nib.Nifti1Image(mask.astype(np.uint8), grid.affine)
    reference = NiftiMasker(mask_image, standardize=None).fit()
    image = masker.to_nifti(rows.isel(subject=1))
    np.testing.assert_array_equal(np.ravel(reference.transform(image)), rows.values[1])
    np.testing.assert_array_equal(image.get_fdata(), reference.inverse_transform(rows.values[1]).get_fdata())
    assert np.array_equal(image.affine, grid.affine) and image.header.get_sform(coded=True)[1] == 4
    np.testing.assert_array_equal(np.asanyarray(masker.mask_image().dataobj), mask)
    volumes = masker.inverse_transform(rows.values)
    assert volumes.shape == (4, *grid.shape) and not volumes[:, ~mask].any()
    np.testing.assert_array_equal(masker.transform(volumes), rows.values)


def test_reductions_turn_into_images_without_their_attributes(cohort):
    _, _, masker, rows = cohort
    mean = rows.mean("subject").drop_attrs()  # as many xarray operations do: the masker holds the grid
    assert Masker.of(rows) is not None and Masker.of(rows).grid == masker.grid
    np.testing.assert_allclose(masker.to_nifti(mean).get_fdata()[masker.indices], rows.values.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="no voxel grid"):
        Masker.of(mean)
    with pytest.raises(ValueError, match="select or reduce"):
        masker.to_nifti(rows)
    with pytest.raises(ValueError, match="another store"):
        masker.to_nifti(mean.assign_coords(i=("voxel", np.roll(mean.i.values, 1))))
    with pytest.raises(ValueError, match="voxels"):
        masker.to_nifti(np.zeros(len(masker) - 1))
    assert masker.to_nifti(mean > 0).get_data_dtype() == np.float32


def test_the_bounding_box_keeps_every_voxels_world_position(cohort):
    grid, mask, masker, rows = cohort
    box = masker.box()
    lower, upper = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
    assert box.grid.shape == tuple(upper - lower + 1) and len(box) == len(masker)
    np.testing.assert_allclose(box.grid.world_coordinates(np.stack(box.indices, 1)),
                               grid.world_coordinates(np.stack(masker.indices, 1)))
    volumes = box.inverse_transform(rows.values)
    assert volumes.shape == (4, *box.grid.shape)
    np.testing.assert_array_equal(box.transform(volumes), rows.values)
