"""Models, splits, metrics, bias correction and training against independent references."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import torch
from safetensors.torch import load_file
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, mean_absolute_error, r2_score, roc_auc_score

from engine.data.store import open_cohort
from engine.layout import file_sha256
from engine.models.ensembles import ENSEMBLE, EnsembleJob, train_ensemble, train_ensembles
from engine.models.metrics import bias_corrected_gap, classification_metrics, out_of_sample_gap, regression_metrics
from engine.models.networks import ModelSpec, PatchIndividualConv3d, build_model
from engine.models.splits import SplitSettings, stratified_split
from engine.models.training import TrainingConfig, load_member, soft_labels, train_member, value_bins
from engine.models.volumes import Augmentation, CohortVolumes, augment, epoch_batches
from engine.tasks import Execution
from tests.helpers import cohort_split


@pytest.mark.parametrize("name", ["mrinet", "mrinet_pif", "sfcn", "cnn4"])
@pytest.mark.parametrize("outputs", [1, 3])
def test_registry_builds_each_model_for_several_channels_and_heads(name, outputs):
    options = {"channels": [4, 8, 8, 4]} if name == "sfcn" else {}
    model = build_model(ModelSpec(name, (24, 28, 22), 2, outputs, options), target_mean=42.0, target_scale=10.0)
    output = model.eval()(torch.zeros(3, 2, 24, 28, 22))
    assert output.shape == (3, outputs)
    assert torch.allclose(output[:, 0], torch.tensor(42.0))  # a blank input gets the bias: the mean target


def test_patch_individual_convolution_applies_separate_filters_per_patch():
    torch.manual_seed(0)
    layer = PatchIndividualConv3d(2, 3, 1, (4, 6, 2), patches=(2, 3, 1))
    x = torch.randn(1, 2, 4, 6, 2)
    output = layer(x)
    for index, (a, b) in enumerate([(a, b) for a in range(2) for b in range(3)]):
        conv = layer.convs[index]
        patch = x[:, :, 2 * a:2 * a + 2, 2 * b:2 * b + 2, :]
        assert torch.allclose(output[:, :, 2 * a:2 * a + 2, 2 * b:2 * b + 2, :], conv(patch))
    with pytest.raises(ValueError, match="patches"):
        PatchIndividualConv3d(2, 3, 1, (4, 6, 2), patches=(2, 2, 3))


def test_overlapping_patches_average_their_filters_where_they_overlap():
    """Two patches along x of a 6-voxel axis, grown by 1 voxel: x 0–3 and 2–5; voxels 2 and 3 get the mean."""
    torch.manual_seed(1)
    layer = PatchIndividualConv3d(2, 3, 3, (6, 4, 5), patches=(2, 1, 1), overlap=1)
    assert [box[0] for box in layer.boxes] == [(0, 4), (2, 6)]
    x = torch.randn(2, 2, 6, 4, 5)
    output = layer(x)
    first, second = layer.convs[0](x[:, :, 0:4]), layer.convs[1](x[:, :, 2:6])
    assert torch.allclose(output[:, :, 0:2], first[:, :, 0:2])
    assert torch.allclose(output[:, :, 2:4], (first[:, :, 2:4] + second[:, :, 0:2]) / 2)
    assert torch.allclose(output[:, :, 4:6], second[:, :, 2:4])
    with pytest.raises(ValueError, match="overlap"):
        PatchIndividualConv3d(2, 3, 1, (4, 6, 2), overlap=-1)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model(ModelSpec("resnet", (8, 8, 8)))


def test_balanced_accuracy_stopping_needs_a_classification():
    with pytest.raises(ValueError, match="balanced_accuracy needs task: classification"):
        TrainingConfig(early_stopping="balanced_accuracy")


def _participants(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(n)], "age": rng.uniform(18, 82, n),
                         "sex": rng.choice(["F", "M"], n, p=[0.6, 0.4])})


def test_stratified_split_matches_fractions_within_every_stratum():
    table = _participants()
    split = stratified_split(table, SplitSettings(seed=4))
    assert split.index.tolist() == table["participant_id"].tolist()
    assert split.value_counts().to_dict() == {"train": 180, "validation": 60, "test": 60}
    bands = pd.qcut(table["age"], 5, labels=False).to_numpy()
    for band in range(5):
        for sex in "FM":
            in_stratum = split[(bands == band) & (table["sex"] == sex).to_numpy()]
            expected = np.array([0.6, 0.2, 0.2]) * len(in_stratum)
            counts = in_stratum.value_counts().reindex(["train", "validation", "test"], fill_value=0).to_numpy()
            assert np.abs(counts - expected).max() <= 1.5
    assert split.equals(stratified_split(table, SplitSettings(seed=4)))
    assert not split.equals(stratified_split(table, SplitSettings(seed=5)))


def test_stratified_split_refuses_bad_settings():
    with pytest.raises(ValueError, match="sum"):
        SplitSettings(fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="validation > 0"):
        SplitSettings(fractions=(0.8, 0.0, 0.2))
    with pytest.raises(ValueError, match="cannot stratify by \\['site'\\]"):
        stratified_split(_participants(), SplitSettings(stratify=("age", "site")))


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    observed = rng.uniform(20, 80, 50)
    predicted = observed + rng.normal(0, 5, 50)
    metrics = regression_metrics(observed, predicted)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(observed, predicted), rel=1e-12)
    assert metrics["r2"] == pytest.approx(r2_score(observed, predicted), rel=1e-12)
    assert metrics["r"] == pytest.approx(np.corrcoef(observed, predicted)[0, 1], rel=1e-12)

    labels = rng.integers(0, 2, 80)
    probabilities = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, 80), 0, 1)
    probabilities = np.round(np.stack([1 - probabilities, probabilities], axis=1), 1)  # ties too
    metrics = classification_metrics(labels, probabilities)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, probabilities.argmax(1)))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities[:, 1]), rel=1e-12)

    three = rng.integers(0, 3, 90)
    scores = rng.dirichlet(np.ones(3), 90) + np.eye(3)[three] * 0.3
    scores /= scores.sum(axis=1, keepdims=True)
    assert classification_metrics(three, scores)["roc_auc"] == pytest.approx(
        roc_auc_score(three, scores, multi_class="ovr", average="macro"), rel=1e-12)


def test_bias_corrected_gap_equals_the_residual_of_a_cubic_ols():
    rng = np.random.default_rng(2)
    age = rng.uniform(18, 82, 120)
    predicted = 30 + 0.4 * age + rng.normal(0, 4, 120)  # regression to the mean: a gap that falls with age
    fit = rng.random(120) < 0.7
    corrected, _ = bias_corrected_gap(predicted, age, degree=3, fit=fit)
    design = np.column_stack([age, age ** 2, age ** 3])
    model = sm.OLS((predicted - age)[fit], sm.add_constant(design[fit])).fit()
    expected = (predicted - age) - model.predict(sm.add_constant(design))
    np.testing.assert_allclose(corrected, expected, rtol=1e-8, atol=1e-8)
    assert abs(np.corrcoef(corrected[fit], age[fit])[0, 1]) < 1e-8
    with pytest.raises(ValueError, match="needs more than 4 participants"):
        bias_corrected_gap(predicted[:4], age[:4])


@pytest.mark.parametrize("method", ["validation", "cross_fit", "test"])
def test_the_age_bias_is_corrected_out_of_sample_unless_the_test_fit_is_asked_for(method):
    """validation: numpy's polyfit on the validation split, polyval on the others (NaN for the fitted ones);
    cross_fit: every test participant corrected by a fit they are not part of, so moving their prediction by δ
    moves their corrected gap by exactly δ; test: the fit includes them, and the same δ moves it by less."""
    rng = np.random.default_rng(4)
    n = 150
    age = rng.uniform(18, 82, n)
    predicted = 30 + 0.4 * age + rng.normal(0, 4, n)
    split = rng.choice(["train", "validation", "test"], n, p=[0.5, 0.25, 0.25])
    corrected, record = out_of_sample_gap(predicted, age, split, method)
    test = split == "test"
    assert np.isfinite(corrected[test]).all() and record["method"] == method
    if method == "validation":
        fit = split == "validation"
        scaled = (age - age[fit].mean()) / age[fit].std()
        expected = (predicted - age) - np.polyval(np.polyfit(scaled[fit], (predicted - age)[fit], 3), scaled)
        np.testing.assert_allclose(corrected[~fit], expected[~fit], rtol=1e-10, atol=1e-10)
        assert np.isnan(corrected[fit]).all() and record["participants_fitted"] == fit.sum()
    if method == "cross_fit":
        assert np.isnan(corrected[~test]).all()
    moved = {}
    for participant in np.flatnonzero(test)[:10]:
        nudged = predicted.copy()
        nudged[participant] += 5.0
        moved[participant] = out_of_sample_gap(nudged, age, split, method)[0][participant] - corrected[participant]
    shifts = np.array(list(moved.values()))
    if method == "test":
        assert (shifts < 5.0 - 1e-6).all()  # in-sample: the fit follows the participant's own gap
    else:
        np.testing.assert_allclose(shifts, 5.0, rtol=1e-9)
    with pytest.raises(ValueError, match="unknown bias correction 'train'"):
        out_of_sample_gap(predicted, age, split, "train")


CONFIG = TrainingConfig(modalities=("T1", "FLAIR"), epochs=3, batch_size=4, patience=2, seed=7)


def test_cohort_volumes_put_scaled_rows_back_on_the_grid(tiny_store):
    volumes = CohortVolumes(tiny_store, ["T1", "GM"])
    dataset = volumes.dataset
    inputs = volumes.read([2, 5])
    assert inputs.shape == (2, 2, *volumes.shape)
    row = dataset["GM"].isel(subject=5).values.astype(np.float64)
    i, j, k = (dataset[axis].values - dataset[axis].values.min() for axis in "ijk")  # the mask's bounding box
    np.testing.assert_allclose(inputs[1, 1, i, j, k], (row - row.mean()) / row.std(), rtol=1e-5, atol=1e-6)
    outside = np.ones(volumes.shape, bool)
    outside[i, j, k] = False
    assert not inputs[:, :, outside].any()
    np.testing.assert_array_equal(volumes.box.transform(inputs), volumes.rows([2, 5]))


@pytest.mark.parametrize("cached", [True, False])
def test_an_epoch_gives_every_participant_once_with_its_own_inputs(tiny_store, cached):
    """Cached (the subjects fit in cache_bytes) or streamed in buffers of whole store chunks (they do not): each
    epoch yields every position once, in batches of at most batch_size, each with its own volume."""
    volumes = CohortVolumes(tiny_store, ["T1"])
    positions = np.arange(3, 21)  # across the store's chunks of 8
    per_subject = 4 * math.prod(volumes.shape)
    cache_bytes = per_subject * (len(positions) if cached else 5)  # streamed: buffers of 5 or more subjects
    rng, cache, orders = np.random.default_rng(0), {}, []
    for _ in range(2):
        seen = []
        for batch, inputs in epoch_batches(volumes, positions, 4, rng, cache, cache_bytes):
            assert len(batch) <= 4 and inputs.shape == (len(batch), 1, *volumes.shape)
            np.testing.assert_array_equal(inputs, volumes.read(batch))
            seen += batch.tolist()
        assert sorted(seen) == positions.tolist()
        orders.append(seen)
    assert orders[0] != orders[1]  # shuffled anew each epoch
    assert ("inputs" in cache) == cached


@pytest.mark.parametrize("scaling", ["zscore_brain", "minmax", "max"])
def test_cohort_volumes_scale_like_the_seed_studies_or_over_the_brain(tiny_store, scaling):
    volumes = CohortVolumes(tiny_store, ["GM"], scaling)
    row = volumes.dataset["GM"].isel(subject=3).values.astype(np.float64)
    inside = row != 0  # zscore_brain: over the participant's own nonzero voxels; the mask's background stays 0
    assert 0 < inside.sum() < len(row)
    expected = {"zscore_brain": np.where(inside, (row - row[inside].mean()) / row[inside].std(), 0),
                "minmax": (row - row.min()) / (row.max() - row.min()), "max": row / np.abs(row).max()}[scaling]
    np.testing.assert_allclose(volumes.rows([3])[0, 0], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown input scaling 'robust'"):
        CohortVolumes(tiny_store, ["T1"], "robust")


def test_augmentation_flips_and_shifts_whole_volumes():
    volume = np.zeros((1, 2, 9, 8, 7), np.float32)
    volume[0, 0, 2, 3, 4], volume[0, 1, 6, 4, 3] = 1.0, 2.0  # both at least 2 voxels from every face
    assert augment(volume, Augmentation(), np.random.default_rng(0)) is volume
    flipped = augment(volume, Augmentation(flip=1.0), np.random.default_rng(0), left_right_axis=1)
    np.testing.assert_array_equal(flipped, volume[:, :, :, ::-1])
    rng, seen = np.random.default_rng(1), set()
    for _ in range(1500):  # each of the 125 shifts is drawn at least once unless the draw is not uniform
        shifted = augment(volume, Augmentation(translation=2), rng)[0]
        shift = tuple(np.argwhere(shifted[0] == 1.0)[0] - (2, 3, 4))
        assert all(abs(s) <= 2 for s in shift)
        seen.add(shift)
        assert shifted[(1, *np.add((6, 4, 3), shift))] == 2.0 and np.count_nonzero(shifted) == 2  # both channels
    assert len(seen) == 125  # every shift in ±2 along three axes
    block = np.random.default_rng(2).random((1, 1, 5, 6, 7)).astype(np.float32) + 1  # no zeros inside
    for seed in range(5):
        shifts = np.random.default_rng(seed).integers(-2, 3, size=3)  # the draw augment makes (no flip)
        expected = np.roll(block[0, 0], shifts, axis=(0, 1, 2))
        for axis, shift in enumerate(shifts):  # what rolled around the edge is zero instead
            edge = [slice(None)] * 3
            edge[axis] = slice(0, shift) if shift > 0 else slice(shift, None) if shift < 0 else slice(0, 0)
            expected[tuple(edge)] = 0
        moved = augment(block, Augmentation(translation=2), np.random.default_rng(seed))[0, 0]
        np.testing.assert_array_equal(moved, expected)


def test_learning_rate_schedules_and_weight_decay_follow_their_definitions(tiny_store, tmp_path):
    split = cohort_split(tiny_store)
    cosine = train_member(tiny_store, CONFIG.model_copy(update={"schedule": "cosine", "epochs": 3, "patience": 3}),
                          split, 0, tmp_path)
    rates = [row["learning_rate"] for row in cosine["history"]]
    np.testing.assert_allclose(rates, [5e-4 * (1 + np.cos(np.pi * e / 3)) / 2 for e in range(3)], rtol=1e-9)
    step = train_member(tiny_store, CONFIG.model_copy(update={"schedule": "step", "step_epochs": 2, "step_gamma": 0.5,
                                                              "epochs": 3, "patience": 3}), split, 0, tmp_path)
    np.testing.assert_allclose([row["learning_rate"] for row in step["history"]], [5e-4, 5e-4, 2.5e-4])
    warm = train_member(tiny_store, CONFIG.model_copy(update={"schedule": "cosine", "warmup_epochs": 2, "epochs": 4,
                                                              "patience": 4}), split, 0, tmp_path)
    np.testing.assert_allclose([row["learning_rate"] for row in warm["history"]],
                               [5e-4 * min(1, (e + 1) / 2) * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)],
                               rtol=1e-9)
    norms = {}
    for decay in (0.0, 1000.0):
        config = CONFIG.model_copy(update={"weight_decay": decay, "epochs": 1})
        train_member(tiny_store, config, split, 0, tmp_path / str(decay))
        norms[decay] = float(load_file(tmp_path / str(decay) / "member_0.safetensors")["features.0.weight"].norm())
    assert norms[1000.0] < 0.5 * norms[0.0]  # AdamW shrinks each weight by (1 − lr·decay) per step


def _dead_models(monkeypatch, how_many: int):
    """The first ``how_many`` models training builds have a last convolution whose ReLUs never fire: the network
    puts out one constant for every participant and no gradient reaches its convolutions."""
    import engine.models.training as training_module

    built = []

    def build(spec, **kwargs):
        model = build_model(spec, **kwargs)
        if len(built) < how_many:
            with torch.no_grad():
                model.last_conv.bias.fill_(-1e6)
        built.append(model)
        return model

    monkeypatch.setattr(training_module, "build_model", build)
    return built


# with the head frozen the dead network's loss never improves: patience 1 would end the run in the epoch the
# collapse shows
@pytest.mark.parametrize("changes", [{"patience": 3}, {"patience": 1, "freeze": ("head",)}])
def test_a_member_that_collapses_to_a_constant_starts_again_from_a_fresh_seed(tiny_store, tmp_path, monkeypatch,
                                                                              changes):
    split = cohort_split(tiny_store)
    config = CONFIG.model_copy(update={"epochs": 4, **changes})
    built = _dead_models(monkeypatch, 1)
    card = train_member(tiny_store, config, split, 1, tmp_path)
    first_seed = 1000 * config.seed + 1
    assert len(built) == 2
    assert card["restarts"] == [{"seed": first_seed, "reason": "constant output", "epoch": 2}]
    assert card["seed"] == first_seed + 1_000_000
    assert not any(row["constant_output"] for row in card["history"])
    predicted = pd.read_parquet(tmp_path / "member_1.predictions.parquet")["predicted"]
    assert predicted.std() > 0.01
    assert float(load_file(tmp_path / "member_1.safetensors")["features.12.bias"].max()) > -1e3  # the fresh model


@pytest.mark.parametrize("stuck", [1, 2])
def test_a_member_stuck_at_the_mean_when_patience_runs_out_starts_again(tiny_store, tmp_path, monkeypatch, stuck):
    """The first ``stuck`` models' output layers are frozen at a thousandth of their scale: their predictions vary
    (no collapse) but stay at the training mean, so patience ends each run early with a validation loss no better
    than predicting the mean, and the member starts again from a fresh seed; a last attempt that is stuck too is
    kept. The card's constant loss is the validation MSE of the training mean, computed here from the store."""
    import engine.models.training as training_module

    built = []

    def build(spec, **kwargs):
        model = build_model(spec, **kwargs)
        if len(built) < stuck:
            with torch.no_grad():
                model.output_layer.weight.mul_(1e-3)
            model.output_layer.requires_grad_(False)
        built.append(model)
        return model

    monkeypatch.setattr(training_module, "build_model", build)
    split = cohort_split(tiny_store)
    config = CONFIG.model_copy(update={"epochs": 8, "patience": 2, "collapse_restarts": 1})
    card = train_member(tiny_store, config, split, 0, tmp_path)
    first_seed = 1000 * config.seed
    assert len(built) == 2 and card["seed"] == first_seed + 1_000_000
    assert card["restarts"][0]["seed"] == first_seed and card["restarts"][0]["reason"] == "no better than a constant"
    assert len(card["restarts"]) == 1 and card["restarts"][0]["epoch"] < config.epochs
    output_weight = float(load_file(tmp_path / "member_0.safetensors")["head.3.weight"].abs().max())
    assert (output_weight < 1e-3) == (stuck == 2)  # the second model: a fresh one, or stuck and kept
    dataset = open_cohort(tiny_store)
    ages = pd.Series(dataset.age.values, index=dataset.subject.values)
    roles = split.reindex(ages.index)
    expected = float(((ages[roles == "validation"] - ages[roles == "train"].mean()) ** 2).mean())
    assert card["constant_loss"] == pytest.approx(expected, rel=1e-5)
    kept = min(row["validation_loss"] for row in card["history"])
    assert card["learned_nothing"] == (kept > 0.95 * expected)
    if stuck == 2:
        assert card["learned_nothing"]


