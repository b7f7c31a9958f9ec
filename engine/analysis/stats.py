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

import contextlib
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import dask.local
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import get_scheduler
from scipy import special, stats
from statsmodels.stats.multitest import multipletests
from threadpoolctl import ThreadpoolController

from engine.data.store import keyed


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
    """A (subject, voxel) dask/numpy matrix as stored (blocks become float64 where it matters) or a
    (subject,) float64 vector."""
    if isinstance(term, xr.DataArray):
        if term.dims == ("subject", "voxel"):
            return (term.data if isinstance(term.data, da.Array) else np.asarray(term.values, np.float64)), True
        if term.dims == ("subject",):
            return np.asarray(term.values, np.float64), False
        raise ValueError(f"{name} must have dims ('subject', 'voxel') or ('subject',), got {term.dims}")
    values = np.asarray(term, np.float64)
    if values.shape != (n,):
        raise ValueError(f"{name} must have one value per subject ({n}), got shape {values.shape}")
    return values, False


#: Residual sum of squares at or below this share of the raw sum of squares counts as none.
DEGENERATE = 1e-10


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
    coverage: np.ndarray
    rows: np.ndarray  # the subjects the model was fitted on (complete data), as positions in the inputs

    @property
    def n(self) -> int:
        return self.design.shape[0]

    @property
    def df(self) -> int:
        return self.n - self.design.shape[1] - 1

    def residual(self, values: np.ndarray, cross: np.ndarray) -> np.ndarray:
        """A per-subject vector minus its fit on the covariates, given ``cross`` = Cᵀ·values."""
        return values - self.design @ (self.gram_inverse @ cross)[:, 0]


def _fit(outcome, predictor, covariates, categorical, min_coverage: float = 0.0,
         within: np.ndarray | None = None) -> tuple[_Model, xr.DataArray]:
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
        if not is_map:
            keep &= ~np.isnan(values)
    design_frame = design_matrix(covariates[keep], categorical)
    rows = np.flatnonzero(keep)
    if not keep.all():
        y, x = (values[rows] for values in (y, x))
    # one pass over the subject blocks: every cross-product the FWL solution needs
    sums = _cross_products(y, x, design_frame.to_numpy())
    n_voxels = reference.sizes["voxel"]
    if np.isnan(sums).any():  # some maps are missing (NaN): drop those subjects and pass again
        complete = np.flatnonzero(_missing_voxels(y, x) == 0)
        y, x, design_frame, rows = y[complete], x[complete], design_frame.iloc[complete], rows[complete]
        sums = _cross_products(y, x, design_frame.to_numpy())
    design = design_frame.to_numpy()
    n, p = design.shape[0], design.shape[1] + 1
    if n <= p:
        raise ValueError(f"{n} subjects with complete data for {p} parameters: the model needs more subjects")
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(f"the covariate design is rank-deficient (columns {list(design_frame.columns)})")
    gram_inverse = np.linalg.inv(design.T @ design)
    q = design.shape[1]
    # per voxel, how many participants have a value (nonzero) in every map of the model at once
    coverage = sums[-1]
    if y_map and x_map:
        cy, cx, xy, xx, yy = sums[:q], sums[q:2 * q], sums[2 * q], sums[2 * q + 1], sums[2 * q + 2]
    elif y_map:
        cy, xy, yy = sums[:q], sums[q], sums[q + 1]
        cx, xx = (design.T @ x)[:, None], np.full(n_voxels, x @ x)
    else:
        cx, xy, xx = sums[:q], sums[q], sums[q + 1]
        cy, yy = (design.T @ y)[:, None], np.full(n_voxels, y @ y)

    def residual(cross, c_first, c_second):  # Σ r_a r_b = Σ ab − (Cᵀa)ᵀ (CᵀC)⁻¹ (Cᵀb)
        return cross - (c_first * (gram_inverse @ c_second)).sum(axis=0)

    sxy, sxx, syy = residual(xy, cx, cy), residual(xx, cx, cx), residual(yy, cy, cy)
    # a term the covariates explain fully (a voxel constant across subjects) has no t: what its
    # residual sums hold is rounding error
    sxx, syy = (np.where(sums_of_squares > DEGENERATE * total, sums_of_squares, np.nan)
                for sums_of_squares, total in ((sxx, xx), (syy, yy)))
    # a voxel that too few participants have a value at is not tested (the map's sums carry the NaN)
    covered = coverage >= math.ceil(min_coverage * n - 1e-9)
    if within is not None:
        if np.shape(within) != (n_voxels,):
            raise ValueError(f"within marks {np.size(within)} voxels, the maps have {n_voxels}")
        covered &= np.asarray(within, bool)
    if x_map:
        sxx = np.where(covered, sxx, np.nan)
    if y_map:
        syy = np.where(covered, syy, np.nan)
    return _Model(y, x, design, gram_inverse, cx, cy, sxy, sxx, syy, coverage.astype(np.int64), rows), reference


