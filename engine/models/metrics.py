"""How well predictions fit: regression and classification metrics, and the brain-age gap with its age bias
removed."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def regression_metrics(observed, predicted) -> dict:
    """MAE, Pearson r and R² (1 − SS_res / SS_tot) of predictions."""
    observed, predicted = np.asarray(observed, float), np.asarray(predicted, float)
    residual = predicted - observed
    varies = len(observed) > 1 and observed.std() > 0 and predicted.std() > 0
    return {"n": len(observed), "mae": float(np.abs(residual).mean()),
            "r": float(np.corrcoef(observed, predicted)[0, 1]) if varies else math.nan,
            "r2": float(1 - (residual ** 2).sum() / ((observed - observed.mean()) ** 2).sum())}


def classification_metrics(labels, probabilities) -> dict:
    """Balanced accuracy and ROC-AUC (one-vs-rest, macro-averaged) from class probabilities (or scores); for two
    classes also sensitivity and specificity, the second class positive (the last of the sorted classes, as in
    the TP/FP/TN/FN groups)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, float)
    predicted = probabilities.argmax(axis=1)
    present = np.unique(labels)
    recalls = [(predicted[labels == c] == c).mean() for c in present]
    aucs = []
    for c in present:
        positive, negative = probabilities[labels == c, c], probabilities[labels != c, c]
        if len(negative):
            aucs.append(stats.mannwhitneyu(positive, negative).statistic / (len(positive) * len(negative)))
        if probabilities.shape[1] == 2:
            break  # binary: the positive class's AUC is the AUC
    metrics = {"n": len(labels), "balanced_accuracy": float(np.mean(recalls)),
               "roc_auc": float(np.mean(aucs)) if aucs else math.nan}
    if probabilities.shape[1] == 2:
        positive, negative = labels == 1, labels == 0
        metrics["sensitivity"] = float((predicted[positive] == 1).mean()) if positive.any() else math.nan
        metrics["specificity"] = float((predicted[negative] == 0).mean()) if negative.any() else math.nan
    return metrics


def bias_corrected_gap(predicted, age, degree: int = 3, fit: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brain-age gap (predicted − age) with its age dependence removed.

    The gap is regressed on a polynomial of age (``degree``; 3, as the seed study did) over the
    participants where ``fit`` is true (default: all); the residual is returned for everyone,
    with the polynomial's coefficients (highest power first, as ``numpy.polyval`` takes them).
    """
    predicted, age = np.asarray(predicted, float), np.asarray(age, float)
    fit = np.ones(len(age), bool) if fit is None else np.asarray(fit, bool)
    if fit.sum() <= degree + 1:
        raise ValueError(f"bias correction of degree {degree} needs more than {degree + 1} participants, "
                         f"got {int(fit.sum())}")
    gap = predicted - age
    centre, spread = age[fit].mean(), age[fit].std() or 1.0
    scaled = (age - centre) / spread
    coefficients = np.polyfit(scaled[fit], gap[fit], degree)
    return gap - np.polyval(coefficients, scaled), coefficients


#: Where the brain-age gap's age bias is fitted: on the validation split and applied to the others, across folds of
#: the test split (each fold corrected by a fit on the other folds), on the test split itself (in-sample: the
#: evaluated participants are part of the fit), or not at all.
BIAS_CORRECTIONS = ("validation", "cross_fit", "test", "none")


def out_of_sample_gap(predicted, age, split, method: str = "validation", degree: int = 3, folds: int = 5,
                      seed: int = 0, participants=None) -> tuple[np.ndarray, dict]:
    """The bias-corrected brain-age gap (:func:`bias_corrected_gap`) of every participant whose correction was
    fitted without them (NaN for the others), and a record of the fit: method, split fitted on, participants.

    ``validation``: fitted on the validation split, applied to the train and test participants; ``cross_fit``:
    the test split dealt into ``folds`` folds (from ``seed``; by ``participants``, one label per row, where a
    participant has several scans), each corrected by the fit on the other folds;
    ``test``: fitted on the test split and applied to everyone (in-sample for the test participants);
    ``none``: no correction.
    """
    if method not in BIAS_CORRECTIONS:
        raise ValueError(f"unknown bias correction {method!r}; known: {', '.join(BIAS_CORRECTIONS)}")
    predicted, age, split = np.asarray(predicted, float), np.asarray(age, float), np.asarray(split, str)
    corrected = np.full(len(age), np.nan)
    record = {"method": method, "degree": degree}
    if method == "none":
        return corrected, record
    if method in ("validation", "test"):
        fit = split == method
        gap, coefficients = bias_corrected_gap(predicted, age, degree, fit)
        applied = ~fit if method == "validation" else np.ones(len(age), bool)
        corrected[applied] = gap[applied]
        return corrected, {**record, "fitted_on": method, "participants_fitted": int(fit.sum()),
                           "coefficients": coefficients.tolist()}
    test = np.flatnonzero(split == "test")
    people = np.arange(len(test)) if participants is None else np.asarray(participants)[test]
    _, person = np.unique(people, return_inverse=True)  # several scans of a participant: one fold
    fold = (np.random.default_rng(seed).permutation(person.max(initial=-1) + 1) % folds)[person]
    for k in range(folds):
        fit = np.zeros(len(age), bool)
        fit[test[fold != k]] = True
        gap, _ = bias_corrected_gap(predicted, age, degree, fit)
        corrected[test[fold == k]] = gap[test[fold == k]]
    return corrected, {**record, "fitted_on": f"the other {folds - 1} of {folds} folds of the test split",
                       "folds": folds, "seed": seed, "participants_fitted": int(len(test) - np.bincount(fold).max())}