def test_a_member_that_keeps_collapsing_fails_without_writing(tiny_store, tmp_path, monkeypatch):
    from engine.models.training import MemberCollapsed

    split = cohort_split(tiny_store)
    config = CONFIG.model_copy(update={"epochs": 4, "patience": 3, "collapse_restarts": 1})
    _dead_models(monkeypatch, 2)
    with pytest.raises(MemberCollapsed,
                       match=r"member 0 collapsed .* all 2 attempts learned nothing \(seeds \[7000, 1007000\]\)"):
        train_member(tiny_store, config, split, 0, tmp_path)
    assert not list(tmp_path.iterdir())


def test_soft_labels_integrate_a_gaussian_over_the_bins_by_hand():
    from math import erf, sqrt

    edges = value_bins([50.5], 1.0)
    np.testing.assert_array_equal(edges, [48, 49, 50, 51, 52, 53])  # two spare bins on each side
    phi = lambda z: (1 + erf(z / sqrt(2))) / 2  # noqa: E731
    expected = np.array([phi(edge - 50.5) for edge in edges[1:]]) - np.array([phi(edge - 50.5) for edge in edges[:-1]])
    labels = soft_labels([50.5], edges, 1.0)
    np.testing.assert_allclose(labels[0], expected / expected.sum(), rtol=1e-12)
    assert labels[0, 2] == pytest.approx(0.38292 / 0.98758, rel=1e-4)  # Φ(½) − Φ(−½) over Φ(2½) − Φ(−2½)
    centres = (edges[:-1] + edges[1:]) / 2
    assert labels[0] @ centres == pytest.approx(50.5)  # symmetric: the expected centre is the value
    np.testing.assert_allclose(soft_labels([20.0, 80.0], value_bins([20.0, 80.0], 2.0), 1.0).sum(axis=1), 1.0)


