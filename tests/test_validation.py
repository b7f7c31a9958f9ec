"""Ground-truth scores and ensemble robustness, against sklearn, numpy float64 and hand-computed cases."""

from __future__ import annotations

from itertools import combinations

import dask.array as da
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn.metrics import roc_auc_score

from engine.analysis.atlas import Atlas, load_atlas
from engine.data.grid import Grid
from engine.models.validation import (
    atlas_truth_regions,
    member_l2_distance,
    member_robustness,
    relevance_mass_accuracy,
    score_methods,
    subject_groups,
    top_k_precision,
    truth_mask,
    voxel_roc_auc,
)
from tests.helpers import HAND_AFFINE, HAND_SHAPE

GRID = Grid(HAND_SHAPE, HAND_AFFINE, "MNI152NLin2009aSym")


def store_array(mask: np.ndarray, values: np.ndarray | None = None) -> xr.DataArray:
    """A (subject × voxel) array like the store's: voxels in mask order with i, j, k and grid attributes."""
    indices = np.nonzero(mask)
    values = np.zeros((2, len(indices[0])), np.float32) if values is None else values
    return xr.DataArray(values, dims=("subject", "voxel"),
                        coords={axis: ("voxel", index) for axis, index in zip("ijk", indices, strict=True)},
                        attrs={"grid_shape": list(HAND_SHAPE), "grid_affine": HAND_AFFINE.tolist()})


def hand_regions(hand_atlas) -> Atlas:
    _, mask, folder = hand_atlas
    return load_atlas(str(folder / "labels.nii.gz"), GRID, np.nonzero(mask), folder / "labels.tsv")


# ---------------------------------------------------------------------------------------
# Ground truth


def test_truth_mask_reads_labels_onto_the_cohort_voxels(hand_atlas, tmp_path):
    labels, mask, folder = hand_atlas
    cohort = store_array(mask)
    np.testing.assert_array_equal(truth_mask(folder / "labels.nii.gz", cohort), labels[mask] > 0)
    np.testing.assert_array_equal(truth_mask(str(folder / "labels.nii.gz"), cohort, labels=[3, 7]),
                                  np.isin(labels[mask], [3, 7]))
    store = xr.Dataset({"R": cohort}, attrs={"grid": GRID.to_attrs()})  # as open_cohort gives it
    image = nib.Nifti1Image(labels[..., None], HAND_AFFINE)  # a 3D image saved with a 4th axis of one
    np.testing.assert_array_equal(truth_mask(image, store, labels=[4]), labels[mask] == 4)

    shifted, affine = tmp_path / "shifted_truth.nii.gz", HAND_AFFINE.copy()
    affine[0, 3] += 2.0
    nib.save(nib.Nifti1Image(labels, affine), shifted)
    with pytest.raises(ValueError, match=r"shifted_truth.nii.gz: grid differs"):
        truth_mask(shifted, cohort)
    with pytest.raises(ValueError, match=r"no voxels labelled \[5\]"):
        truth_mask(folder / "labels.nii.gz", cohort, labels=[3, 5])
    with pytest.raises(ValueError, match="grid attributes"):
        truth_mask(folder / "labels.nii.gz", xr.DataArray(np.zeros((1, mask.sum())), dims=("subject", "voxel")))
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.where(mask, 0, 1).astype(np.uint8), HAND_AFFINE), empty)
    with pytest.raises(ValueError, match=r"empty.nii.gz: none of the cohort's voxels"):
        truth_mask(empty, cohort)


def test_truth_regions_are_those_mostly_inside_the_truth(hand_atlas):
    atlas = hand_regions(hand_atlas)
    labels = atlas.voxel_labels
    truth = labels == 3
    truth[np.flatnonzero(labels == 7)[: int(np.sum(labels == 7) * 0.4)]] = True  # 40 % of Precentral_L
    truth[np.flatnonzero(labels == 0)[:3]] = True
    assert atlas_truth_regions(atlas, truth) == ["Left_Hippocampus"]
    assert atlas_truth_regions(atlas, truth, min_fraction=0.3) == ["Left_Hippocampus", "Precentral_L"]
    assert "Unused" not in atlas_truth_regions(atlas, np.ones_like(truth), min_fraction=1.0)
    with pytest.raises(ValueError, match="min_fraction"):
        atlas_truth_regions(atlas, truth, min_fraction=0)


# ---------------------------------------------------------------------------------------
# Scores of single maps


