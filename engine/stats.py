"""Voxel-wise linear models as streaming reductions over subjects (Frisch–Waugh–Lovell).

Per voxel v: ``outcome_v = β0 + β·predictor(_v) + γ·C + ε``, where the outcome and the
predictor are each either one value per subject or a (``subject`` × ``voxel``) map, and ``C``
are per-subject covariates (numeric, or categorical and dummy-coded). With FWL, β and its
standard error follow from sums over subjects — ``CᵀY``, ``CᵀX``, ``ΣXY``, ``ΣX²``, ``ΣY²`` —
that one pass over the maps' subject blocks accumulates, so the cohort is never in memory at
once and memory stays flat in N.

Family-wise error by permutation max-T follows Freedman & Lane (1983) as FSL randomise and
nilearn's ``permuted_ols`` do: the outcome's residuals given the covariates are permuted, and a
batch of permutations is one matrix product of permuted design rows with the residual maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats
from statsmodels.stats.multitest import multipletests

from engine.store import cohort_grid

#: Multiple-comparison corrections of voxel-wise p-values (``fwe`` is permutation max-T).
CORRECTIONS = ("bonferroni", "fdr_bh", "fwe")


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


@dataclass
class _Model:
    """A voxel-wise model after its one pass: the design, residual sums and what permutations need."""

    y: np.ndarray | da.Array
    x: np.ndarray | da.Array
    design: np.ndarray
    gram_inverse: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    sxy: np.ndarray
    sxx: np.ndarray
    syy: np.ndarray

    @property
    def n(self) -> int:
        return self.design.shape[0]

    @property
    def df(self) -> int:
        return self.n - self.design.shape[1] - 1

    def residual(self, values, cross):
        """``values`` minus their fit on the covariates, given ``cross`` = Cᵀ·values."""
        coefficients = self.gram_inverse @ cross
        if isinstance(values, da.Array):
            design = da.from_array(self.design, chunks=(values.chunks[0], -1))
            return values - design @ coefficients
        return values - self.design @ coefficients[:, 0] if values.ndim == 1 else values - self.design @ coefficients


def _fit(outcome, predictor, covariates, categorical) -> tuple[_Model, xr.DataArray]:
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
    design_frame = design_matrix(covariates[keep], categorical)
    design = design_frame.to_numpy()
    n, p = design.shape[0], design.shape[1] + 1
    if n <= p:
        raise ValueError(f"{n} subjects with complete data for {p} parameters: the model needs more subjects")
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(f"the covariate design is rank-deficient (columns {list(design_frame.columns)})")
    rows = np.flatnonzero(keep)
    y, x = (values[rows] for values in (y, x))
    gram_inverse = np.linalg.inv(design.T @ design)

    # one pass over the subject blocks: every cross-product the FWL solution needs
    n_voxels = reference.sizes["voxel"]
    x2, y2 = (values if values.ndim == 2 else values[:, None] for values in (x, y))
    sums = da.compute(design.T @ x2, design.T @ y2, (x2 * y2).sum(axis=0), (x2 * x2).sum(axis=0),
                      (y2 * y2).sum(axis=0))
    cx, cy = (np.asarray(value, np.float64) for value in sums[:2])
    xy, xx, yy = (np.broadcast_to(np.asarray(value, np.float64), (n_voxels,)) for value in sums[2:])

    def residual(cross, c_first, c_second):  # Σ r_a r_b = Σ ab − (Cᵀa)ᵀ (CᵀC)⁻¹ (Cᵀb)
        return cross - np.einsum("pv,pq,qv->v", c_first, gram_inverse, c_second)

    sxy = residual(xy, *np.broadcast_arrays(cx, cy))
    sxx = residual(xx, cx, cx) if x_map else np.broadcast_to(residual(xx, cx, cx), (n_voxels,))
    syy = residual(yy, cy, cy) if y_map else np.broadcast_to(residual(yy, cy, cy), (n_voxels,))
    return _Model(y, x, design, gram_inverse, cx, cy, sxy, sxx, syy), reference


def voxelwise_ols(outcome, predictor, covariates: pd.DataFrame | None = None, categorical: Sequence[str] = (),
                  permutations: int = 0, seed: int = 0, permutation_batch: int = 64) -> xr.Dataset:
    """Per voxel: β, SE, t, two-sided p and partial r of ``predictor`` on ``outcome`` given covariates.

    ``outcome`` and ``predictor`` are DataArrays with dims (``subject``, ``voxel``) or
    (``subject``,), or per-subject arrays; at least one is a map. ``covariates`` has one row per
    subject (same order). Subjects with a missing value anywhere (a missing map row, a missing
    covariate) are dropped; ``n`` reports how many were used. A rank-deficient design or
    ``n ≤`` number of parameters is an error.

    With ``permutations`` > 0, also ``p_fwe`` (two-sided max-T, Freedman–Lane) and the null
    distribution ``max_t_null``; permutation k depends on (``seed``, k) only, so results do not
    depend on the batch size or the number of workers.
    """
    model, reference = _fit(outcome, predictor, covariates, categorical)
    df = model.df
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = model.sxy / model.sxx
        se = np.sqrt(np.maximum(model.syy - beta * model.sxy, 0) / df / model.sxx)
        t = beta / se
        partial_r = model.sxy / np.sqrt(model.sxx * model.syy)
    voxel_coords = {name: coord for name, coord in reference.coords.items() if coord.dims == ("voxel",)}
    result = xr.Dataset({"beta": ("voxel", beta), "se": ("voxel", se), "t": ("voxel", t),
                         "p": ("voxel", 2 * stats.t.sf(np.abs(t), df)), "partial_r": ("voxel", partial_r)},
                        coords=voxel_coords)
    result.attrs.update(n=int(model.n), df=int(df))
    if permutations:
        null = max_t_null(model, permutations, seed, permutation_batch)
        exceed = np.searchsorted(np.sort(null), np.abs(t), side="left")
        result["p_fwe"] = ("voxel", np.where(np.isnan(t), np.nan, (1 + permutations - exceed) / (1 + permutations)))
        result["max_t_null"] = ("permutation", null)
        result.attrs.update(permutations=int(permutations), seed=int(seed))
    if {"grid", "grid_shape"} & set(reference.attrs):  # every map turns back into a NIfTI image (store.to_volume)
        grid = cohort_grid(reference).to_attrs()
        for name in result.data_vars:
            if result[name].dims == ("voxel",):
                result[name].attrs["grid"] = grid
    return result


def _missing_rows(values) -> np.ndarray:
    """Subjects whose map row has any NaN (a missing map), computed in one pass."""
    missing = da.isnan(values).any(axis=1) if isinstance(values, da.Array) else np.isnan(values).any(axis=1)
    return np.asarray(missing.compute() if isinstance(missing, da.Array) else missing)


def permutation(seed: int, index: int, n: int) -> np.ndarray:
    """Permutation number ``index`` of ``n`` subjects under ``seed`` (independent of batching)."""
    return np.random.default_rng([seed, index]).permutation(n)


def _max_abs_t(a, c2, syy, df):
    """max over voxels of |t| for each permutation: a (B × v), c2 (B × v or B × 1), syy (v)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = a * np.sqrt(df / (syy - c2 - a * a))
    return np.nanmax(np.abs(t), axis=1, initial=0.0)