def test_soft_label_training_minimises_the_kl_divergence_and_predicts_the_expected_bin(tiny_store, tmp_path):
    """Peng et al.'s recipe: SGD, step decay, soft labels; the recorded validation loss is the KL divergence
    computed here by hand, and predictions are the softmax-weighted bin centres."""
    split = cohort_split(tiny_store)
    config = TrainingConfig(modalities=("T1",), model="sfcn", model_options={"channels": [4, 8, 8, 4]},
                            loss="soft_labels", bin_width=2.0, soft_label_sigma=1.0, optimizer="sgd",
                            learning_rate=0.01, weight_decay=1e-3, schedule="step", step_epochs=1, step_gamma=0.3,
                            epochs=2, patience=2, batch_size=4, seed=2)
    card = train_member(tiny_store, config, split, 0, tmp_path)
    model, _ = load_member(tmp_path / "member_0")
    volumes = CohortVolumes(tiny_store, ["T1"])
    age = volumes.dataset.age.values
    in_split = split.reindex(volumes.subjects).to_numpy()
    edges = value_bins(age[in_split == "train"], 2.0)
    centres = (edges[:-1] + edges[1:]) / 2
    np.testing.assert_allclose(model.bin_centres.numpy(), centres)
    validation = np.flatnonzero(in_split == "validation")
    with torch.no_grad():
        logits = model(torch.from_numpy(volumes.read(validation))).double().numpy()
    log_q = logits - logits.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    p = soft_labels(age[validation], edges, 1.0)
    kl = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0)) / len(validation)
    best = card["history"][card["best_epoch"] - 1]
    assert best["validation_loss"] == pytest.approx(kl, rel=1e-4)
    assert [row["learning_rate"] for row in card["history"]] == pytest.approx([0.01, 0.003])
    table = pd.read_parquet(tmp_path / "member_0.predictions.parquet").set_index("participant_id")
    expected = np.exp(log_q) @ centres
    np.testing.assert_allclose(table.loc[volumes.subjects[validation], "predicted"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="soft_labels needs task: regression"):
        TrainingConfig(loss="soft_labels", task="classification", target="sex")


def test_training_is_deterministic_and_checkpoints_load_weights_only(tiny_store, tmp_path):
    split = cohort_split(tiny_store)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = train_member(tiny_store, CONFIG, split, 1, tmp_path / "a")
    second = train_member(tiny_store, CONFIG, split, 1, tmp_path / "b")
    weights_a, weights_b = (load_file(tmp_path / part / "member_1.safetensors") for part in "ab")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert first["history"] == second["history"]
    model, card = load_member(tmp_path / "a" / "member_1")
    assert card["best_epoch"] == min(first["history"], key=lambda row: row["validation_loss"])["epoch"]
    volumes = CohortVolumes(tiny_store, ["T1", "FLAIR"])
    with torch.no_grad():
        predicted = model(torch.from_numpy(volumes.read(np.arange(4))))[:, 0].double().numpy()
    table = pd.read_parquet(tmp_path / "a" / "member_1.predictions.parquet")
    np.testing.assert_allclose(table["predicted"].to_numpy()[:4], predicted, rtol=1e-6)


def test_ensemble_writes_members_predictions_and_metrics_and_resumes(tiny_store, tmp_path, client):
    split = cohort_split(tiny_store)
    result = train_ensemble(tiny_store, CONFIG, 2, tmp_path, split, Execution(client))
    metrics = result["metrics"].set_index(["member", "split"])
    predictions = result["predictions"]
    test = predictions[(predictions.member == ENSEMBLE) & (predictions.split == "test")]
    members = [predictions[(predictions.member == m) & (predictions.split == "test")] for m in ("0", "1")]
    np.testing.assert_allclose(test["predicted"], (members[0]["predicted"].to_numpy() +
                                                   members[1]["predicted"].to_numpy()) / 2)
    assert metrics.loc[("ensemble", "test"), "mae"] == pytest.approx(
        np.abs(test["predicted"] - test["observed"]).mean())
    assert ("predict_train_mean", "test") in metrics.index
    # the ridge baseline: scikit-learn's RidgeCV on the members' inputs (T1 and FLAIR voxels, each z-scored per
    # participant over the mask) of the training split
    from sklearn.linear_model import RidgeCV

    from engine.models.baselines import DEFAULT_ALPHAS

    dataset = open_cohort(tiny_store)
    voxels = np.hstack([stats.zscore(dataset[name].values.astype(np.float64), axis=1) for name in CONFIG.modalities])
    age = dataset.age.values
    in_split = split.reindex(dataset.subject.values).to_numpy()
    ridge = RidgeCV(alphas=DEFAULT_ALPHAS).fit(voxels[in_split == "train"], age[in_split == "train"])
    expected = np.abs(ridge.predict(voxels[in_split == "test"]) - age[in_split == "test"]).mean()
    assert metrics.loc[("ridge_voxels", "test"), "mae"] == pytest.approx(expected, rel=1e-6)
    assert test["brain_age_gap_corrected"].notna().all()
    assert (pd.read_csv(tmp_path / "split.tsv", sep="\t").set_index("participant_id")["split"]
            .reindex(split.index).equals(split))
    stamps = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("member_*.safetensors")}
    train_ensemble(tiny_store, CONFIG, 2, tmp_path, split, Execution(client))
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("member_*.safetensors")} == stamps