def voxelwise_ols(outcome, predictor, covariates: pd.DataFrame | None = None, categorical: Sequence[str] = (),
                  permutations: int = 0, seed: int = 0, permutation_batch: int = 64,
                  min_coverage: float = 0.0, within: np.ndarray | None = None,
                  blocks: ExchangeabilityBlocks | None = None) -> xr.Dataset:
    """Per voxel: β, SE, t, two-sided p and partial r of ``predictor`` on ``outcome`` given covariates.

    ``outcome`` and ``predictor`` are DataArrays with dims (``subject``, ``voxel``) or
    (``subject``,), or per-subject arrays; at least one is a map. ``covariates`` has one row per
    subject (same order). Subjects with a missing value anywhere (a missing map row, a missing
    covariate) are dropped; ``n`` reports how many were used. A rank-deficient design or
    ``n ≤`` number of parameters is an error.

    ``coverage`` counts, per voxel, the participants with a nonzero value in every map term. A voxel
    covered by less than the share ``min_coverage`` of the ``n`` participants is not tested (NaN
    statistics, left out of the max-T null), as SPM's implicit mask leaves out voxels outside some
    participants' images (its rule is ``min_coverage`` = 1) and lesion-symptom mapping voxels
    lesioned in too few patients: where a map is zero for most participants (gray matter outside
    the cortex, relevance outside the heads of ``zscore_brain`` inputs), the few others decide the fit.
    ``within`` (a boolean per voxel) restricts the test to those voxels in the same way, e.g. to the
    white-matter tracts.

    With ``permutations`` > 0, also ``p_fwe`` (two-sided max-T, Freedman–Lane) and the null
    distribution ``max_t_null``. Permutation k depends on (``seed``, k) only: the same settings on
    the same machine give the same null bit for bit; another batch size, chunking, worker or BLAS
    thread count, or CPU rounds the float32 products differently (≈ 1e-7 relative; tested ≤ 1e-5),
    which moves ``p_fwe`` only at a voxel whose |t| lies that close to a null maximum.

    ``blocks``: with several scans per participant, the permutations respect them
    (:class:`ExchangeabilityBlocks`); a predictor that does not vary within the blocks (a between-participant
    effect) cannot be tested by permuting within them, which is an error.
    """
    if not 0 <= min_coverage <= 1:
        raise ValueError(f"min_coverage is a share of the participants, between 0 and 1; got {min_coverage}")
    model, reference = _fit(outcome, predictor, covariates, categorical, min_coverage, within)
    if blocks is not None:
        if len(blocks.labels) != reference.sizes["subject"]:
            raise ValueError(f"blocks label {len(blocks.labels)} rows, the maps have {reference.sizes['subject']}")
        blocks = blocks.subset(model.rows)
        blocks.check_permutable()
        if model.x.ndim == 1:
            blocks.check_predictor(model.x)
    df = model.df
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = model.sxy / model.sxx
        se = np.maximum(model.syy - beta * model.sxy, 0)
        se /= df * model.sxx
        np.sqrt(se, out=se)
        t = beta / se
        partial_r = model.sxy / np.sqrt(model.sxx * model.syy)
    voxel_coords = {name: coord for name, coord in reference.coords.items() if coord.dims == ("voxel",)}
    result = xr.Dataset({"beta": ("voxel", beta), "se": ("voxel", se), "t": ("voxel", t),
                         "p": ("voxel", _two_sided_p(t, df)), "partial_r": ("voxel", partial_r),
                         "coverage": ("voxel", model.coverage)},
                        coords=voxel_coords)
    result.attrs.update(n=int(model.n), df=int(df), min_coverage=float(min_coverage))
    if permutations:
        null = max_t_null(model, permutations, seed, permutation_batch, blocks)
        exceed = np.searchsorted(np.sort(null), np.abs(t), side="left")
        result["p_fwe"] = ("voxel", np.where(np.isnan(t), np.nan, (1 + permutations - exceed) / (1 + permutations)))
        result["max_t_null"] = ("permutation", null)
        result.attrs.update(permutations=int(permutations), seed=int(seed))
        if blocks is not None:
            result.attrs["permuted"] = "whole blocks" if blocks.whole else "within blocks"
    return result


def _two_sided_p(t: np.ndarray, df: int) -> np.ndarray:
    """2·P(T_df > |t|), equal to scipy's ``2·stdtr(df, −|t|)`` within 1e-11 (relative), and cheaper.

    ``stdtr`` costs more per voxel than the whole fit's arithmetic; below |t| = 10, log p is
    interpolated by cubic Hermite polynomials between exact nodes 1/512 apart, with exact slopes
    (d log p / dt = −pdf / sf); beyond, ``stdtr`` itself. NaN stays NaN.
    """
    nodes = np.arange(0, P_TABLE_MAX_T + 2 * P_TABLE_STEP, P_TABLE_STEP)
    tail = special.stdtr(df, -nodes)
    log_pdf = (special.gammaln((df + 1) / 2) - special.gammaln(df / 2) - 0.5 * np.log(df * np.pi)
               - (df + 1) / 2 * np.log1p(nodes * nodes / df))
    values, slopes = np.log(2 * tail), -np.exp(log_pdf) / tail * P_TABLE_STEP
    x = np.abs(np.asarray(t, np.float64))
    near = x < P_TABLE_MAX_T  # False for NaN
    p = np.empty_like(x)
    p[~near] = 2 * special.stdtr(df, -x[~near])
    position = x[near] / P_TABLE_STEP
    node = position.astype(np.intp)
    s = position - node
    y0, y1, m0, m1 = values[node], values[node + 1], slopes[node], slopes[node + 1]
    p[near] = np.exp(y0 + s * s * (3 - 2 * s) * (y1 - y0) + s * (1 - s) * ((1 - s) * m0 - s * m1))
    return p


#: |t| below which p-values come from the interpolation table, and the table's step.
P_TABLE_MAX_T, P_TABLE_STEP = 10.0, 1 / 512

#: Stored bytes of map values per task of the one-pass fit.
FIT_TASK_BYTES = 2**25