def _as_dask(values, like) -> da.Array:
    return da.from_array(values, chunks=(like.chunks[0], -1))


def max_t_null(model: _Model, permutations: int, seed: int, batch: int = 64) -> np.ndarray:
    """Largest |t| over voxels for each of ``permutations`` Freedman–Lane permutations.

    The outcome's covariate residuals are permuted (Y* = Ŷ_C + P·R_Y); for a unit-norm
    residual predictor u and an orthonormal covariate basis Q, the permuted t is
    ``a·√(df / (‖R_Y‖² − ‖c‖² − a²))`` with ``a = uᵀP·R_Y`` and ``c = QᵀP·R_Y``. A batch of
    permutations is one product of permuted design rows with the residual maps, summed over
    subject blocks; batches are Dask tasks spread over the workers.
    """
    y_map, x_map = (isinstance(values, da.Array) or values.ndim == 2 for values in (model.y, model.x))
    basis = np.linalg.qr(model.design)[0]
    df, n = model.df, model.n
    batches = [range(start, min(start + batch, permutations)) for start in range(0, permutations, batch)]
    if y_map and not x_map:
        residual_maps = _persist_small(_as_dask_array(model.residual(model.y, model.cy)), _LARGE_BLOCKS)
        r_x = model.residual(model.x, model.cx)
        unit = r_x / np.sqrt(r_x @ r_x)
        syy = da.from_array(model.syy, chunks=(residual_maps.chunks[1],))
        width = basis.shape[1] + 1
        results = []
        for indices in batches:
            rows = [np.column_stack([unit[order], basis[order]]) for order in _orders(seed, indices, n)]
            products = _as_dask(np.concatenate(rows, axis=1), residual_maps).T @ residual_maps
            results.append(da.map_blocks(_batch_design_side, products, syy[None, :], width=width, df=df,
                                         chunks=((len(indices),), (1,) * products.numblocks[1]), dtype=float))
    elif x_map and not y_map:
        residual_maps = _persist_small(_as_dask_array(model.residual(model.x, model.cx)), _LARGE_BLOCKS)
        r_y = model.residual(model.y, model.cy)
        scale = da.from_array(1 / np.sqrt(model.sxx), chunks=(residual_maps.chunks[1],))
        results = []
        for indices in batches:
            permuted = np.column_stack([r_y[order] for order in _orders(seed, indices, n)])
            c2 = ((basis.T @ permuted) ** 2).sum(axis=0)[:, None]
            products = _as_dask(permuted, residual_maps).T @ residual_maps
            results.append(da.map_blocks(_batch_outcome_side, products, scale[None, :], c2=c2, syy=model.syy[0],
                                         df=df, chunks=((len(indices),), (1,) * products.numblocks[1]), dtype=float))
    else:
        results = _map_map_batches(model, basis, batches, seed)
    return np.concatenate([values.max(axis=1) for values in dask.compute(*results)])