def test_mixed_precision_trains_under_bfloat16_autocast_and_keeps_float32_weights(tiny_store, tmp_path, monkeypatch):
    """The GPU path (bfloat16 autocast) run on CPU: it changes the arithmetic, not the stored model."""
    import engine.models.training as training_module

    split = cohort_split(tiny_store)
    config = CONFIG.model_copy(update={"epochs": 2, "patience": 2})
    full = train_member(tiny_store, config, split, 0, tmp_path / "float32")
    ignored = train_member(tiny_store, config, split, 0, tmp_path / "ignored")  # mixed_precision: on, not on CPU
    assert config.mixed_precision and ignored["history"] == full["history"]
    monkeypatch.setattr(training_module, "MIXED_PRECISION_DEVICES", ("cuda", "cpu"))
    half = train_member(tiny_store, config, split, 0, tmp_path / "bfloat16")
    assert [row["train_loss"] for row in half["history"]] != [row["train_loss"] for row in full["history"]]
    assert all(math.isfinite(row["validation_loss"]) for row in half["history"])
    weights = load_file(tmp_path / "bfloat16" / "member_0.safetensors")
    assert {value.dtype for value in weights.values()} == {torch.float32}
    # bfloat16 keeps 8 bits of mantissa: the first epoch's losses agree to a few percent
    np.testing.assert_allclose(half["history"][0]["train_loss"], full["history"][0]["train_loss"], rtol=0.05)


