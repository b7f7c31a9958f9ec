"""Relevance in lesion/PVS masks: indices by hand and against numpy, the paired comparison against scipy and
brute force, PVS masks on a constructed volume."""

from __future__ import annotations

import io
import itertools
import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

from engine.analysis.mask_relevance import (
    INDICES,
    cluster_count,
    compare_to_average,
    comparison_figure,
    mask_indices,
    pvs_mask,
)
from engine.data.grid import Grid
from engine.data.masker import Masker


def _relevance(values, subjects, **coords) -> xr.DataArray:
    values = np.asarray(values, np.float32)
    dims = ("attribution", "subject", "voxel")[-values.ndim:]
    return xr.DataArray(values, dims=dims, coords={"subject": subjects, **coords}, name="R")


def test_indices_equal_a_hand_computation():
    relevance = _relevance([[1, 2, 0, -1, 3, 0, 0.5, -0.5, 4, 0],
                            [0, -1, -2, 0, 0, 0, 0, 0, 0, -1]], ["a", "b"], age=("subject", [61.0, 70.0]))
    masks = xr.DataArray(np.array([[0] * 10, [0] * 10, [1, 1, 0, 0, 1, 0, 0, 0, 0, 0]], np.uint8),
                         dims=("subject", "voxel"), coords={"subject": ["b", "c", "a"]})  # more subjects, reordered
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = mask_indices(masks, relevance).compute()
    assert set(result.data_vars) == set(INDICES)
    # a: Σ R = 9 over 7 nonzero voxels, lesions 1 + 2 + 3, positives 1 + 2 + 3 + 0.5 + 4 = 10.5 over 5 voxels.
    expected = {"a_voxel": [9 / 7, -4 / 3], "s_voxel": [9, -4], "n_wml_voxel": [3, 0], "a_wml_voxel": [2, np.nan],
                "s_wml_voxel": [6, 0], "s_pos_voxel": [10.5, 0], "s_neg_voxel": [-1.5, -4],
                "p_wml_voxel": [6 / 10.5, np.nan], "ap_voxel": [2.1, np.nan], "p_voxel": [2.1 * 3 / 10.5, np.nan]}
    for name, values in expected.items():
        np.testing.assert_allclose(result[name].values, values, rtol=1e-15, err_msg=name)
    assert result["n_wml_voxel"].dtype.kind == "i"
    np.testing.assert_array_equal(result["age"], [61.0, 70.0])


