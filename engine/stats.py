"""Voxel-wise linear models as streaming reductions over subjects (Frisch–Waugh–Lovell).

Per voxel v: ``outcome_v = β0 + β·predictor(_v) + γ·C + ε``, where the outcome and the
predictor are each either one value per subject or a (``subject`` × ``voxel``) map, and ``C``
are per-subject covariates (numeric, or categorical and dummy-coded). With FWL, β and its
standard error follow from sums over subjects — ``CᵀY``, ``CᵀX``, ``ΣXY``, ``ΣX²``, ``ΣY²`` —
that one pass over the maps' subject blocks accumulates, so the cohort is never in memory at
once and memory stays flat in N.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats


def design_matrix(covariates: pd.DataFrame, categorical: Sequence[str] = ()) -> pd.DataFrame:
    """Intercept, numeric covariates, and dummy codes (first level dropped) of ``categorical`` ones."""
    unknown = sorted(set(categorical) - set(covariates.columns))
    if unknown:
        raise ValueError(f"categorical covariate(s) {unknown} are not columns of the covariates {list(covariates)}")
    numeric = covariates.drop(columns=list(categorical))
    bad = [column for column in numeric if not pd.api.types.is_numeric_dtype(numeric[column])]
    if bad:
        raise ValueError(f"covariate(s) {bad} are not numeric: list them as categorical")
    parts = [pd.Series(1.0, index=covariates.index, name="intercept"), numeric.astype(float)]
    if categorical:
        parts.append(pd.get_dummies(covariates[list(categorical)].astype("category"), drop_first=True, dtype=float))
    return pd.concat(parts, axis=1)


def _as_matrix(term: xr.DataArray | np.ndarray | pd.Series, n: int, name: str):
    """A (subject, voxel) dask/numpy matrix or a (subject,) vector, float64."""
    if isinstance(term, xr.DataArray):
        if term.dims == ("subject", "voxel"):
            return term.data.astype(np.float64), True
        if term.dims == ("subject",):
            return np.asarray(term.values, np.float64), False
        raise ValueError(f"{name} must have dims ('subject', 'voxel') or ('subject',), got {term.dims}")
    values = np.asarray(term, np.float64)
    if values.shape != (n,):
        raise ValueError(f"{name} must have one value per subject ({n}), got shape {values.shape}")
    return values, False


def voxelwise_ols(outcome, predictor, covariates: pd.DataFrame | None = None,
                  categorical: Sequence[str] = ()) -> xr.Dataset:
    """Per voxel: β, SE, t, two-sided p and partial r of ``predictor`` on ``outcome`` given covariates.

    ``outcome`` and ``predictor`` are DataArrays with dims (``subject``, ``voxel``) or
    (``subject``,), or per-subject arrays; at least one is a map. ``covariates`` has one row per
    subject (same order). Subjects with a missing value anywhere (a missing map row, a missing
    covariate) are dropped; ``n`` reports how many were used. A rank-deficient design or
    ``n ≤`` number of parameters is an error.
    """
    maps = [term for term in (outcome, predictor) if isinstance(term, xr.DataArray) and "voxel" in term.dims]
    if not maps:
        raise ValueError("voxelwise_ols needs a (subject, voxel) map as outcome or predictor")
    reference = maps[0]
    n_subjects = reference.sizes["subject"]
    covariates = pd.DataFrame(index=range(n_subjects)) if covariates is None else covariates.reset_index(drop=True)
    if len(covariates) != n_subjects:
        raise ValueError(f"covariates have {len(covariates)} rows for {n_subjects} subjects")
    y, y_map = _as_matrix(outcome, n_subjects, "outcome")
    x, x_map = _as_matrix(predictor, n_subjects, "predictor")

    keep = covariates.notna().all(axis=1).to_numpy().copy()
    for values, is_map in ((y, y_map), (x, x_map)):
        keep &= ~np.isnan(values) if not is_map else ~_missing_rows(values)
    design = design_matrix(covariates[keep], categorical).to_numpy()
    n, p = design.shape[0], design.shape[1] + 1
    if n <= p:
        raise ValueError(f"{n} subjects with complete data for {p} parameters: the model needs more subjects")
    if np.linalg.matrix_rank(design) < design.shape[1]:
        names = list(design_matrix(covariates[keep], categorical).columns)
        raise ValueError(f"the covariate design is rank-deficient (columns {names})")
    rows = np.flatnonzero(keep)
    y, x = (values[rows] for values in (y, x))
    gram_inverse = np.linalg.inv(design.T @ design)

    # one pass over the subject blocks: every cross-product the FWL solution needs
    n_voxels = reference.sizes["voxel"]
    x2, y2 = (values if values.ndim == 2 else values[:, None] for values in (x, y))
    sums = da.compute(design.T @ x2, design.T @ y2, (x2 * y2).sum(axis=0), (x2 * x2).sum(axis=0),
                      (y2 * y2).sum(axis=0))
    cx, cy, xy, xx, yy = (np.broadcast_to(np.asarray(value, np.float64), shape)
                          for value, shape in zip(sums, [(design.shape[1], n_voxels)] * 2 + [(n_voxels,)] * 3,
                                                  strict=True))

    def residual(cross, c_first, c_second):  # Σ r_a r_b = Σ ab − (Cᵀa)ᵀ (CᵀC)⁻¹ (Cᵀb)
        return cross - np.einsum("pv,pq,qv->v", c_first, gram_inverse, c_second)

    sxy, sxx, syy = residual(xy, cx, cy), residual(xx, cx, cx), residual(yy, cy, cy)
    df = n - p
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = sxy / sxx
        se = np.sqrt(np.maximum(syy - beta * sxy, 0) / df / sxx)
        t = beta / se
        partial_r = sxy / np.sqrt(sxx * syy)
    voxel_coords = {name: coord for name, coord in reference.coords.items() if coord.dims == ("voxel",)}
    result = xr.Dataset({"beta": ("voxel", beta), "se": ("voxel", se), "t": ("voxel", t),
                         "p": ("voxel", 2 * stats.t.sf(np.abs(t), df)), "partial_r": ("voxel", partial_r)},
                        coords=voxel_coords)
    result.attrs.update(n=int(n), df=int(df))
    if "grid" in reference.attrs:  # every map turns back into a NIfTI image (engine.store.to_volume)
        for name in result.data_vars:
            result[name].attrs["grid"] = reference.attrs["grid"]
    return result


def _missing_rows(values) -> np.ndarray:
    """Subjects whose map row has any NaN (a missing map), computed in one pass."""
    missing = da.isnan(values).any(axis=1) if isinstance(values, da.Array) else np.isnan(values).any(axis=1)
    return np.asarray(missing.compute() if isinstance(missing, da.Array) else missing)