def test_finetuning_loads_weights_and_keeps_frozen_layers_fixed(tiny_store, tmp_path):
    split = cohort_split(tiny_store)
    (tmp_path / "source").mkdir()
    train_member(tiny_store, CONFIG, split, 0, tmp_path / "source")
    source = load_file(tmp_path / "source" / "member_0.safetensors")
    config = TrainingConfig(modalities=("T1", "FLAIR"), target="sex", task="classification", epochs=2,
                            batch_size=4, finetune_from=str(tmp_path / "source"), freeze=("features.0",))
    (tmp_path / "tuned").mkdir()
    card = train_member(tiny_store, config, split, 0, tmp_path / "tuned", classes=["F", "M"])
    tuned = load_file(tmp_path / "tuned" / "member_0.safetensors")
    assert torch.equal(tuned["features.0.weight"], source["features.0.weight"])
    assert not torch.equal(tuned["features.3.weight"], source["features.3.weight"])
    assert card["fresh_layers"] == ["head.3.bias", "head.3.weight", "output_scale"]  # a new head: 2 classes
    table = pd.read_parquet(tmp_path / "tuned" / "member_0.predictions.parquet")
    np.testing.assert_allclose(table[["p_F", "p_M"]].sum(axis=1), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="freeze: 'backbone' names no layer"):
        train_member(tiny_store, TrainingConfig(modalities=("T1",), epochs=1, freeze=("backbone",)), split, 0,
                     tmp_path / "tuned")
    assert json.loads((tmp_path / "tuned" / "member_0.json").read_text())["config"]["task"] == "classification"
    source_file = tmp_path / "source" / "member_0.safetensors"
    written = json.loads((tmp_path / "tuned" / "member_0.json").read_text())
    assert written["finetuned_from"] == {"file": str(source_file.resolve()), "sha256": file_sha256(source_file),
                                         "modalities": list(CONFIG.modalities), "target": CONFIG.target,
                                         "classes": None, "grid": written["spec"]["input_shape"],
                                         "input_scaling": CONFIG.input_scaling}
    for change, named in (({"input_scaling": "minmax"}, "input_scaling zscore (here minmax)"),
                          ({"modalities": ("T1",)}, "input channels 2 (here 1)")):
        with pytest.raises(ValueError, match=re.escape(named)):
            train_member(tiny_store, config.model_copy(update=change), split, 0, tmp_path / "other", classes=["F", "M"])