def test_mass_accuracy_by_hand():
    relevance = xr.DataArray([[1, -2, 3, 0], [-1, -1, -1, -1], [2, 2, 0, 4], [1, np.nan, 1, 1]],
                             dims=("subject", "voxel"))
    truth = np.array([True, False, True, False])
    accuracy = relevance_mass_accuracy(relevance.chunk({"subject": 2, "voxel": 2}), truth)
    assert isinstance(accuracy.data, da.Array)  # lazy until asked
    np.testing.assert_allclose(accuracy.values, [1.0, np.nan, 2 / 8, np.nan], rtol=1e-15)
    assert accuracy.attrs["uniform_expectation"] == 0.5
    one_map = relevance_mass_accuracy(relevance.isel(subject=2), np.array([0, 0, 0, 1]))
    assert float(one_map) == 0.5 and one_map.attrs["uniform_expectation"] == 0.25


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "absolute"])
def test_roc_auc_equals_sklearn_with_ties(absolute):
    rng = np.random.default_rng(4)
    values = rng.integers(-2, 3, (2, 4, 200)).astype(np.float32)  # five levels: many ties
    truth = rng.random(200) < 0.3
    values[1, 3, np.flatnonzero(truth)[0]] = np.nan  # a map with NaN inside the truth …
    values[0, 3, np.flatnonzero(~truth)[0]] = np.nan  # … and one with NaN outside it
    relevance = xr.DataArray(da.from_array(values, chunks=(1, 2, 50)), dims=("attribution", "subject", "voxel"),
                             coords={"attribution": ["a", "b"]})
    auc = voxel_roc_auc(relevance, truth, absolute=absolute)
    assert auc.dims == ("attribution", "subject") and isinstance(auc.data, da.Array)
    auc = auc.compute()
    assert np.isnan(auc.values[:, 3]).all()
    for method in range(2):
        for subject in range(3):
            scores = np.abs(values[method, subject]) if absolute else values[method, subject]
            assert auc.values[method, subject] == pytest.approx(roc_auc_score(truth, scores), rel=1e-12)


def test_planted_relevance_scores_near_one_and_random_near_chance():
    rng = np.random.default_rng(5)
    truth = np.zeros(5000, bool)
    truth[rng.choice(5000, 500, replace=False)] = True
    noise = rng.normal(0, 0.1, (2, 5000))
    relevance = xr.DataArray(np.stack([truth + noise[0], noise[1]]), dims=("attribution", "voxel"),
                             coords={"attribution": ["planted", "random"]})
    auc = voxel_roc_auc(relevance, truth)
    accuracy = relevance_mass_accuracy(relevance, truth)
    assert auc.sel(attribution="planted") > 0.99 and abs(auc.sel(attribution="random") - 0.5) < 0.05
    assert accuracy.sel(attribution="planted") > 0.7  # the noise outside adds about 180 to the truth's 500
    assert abs(accuracy.sel(attribution="random") - accuracy.attrs["uniform_expectation"]) < 0.03
    assert voxel_roc_auc(-relevance, truth, absolute=True).sel(attribution="planted") > 0.99


def test_top_k_precision_by_hand():
    scores = xr.DataArray([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5], [np.nan, np.nan, np.nan, np.nan, 1]],
                          dims=("subject", "region"), coords={"region": list("abcde")})
    np.testing.assert_allclose(top_k_precision(scores, {"a", "c"}, 2), [0.5, 0.0, np.nan])
    np.testing.assert_allclose(top_k_precision(scores.T, ["a", "c"], 3), [2 / 3, 1 / 3, np.nan])
    assert float(top_k_precision(scores.isel(subject=1), ["e"], 1)) == 1.0
    with pytest.raises(ValueError, match=r"number of regions \(5\), got 6"):
        top_k_precision(scores, {"a"}, 6)
    with pytest.raises(ValueError, match=r"truth regions \['z'\]"):
        top_k_precision(scores, {"a", "z"}, 2)
    with pytest.raises(ValueError, match="'region' dimension"):
        top_k_precision(scores.rename(region="parcel"), {"a"}, 2)


