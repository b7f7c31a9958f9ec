"""Voxel-wise OLS by streaming FWL sums against statsmodels OLS per voxel (float64)."""

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import xarray as xr

from engine.stats import design_matrix, voxelwise_ols

N, V = 60, 25


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    covariates = pd.DataFrame({"age": rng.uniform(20, 80, N), "tiv": rng.normal(1500, 120, N),
                               "site": rng.choice(["A", "B", "C"], N), "sex": rng.choice(["F", "M"], N)})
    x = rng.normal(size=N) + 0.02 * covariates["age"].to_numpy()
    x_map = rng.normal(size=(N, V)) + x[:, None]
    y = (0.5 * x[:, None] + 0.01 * covariates["age"].to_numpy()[:, None] + rng.normal(size=(N, V))
         + (covariates["site"] == "B").to_numpy()[:, None])
    return covariates, x, x_map, y


def _reference(y, x, covariates):
    design = sm.add_constant(pd.concat([pd.Series(x, name="x"), covariates], axis=1), has_constant="add")
    return sm.OLS(y, design).fit()


def _maps(values):
    return xr.DataArray(values, dims=("subject", "voxel")).chunk({"subject": 16})


def test_map_outcome_on_a_subject_predictor_equals_statsmodels(data):
    covariates, x, _, y = data
    result = voxelwise_ols(_maps(y), x, covariates, categorical=["site", "sex"])
    design = design_matrix(covariates, ["site", "sex"]).drop(columns="intercept")
    for voxel in range(V):
        fit = _reference(y[:, voxel], x, design)
        assert result.beta[voxel] == pytest.approx(fit.params["x"], rel=1e-6)
        assert result.se[voxel] == pytest.approx(fit.bse["x"], rel=1e-6)
        assert result.t[voxel] == pytest.approx(fit.tvalues["x"], rel=1e-6)
        assert result.p[voxel] == pytest.approx(fit.pvalues["x"], rel=1e-6)
    assert result.attrs["n"] == N and result.attrs["df"] == N - design.shape[1] - 2


def test_voxelwise_predictor_map_equals_statsmodels_and_partial_r(data):
    covariates, _, x_map, y = data
    result = voxelwise_ols(_maps(y), _maps(x_map), covariates[["age", "tiv"]])
    for voxel in range(V):
        fit = _reference(y[:, voxel], x_map[:, voxel], covariates[["age", "tiv"]])
        assert result.t[voxel] == pytest.approx(fit.tvalues["x"], rel=1e-6)
        residual_y = sm.OLS(y[:, voxel], sm.add_constant(covariates[["age", "tiv"]])).fit().resid
        residual_x = sm.OLS(x_map[:, voxel], sm.add_constant(covariates[["age", "tiv"]])).fit().resid
        assert result.partial_r[voxel] == pytest.approx(np.corrcoef(residual_x, residual_y)[0, 1], rel=1e-6)


def test_missing_subjects_are_dropped_and_counted(data):
    covariates, x, _, y = data
    y = y.copy()
    y[3] = np.nan  # a missing map
    covariates = covariates.copy()
    covariates.loc[10, "age"] = np.nan
    result = voxelwise_ols(_maps(y), x, covariates[["age"]])
    keep = np.ones(N, bool)
    keep[[3, 10]] = False
    fit = _reference(y[keep, 0], x[keep], covariates.loc[keep, ["age"]].reset_index(drop=True))
    assert result.attrs["n"] == N - 2
    assert result.t[0] == pytest.approx(fit.tvalues["x"], rel=1e-6)


def test_bad_designs_are_refused(data):
    covariates, x, _, y = data
    collinear = covariates[["age"]].assign(age_again=covariates["age"] * 2)
    with pytest.raises(ValueError, match="rank-deficient"):
        voxelwise_ols(_maps(y), x, collinear)
    with pytest.raises(ValueError, match="needs more subjects"):
        voxelwise_ols(_maps(y[:4]), x[:4], covariates.iloc[:4], categorical=["site", "sex"])
    with pytest.raises(ValueError, match="'site'.*not numeric"):
        voxelwise_ols(_maps(y), x, covariates[["age", "site"]])
    with pytest.raises(ValueError, match="needs a \\(subject, voxel\\) map"):
        voxelwise_ols(x, x, covariates[["age"]])
