"""Linear baselines for the CNNs: ridge regression on the stored voxels, streamed in its dual form.

:func:`ridge_baseline` needs the cohort only through its subject × subject Gram matrix
``X Xᵀ``, one Dask reduction over voxel blocks (the cohort is never in memory). Centring on the
training subjects, the leave-one-out choice of α and the predictions all follow from that matrix,
as scikit-learn's ``RidgeCV`` (efficient leave-one-out, its "gram" mode) computes them. The Gram
matrix holds N² float64 values: 32 MB at N = 2,000, 3.2 GB at N = 20,000; beyond that a primal
solver over voxel blocks would be needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr

#: The α grid of :func:`ridge_baseline` (log-spaced, as RidgeCV users usually give it).
DEFAULT_ALPHAS = tuple(10.0 ** np.arange(-2, 7))


@dataclass(frozen=True)
class RidgeBaseline:
    """A fitted ridge baseline: the α chosen by leave-one-out on the training subjects, each α's
    leave-one-out mean squared error, and the predictions for every subject of the maps."""

    alpha: float
    loo_mse: dict[float, float]
    predictions: np.ndarray  # one per subject, in the maps' order


def gram_matrix(maps: xr.DataArray) -> np.ndarray:
    """``X Xᵀ`` (float64) of (subject × voxel) maps: one streaming reduction over voxel blocks."""
    if set(maps.dims) != {"subject", "voxel"}:
        raise ValueError(f"ridge: maps need dims ('subject', 'voxel'), got {maps.dims}")
    values = maps.transpose("subject", "voxel").data
    values = values if isinstance(values, da.Array) else da.from_array(np.asarray(values))
    # every subject in each block (aligned voxel blocks, no rechunking inside the product), blocks of
    # N × (2²³ / N) float64 values: larger ones held several times the cohort's size while the threads kept
    # some in flight (benchmarks/ridge_baseline.py)
    values = values.astype(np.float64).rechunk({0: -1, 1: max(256, 2**23 // values.shape[0])})
    return np.asarray(da.dot(values, values.T).compute())


def ridge_baseline(maps: xr.DataArray, target: np.ndarray, train: np.ndarray,
                   alphas=DEFAULT_ALPHAS) -> RidgeBaseline:
    """Ridge regression with an unpenalised intercept on the training subjects (``train``: boolean per
    subject), α by efficient leave-one-out; predictions for all subjects."""
    target, train = np.asarray(target, np.float64), np.asarray(train, bool)
    if train.shape != target.shape or train.shape != (maps.sizes["subject"],):
        raise ValueError(f"ridge: target and train need one value per subject ({maps.sizes['subject']})")
    if train.sum() < 3 or not np.isfinite(target[train]).all():
        raise ValueError("ridge: needs at least 3 training subjects with a finite target")
    gram = gram_matrix(maps)
    # centre on the training subjects: Xc = X − 1 μᵀ with μ the training mean, all from X Xᵀ
    n = int(train.sum())
    towards_mean = gram[:, train].sum(axis=1) / n  # X μ
    mean_norm = gram[np.ix_(train, train)].sum() / n**2  # μ·μ
    centred = gram - towards_mean[:, None] - towards_mean[None, :] + mean_norm
    kernel = centred[np.ix_(train, train)]
    y_mean = target[train].mean()
    y = target[train] - y_mean
    # the intercept as a constant column (orthogonal to the centred ones), left unpenalised below
    eigenvalues, eigenvectors = np.linalg.eigh(kernel + 1.0)
    intercept = np.argmax(np.abs(eigenvectors.T @ np.full(n, 1 / np.sqrt(n))))
    projected = eigenvectors.T @ y
    loo_mse, dual = {}, {}
    for alpha in alphas:
        weights = 1.0 / (eigenvalues + alpha)
        weights[intercept] = 0.0
        coefficients = eigenvectors @ (weights * projected)
        inverse_diagonal = (eigenvectors**2 * weights).sum(axis=1)
        loo_mse[float(alpha)] = float(np.mean((coefficients / inverse_diagonal) ** 2))
        dual[float(alpha)] = coefficients
    best = min(loo_mse, key=loo_mse.get)
    predictions = centred[:, train] @ dual[best] + y_mean
    return RidgeBaseline(best, loo_mse, predictions)