def test_classification_ensemble_reports_balanced_accuracy_and_auc(tiny_store, tmp_path):
    split = cohort_split(tiny_store, seed=1)
    config = TrainingConfig(modalities=("T1",), target="sex", task="classification", epochs=3, batch_size=4,
                            early_stopping="balanced_accuracy", patience=3)
    result = train_ensemble(tiny_store, config, 2, tmp_path, split)
    card = json.loads((tmp_path / "member_0.json").read_text())
    accuracies = [row["validation_balanced_accuracy"] for row in card["history"]]
    assert card["best_epoch"] == int(np.argmax(accuracies)) + 1  # the first epoch with the best accuracy
    metrics = result["metrics"].set_index(["member", "split"])
    assert {"balanced_accuracy", "roc_auc"} <= set(metrics.columns)
    ensemble = result["predictions"].query("member == @ENSEMBLE")
    np.testing.assert_allclose(ensemble[["p_F", "p_M"]].sum(axis=1), 1, rtol=1e-6)
    test = ensemble[ensemble.split == "test"]
    labels = (test["observed"] == "M").astype(int)
    expected = balanced_accuracy_score(labels, (test["p_M"] > test["p_F"]).astype(int))
    assert metrics.loc[("ensemble", "test"), "balanced_accuracy"] == pytest.approx(expected)
    # each scan's confusion group (M positive, called at p ≥ 0.5) against scikit-learn's confusion matrix
    (tn, fp), (fn, tp) = confusion_matrix(labels, (test["p_M"] >= 0.5).astype(int), labels=[0, 1])
    assert test["outcome"].value_counts().reindex(["TN", "FP", "FN", "TP"], fill_value=0).tolist() == [tn, fp, fn, tp]