def _orders(seed, indices, n):
    return [permutation(seed, index, n) for index in indices]


def _as_dask_array(values) -> da.Array:
    return values if isinstance(values, da.Array) else da.from_array(values, chunks=(-1, -1))


_LARGE_BLOCKS = 2**26  # bytes of float64 per block of residual maps: fewer, larger products


def _persist_small(values: da.Array, block_bytes: int, full_subjects: bool = False,
                   limit_bytes: float = 2**30) -> da.Array:
    """Rechunk residual maps into ~``block_bytes`` blocks (whole subject blocks, or every subject of a
    voxel block) and keep them in (cluster) memory when they are small, else recompute per batch."""
    if full_subjects:
        values = values.rechunk((-1, max(1, min(values.shape[1], block_bytes // (8 * values.shape[0])))))
    else:
        subjects = max(1, block_bytes // (8 * values.shape[1]))
        values = values.rechunk({0: min(values.shape[0], max(subjects, values.chunks[0][0]))})
    return values.persist() if values.nbytes <= limit_bytes else values


def _batch_design_side(products, syy, width, df):
    products = products.reshape(-1, width, products.shape[-1])
    a = products[:, 0]
    c2 = (products[:, 1:] ** 2).sum(axis=1)
    return _max_abs_t(a, c2, syy, df)[:, None]


def _batch_outcome_side(products, scale, c2, syy, df):
    return _max_abs_t(products * scale, c2, syy, df)[:, None]


def _map_map_batches(model: _Model, basis, batches, seed):
    """Both terms are maps: each task holds every subject of a voxel block (memory n × block)."""
    n = model.n
    residual_y, residual_x = (_persist_small(_as_dask_array(model.residual(values, cross)), 2**25, full_subjects=True)
                              for values, cross in ((model.y, model.cy), (model.x, model.cx)))
    sxx = da.from_array(model.sxx, chunks=(residual_y.chunks[1],))[None, :]
    syy = da.from_array(model.syy, chunks=(residual_y.chunks[1],))[None, :]
    return [da.map_blocks(_batch_map_map, residual_x, residual_y, sxx, syy, basis=basis,
                          orders=np.stack(_orders(seed, indices, n)), df=model.df,
                          chunks=((len(indices),), (1,) * residual_y.numblocks[1]), dtype=float)
            for indices in batches]


def _batch_map_map(residual_x, residual_y, sxx, syy, basis, orders, df):
    maxima = np.empty(len(orders))
    with np.errstate(divide="ignore"):
        scale = 1 / np.sqrt(sxx[0])  # a voxel whose predictor is constant has no t
    for row, order in enumerate(orders):  # Σ_i r_x[σ(i)] r_y[i] pairs each subject's maps anew
        with np.errstate(invalid="ignore"):
            a = (residual_x[order] * residual_y).sum(axis=0) * scale
        c2 = ((basis[order].T @ residual_y) ** 2).sum(axis=0)
        maxima[row] = _max_abs_t(a[None], c2[None], syy[0], df)[0]
    return maxima[:, None]


def adjust_p(p: np.ndarray | xr.DataArray, method: str):
    """Bonferroni or Benjamini–Hochberg adjusted p-values (statsmodels); NaN stays NaN."""
    if method not in ("bonferroni", "fdr_bh"):
        raise ValueError(f"unknown correction {method!r}: use 'bonferroni' or 'fdr_bh'")
    values = np.asarray(p, np.float64)
    adjusted = np.full_like(values, np.nan)
    finite = np.isfinite(values)
    if finite.any():
        adjusted[finite] = multipletests(values[finite], method=method)[1]
    return p.copy(data=adjusted) if isinstance(p, xr.DataArray) else adjusted


def map_similarity(first: xr.DataArray, second: xr.DataArray, mask: np.ndarray | None = None) -> pd.DataFrame:
    """Per subject: Pearson r and cosine similarity of two (``subject`` × ``voxel``) maps inside ``mask``.

    One lazy pass of five sums per subject; voxels where either map is NaN are left out.
    """
    for name, values in (("first", first), ("second", second)):
        if values.dims != ("subject", "voxel"):
            raise ValueError(f"map_similarity: {name} map needs dims ('subject', 'voxel'), got {values.dims}")
    if first.shape != second.shape:
        raise ValueError(f"map_similarity: maps differ in shape, {first.shape} and {second.shape}")
    a, b = (values.data if isinstance(values.data, da.Array) else da.from_array(values.values)
            for values in (first, second))
    a, b = a.astype(np.float64), b.astype(np.float64)
    keep = ~(da.isnan(a) | da.isnan(b))
    if mask is not None:
        keep = keep & da.from_array(np.asarray(mask, bool)[None, :], chunks=(1, a.chunks[1]))
    a, b = da.where(keep, a, 0), da.where(keep, b, 0)
    count, sa, sb, sab, saa, sbb = da.compute(keep.sum(axis=1), a.sum(axis=1), b.sum(axis=1), (a * b).sum(axis=1),
                                              (a * a).sum(axis=1), (b * b).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        covariance = sab - sa * sb / count
        pearson = covariance / np.sqrt((saa - sa**2 / count) * (sbb - sb**2 / count))
        cosine = sab / np.sqrt(saa * sbb)
    return pd.DataFrame({"participant_id": first["subject"].values, "pearson_r": pearson, "cosine": cosine,
                         "voxels": count})


def region_models(table: pd.DataFrame, formula: str, robust: bool = False, groups: str | None = None,
                  region: str = "region") -> pd.DataFrame:
    """Per region: a statsmodels formula fit on that region's rows, FDR across regions per term.

    ``table`` is long: one row per participant and region, with the region-level columns and the
    per-subject covariates the formula names. OLS by default, HC3 standard errors with
    ``robust``, or a linear mixed model with a random intercept per ``groups`` (e.g. site).
    Rows with a missing value are dropped per region and ``n`` reports the rows used; regions
    that cannot be fitted are listed in ``attrs["skipped"]`` with the reason. Returns a tidy
    table: region, term, estimate, se, statistic (t, or z for mixed models), p, p_fdr, n, converged.
    """
    import re
    import warnings

    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    if region not in table.columns:
        raise ValueError(f"region_models: the table has no {region!r} column (columns {list(table.columns)})")
    if groups is not None and groups not in table.columns:
        raise ValueError(f"region_models: grouping column {groups!r} is not in the table")
    used = [column for column in table.columns if re.search(rf"\b{re.escape(str(column))}\b", formula)]
    rows, skipped = [], {}
    for name, data in table.groupby(region, sort=False, observed=True):
        if data[used].dropna().empty:
            skipped[name] = "no complete rows (e.g. a region outside the cohort mask)"
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                if groups is None:
                    fit = smf.ols(formula, data).fit(cov_type="HC3" if robust else "nonrobust")
                    parameters = fit.params.index
                else:
                    fit = smf.mixedlm(formula, data.dropna(subset=[groups]), groups=groups,
                                      missing="drop").fit(reml=True)
                    parameters = fit.fe_params.index
            except (ValueError, np.linalg.LinAlgError) as error:  # e.g. a region without complete rows
                skipped[name] = f"{type(error).__name__}: {error}"
                continue
            if fit.df_resid <= 0:
                skipped[name] = f"{int(fit.nobs)} complete row(s) for {len(parameters)} parameters"
                continue
        converged = not any(issubclass(warning.category, ConvergenceWarning) for warning in caught)
        for term in parameters:
            if term == "Intercept":
                continue
            rows.append({"region": name, "term": term, "estimate": fit.params[term], "se": fit.bse[term],
                         "statistic": fit.tvalues[term], "p": fit.pvalues[term], "n": int(fit.nobs),
                         "converged": converged})
    if not rows:
        raise ValueError(f"region_models: no region had rows to fit {formula!r} ({next(iter(skipped.values()), '')})")
    result = pd.DataFrame(rows)
    result["p_fdr"] = result.groupby("term")["p"].transform(lambda p: adjust_p(p.to_numpy(), "fdr_bh"))
    result = result[["region", "term", "estimate", "se", "statistic", "p", "p_fdr", "n", "converged"]]
    result.attrs["skipped"] = skipped
    return result