def test_bad_maps_and_masks_are_named():
    relevance = xr.DataArray(np.ones((2, 4)), dims=("subject", "voxel"))
    with pytest.raises(ValueError, match=r"one value per voxel \(4\), got shape \(5,\)"):
        relevance_mass_accuracy(relevance, np.ones(5, bool))
    with pytest.raises(ValueError, match="'voxel' dimension"):
        voxel_roc_auc(relevance.rename(voxel="v"), np.ones(4, bool))
    with pytest.raises(ValueError, match="boolean"):
        voxel_roc_auc(relevance, np.array([0, 3, 1, 0]))
    with pytest.raises(ValueError, match="empty"):
        relevance_mass_accuracy(relevance, np.zeros(4, bool))
    with pytest.raises(ValueError, match="covers every voxel"):
        voxel_roc_auc(relevance, np.ones(4, bool))


# ---------------------------------------------------------------------------------------
# Robustness across ensemble members


def test_member_l2_distance_equals_numpy_float64():
    maps = np.random.default_rng(6).normal(size=(2, 4, 30)).astype(np.float32)
    member_maps = xr.DataArray(maps, dims=("attribution", "member", "voxel"),
                               coords={"attribution": ["x", "y"], "member": [10, 11, 12, 13]})
    distance = member_l2_distance(member_maps.chunk({"voxel": 10}))
    for method in range(2):
        scaled = [row / np.abs(row).max() for row in maps[method].astype(np.float64)]
        expected = np.mean([np.linalg.norm(a - b) for a, b in combinations(scaled, 2)])
        assert distance.sel(attribution="xy"[method]).values == pytest.approx(expected, rel=1e-12)
    assert float(member_l2_distance(member_maps.isel(attribution=0, member=[0, 0]))) == 0.0


def test_member_robustness_by_hand():
    # regions A (3 voxels), B, C, D (1 voxel each) and an empty region E; one voxel outside every region
    atlas = Atlas("hand", np.array([1, 1, 1, 2, 3, 4, 0], np.int32),
                  pd.DataFrame({"name": list("ABCDE")}, index=pd.Index([1, 2, 3, 4, 5], name="label")))
    group_values = [[1, 2, 0.5, 0.1], [1, 0.5, 2, 0.1], [0.1, 2, 0.5, 1]]  # per member, per region and voxel
    control_values = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 10]]
    voxels = np.array([0, 0, 0, 1, 2, 3])

    def voxel_map(per_region):
        return np.append(np.asarray(per_region)[voxels], 7.0)

    maps = np.stack([np.stack([voxel_map(group), voxel_map(group), voxel_map(control)])
                     for group, control in zip(group_values, control_values, strict=True)])
    maps[1] *= -1  # member 1's maps with the opposite sign: robustness is scored on |R|
    relevance = xr.DataArray(maps, dims=("member", "subject", "voxel"))
    group = np.array([True, True, False])
    table = member_robustness(relevance, atlas, {"patients": group}, controls=~group, k=2)
    # top-2 by sum: AB, AC, BD; by density: AB, AC, BD; by gain over the controls: AB, AC, BC
    assert list(table.columns) == ["group", "n", "l2_distance", "top_k_overlap_sum", "top_k_overlap_density",
                                   "top_k_overlap_gain"]
    assert list(table.index) == ["relevance"]
    row = table.iloc[0]
    assert (row["group"], row["n"]) == ("patients", 2)
    assert row["top_k_overlap_sum"] == pytest.approx(1 / 3)
    assert row["top_k_overlap_density"] == pytest.approx(1 / 3)
    assert row["top_k_overlap_gain"] == pytest.approx(0.5)
    scaled = [voxel_map(values) / 7.0 for values in group_values]
    expected = np.mean([np.linalg.norm(a - b) for a, b in combinations(scaled, 2)])
    assert row["l2_distance"] == pytest.approx(expected, rel=1e-12)
    two_groups = member_robustness(relevance, atlas, {"patients": group, "controls": ~group}, k=2)
    assert list(two_groups["group"]) == ["patients", "controls"] and list(two_groups["n"]) == [2, 1]
    assert two_groups["top_k_overlap_gain"].isna().all()  # no controls given: no gain
    with_controls = member_robustness(relevance, atlas, {"patients": group, "controls": ~group}, controls=~group, k=2)
    assert with_controls["top_k_overlap_gain"].tolist()[0] == pytest.approx(0.5)
    assert np.isnan(with_controls["top_k_overlap_gain"].tolist()[1])  # the controls over themselves: no gain

    with pytest.raises(ValueError, match=r"number of regions \(4\), got 5"):
        member_robustness(relevance, atlas, {"g": group}, k=5)
    with pytest.raises(ValueError, match=r"one value per subject \(3\)"):
        member_robustness(relevance, atlas, {"g": np.array([True, False])}, k=2)
    with pytest.raises(ValueError, match="at least two members"):
        member_robustness(relevance.isel(member=[0]), atlas, {"g": group}, k=2)
    with pytest.raises(ValueError, match=r"\['member'\] missing"):
        member_robustness(relevance.isel(member=0), atlas, {"g": group}, k=2)
    with pytest.raises(ValueError, match="controls has no subjects"):
        member_robustness(relevance, atlas, {"g": group}, controls=np.zeros(3, bool), k=2)