def test_a_chosen_positive_class_comes_last(tiny_store, tmp_path):
    """positive_class reorders the classes so the explained output and the report's positive class are it."""
    split = cohort_split(tiny_store, seed=1)
    config = TrainingConfig(modalities=("T1",), target="sex", task="classification", epochs=1, batch_size=4,
                            positive_class="F")
    result = train_ensemble(tiny_store, config, 1, tmp_path, split)
    assert [column for column in result["predictions"] if column.startswith("p_")] == ["p_M", "p_F"]
    assert json.loads((tmp_path / "member_0.json").read_text())["classes"] == ["M", "F"]
    with pytest.raises(ValueError, match="positive_class 'X' is not a value of 'sex'"):
        train_ensemble(tiny_store, config.model_copy(update={"positive_class": "X"}), 1, tmp_path / "x", split)
    with pytest.raises(ValueError, match="positive_class needs task: classification"):
        TrainingConfig(positive_class="F")


def test_a_classification_adds_linear_baselines_on_a_feature_table(tiny_store, tmp_path):
    """baseline_features: an SVM and a logistic regression on per-scan columns, z-scored on the training scans.
    On one planted column the linear decision is monotone in it, so the ROC AUC is scikit-learn's of the column
    itself on the test scans."""
    split = cohort_split(tiny_store, seed=1)
    dataset = open_cohort(tiny_store)
    rng = np.random.default_rng(0)
    signal = (dataset.sex.values == "M") + rng.normal(0, 0.7, dataset.sizes["subject"])
    features = pd.DataFrame({"load": 1000 * signal + 5000}, index=dataset.subject.values)
    config = TrainingConfig(modalities=("T1",), target="sex", task="classification", epochs=1, batch_size=4)
    job = EnsembleJob(tiny_store, config, 1, tmp_path, split, baseline_features=features)
    metrics = train_ensembles([job])[0]["metrics"].set_index("member")
    test = (split.reindex(dataset.subject.values) == "test").to_numpy()
    labels = (dataset.sex.values[test] == "M").astype(int)
    for member in ("linear_svm_features", "logistic_features"):
        assert metrics.loc[member, "roc_auc"] == pytest.approx(roc_auc_score(labels, signal[test]))
    assert {"linear_svm_voxels", "logistic_voxels"} <= set(metrics.index)


def test_feature_baselines_take_feature_columns_only():
    from pipelines.catalog import TrainSettings

    assert TrainSettings(baseline_features=["features.lesion_load.lesion_volume_mm3"]).baseline_features[0].column \
        == "lesion_volume_mm3"
    with pytest.raises(ValueError, match=r"baseline_features: \['age'\] are not features"):
        TrainSettings(baseline_features=["age"])