def _cross_products(y, x, design: np.ndarray) -> np.ndarray:
    """Sums over subjects of the products the model needs (see :func:`_task_cross_products`), from
    one pass over the maps' subject blocks; NaN where a map is missing."""
    maps = [values for values in (y, x) if values.ndim == 2]
    reference = maps[0] if isinstance(maps[0], da.Array) else da.from_array(maps[0], chunks=(-1, -1))
    # tasks take several stored subject chunks (and sum them chunk by chunk): fewer float64 partial
    # sums to add up afterwards, memory still flat in N
    step = reference.chunks[0][0]
    per_task = FIT_TASK_BYTES // (max(reference.chunks[1]) * reference.dtype.itemsize)
    reference = reference.rechunk({0: max(step, per_task // step * step)})
    subjects = reference.chunks[0]

    def aligned(values):
        if values.ndim == 1:
            return da.from_array(values, chunks=(subjects,)), "s"
        return (values.rechunk({0: subjects}) if isinstance(values, da.Array)
                else da.from_array(values, chunks=(subjects, reference.chunks[1]))), "sv"

    (y_blocks, y_index), (x_blocks, x_index) = aligned(y), aligned(x)
    q = design.shape[1]
    rows = 2 * q + 4 if len(maps) == 2 else q + 3
    parts = da.blockwise(_task_cross_products, "skv", y_blocks, y_index, x_blocks, x_index,
                         da.from_array(design, chunks=(subjects, -1)), "sq", new_axes={"k": rows},
                         adjust_chunks={"s": 1}, meta=np.empty((0, 0, 0)), concatenate=True, step=step)
    with _task_blas_threads():
        return parts.sum(axis=0).compute()


def _task_blas_threads():
    """One BLAS thread per task unless Dask runs its tasks one at a time: the tasks are the
    parallelism, and idle BLAS threads spin on the cores that the other tasks need."""
    if get_scheduler() is dask.local.get_sync:
        return contextlib.nullcontext()
    return _blas_controller().limit(limits=1, user_api="blas")


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The process's thread pools, found once (each search goes through every loaded library)."""
    return ThreadpoolController()


def _task_cross_products(y, x, design, step):
    """One task's sums over its subjects in float64, as rows of a (1, k, voxel) array:

    both maps: Cᵀy, Cᵀx, Σxy, Σx², Σy², then the number of subjects nonzero in both; one map m and a
    vector v: [C v]ᵀm, Σm², the number of nonzero values of m. ``step`` subjects at a time are cast into
    reused float64 buffers (a fresh buffer per block costs more in page faults than the products).
    """
    maps = [values for values in (y, x) if values.ndim == 2]
    n_voxels = maps[0].shape[1]
    if len(maps) == 2:
        q = design.shape[1]
        sums = np.zeros((2 * q + 4, n_voxels))
    else:
        design = np.column_stack([design, y if y.ndim == 1 else x])
        q = design.shape[1]
        sums = np.zeros((q + 2, n_voxels))
    buffers = [np.empty((min(step, len(design)), n_voxels)) for _ in maps]
    for first in range(0, len(design), step):
        rows = slice(first, first + step)
        blocks = [buffer[:len(design[rows])] for buffer in buffers]
        for block, values in zip(blocks, maps, strict=True):
            np.copyto(block, values[rows])
        if len(blocks) == 2:
            block_y, block_x = blocks
            sums[:q] += design[rows].T @ block_y
            sums[q:2 * q] += design[rows].T @ block_x
            sums[2 * q] += np.einsum("sv,sv->v", block_x, block_y)
            sums[2 * q + 1] += np.einsum("sv,sv->v", block_x, block_x)
            sums[2 * q + 2] += np.einsum("sv,sv->v", block_y, block_y)
        else:
            sums[:q] += design[rows].T @ blocks[0]
            sums[q] += np.einsum("sv,sv->v", blocks[0], blocks[0])
        sums[-1] += np.count_nonzero(np.logical_and.reduce([block != 0 for block in blocks]), axis=0)
    return sums[None]


def _missing_voxels(y, x) -> np.ndarray:
    """Per subject, the number of NaN voxels in its maps (a second pass, only when some are missing)."""
    counts = [da.isnan(values).sum(axis=1) if isinstance(values, da.Array) else np.isnan(values).sum(axis=1)
              for values in (y, x) if values.ndim == 2]
    return np.asarray(sum(dask.compute(*counts)))


def permutation(seed: int, index: int, n: int, blocks: ExchangeabilityBlocks | None = None) -> np.ndarray:
    """Permutation number ``index`` of ``n`` subjects under ``seed`` (independent of batching), within the
    exchangeability ``blocks`` where given: row i of the permuted data is row ``order[i]``."""
    rng = np.random.default_rng([seed, index])
    return rng.permutation(n) if blocks is None else blocks.permutation(rng)


@dataclass(frozen=True)
class ExchangeabilityBlocks:
    """Which rows a permutation may exchange when a participant has several scans (Winkler et al. 2014; FSL
    randomise's ``-e`` groups). ``labels``: each row's block, e.g. its ``participant_id``.

    ``whole=True`` (randomise ``--permuteBlocks``): a block's rows move together, onto a block with as many rows,
    in their order: for between-participant effects (diagnosis, sex), whose scans are not independent.
    ``whole=False``: rows are permuted within their block only: for within-participant effects (time since the
    first scan), with each participant's level kept.
    """

    labels: np.ndarray
    whole: bool = True

    def __post_init__(self):
        object.__setattr__(self, "labels", np.asarray(self.labels))

    @functools.cached_property
    def members(self) -> list[np.ndarray]:
        """Each block's rows, blocks in order of first appearance."""
        _, first, codes = np.unique(self.labels, return_index=True, return_inverse=True)
        order = np.argsort(first)
        return [np.flatnonzero(codes == code) for code in order]

    @functools.cached_property
    def same_size(self) -> list[list[np.ndarray]]:
        """The blocks grouped by their number of rows: whole-block permutation exchanges blocks within a group."""
        by_size: dict[int, list[np.ndarray]] = {}
        for rows in self.members:
            by_size.setdefault(len(rows), []).append(rows)
        return list(by_size.values())

    def subset(self, rows: np.ndarray) -> ExchangeabilityBlocks:
        """The blocks of the rows a model kept (complete data)."""
        return ExchangeabilityBlocks(self.labels[rows], self.whole)

    def permutation(self, rng: np.random.Generator) -> np.ndarray:
        order = np.arange(len(self.labels))
        if not self.whole:
            for rows in self.members:
                order[rows] = rows[rng.permutation(len(rows))]
            return order
        for group in self.same_size:
            for rows, source in zip(group, rng.permutation(len(group)), strict=True):
                order[rows] = group[source]
        return order

    def check_permutable(self) -> None:
        """Refuse blocks that no whole-block permutation can move."""
        if self.whole and max(len(group) for group in self.same_size) < 2:
            raise ValueError("whole-block permutation exchanges blocks with as many scans, but no two blocks have "
                             "the same number of scans here: no permutation is possible")

    def check_predictor(self, predictor: np.ndarray) -> None:
        """Refuse a per-subject predictor the permutations cannot test."""
        if not self.whole and not any(np.ptp(predictor[rows]) > 0 for rows in self.members):
            raise ValueError("the predictor is constant within every block (a between-participant effect): "
                             "permuting scans within participants leaves it in place, so its test has no null "
                             "distribution; permute whole blocks (participants) instead")


#: Bytes of residual maps per task (every subject of a block of voxels), counted as float64; the
#: kernels with one map hold float32 residuals, half of it.
PERMUTATION_BLOCK_BYTES = 2**26


def max_t_null(model: _Model, permutations: int, seed: int, batch: int = 64,
               blocks: ExchangeabilityBlocks | None = None) -> np.ndarray:
    """Largest |t| over voxels for each of ``permutations`` Freedman–Lane permutations.

    The outcome's covariate residuals are permuted (Y* = Ŷ_C + P·R_Y). For a unit-norm residual
    predictor u and an orthonormal covariate basis Q, the permuted t is
    ``a·√(df / (‖R_Y‖² − ‖c‖² − a²))`` with ``a = uᵀP·R_Y`` and ``c = QᵀP·R_Y``; ``batch``
    permutations are one matrix product of permuted design rows with the residual maps, in
    float32 as FSL randomise computes (the observed statistics stay float64). Each Dask task
    holds every subject of one block of voxels and runs a share of the permutations, so the
    maps are read once; the maxima are combined over blocks.
    """
    maps = [values for values in (model.y, model.x) if values.ndim == 2]
    n, n_voxels = model.n, maps[0].shape[1]
    columns = max(1, min(n_voxels, PERMUTATION_BLOCK_BYTES // (8 * n)))
    y_map, x_map = model.y.ndim == 2, model.x.ndim == 2

    def residuals(values, cross, dtype):  # every subject per block minus its covariate fit, once per block
        return da.blockwise(_residual, "nv", _as_dask_array(values).rechunk((-1, columns)), "nv",
                            da.from_array(model.gram_inverse @ cross, chunks=(-1, columns)), "qv",
                            design=model.design, precision=dtype, concatenate=True, meta=np.empty((0, 0), dtype))

    # an orthonormal basis of the covariates without the intercept's column: residuals sum to zero,
    # so the permuted residuals have no intercept component to remove
    basis = np.linalg.qr(model.design)[0][:, 1:]
    common = {"basis": basis, "seed": seed, "batch": batch, "df": model.df, "blocks": blocks}
    if y_map and not x_map:
        residual_y = residuals(model.y, model.cy, np.float32)
        kernel, arguments = _design_side_maxima, [residual_y, "nv", _vector(model.syy, residual_y.chunks[1]), "v"]
        r_x = model.residual(model.x, model.cx)
        common["unit"] = r_x / np.sqrt(r_x @ r_x)
    elif x_map and not y_map:
        residual_x = residuals(model.x, model.cx, np.float32)
        kernel, arguments = _outcome_side_maxima, [residual_x, "nv", _vector(model.sxx, residual_x.chunks[1]), "v"]
        common.update(residual_y=model.residual(model.y, model.cy), syy=float(model.syy[0]))
    else:
        residual_x, residual_y = residuals(model.x, model.cx, np.float64), residuals(model.y, model.cy, np.float64)
        kernel = _map_map_maxima
        arguments = [residual_x, "nv", residual_y, "nv", _vector(model.sxx, residual_x.chunks[1]), "v",
                     _vector(model.syy, residual_x.chunks[1]), "v"]
    n_blocks = len(arguments[0].chunks[1])
    # enough tasks for the workers even when the voxels fit in one block: split the permutations too
    groups = max(1, min(-(-permutations // batch), -(-8 // n_blocks)))
    edges = np.linspace(0, permutations, groups + 1).astype(int)
    tasks = [da.blockwise(kernel, "pv", *arguments, new_axes={"p": int(stop - start)}, adjust_chunks={"v": 1},
                          meta=np.empty((0, 0)), concatenate=True, start=int(start), stop=int(stop), **common)
             for start, stop in itertools.pairwise(edges) if stop > start]
    with _task_blas_threads():
        return np.concatenate([maxima.max(axis=1) for maxima in dask.compute(*tasks)])


def _vector(values: np.ndarray, blocks) -> da.Array:
    return da.from_array(np.ascontiguousarray(values, np.float64), chunks=(blocks,))


def _as_dask_array(values) -> da.Array:
    return values if isinstance(values, da.Array) else da.from_array(values, chunks=(-1, -1))


def _max_abs_t(a, c2, syy, df):
    """max over voxels of |t| for each permutation: a (B × v), c2 (B × v or B × 1), syy (v).

    t² = df·a² / (syy − c² − a²) is maximised, one square root per permutation at the end.
    """
    squared = a * a
    with np.errstate(divide="ignore", invalid="ignore"):
        t2 = np.divide(squared, np.subtract(syy, c2) - squared)
    return np.sqrt(df * np.nanmax(t2, axis=1, initial=0.0))


def _batches(seed, start, stop, batch, n, blocks):
    for first in range(start, stop, batch):
        yield [permutation(seed, index, n, blocks) for index in range(first, min(first + batch, stop))]


def _residual(values, coefficients, design, precision):
    """A block of maps minus their covariate fit (``design`` · ``coefficients``), in ``precision``."""
    residual = values.astype(precision)
    residual -= design.astype(precision) @ coefficients.astype(precision)
    return residual


#: Voxels per matrix product inside a task: the products of a batch stay in the CPU cache.
PRODUCT_VOXELS = 8192


def _design_side_maxima(residual_y, syy, unit, basis, seed, batch, df, start, stop, blocks):
    """Map outcome, vector predictor: permuted rows [u, Q] against the residual maps, batch by batch."""
    maxima = []
    width = basis.shape[1] + 1
    syy = syy.astype(np.float32)
    for orders in _batches(seed, start, stop, batch, len(unit), blocks):
        permuted = np.concatenate([np.column_stack([unit[order], basis[order]]) for order in orders], axis=1).T
        permuted = permuted.astype(np.float32)
        best = np.zeros(len(orders))
        for first in range(0, residual_y.shape[1], PRODUCT_VOXELS):
            voxels = slice(first, first + PRODUCT_VOXELS)
            products = (permuted @ residual_y[:, voxels]).reshape(len(orders), width, -1)
            c2 = np.zeros_like(products[:, 0])  # no covariates but the intercept: nothing to project out
            for column in range(1, width):
                c2 += products[:, column] * products[:, column]
            best = np.fmax(best, _max_abs_t(products[:, 0], c2, syy[voxels], df))
        maxima.append(best)
    return np.concatenate(maxima)[:, None]


def _outcome_side_maxima(residual_x, sxx, residual_y, syy, basis, seed, batch, df, start, stop, blocks):
    """Vector outcome, map predictor: the permuted outcome residuals against the residual maps."""
    maxima = []
    scale = (1 / np.sqrt(sxx)).astype(np.float32)
    for orders in _batches(seed, start, stop, batch, len(residual_y), blocks):
        permuted = np.column_stack([residual_y[order] for order in orders])
        c2 = ((basis.T @ permuted) ** 2).sum(axis=0)[:, None].astype(np.float32)
        permuted = permuted.astype(np.float32)
        best = np.zeros(len(orders))
        for first in range(0, residual_x.shape[1], PRODUCT_VOXELS):
            voxels = slice(first, first + PRODUCT_VOXELS)
            with np.errstate(invalid="ignore"):
                a = (permuted.T @ residual_x[:, voxels]) * scale[voxels]
            best = np.fmax(best, _max_abs_t(a, c2, np.float32(syy), df))
        maxima.append(best)
    return np.concatenate(maxima)[:, None]


def _map_map_maxima(residual_x, residual_y, sxx, syy, basis, seed, batch, df, start, stop, blocks):
    """Both terms are maps: Σ_i r_x[σ(i)] r_y[i] pairs each subject's maps anew, voxel by voxel."""
    maxima = []
    scale = 1 / np.sqrt(sxx)
    for orders in _batches(seed, start, stop, batch, len(residual_y), blocks):
        c = np.concatenate([basis[order] for order in orders], axis=1).T @ residual_y
        c2 = np.einsum("bkv,bkv->bv", *(c.reshape(len(orders), basis.shape[1], -1),) * 2)
        with np.errstate(invalid="ignore"):
            a = np.stack([np.einsum("sv,sv->v", residual_x[order], residual_y) for order in orders]) * scale
        maxima.append(_max_abs_t(a, c2, syy, df))
    return np.concatenate(maxima)[:, None]


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


#: Per-region statistics of an roi analysis besides the regression model.
CORRELATIONS = ("pearson", "spearman", "partial")

#: Permutations one matrix product of the roi permutation test takes (bounds its memory: permutations × participants).
REGION_PERMUTATION_BATCH = 1024


@dataclass(frozen=True)
class _RegionFit:
    """One region's partial correlation of ``y`` and ``x`` given the design ``Z`` (intercept and covariates), kept
    in the form the Freedman–Lane permutation test needs: the rows' participants, the outcome's residual ``e`` =
    R_Z y, the predictor's residual R_Z x and an orthonormal basis of Z."""

    region: object
    rows: np.ndarray  # positions of the region's complete rows among all participants
    residual: np.ndarray
    predictor_residual: np.ndarray
    basis: np.ndarray
    df: int
    r: float

    @property
    def t(self) -> float:
        return self.r * math.sqrt(self.df / max(1 - self.r * self.r, 1e-300))

    def null_t(self, permutations: np.ndarray) -> np.ndarray:
        """t of each permuted outcome Ŷ_Z + P·e (``permutations``: rows of participant positions, the region's
        rows taken in the order each permutation puts them); R_Z P e · R_Z x = P e · R_Z x, and
        |R_Z P e|² = |e|² − |Qᵀ P e|²."""
        local = np.full(int(permutations.max(initial=0)) + 1, -1)
        local[self.rows] = np.arange(len(self.rows))
        mine = local[permutations]
        orders = mine[mine >= 0].reshape(len(permutations), len(self.rows))
        permuted = self.residual[orders]
        norm = (self.residual @ self.residual - ((permuted @ self.basis) ** 2).sum(axis=1))
        r = permuted @ self.predictor_residual / np.sqrt(np.clip(norm, 1e-300, None)
                                                         * (self.predictor_residual @ self.predictor_residual))
        r = np.clip(r, -1, 1)
        return r * np.sqrt(self.df / np.clip(1 - r * r, 1e-300, None))


def _region_fits(table: pd.DataFrame, outcome: str, predictor: str, covariates: Sequence[str], ranks: bool,
                 region: str, participants: pd.Index | None) -> list[_RegionFit | tuple]:
    """Per region (in the table's order) a :class:`_RegionFit` on the complete rows, or ``(region, n)`` where the
    correlation does not exist (too few rows for the design, a rank-deficient design, a constant term).

    The design is an intercept, the numeric covariates and the dummies of each non-numeric one's levels present
    in the region (all but one): the table is read into arrays once, then each region is a set of rows."""
    terms = table[[outcome, predictor]].to_numpy(np.float64)
    numeric = [name for name in covariates if pd.api.types.is_numeric_dtype(table[name])]
    numeric_values = table[numeric].to_numpy(np.float64)
    levels = [pd.factorize(table[name])[0] for name in covariates if name not in numeric]  # −1: missing
    complete = np.isfinite(terms).all(axis=1) & np.isfinite(numeric_values).all(axis=1)
    for codes in levels:
        complete &= codes >= 0
    region_codes, names = pd.factorize(table[region], sort=False)
    people = participants.get_indexer(table[_row_column(table)]) if participants is not None else None
    fits = []
    for index, name in enumerate(names):
        rows = np.flatnonzero((region_codes == index) & complete)
        n = len(rows)
        y, x = terms[rows, 0], terms[rows, 1]
        if ranks:
            y, x = stats.rankdata(y), stats.rankdata(x)
        columns = [np.ones(n), *numeric_values[rows].T]
        for codes in levels:
            present = np.unique(codes[rows])
            columns += [(codes[rows] == level).astype(np.float64) for level in present[1:]]
        design = np.column_stack(columns)
        df = n - 1 - design.shape[1]
        if df < 1 or np.linalg.matrix_rank(design) < design.shape[1]:
            fits.append((name, n))
            continue
        basis = np.linalg.qr(design)[0]
        y_res, x_res = (values - basis @ (basis.T @ values) for values in (y, x))
        scale = np.sqrt((y_res @ y_res) * (x_res @ x_res))
        if not scale > 0:
            fits.append((name, n))
            continue
        r = float(np.clip(y_res @ x_res / scale, -1, 1))  # rounding passes ±1, as in scipy
        fits.append(_RegionFit(name, np.arange(n) if people is None else people[rows], y_res, x_res, basis, df, r))
    return fits


def region_permutation_test(fits: Sequence[_RegionFit], participants: int, permutations: int,
                            seed: int = 0, blocks: ExchangeabilityBlocks | None = None,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Freedman–Lane permutation p-values of the regions' t (partial correlations, or the predictor's OLS t):
    per region uncorrected, and family-wise over the regions by the maximum |t| of each permutation.

    Permutation k of all ``participants`` (:func:`permutation` with ``seed``) permutes every region's outcome
    residuals at once, restricted to the region's participants (those of a region with missing values are taken
    in the order the permutation puts them), so regions keep their dependence; with ``blocks`` (one label per
    participant position) within their exchangeability blocks. p = (1 + #{null ≥ |t|}) / (1 + permutations).
    Returns (p per region, family-wise p per region, the max-|t| null).
    """
    observed = np.abs([fit.t for fit in fits])
    exceed = np.zeros(len(fits))
    null = np.zeros(permutations)
    for start in range(0, permutations, REGION_PERMUTATION_BATCH):
        indices = range(start, min(start + REGION_PERMUTATION_BATCH, permutations))
        orders = np.stack([permutation(seed, index, participants, blocks) for index in indices])
        null_t = np.abs(np.stack([fit.null_t(orders) for fit in fits]))  # region × permutation
        exceed += (null_t >= observed[:, None] * (1 - 1e-10)).sum(axis=1)
        null[indices.start:indices.stop] = null_t.max(axis=0, initial=0)
    fwe = np.array([(1 + np.sum(null >= t * (1 - 1e-10))) / (1 + permutations) for t in observed])
    return (1 + exceed) / (1 + permutations), fwe, null


def _row_column(table: pd.DataFrame) -> str:
    """The column naming whose row it is: ``subject`` (the store's row, a scan), else ``participant_id``."""
    if "subject" in table.columns:
        return "subject"
    if "participant_id" not in table.columns:
        raise ValueError("a permutation test needs the table's subject or participant_id column (whose row it is)")
    return "participant_id"


def _participants(table: pd.DataFrame) -> pd.Index:
    return pd.Index(pd.unique(table[_row_column(table)]))


def region_correlations(table: pd.DataFrame, outcome: str, predictor: str, covariates: Sequence[str] = (),
                        method: str = "pearson", permutations: int = 0, seed: int = 0,
                        region: str = "region", blocks: str | None = None, whole_blocks: bool = True) -> pd.DataFrame:
    """Per region the correlation of ``outcome`` and ``predictor`` across the table's rows (participants),
    as the seed study tabulated it: region, r, p, p_bonferroni, p_fdr, n, family_size (and p_permutation,
    p_fwe).

    ``pearson`` and ``spearman`` (Pearson of the ranks) take no covariates; ``partial`` is the
    Pearson correlation of the two after least-squares removal of an intercept and the
    ``covariates`` (non-numeric ones dummy-coded), with df = n − 2 − (covariate columns), so its p
    equals the predictor's OLS t-test in outcome ~ predictor + covariates. Rows with a missing value
    are left out per region (``n`` counts the rest); a region without a correlation has NaN. The
    family is the table's regions: Bonferroni (× ``family_size``, the regions with a p) and
    Benjamini–Hochberg run across them. With ``permutations`` (and a ``subject`` or ``participant_id`` column
    naming each row's scan or participant),
    :func:`region_permutation_test`: Freedman–Lane ``p_permutation`` per region and the family-wise
    ``p_fwe`` of the maximum |t| over the regions. ``blocks``: a column naming each row's exchangeability block
    when rows are not exchangeable one by one (several scans of a participant: ``subject`` holds the scan,
    ``blocks`` the person), permuted whole (``whole_blocks``) or within (:class:`ExchangeabilityBlocks`).
    """
    if method not in CORRELATIONS:
        raise ValueError(f"unknown correlation {method!r}; known: {', '.join(CORRELATIONS)}")
    if method != "partial" and covariates:
        raise ValueError(f"a {method} correlation takes no covariates ({list(covariates)}); use partial")
    missing = [column for column in (region, outcome, predictor, *covariates, *([blocks] if blocks else []))
               if column not in table.columns]
    if missing:
        raise ValueError(f"region_correlations: columns {missing} are not in the table ({list(table.columns)})")
    participants = _participants(table) if permutations else None
    fits = _region_fits(table, outcome, predictor, covariates, method == "spearman", region, participants)
    rows = []
    for fit in fits:
        if isinstance(fit, tuple):
            rows.append({"region": fit[0], "r": np.nan, "p": np.nan, "n": fit[1]})
        else:
            rows.append({"region": fit.region, "r": fit.r, "p": float(2 * special.stdtr(fit.df, -abs(fit.t))),
                         "n": len(fit.rows)})
    result = _family_corrected(pd.DataFrame(rows, columns=["region", "r", "p", "n"]))
    columns = ["region", "r", "p", "p_bonferroni", "p_fdr", "n", "family_size"]
    if permutations:
        fitted = [fit for fit in fits if isinstance(fit, _RegionFit)]
        exchange = None
        if blocks is not None:
            labels = table.drop_duplicates(_row_column(table)).set_index(_row_column(table))[blocks]
            exchange = ExchangeabilityBlocks(labels.reindex(participants).to_numpy(), whole_blocks)
            exchange.check_permutable()
        p, fwe, null = region_permutation_test(fitted, len(participants), permutations, seed, exchange)
        tested = result["region"].isin([fit.region for fit in fitted]).to_numpy()
        result.loc[tested, "p_permutation"], result.loc[tested, "p_fwe"] = p, fwe
        result.attrs["max_t_null"] = null
        columns += ["p_permutation", "p_fwe"]
    return result.reindex(columns=columns)


def _family_corrected(result: pd.DataFrame) -> pd.DataFrame:
    """``result`` with Bonferroni and Benjamini–Hochberg across its rows with a p-value (the family), and its size."""
    return result.assign(p_bonferroni=adjust_p(result["p"].to_numpy(), "bonferroni"),
                         p_fdr=adjust_p(result["p"].to_numpy(), "fdr_bh"), family_size=int(result["p"].notna().sum()))


def map_similarity(first: xr.DataArray, second: xr.DataArray, mask: np.ndarray | None = None) -> pd.DataFrame:
    """Per subject: Pearson r and cosine similarity of two (``subject`` × ``voxel``) maps inside ``mask``.

    One lazy pass of five sums over ``voxel`` per subject; voxels where either map is NaN are left out.
    """
    for name, values in (("first", first), ("second", second)):
        if set(values.dims) != {"subject", "voxel"}:
            raise ValueError(f"map_similarity: {name} map needs dims ('subject', 'voxel'), got {values.dims}")
    try:
        first, second = xr.align(first, second, join="exact")
    except ValueError:
        raise ValueError(f"map_similarity: maps differ in subjects or voxels, {dict(first.sizes)} and "
                         f"{dict(second.sizes)}") from None
    keep = first.notnull() & second.notnull()
    if mask is not None:
        keep = keep & xr.DataArray(np.asarray(mask, bool), dims="voxel")
    a, b = (values.astype(np.float64).where(keep, 0) for values in (first, second))
    sums = xr.Dataset({"count": keep.sum("voxel"), "a": a.sum("voxel"), "b": b.sum("voxel"),
                       "ab": (a * b).sum("voxel"), "aa": (a * a).sum("voxel"), "bb": (b * b).sum("voxel")})
    sums = sums.reset_coords(drop=True).compute().transpose("subject")
    count, sa, sb, sab, saa, sbb = (sums[name].values for name in ("count", "a", "b", "ab", "aa", "bb"))
    with np.errstate(divide="ignore", invalid="ignore"):
        covariance = sab - sa * sb / count
        pearson = covariance / np.sqrt((saa - sa**2 / count) * (sbb - sb**2 / count))
        cosine = sab / np.sqrt(saa * sbb)
    table = pd.DataFrame({"subject": sums["subject"].values, "pearson_r": pearson, "cosine": cosine, "voxels": count})
    return keyed(table, first)


def mixed_model(formula: str, data: pd.DataFrame, groups: str | Sequence[str]):
    """statsmodels MixedLM (REML) of ``formula`` with a random intercept per ``groups`` column, or per each of a
    list, outermost first (``[site, participant_id]``: the inner ones as variance components nested in the first);
    rows with a missing value are dropped."""
    import statsmodels.formula.api as smf

    groups = [groups] if isinstance(groups, str) else list(groups)
    nested = {name: f"0 + C({name})" for name in groups[1:]} or None
    return smf.mixedlm(formula, data.dropna(subset=groups), groups=groups[0], vc_formula=nested,
                       missing="drop").fit(reml=True)


def region_models(table: pd.DataFrame, formula: str, robust: bool = False, groups: str | Sequence[str] | None = None,
                  region: str = "region") -> pd.DataFrame:
    """Per region: a statsmodels formula fit on that region's rows, Bonferroni and FDR across regions per term.

    ``table`` is long: one row per participant and region, with the region-level columns and the
    per-subject covariates the formula names. OLS by default, HC3 standard errors with
    ``robust``, or a linear mixed model with a random intercept per ``groups`` (:func:`mixed_model`: participant_id
    with several scans per participant, site).
    Rows with a missing value are dropped per region and ``n`` reports the rows used; regions
    that cannot be fitted are listed in ``attrs["skipped"]`` with the reason. The family of a term is
    the regions it was fitted in (``family_size``). Returns a tidy table: region, term, estimate, se,
    statistic (t, or z for mixed models), p, p_bonferroni, p_fdr, n, family_size, converged.
    """
    import re
    import warnings

    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    if region not in table.columns:
        raise ValueError(f"region_models: the table has no {region!r} column (columns {list(table.columns)})")
    missing = [name for name in ([groups] if isinstance(groups, str) else groups or []) if name not in table.columns]
    if missing:
        raise ValueError(f"region_models: grouping columns {missing} are not in the table")
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
                    fit = mixed_model(formula, data, groups)
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
    result = pd.concat([_family_corrected(rows) for _, rows in pd.DataFrame(rows).groupby("term", sort=False)])
    result = result.sort_index()[["region", "term", "estimate", "se", "statistic", "p", "p_bonferroni", "p_fdr", "n",
                                  "family_size", "converged"]]
    result.attrs["skipped"] = skipped
    return result


#: Up to this many pairs the signed-rank CI uses the exact distribution (as scipy's and R's tests do).
EXACT_PAIRS = 50


def paired_wilcoxon(first, second, confidence: float = 0.95) -> dict[str, float]:
    """The two-sided Wilcoxon signed-rank test of paired values (``scipy.stats.wilcoxon(second, first)``) with its
    effect sizes: the medians, the median difference d = second − first, ``statistic`` and ``p``; the matched-pairs
    rank-biserial correlation (W⁺ − W⁻) / (W⁺ + W⁻) over the nonzero d (Kerby 2014); ``hodges_lehmann``, the
    median of the Walsh averages (dᵢ + dⱼ)/2, i ≤ j, and its distribution-free CI ``ci_low``/``ci_high``
    (Hollander & Wolfe: the k-th smallest and largest Walsh averages, k from the exact signed-rank distribution up
    to ``EXACT_PAIRS`` pairs, its normal approximation beyond; NaN where too few pairs give no such k)."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    difference = second - first
    n = difference.size
    nonzero = difference[difference != 0]
    test = stats.wilcoxon(second, first) if nonzero.size else None
    ranks = stats.rankdata(np.abs(nonzero))
    rank_biserial = (ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum() if nonzero.size else 0.0
    upper, lower = np.triu_indices(n)
    walsh = np.sort((difference[upper] + difference[lower]) / 2)
    k = _ci_order(n, 1 - confidence)
    return {"n": n, "median_first": float(np.median(first)), "median_second": float(np.median(second)),
            "median_difference": float(np.median(difference)),
            "statistic": float(test.statistic) if test else np.nan, "p": float(test.pvalue) if test else 1.0,
            "rank_biserial": float(rank_biserial), "hodges_lehmann": float(np.median(walsh)),
            "ci_low": float(walsh[k - 1]) if k else np.nan, "ci_high": float(walsh[-k]) if k else np.nan}


def _ci_order(n: int, alpha: float) -> int:
    """The largest k with P(T⁺ ≤ k − 1) ≤ α/2 for the signed-rank sum T⁺ of n pairs (0: no CI)."""
    total = n * (n + 1) // 2
    if n > EXACT_PAIRS:
        spread = stats.norm.ppf(1 - alpha / 2) * np.sqrt(n * (n + 1) * (2 * n + 1) / 24)
        return int(np.floor(total / 2 - spread + 0.5))
    counts = np.zeros(total + 1, np.int64)  # sign patterns per value of T⁺, up to 2⁵⁰
    counts[0] = 1
    for rank in range(1, n + 1):
        counts[rank:] = counts[rank:] + counts[:-rank]
    return int(np.count_nonzero(np.cumsum(counts) / 2.0**n <= alpha / 2))