def test_member_robustness_equals_numpy_reference(hand_atlas):
    atlas = hand_regions(hand_atlas)
    labels = atlas.voxel_labels
    rng = np.random.default_rng(7)
    values = rng.normal(0.5, 1, (3, 6, labels.size, 2))  # member, subject, voxel, method: voxel not last
    relevance = xr.DataArray(da.from_array(values, chunks=(1, 3, 20, 1)),
                             dims=("member", "subject", "voxel", "attribution"),
                             coords={"attribution": ["lrp", "smoothgrad"]})
    group = np.array([True, True, True, False, False, True])
    k = 3
    table = member_robustness(relevance, atlas, {"group": group}, controls=~group, k=k)
    assert list(table.index) == ["lrp", "smoothgrad"]

    present = [label for label in atlas.regions.index if np.any(labels == label)]
    counts = np.array([np.sum(labels == label) for label in present])
    for method, name in enumerate(["lrp", "smoothgrad"]):
        tops = {"sum": [], "density": [], "gain": []}
        means = []
        for member in range(3):
            maps = np.abs(values[member, :, :, method])
            sums = np.stack([maps[:, labels == label].sum(axis=1) for label in present], axis=1)
            rankings = {"sum": sums[group].mean(0), "density": sums[group].mean(0) / counts,
                        "gain": sums[group].mean(0) / sums[~group].mean(0)}
            for ranking, score in rankings.items():
                tops[ranking].append(set(np.argsort(-score)[:k]))
            means.append(maps[group].mean(0))
        for ranking, sets in tops.items():
            expected = np.mean([len(a & b) / k for a, b in combinations(sets, 2)])
            assert table.loc[name, f"top_k_overlap_{ranking}"] == pytest.approx(expected)
        scaled = [mean / np.abs(mean).max() for mean in means]
        expected = np.mean([np.linalg.norm(a - b) for a, b in combinations(scaled, 2)])
        assert table.loc[name, "l2_distance"] == pytest.approx(expected, rel=1e-12)