def test_indices_equal_numpy_float64_with_methods_and_voxel_chunks():
    rng = np.random.default_rng(4)
    methods, subjects, voxels = 2, 6, 37
    values = rng.normal(0, 1, (methods, subjects, voxels)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = 0
    values[1, 2] = -np.abs(values[1, 2])  # no positive relevance: NaN shares
    lesions = rng.random((subjects, voxels)) < 0.3
    lesions[4] = False  # no lesions: NaN lesion mean
    names = [f"sub-{n}" for n in range(subjects)]
    relevance = xr.DataArray(da.from_array(values, chunks=(1, 2, 10)), dims=("attribution", "subject", "voxel"),
                             coords={"attribution": ["lrp", "gradient"], "subject": names})
    masks = xr.DataArray(da.from_array(lesions, chunks=(3, 20)), dims=("subject", "voxel"), coords={"subject": names})
    result = mask_indices(masks, relevance)
    assert isinstance(result["s_wml_voxel"].data, da.Array)  # lazy until asked
    result = result.compute()
    for m, s in itertools.product(range(methods), range(subjects)):
        r, inside = values[m, s].astype(np.float64), lesions[s]
        positive, n = r[r > 0], int(inside.sum())
        mean_positive = positive.sum() / positive.size if positive.size else np.nan
        expected = {"s_voxel": r.sum(), "a_voxel": r.sum() / np.count_nonzero(r), "n_wml_voxel": n,
                    "s_wml_voxel": r[inside].sum(), "a_wml_voxel": r[inside].sum() / n if n else np.nan,
                    "s_pos_voxel": positive.sum(), "s_neg_voxel": r[r < 0].sum(), "ap_voxel": mean_positive,
                    "p_wml_voxel": r[inside].sum() / positive.sum() if positive.size else np.nan,
                    "p_voxel": mean_positive * n / positive.sum() if positive.size else np.nan}
        for name, value in expected.items():
            got = result[name].sel(subject=names[s])
            got = got.isel(attribution=m) if "attribution" in got.dims else got
            np.testing.assert_allclose(float(got), value, rtol=1e-12, atol=1e-12, err_msg=f"{name} {m} {s}")


def test_bad_inputs_name_the_problem():
    relevance = _relevance(np.ones((2, 10)), ["a", "b"])
    masks = xr.DataArray(np.ones((2, 10), bool), dims=("subject", "voxel"), coords={"subject": ["a", "c"]})
    with pytest.raises(ValueError, match=r"no mask for participant\(s\) \['b'\]"):
        mask_indices(masks, relevance)
    with pytest.raises(ValueError, match="voxel counts differ: masks have 9 voxels, relevance maps 10"):
        mask_indices(masks.assign_coords(subject=["a", "b"]).isel(voxel=slice(0, 9)), relevance)
    with pytest.raises(ValueError, match="'subject' and 'voxel' dims"):
        mask_indices(masks, relevance.rename(voxel="v"))
    with pytest.raises(ValueError, match="lack"):
        compare_to_average(pd.DataFrame({"a_voxel": [1.0]}))


def _table(rng, n, methods=("lrp", "gradient")) -> pd.DataFrame:
    parts = []
    for shift, method in enumerate(methods):
        average = rng.normal(1, 0.3, n)
        parts.append(pd.DataFrame({"attribution": method, "subject": np.arange(n), "a_voxel": average,
                                   "a_wml_voxel": average + rng.normal(0.2 * shift, 0.5, n),
                                   "n_wml_voxel": rng.integers(0, 80, n)}))
    table = pd.concat(parts, ignore_index=True)
    table.loc[0, "n_wml_voxel"] = 30  # exactly min_voxels: excluded
    return table


def test_comparison_equals_scipy_wilcoxon_and_excludes_small_lesion_loads():
    table = _table(np.random.default_rng(5), 60)
    result = compare_to_average(table, min_voxels=30).set_index("attribution")
    for method, group in table.groupby("attribution"):
        chosen = group[group.n_wml_voxel > 30]
        expected = stats.wilcoxon(chosen.a_wml_voxel, chosen.a_voxel)
        row = result.loc[method]
        assert row["n"] == len(chosen) < len(group)
        assert row["statistic"] == pytest.approx(expected.statistic, rel=1e-12)
        assert row["p"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert row["median_a_voxel"] == pytest.approx(np.median(chosen.a_voxel))
        assert row["median_difference"] == pytest.approx(np.median(chosen.a_wml_voxel - chosen.a_voxel))
    assert result.loc["gradient", "p"] < 0.05 < result.loc["lrp", "p"]  # the planted shift is found
    assert (compare_to_average(table, min_voxels=79)["n"] == 0).all()


def test_rank_biserial_and_hodges_lehmann_by_hand():
    difference = np.array([1, 2, 3, -4, 5, 6, 7.5, 0])
    table = pd.DataFrame({"a_voxel": np.full(8, 10.0), "a_wml_voxel": 10 + difference, "n_wml_voxel": 31})
    row = compare_to_average(table).iloc[0]
    assert "attribution" not in compare_to_average(table).columns
    # Ranks of |d| over the 7 nonzero d are 1..7: W⁺ = 24, W⁻ = 4.
    assert row["rank_biserial"] == pytest.approx((24 - 4) / 28)
    walsh = sorted((a + b) / 2 for a, b in itertools.combinations_with_replacement(difference, 2))
    assert row["hodges_lehmann"] == pytest.approx(np.median(walsh))
    # The exact CI by brute force over the 2⁸ sign patterns of ranks 1..8: k largest with P(T⁺ ≤ k − 1) ≤ 0.025.
    sums = [sum(rank for rank, sign in zip(range(1, 9), signs, strict=True) if sign)
            for signs in itertools.product((0, 1), repeat=8)]
    k = max(k for k in range(1, 37) if np.mean(np.array(sums) <= k - 1) <= 0.025)
    assert k == 4
    assert (row["ci_low"], row["ci_high"]) == (walsh[k - 1], walsh[-k])


@pytest.mark.parametrize("n, method", [(20, "exact"), (80, "asymptotic")])
def test_hodges_lehmann_ci_is_the_set_of_shifts_the_test_keeps(n, method):
    rng = np.random.default_rng(n)
    average = rng.normal(0, 1, n)
    table = pd.DataFrame({"a_voxel": average, "a_wml_voxel": average + rng.normal(0.3, 1, n), "n_wml_voxel": 50})
    row = compare_to_average(table).iloc[0]
    difference = table.a_wml_voxel - table.a_voxel
    assert row["ci_low"] < row["hodges_lehmann"] < row["ci_high"]
    for bound, outward in ((row["ci_low"], -1), (row["ci_high"], 1)):
        for step, rejected in ((outward * 1e-9, True), (-outward * 1e-9, False)):
            p = stats.wilcoxon(difference - (bound + step), method=method, correction=True).pvalue
            assert (p <= 0.05) == rejected, (bound, step, p)


def test_too_few_participants_give_nan_without_warnings():
    table = _table(np.random.default_rng(6), 5, methods=("lrp",)).assign(n_wml_voxel=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = compare_to_average(table).iloc[0]
    assert row["n"] == 5 and row.drop(["attribution", "n"]).isna().all()


def test_comparison_figure_from_mask_indices():
    rng = np.random.default_rng(7)
    names = [f"sub-{n}" for n in range(12)]
    relevance = _relevance(rng.normal(0, 1, (2, 12, 200)), names, attribution=["lrp", "gradient"])
    masks = xr.DataArray(rng.random((12, 200)) < 0.3, dims=("subject", "voxel"), coords={"subject": names})
    indices = mask_indices(masks, relevance)
    figure = comparison_figure(indices, min_voxels=30)
    result = compare_to_average(indices, min_voxels=30)
    assert list(result["attribution"]) == ["lrp", "gradient"] and (result["n"] == 12).all()
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == [f"{m}: Wilcoxon p = {p:.2g}, n = 12"
                      for m, p in zip(result["attribution"], result["p"], strict=True)]
    figure.savefig(io.BytesIO(), format="png")
    with pytest.raises(ValueError, match="one per method"):
        comparison_figure(indices, ax=figure.axes[0])


# ---------------------------------------------------------------------------------------
# PVS masks

SHAPE = (10, 9, 8)
TUBE = [(x, 2, 2) for x in range(1, 6)]  # 5 voxels, one at exactly the threshold: kept
SMALL = [(x, 6, 2) for x in range(1, 5)]  # 4 voxels: removed, also with its 0.49 neighbour
PAIR = [(6, 5, 3), (6, 5, 4), (6, 5, 5), (7, 6, 6), (7, 6, 7)]  # 3 + 2 voxels touching at a corner: one cluster
OUTSIDE = (3, 3, 2)  # beside the tube but not a cohort voxel


def _pvs_volumes():
    volume = np.zeros(SHAPE, np.float32)
    for voxel in TUBE + PAIR:
        volume[voxel] = 0.6
    volume[TUBE[2]] = 0.5
    for voxel in SMALL:
        volume[voxel] = 0.9
    volume[(0, 6, 2)] = 0.49
    volume[(9, 0, 7)] = 0.7  # isolated
    cohort = np.ones(SHAPE, bool)
    cohort[OUTSIDE] = False
    masker = Masker(Grid(SHAPE, np.diag([2.0, 2.0, 2.0, 1.0])), np.nonzero(cohort))
    rows = masker.transform(np.stack([volume, np.zeros(SHAPE, np.float32), volume]))
    probability = xr.DataArray(da.from_array(rows, chunks=(2, 100)), dims=("subject", "voxel"),
                               coords={"subject": ["a", "b", "c"], "age": ("subject", [50.0, 60.0, 70.0])})
    return probability, masker, cohort


def _grown(voxels, cohort, steps):
    """Breadth-first growth by face neighbours through the cohort's voxels."""
    grown = set(voxels)
    for _ in range(steps):
        grown |= {tuple(np.add(voxel, step)) for voxel in grown for step in itertools.chain(
            np.eye(3, dtype=int), -np.eye(3, dtype=int))}
        grown = {voxel for voxel in grown if all(0 <= c < s for c, s in zip(voxel, SHAPE, strict=True))
                 and cohort[voxel]}
    return grown


@pytest.mark.parametrize("dilate", [0, 1, 2])
def test_pvs_mask_keeps_clusters_and_dilates_through_cohort_voxels(dilate):
    probability, masker, cohort = _pvs_volumes()
    mask = pvs_mask(probability, masker, dilate=dilate)
    assert isinstance(mask.data, da.Array) and mask.dtype == bool
    volumes = masker.inverse_transform(mask.values, fill=False)
    expected = _grown(TUBE + PAIR, cohort, dilate)
    assert {tuple(int(c) for c in voxel) for voxel in np.argwhere(volumes[0])} == expected
    # By hand, one step adds the tube's 2 ends + 5·4 sides − the non-cohort voxel and the pair's 2 + 3·4 and
    # 1 + 2·4 (z = 8 is off the grid).
    assert len(expected) == {0: 10, 1: 10 + 21 + 23, 2: len(expected)}[dilate]
    assert not volumes[1].any()
    np.testing.assert_array_equal(volumes[2], volumes[0])
    if dilate == 2:
        assert (3, 4, 2) not in expected  # reached only through the non-cohort voxel beside the tube


def test_cluster_count_agrees_with_the_mask():
    probability, masker, _ = _pvs_volumes()
    counts = cluster_count(probability, masker).compute()
    np.testing.assert_array_equal(counts["pvs_count"], [2, 0, 2])
    np.testing.assert_array_equal(counts["pvs_voxels"], pvs_mask(probability, masker).sum("voxel"))
    np.testing.assert_array_equal(counts["age"], [50.0, 60.0, 70.0])
    assert cluster_count(probability, masker, min_cluster=4)["pvs_count"].values.tolist() == [3, 0, 3]
    assert cluster_count(probability, masker, threshold=0.45)["pvs_count"].values.tolist() == [3, 0, 3]
    with pytest.raises(ValueError, match="voxels, the masker"):
        pvs_mask(probability.isel(voxel=slice(1, None)), masker)
