import numpy as np
import pytest

from engine.data.grid import Grid, mni_grid


def test_mni_grid_matches_fsl_standard_spaces():
    # FSL's MNI152_T1_2mm: 91×109×91, voxel (45, 63, 36) is the origin (0, 0, 0) mm.
    two = mni_grid(2.0)
    assert two.shape == (91, 109, 91)
    np.testing.assert_allclose(two.world_coordinates(np.array([[45, 63, 36]])), [[0, 0, 0]])
    assert mni_grid(4.0).shape == (46, 55, 46)
    assert mni_grid(1.0).shape == (181, 217, 181)
    assert two.voxel_volume == pytest.approx(8.0)


def test_grid_round_trips_through_attributes_and_matches():
    grid = mni_grid(3.0)
    again = Grid.from_attrs(grid.to_attrs())
    assert again == grid
    assert again != mni_grid(4.0)
    assert grid.matches(grid.shape, grid.affine + 1e-6)
    assert not grid.matches(grid.shape, grid.affine + np.eye(4) * 0.1)
    assert not grid.matches((1, 2, 3), grid.affine)


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        mni_grid(0)
    with pytest.raises(ValueError, match="3D shape"):
        Grid((2, 2), np.eye(4))
