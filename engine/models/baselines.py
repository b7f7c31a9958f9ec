"""Linear baselines for the CNNs on the stored voxels, streamed in their dual forms: ridge regression and, for a
classification, a linear support vector machine and a logistic regression.

Both need the cohort only through its subject × subject Gram matrix ``X Xᵀ``, one Dask reduction over voxel
blocks (the cohort is never in memory). For :func:`ridge_baseline`, centring on the training subjects, the
leave-one-out choice of α and the predictions all follow from that matrix, as scikit-learn's ``RidgeCV``
(efficient leave-one-out, its "gram" mode) computes them; :func:`linear_classifier_baseline` gives the centred
matrix to scikit-learn's classifiers. The Gram matrix holds N² float64 values: 32 MB at N = 2,000, 3.2 GB
at N = 20,000; beyond that a primal solver over voxel blocks would be needed.
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


def centred_gram(gram: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``Xc Xcᵀ`` of the maps centred on the training subjects (Xc = X − 1 μᵀ, μ their mean), from ``X Xᵀ``."""
    n = int(train.sum())
    towards_mean = gram[:, train].sum(axis=1) / n  # X μ
    mean_norm = gram[np.ix_(train, train)].sum() / n**2  # μ·μ
    return gram - towards_mean[:, None] - towards_mean[None, :] + mean_norm


#: The C grid of :func:`linear_classifier_baseline`.
DEFAULT_CS = tuple(10.0 ** np.arange(-6, 1))
#: The linear classifiers :func:`linear_classifier_baseline` fits.
CLASSIFIERS = ("svm", "logistic")


@dataclass(frozen=True)
class ClassifierBaseline:
    """A fitted linear classifier: the C chosen by stratified 5-fold cross-validation on the training subjects
    (balanced accuracy), each C's score, and the decision values of every subject (> 0: the second class)."""

    kind: str
    c: float
    cv_balanced_accuracy: dict[float, float]
    decision: np.ndarray


def linear_classifier_baseline(maps: xr.DataArray, labels: np.ndarray, train: np.ndarray, kind: str = "svm",
                               cs=DEFAULT_CS, seed: int = 0) -> ClassifierBaseline:
    """A linear SVM or an L2-penalised logistic regression, both with balanced class weights (scikit-learn), on
    the maps centred on the training subjects, for two classes (``labels`` 0 and 1, −1 outside them); C by
    stratified 5-fold cross-validation on the training subjects; decision values for all subjects.

    Both see the voxels only through the centred Gram matrix: the SVM as a precomputed kernel, the logistic
    regression on each subject's coordinates in the span of the training subjects' maps (from the matrix's
    eigenvectors), where an L2-penalised linear model's weights lie: the same fit as on the voxels themselves.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown linear classifier {kind!r}; known: {', '.join(CLASSIFIERS)}")
    labels, train = np.asarray(labels), np.asarray(train, bool) & (np.asarray(labels) >= 0)
    counts = np.bincount(labels[train], minlength=2)
    if len(counts) != 2 or counts.min() < 2:
        raise ValueError(f"linear {kind}: needs two classes with at least two training subjects each, got {counts}")
    centred = centred_gram(gram_matrix(maps), train)
    rows = np.flatnonzero(train)
    if kind == "svm":
        features = centred[:, rows]  # a subject's kernel values with the training subjects

        def model(c):
            return SVC(kernel="precomputed", C=c, class_weight="balanced")
    else:
        eigenvalues, eigenvectors = np.linalg.eigh(centred[np.ix_(rows, rows)])
        kept = eigenvalues > 1e-10 * eigenvalues.max()
        features = centred[:, rows] @ eigenvectors[:, kept] / np.sqrt(eigenvalues[kept])

        def model(c):
            return LogisticRegression(C=c, class_weight="balanced", max_iter=10_000, tol=1e-8)

    def inputs(subjects: np.ndarray, fit: np.ndarray) -> np.ndarray:
        """The subjects' inputs to a model fitted on the training subjects at positions ``fit``."""
        return features[subjects][:, fit] if kind == "svm" else features[subjects]

    folds = StratifiedKFold(min(5, int(counts.min())), shuffle=True, random_state=seed)
    scores = {}
    for c in cs:
        predicted = np.empty(len(rows), int)
        for fit, held_out in folds.split(rows, labels[rows]):
            fitted = model(c).fit(inputs(rows[fit], fit), labels[rows[fit]])
            predicted[held_out] = fitted.predict(inputs(rows[held_out], fit))
        scores[float(c)] = float(balanced_accuracy_score(labels[rows], predicted))
    best = max(scores, key=lambda c: (scores[c], -c))  # the most regularised of the best
    fitted = model(best).fit(features[rows], labels[rows])
    return ClassifierBaseline(kind, best, scores, fitted.decision_function(features))


def ridge_baseline(maps: xr.DataArray, target: np.ndarray, train: np.ndarray,
                   alphas=DEFAULT_ALPHAS) -> RidgeBaseline:
    """Ridge regression with an unpenalised intercept on the training subjects (``train``: boolean per
    subject), α by efficient leave-one-out; predictions for all subjects."""
    target, train = np.asarray(target, np.float64), np.asarray(train, bool)
    if train.shape != target.shape or train.shape != (maps.sizes["subject"],):
        raise ValueError(f"ridge: target and train need one value per subject ({maps.sizes['subject']})")
    if train.sum() < 3 or not np.isfinite(target[train]).all():
        raise ValueError("ridge: needs at least 3 training subjects with a finite target")
    centred = centred_gram(gram_matrix(maps), train)
    n = int(train.sum())
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
