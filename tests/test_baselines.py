"""The streaming linear baselines against scikit-learn (RidgeCV, SVC with a linear kernel, LogisticRegression);
the classification metrics against scikit-learn's."""

import warnings

import numpy as np
import pytest
import xarray as xr
from dask.array.core import PerformanceWarning
from sklearn.linear_model import RidgeCV

from engine.models.baselines import linear_classifier_baseline, ridge_baseline
from engine.models.metrics import classification_metrics


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


@pytest.mark.parametrize("kind", ["svm", "logistic"])
def test_linear_classifier_baselines_equal_scikit_learn_on_the_centred_voxels(kind):
    """From the streamed Gram matrix, against scikit-learn fitted on the voxels themselves (centred on the training
    subjects): SVC with a linear kernel, LogisticRegression; the same cross-validation scores and decisions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    rng = np.random.default_rng(2)
    n, voxels = 70, 200
    labels = rng.integers(0, 2, n)
    x = rng.normal(size=(n, voxels)) + 0.6 * labels[:, None] * (np.arange(voxels) < 20) + 5.0
    labels[3] = -1  # outside the two classes: not trained on
    train = np.zeros(n, bool)
    train[rng.permutation(n)[:50]] = True
    maps = xr.DataArray(x.astype(np.float32), dims=("subject", "voxel")).chunk({"subject": 16})
    cs = (1e-4, 1e-3, 1e-2, 1e-1)
    ours = linear_classifier_baseline(maps, labels, train, kind, cs, seed=3)

    def reference(c):
        return (SVC(kernel="linear", C=c, class_weight="balanced") if kind == "svm" else
                LogisticRegression(C=c, class_weight="balanced", max_iter=10_000, tol=1e-8))

    rows = np.flatnonzero(train & (labels >= 0))
    features = x.astype(np.float32).astype(np.float64)
    centred = features - features[rows].mean(axis=0)
    folds = StratifiedKFold(5, shuffle=True, random_state=3)
    for c in cs:  # the cross-validation, by hand
        predicted = np.empty(len(rows), int)
        for fit, held_out in folds.split(rows, labels[rows]):
            predicted[held_out] = reference(c).fit(centred[rows[fit]], labels[rows[fit]]).predict(
                centred[rows[held_out]])
        assert ours.cv_balanced_accuracy[c] == pytest.approx(balanced_accuracy_score(labels[rows], predicted))
    expected = reference(ours.c).fit(centred[rows], labels[rows]).decision_function(centred)
    np.testing.assert_allclose(ours.decision, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="two classes with at least two training subjects"):
        linear_classifier_baseline(maps, np.where(np.arange(n) == 0, 1, 0), train, kind, cs)


def test_classification_metrics_equal_scikit_learns():
    from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 80)
    scores = rng.normal(size=80) + labels
    probabilities = np.column_stack([1 - 1 / (1 + np.exp(-scores)), 1 / (1 + np.exp(-scores))])
    ours = classification_metrics(labels, probabilities)
    called = (probabilities[:, 1] > probabilities[:, 0]).astype(int)
    assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, called))
    assert ours["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]))
    assert ours["sensitivity"] == pytest.approx(recall_score(labels, called, pos_label=1))
    assert ours["specificity"] == pytest.approx(recall_score(labels, called, pos_label=0))
