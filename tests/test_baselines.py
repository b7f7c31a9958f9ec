"""The streaming ridge baseline against scikit-learn's RidgeCV."""

import warnings

import numpy as np
import pytest
import xarray as xr
from dask.array.core import PerformanceWarning
from sklearn.linear_model import RidgeCV

from engine.models.baselines import ridge_baseline


@pytest.mark.parametrize("voxels", [300, 25])  # more voxels than subjects, and fewer
def test_ridge_baseline_equals_sklearn_ridgecv(voxels):
    rng = np.random.default_rng(voxels)
    n = 60
    x = rng.normal(size=(n, voxels)) + 3.0
    target = x[:, :5] @ rng.normal(size=5) + rng.normal(0, 0.5, n) + 40
    train = np.zeros(n, bool)
    train[rng.permutation(n)[:40]] = True
    maps = xr.DataArray(x.astype(np.float32), dims=("subject", "voxel")).chunk({"subject": 16, "voxel": 64})
    alphas = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    with warnings.catch_warnings():  # dask's rechunking warning is nothing a user can act on
        warnings.simplefilter("error", PerformanceWarning)
        ours = ridge_baseline(maps, target, train, alphas)
    reference = RidgeCV(alphas=alphas).fit(x.astype(np.float32).astype(np.float64)[train], target[train])
    assert ours.alpha == reference.alpha_
    assert ours.loo_mse[ours.alpha] == pytest.approx(-reference.best_score_, rel=1e-6)  # leave-one-out MSE
    expected = reference.predict(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(ours.predictions, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_ridge_baseline_refuses_bad_input():
    maps = xr.DataArray(np.ones((5, 4)), dims=("subject", "voxel"))
    with pytest.raises(ValueError, match="one value per subject"):
        ridge_baseline(maps, np.arange(4.0), np.ones(4, bool))
    with pytest.raises(ValueError, match="at least 3 training subjects"):
        ridge_baseline(maps, np.arange(5.0), np.array([True, True, False, False, False]))