def test_parameter_randomisation_scores_maps_of_the_trained_and_the_redrawn_model():
    import torch
    from scipy.stats import spearmanr

    from engine.models.attribution import attribute
    from engine.models.networks import ModelSpec, build_model
    from engine.models.validation import parameter_randomisation, randomised_copy

    shape = (12, 14, 10)
    torch.manual_seed(0)
    model = build_model(ModelSpec("mrinet", shape, 1, 1), target_mean=50.0, target_scale=10.0).double().eval()
    inputs = torch.randn(3, 1, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inside = np.zeros(shape, bool)
    inside[2:10, 2:12, 2:8] = True
    itself = parameter_randomisation(model, inputs, ["gradient"], inside=inside, randomised=model)
    assert itself.loc[0, "spearman"] == pytest.approx(1.0) and itself.loc[0, "spearman_abs"] == pytest.approx(1.0)

    redrawn = randomised_copy(model, seed=5)
    assert float(redrawn.output_scale[0]) == 10.0  # buffers are kept
    assert not any(torch.equal(a, b) for (name, a), b in zip(model.named_parameters(), redrawn.parameters(),
                                                              strict=True) if name.endswith("weight"))
    table = parameter_randomisation(model, inputs, ["gradient", "gradient_x_input"], inside=inside, seed=5)
    assert list(table.attribution) == ["gradient", "gradient_x_input"] and list(table.n) == [3, 3]
    trained, shuffled = (attribute(network, inputs, "gradient").numpy()[:, inside] for network in (model, redrawn))
    expected = np.mean([spearmanr(np.abs(a), np.abs(b)).statistic for a, b in zip(trained, shuffled, strict=True)])
    assert table.loc[0, "spearman_abs"] == pytest.approx(expected, rel=1e-12)
    assert abs(table.loc[0, "spearman"]) < 0.5  # the gradient of a re-drawn network is another map


def test_subject_groups_by_outcome_and_by_age_band():
    predictions = pd.DataFrame({"participant_id": ["a", "b", "c", "d", "e"],
                                "observed": ["AD", "AD", "HC", "HC", "AD"],
                                "p_AD": [0.9, 0.2, 0.7, 0.1, 0.6], "p_HC": [0.1, 0.8, 0.3, 0.9, 0.4]})
    groups = subject_groups(["e", "d", "c", "b", "a"], None, predictions)
    assert groups.kind == "outcome (positive class HC)"  # sorted classes: the last is positive
    assert {name: list(mask) for name, mask in groups.masks.items()} == {
        "TP": [False, True, False, False, False], "FP": [False, False, False, True, False],
        "TN": [True, False, False, False, True], "FN": [False, False, True, False, False]}
    assert list(groups.gain_numerator) == [False, True, True, False, False]  # patients: observed HC here
    assert list(groups.gain_denominator) == [True, False, False, True, True]
    by_age = subject_groups(["a", "b", "c", "d"], np.array([30.0, 45, 70, 65]), None, age_bands=(40, 60))
    assert list(by_age.masks) == ["age < 40", "age 40–60", "age ≥ 60"]
    assert list(by_age.gain_numerator) == [False, False, True, True] and by_age.gain_description == \
        "age ≥ 60 over age < 40"


# ---------------------------------------------------------------------------------------
# The table of methods


def test_score_methods_tabulates_the_single_scores(hand_atlas):
    atlas = hand_regions(hand_atlas)
    truth = np.isin(atlas.voxel_labels, [3, 4])  # both hippocampi
    rng = np.random.default_rng(8)
    noise = rng.normal(0, 0.2, (2, 4, truth.size))
    values = np.stack([truth + noise[0], noise[1]])
    values[1, 2] = np.nan  # a missing map
    relevance = xr.DataArray(da.from_array(values, chunks=(1, 2, 30)), dims=("attribution", "subject", "voxel"),
                             coords={"attribution": ["planted", "random"]})
    table = score_methods(relevance, truth, atlas, k=2)
    assert list(table.columns) == ["n_maps", "mass_accuracy", "mass_accuracy_uniform", "roc_auc", "top_k_precision",
                                   "top_k_precision_uniform"]
    assert list(table.index) == ["planted", "random"]
    assert list(table["n_maps"]) == [4, 3]
    np.testing.assert_allclose(table["mass_accuracy"], relevance_mass_accuracy(relevance, truth).mean("subject"))
    np.testing.assert_allclose(table["roc_auc"], voxel_roc_auc(relevance, truth).mean("subject"))
    assert table.loc["planted", "roc_auc"] > 0.95 and table.loc["planted", "top_k_precision"] == 1.0
    assert table["mass_accuracy_uniform"].iloc[0] == pytest.approx(truth.mean())
    assert table["top_k_precision_uniform"].iloc[0] == pytest.approx(2 / 4)  # of the four regions with voxels

    per_map = score_methods(relevance, truth, atlas, k=2, average_over=())
    assert per_map.index.names == ["attribution", "subject"] and len(per_map) == 8
    assert per_map.loc[("random", 2), ["mass_accuracy", "roc_auc", "top_k_precision"]].isna().all()
    assert per_map.loc[("random", 2), "n_maps"] == 0
    regions = [label for label in atlas.regions.index if np.any(atlas.voxel_labels == label)]
    for subject in range(4):
        means = [values[0, subject, atlas.voxel_labels == label].mean() for label in regions]
        best = {atlas.regions.loc[regions[n], "name"] for n in np.argsort(means)[::-1][:2]}
        expected = len(best & {"Left_Hippocampus", "Right_Hippocampus"}) / 2
        assert per_map.loc[("planted", subject), "top_k_precision"] == expected

    ensemble = score_methods(relevance.isel(attribution=0), truth)
    assert list(ensemble.index) == ["planted"] and "top_k_precision" not in ensemble
    with pytest.raises(ValueError, match=r"number of regions \(4\), got 5"):
        score_methods(relevance, truth, atlas, k=5)
    with pytest.raises(ValueError, match=r"truth regions \['Unused'\]"):
        score_methods(relevance, truth, atlas, k=2, truth_regions=["Unused"])  # it has no voxels
    with pytest.raises(ValueError, match="no atlas region"):
        score_methods(relevance, atlas.voxel_labels == 0, atlas, k=2)
