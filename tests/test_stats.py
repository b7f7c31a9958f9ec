"""Voxel-wise OLS by streaming FWL sums against statsmodels OLS per voxel (float64)."""

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import xarray as xr
from scipy import special, stats
from statsmodels.stats.multitest import multipletests

from engine.analysis.stats import (
    ExchangeabilityBlocks,
    _two_sided_p,
    adjust_p,
    design_matrix,
    map_similarity,
    permutation,
    region_correlations,
    region_models,
    voxelwise_ols,
)

N, V = 60, 25


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    covariates = pd.DataFrame({"age": rng.uniform(20, 80, N), "tiv": rng.normal(1500, 120, N),
                               "site": rng.choice(["A", "B", "C"], N), "sex": rng.choice(["F", "M"], N)})
    x = rng.normal(size=N) + 0.02 * covariates["age"].to_numpy()
    x_map = rng.normal(size=(N, V)) + x[:, None]
    y = (0.5 * x[:, None] + 0.01 * covariates["age"].to_numpy()[:, None] + rng.normal(size=(N, V))
         + (covariates["site"] == "B").to_numpy()[:, None])
    return covariates, x, x_map, y


def _reference(y, x, covariates):
    design = sm.add_constant(pd.concat([pd.Series(x, name="x"), covariates], axis=1), has_constant="add")
    return sm.OLS(y, design).fit()


def _maps(values):
    return xr.DataArray(values, dims=("subject", "voxel")).chunk({"subject": 16})


def test_map_outcome_on_a_subject_predictor_equals_statsmodels(data):
    covariates, x, _, y = data
    result = voxelwise_ols(_maps(y), x, covariates, categorical=["site", "sex"])
    design = design_matrix(covariates, ["site", "sex"]).drop(columns="intercept")
    for voxel in range(V):
        fit = _reference(y[:, voxel], x, design)
        assert result.beta[voxel] == pytest.approx(fit.params["x"], rel=1e-6)
        assert result.se[voxel] == pytest.approx(fit.bse["x"], rel=1e-6)
        assert result.t[voxel] == pytest.approx(fit.tvalues["x"], rel=1e-6)
        assert result.p[voxel] == pytest.approx(fit.pvalues["x"], rel=1e-6)
    assert result.attrs["n"] == N and result.attrs["df"] == N - design.shape[1] - 2


def test_voxelwise_predictor_map_equals_statsmodels_and_partial_r(data):
    covariates, _, x_map, y = data
    result = voxelwise_ols(_maps(y), _maps(x_map), covariates[["age", "tiv"]])
    for voxel in range(V):
        fit = _reference(y[:, voxel], x_map[:, voxel], covariates[["age", "tiv"]])
        assert result.t[voxel] == pytest.approx(fit.tvalues["x"], rel=1e-6)
        residual_y = sm.OLS(y[:, voxel], sm.add_constant(covariates[["age", "tiv"]])).fit().resid
        residual_x = sm.OLS(x_map[:, voxel], sm.add_constant(covariates[["age", "tiv"]])).fit().resid
        assert result.partial_r[voxel] == pytest.approx(np.corrcoef(residual_x, residual_y)[0, 1], rel=1e-6)


def test_missing_subjects_are_dropped_and_counted(data):
    covariates, x, _, y = data
    y = y.copy()
    y[3] = np.nan  # a missing map
    covariates = covariates.copy()
    covariates.loc[10, "age"] = np.nan
    result = voxelwise_ols(_maps(y), x, covariates[["age"]])
    keep = np.ones(N, bool)
    keep[[3, 10]] = False
    fit = _reference(y[keep, 0], x[keep], covariates.loc[keep, ["age"]].reset_index(drop=True))
    assert result.attrs["n"] == N - 2
    assert result.t[0] == pytest.approx(fit.tvalues["x"], rel=1e-6)
    y[20, 4] = np.nan  # one missing voxel drops that subject's map too
    keep[20] = False
    result = voxelwise_ols(_maps(y), x, covariates[["age"]])
    fit = _reference(y[keep, 0], x[keep], covariates.loc[keep, ["age"]].reset_index(drop=True))
    assert result.attrs["n"] == N - 3
    assert result.t[0] == pytest.approx(fit.tvalues["x"], rel=1e-6)


def test_bad_designs_are_refused(data):
    covariates, x, _, y = data
    collinear = covariates[["age"]].assign(age_again=covariates["age"] * 2)
    with pytest.raises(ValueError, match="rank-deficient"):
        voxelwise_ols(_maps(y), x, collinear)
    with pytest.raises(ValueError, match="needs more subjects"):
        voxelwise_ols(_maps(y[:4]), x[:4], covariates.iloc[:4], categorical=["site", "sex"])
    with pytest.raises(ValueError, match=r"'site'.*not numeric"):
        voxelwise_ols(_maps(y), x, covariates[["age", "site"]])
    with pytest.raises(ValueError, match="needs a \\(subject, voxel\\) map"):
        voxelwise_ols(x, x, covariates[["age"]])


def _brute_force_max_t(y, x, covariates, orders, permute):
    """Freedman–Lane by refitting the full model per voxel for each permuted outcome (numpy, float64)."""
    design = design_matrix(covariates, ["site"]).to_numpy()
    y2 = y if y.ndim == 2 else y[:, None]
    fitted = design @ np.linalg.lstsq(design, y2, rcond=None)[0]
    residuals = y2 - fitted
    maxima = []
    for order in orders:
        permuted = fitted + permute(residuals, order)
        t = []
        for voxel in range(max(y2.shape[1], x.shape[1] if x.ndim == 2 else 1)):
            predictor = x[:, voxel] if x.ndim == 2 else x
            outcome = permuted[:, voxel if permuted.shape[1] > 1 else 0]
            fit = sm.OLS(outcome, np.column_stack([predictor, design])).fit()
            t.append(fit.tvalues[0])
        maxima.append(np.abs(t).max())
    return np.array(maxima)


@pytest.mark.parametrize("case", ["map outcome", "map predictor", "both maps"])
def test_permutation_null_equals_refitting_each_permutation(data, case):
    covariates, x, x_map, y = data
    covariates = covariates[["age", "site"]]
    outcome, predictor = {"map outcome": (y, x), "map predictor": (y[:, 0], x_map), "both maps": (y, x_map)}[case]
    as_term = {True: _maps, False: lambda values: values}
    result = voxelwise_ols(as_term[outcome.ndim == 2](outcome), as_term[predictor.ndim == 2](predictor), covariates,
                           ["site"], permutations=12, seed=5, permutation_batch=5)
    orders = [permutation(5, k, N) for k in range(12)]
    # the outcome side permutes residual rows by σ; the design side pairs design row σ(i) with residual i
    permute = ((lambda r, order: r[order]) if case == "map predictor"
               else (lambda r, order: r[np.argsort(order)]))
    expected = _brute_force_max_t(outcome, predictor, covariates, orders, permute)
    # products in float32 when one term is a vector (as FSL randomise), float64 for two maps
    np.testing.assert_allclose(result.max_t_null.values, expected, rtol=1e-8 if case == "both maps" else 1e-4)


def test_without_covariates_the_null_equals_refitting_each_permutation(data):
    _, x, _, y = data
    result = voxelwise_ols(_maps(y), x, None, permutations=8, seed=1)
    orders = [permutation(1, k, N) for k in range(8)]
    expected = _brute_force_max_t(y, x, pd.DataFrame(index=range(N), columns=["site"]).fillna("A"), orders,
                                  lambda r, order: r[np.argsort(order)])
    np.testing.assert_allclose(result.max_t_null.values, expected, rtol=1e-4)


#: Blocks of 2, 2, 1, 3, 3 and 1 rows (participants with that many scans), not in row order.
BLOCK_LABELS = np.array(["a", "a", "b", "c", "b", "d", "d", "d", "e", "e", "e", "f"])


def test_blocks_move_whole_or_their_rows_stay_inside_them():
    whole, within = ExchangeabilityBlocks(BLOCK_LABELS), ExchangeabilityBlocks(BLOCK_LABELS, whole=False)
    rows = {label: np.flatnonzero(np.equal(BLOCK_LABELS, label)) for label in "abcdef"}
    seen_whole, seen_within = set(), set()
    for index in range(300):
        order = permutation(3, index, 12, whole)
        assert sorted(order) == list(range(12))
        for members in rows.values():  # a block's rows come from one block of as many rows, in its order
            sources = [source for source in rows.values() if len(source) == len(members)]
            assert any(np.array_equal(order[members], source) for source in sources)
        seen_whole.add(tuple(order))
    for index in range(3000):  # enough draws to meet each of the 144 orders (all met: p ≈ 1e-7 to fail)
        order = permutation(3, index, 12, within)
        assert (BLOCK_LABELS[order] == BLOCK_LABELS).all()
        seen_within.add(tuple(order))
    assert len(seen_whole) == 2 * 2 * 2  # a↔b, c↔f, d↔e: each pair swapped or not
    assert len(seen_within) == 2 * 2 * 6 * 6  # 2!·2!·3!·3! orders inside the blocks


@pytest.mark.parametrize("whole", [True, False])
def test_block_permutation_null_equals_refitting_each_permuted_design(data, whole):
    covariates, x, _, y = data
    covariates = covariates[["age", "site"]].copy()
    covariates.loc[4, "age"] = np.nan  # row 4 is left out: its block keeps two scans
    labels = np.repeat(np.arange(N // 3), 3)
    blocks = ExchangeabilityBlocks(labels, whole)
    result = voxelwise_ols(_maps(y), x, covariates, ["site"], permutations=10, seed=4, permutation_batch=3,
                           blocks=blocks)
    kept = np.flatnonzero(covariates["age"].notna())
    orders = [permutation(4, k, len(kept), ExchangeabilityBlocks(labels[kept], whole)) for k in range(10)]
    expected = _brute_force_max_t(y[kept], x[kept], covariates.iloc[kept].reset_index(drop=True), orders,
                                  lambda r, order: r[np.argsort(order)])
    np.testing.assert_allclose(result.max_t_null.values, expected, rtol=1e-4)
    assert result.attrs["permuted"] == ("whole blocks" if whole else "within blocks")


def test_designs_the_block_permutations_cannot_test_are_refused(data, region_table):
    _, x, x_map, y = data
    labels = np.repeat(np.arange(N // 3), 3)
    between = np.repeat(x[::3], 3)  # one value per participant
    with pytest.raises(ValueError, match="between-participant effect"):
        voxelwise_ols(_maps(y), between, permutations=5, blocks=ExchangeabilityBlocks(labels, whole=False))
    unique_sizes = np.repeat(np.arange(10), [*range(1, 10), 15])  # 60 rows in blocks of 1, 2, …, 9 and 15
    for outcome, predictor in ((_maps(y), x), (y[:, 0], _maps(x_map))):  # a vector or a map predictor
        with pytest.raises(ValueError, match="no two blocks have the same number of scans"):
            voxelwise_ols(outcome, predictor, permutations=5, blocks=ExchangeabilityBlocks(unique_sizes))
    people = region_table.drop_duplicates("participant_id")["participant_id"]
    sizes = np.repeat(np.arange(12), [*range(1, 12), 24])  # 90 participants in blocks of 1, 2, …, 11 and 24
    blocks = region_table["participant_id"].map(dict(zip(people, sizes, strict=True)))
    with pytest.raises(ValueError, match="no two blocks have the same number of scans"):
        region_correlations(region_table.assign(block=blocks), "density", "volume", permutations=5, blocks="block")


def repeated_null(rng, participants: int = 40, voxels: int = 20):
    """A cohort without any effect: 2–4 scans per participant whose maps share the participant's own level
    (intra-class correlation ≈ 0.9), a between-participant predictor unrelated to them."""
    labels = np.repeat(np.arange(participants), rng.integers(2, 5, participants))
    maps = rng.normal(size=(participants, voxels))[labels] + 0.3 * rng.normal(size=(len(labels), voxels))
    return xr.DataArray(maps, dims=("subject", "voxel")), rng.normal(size=participants)[labels], labels


@pytest.mark.slow
def test_whole_block_permutation_holds_the_family_wise_error_where_row_permutation_does_not():
    """200 null cohorts with strongly correlated repeated scans: the share with any voxel at p_fwe ≤ 0.05 lies
    within the 99.9 % binomial bounds of 0.05 when participants are permuted whole; permuting scans as if they
    were participants rejects far more often (pseudo-replication)."""
    rng = np.random.default_rng(2)
    cohorts, blocked, rowwise = 200, 0, 0
    for cohort in range(cohorts):
        maps, predictor, labels = repeated_null(rng)
        blocked += float(voxelwise_ols(maps, predictor, permutations=49, seed=cohort,
                                       blocks=ExchangeabilityBlocks(labels)).p_fwe.min()) <= 0.05
        rowwise += float(voxelwise_ols(maps, predictor, permutations=49, seed=cohort).p_fwe.min()) <= 0.05
    low, high = stats.binom.ppf([0.0005, 0.9995], cohorts, 0.05) / cohorts
    assert low <= blocked / cohorts <= high
    assert rowwise / cohorts > 0.5


@pytest.mark.parametrize("case", ["map outcome", "map predictor", "both maps"])
def test_voxels_too_few_participants_have_a_value_at_are_left_out_of_the_fit_and_the_null(data, case):
    """Zeros planted at 5 voxels (a map nonzero for only 3, 20 or 40 of the 60 participants), and with two maps
    a voxel each map has 40 values at but both only 20: coverage counts the participants nonzero in every map at
    once (numpy's count); with min_coverage 0.5 the voxels under 30 are NaN and the max-T
    null equals refitting each permutation on the covered voxels only."""
    covariates, x, x_map, y = data
    covariates = covariates[["age", "site"]]
    y, x_map = y.copy(), x_map.copy()
    rng = np.random.default_rng(3)
    for voxel, nonzero in zip((2, 7, 11, 18, 23), (3, 20, 40, 3, 29), strict=True):
        hidden = rng.permutation(N)[nonzero:]
        (x_map if voxel in (18, 23) and case != "map outcome" else y)[hidden, voxel] = 0
    if case == "both maps":  # each map nonzero for 40 participants, both at once for only 20 of them
        order = rng.permutation(N)
        y[order[:20], 24], x_map[order[20:40], 24] = 0, 0
    outcome, predictor = {"map outcome": (y, x), "map predictor": (y[:, 0], x_map), "both maps": (y, x_map)}[case]
    maps = [values for values in (outcome, predictor) if values.ndim == 2]
    expected_coverage = np.logical_and.reduce([values != 0 for values in maps]).sum(axis=0)
    as_term = {True: _maps, False: lambda values: values}
    result = voxelwise_ols(as_term[outcome.ndim == 2](outcome), as_term[predictor.ndim == 2](predictor), covariates,
                           ["site"], permutations=12, seed=5, permutation_batch=5, min_coverage=0.5)
    np.testing.assert_array_equal(result.coverage.values, expected_coverage)
    covered = expected_coverage >= 30
    assert (~covered).sum() >= 2  # the planted voxels under 30 that this case's maps hold
    if case == "both maps":
        assert not covered[24] and ((y[:, 24] != 0).sum(), (x_map[:, 24] != 0).sum()) == (40, 40)
    assert np.isnan(result.t.values[~covered]).all() and np.isnan(result.p.values[~covered]).all()
    everything = voxelwise_ols(as_term[outcome.ndim == 2](outcome), as_term[predictor.ndim == 2](predictor),
                               covariates, ["site"])
    np.testing.assert_array_equal(result.t.values[covered], everything.t.values[covered])
    orders = [permutation(5, k, N) for k in range(12)]
    permute = ((lambda r, order: r[order]) if case == "map predictor"
               else (lambda r, order: r[np.argsort(order)]))
    outcome, predictor = (values[:, covered] if values.ndim == 2 else values for values in (outcome, predictor))
    expected = _brute_force_max_t(outcome, predictor, covariates, orders, permute)
    np.testing.assert_allclose(result.max_t_null.values, expected, rtol=1e-8 if case == "both maps" else 1e-4)
    with pytest.raises(ValueError, match="min_coverage is a share"):
        voxelwise_ols(_maps(y), x, covariates, ["site"], min_coverage=30)


def test_within_tests_only_the_voxels_it_marks_and_the_max_t_null_runs_over_them(data):
    """within (e.g. the tracts): outside, no statistics; inside, the unrestricted fit's t; the max-T null is the
    brute-force refit of each permutation on the marked voxels alone."""
    covariates, x, _, y = data
    covariates = covariates[["age", "site"]]
    within = np.zeros(V, bool)
    within[[1, 4, 9, 16, 20]] = True
    result = voxelwise_ols(_maps(y), x, covariates, ["site"], permutations=12, seed=5, within=within)
    everything = voxelwise_ols(_maps(y), x, covariates, ["site"])
    assert np.isnan(result.t.values[~within]).all() and np.isnan(result.p_fwe.values[~within]).all()
    np.testing.assert_array_equal(result.t.values[within], everything.t.values[within])
    orders = [permutation(5, k, N) for k in range(12)]
    expected = _brute_force_max_t(y[:, within], x, covariates, orders, lambda r, order: r[np.argsort(order)])
    np.testing.assert_allclose(result.max_t_null.values, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="within marks 3 voxels, the maps have 25"):
        voxelwise_ols(_maps(y), x, covariates, ["site"], within=within[:3])


#: How far the max-T null may move when only the batching, chunking or BLAS threads change: float32
#: products are rounded differently by the kernels BLAS picks for other matrix shapes (≈ 1e-7 seen).
NULL_RTOL = 1e-5


@pytest.mark.parametrize("case", ["map outcome", "map predictor", "both maps"])
def test_permutation_null_depends_on_batching_chunking_and_threads_only_by_rounding(data, case):
    from threadpoolctl import threadpool_limits

    covariates, x, x_map, y = data
    covariates = covariates[["age", "site"]]
    outcome, predictor = {"map outcome": (y, x), "map predictor": (y[:, 0], x_map), "both maps": (y, x_map)}[case]

    def fit(batch, chunks):
        def as_term(values):
            return xr.DataArray(values, dims=("subject", "voxel")).chunk(chunks) if values.ndim == 2 else values
        return voxelwise_ols(as_term(outcome), as_term(predictor), covariates, ["site"], permutations=40, seed=5,
                             permutation_batch=batch)

    reference = fit(5, {"subject": 16})
    with threadpool_limits(1):
        variants = [fit(64, {"subject": 16}), fit(7, {"subject": 9, "voxel": 10}), fit(1, {"subject": 60})]
    for other in variants:
        np.testing.assert_allclose(other.t.values, reference.t.values, rtol=1e-12)
        np.testing.assert_allclose(other.max_t_null.values, reference.max_t_null.values, rtol=NULL_RTOL)
        # p_fwe counts null maxima at or above |t|: it can change only where |t| is within the tolerance
        # of a null maximum, and then by one count per such maximum
        null = reference.max_t_null.values
        near = (np.abs(np.abs(reference.t.values)[:, None] - null) <= NULL_RTOL * null).sum(axis=1)
        change = np.abs(other.p_fwe.values - reference.p_fwe.values) * (1 + len(null))
        assert (np.round(change) <= near).all()
        assert np.array_equal(other.p_fwe.values[near == 0], reference.p_fwe.values[near == 0])


def test_permutation_null_is_bit_identical_when_rerun_with_the_same_settings(data):
    covariates, x, _, y = data
    first, second = (voxelwise_ols(_maps(y), x, covariates[["age", "site"]], ["site"], permutations=30, seed=2)
                     for _ in range(2))
    np.testing.assert_array_equal(first.max_t_null.values, second.max_t_null.values)
    np.testing.assert_array_equal(first.p_fwe.values, second.p_fwe.values)


def test_t_and_max_t_p_values_agree_with_nilearn_permuted_ols():
    from nilearn.mass_univariate import permuted_ols

    rng = np.random.default_rng(11)
    n, v, permutations = 70, 400, 2000
    covariates = pd.DataFrame({"age": rng.uniform(20, 80, n), "site": rng.choice(["A", "B", "C"], n)})
    x = rng.normal(size=n)
    y = rng.normal(size=(n, v))
    y[:, :30] += np.linspace(0.1, 0.6, 30) * x[:, None]  # p_fwe from ~1 down to ~0
    confounds = design_matrix(covariates, ["site"]).drop(columns="intercept").to_numpy()
    reference = permuted_ols(x[:, None], y, confounds, model_intercept=True, n_perm=permutations,
                             two_sided_test=True, random_state=0, output_type="dict", verbose=0)
    result = voxelwise_ols(_maps(y), x, covariates, ["site"], permutations=permutations, seed=0)
    np.testing.assert_allclose(result.t.values, reference["t"][0], rtol=1e-10)
    nilearn_p = 10 ** -reference["logp_max_t"][0]
    # two independent Monte-Carlo estimates of the same p: differences within ~4 binomial SDs
    sd = np.sqrt(2 * nilearn_p * (1 - nilearn_p) / permutations) + 1 / permutations
    assert np.all(np.abs(result.p_fwe.values - nilearn_p) <= 4 * sd)
    assert (result.p_fwe.values < 0.05).sum() >= 5


def test_fdr_and_bonferroni_match_hand_computed_values():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan, 0.5])
    # BH: sorted 0.005, 0.01, 0.03, 0.04, 0.5 (m = 5) → p·m/rank, then running minimum from the top
    expected_bh = np.array([0.025, 0.05, 0.05, 0.025, np.nan, 0.5])
    np.testing.assert_allclose(adjust_p(p, "fdr_bh"), expected_bh, rtol=1e-12)
    np.testing.assert_allclose(adjust_p(p, "bonferroni"), [0.05, 0.2, 0.15, 0.025, np.nan, 1.0], rtol=1e-12)
    with pytest.raises(ValueError, match="unknown correction 'holm-ish'"):
        adjust_p(p, "holm-ish")


def test_map_similarity_equals_numpy_per_subject():
    rng = np.random.default_rng(2)
    first = rng.normal(size=(6, 50))
    second = 0.5 * first + rng.normal(size=(6, 50))
    first[2, 7] = np.nan
    mask = rng.random(50) > 0.3
    result = map_similarity(_maps(first), _maps(second), mask)
    for subject in range(6):
        keep = mask & ~np.isnan(first[subject])
        a, b = first[subject, keep], second[subject, keep]
        assert result.pearson_r[subject] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-10)
        assert result.cosine[subject] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-10)
        assert result.voxels[subject] == keep.sum()
    transposed = map_similarity(_maps(first).T, _maps(second), mask)  # dims by name, not by position
    pd.testing.assert_frame_equal(transposed, result)
    with pytest.raises(ValueError, match="maps differ in subjects or voxels"):
        map_similarity(_maps(first), _maps(second)[:5])


@pytest.fixture
def region_table():
    rng = np.random.default_rng(4)
    n, regions = 90, ["hippocampus", "thalamus", "precuneus", "cuneus"]
    people = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(n)], "age": rng.uniform(20, 80, n),
                           "site": rng.choice(["A", "B", "C"], n)})
    site_offset = people["site"].map({"A": 0.0, "B": 0.8, "C": -0.5}).to_numpy()
    rows = []
    for name in regions:
        volume = rng.normal(3000, 300, n)
        slope = 0.004 if name == "hippocampus" else 0.0
        density = slope * volume + 0.01 * people["age"] + site_offset + rng.normal(0, 1 + 0.01 * people["age"], n)
        rows.append(people.assign(region=name, volume=volume, density=density))
    table = pd.concat(rows, ignore_index=True)
    table.loc[5, "volume"] = np.nan
    return table


def test_region_models_equal_statsmodels_per_region_with_fdr(region_table):
    import statsmodels.formula.api as smf

    result = region_models(region_table, "density ~ volume + age + C(site)", robust=True)
    row = result.set_index(["region", "term"]).loc[("hippocampus", "volume")]
    fit = smf.ols("density ~ volume + age + C(site)", region_table[region_table.region == "hippocampus"]).fit(
        cov_type="HC3")
    assert row.estimate == pytest.approx(fit.params["volume"], rel=1e-10)
    assert row.se == pytest.approx(fit.bse["volume"], rel=1e-10)
    assert row.n == fit.nobs == 89  # the missing volume dropped
    volume = result[result.term == "volume"]
    np.testing.assert_allclose(volume.p_fdr, multipletests(volume.p, method="fdr_bh")[1], rtol=1e-12)
    assert volume.set_index("region").p_fdr.idxmin() == "hippocampus" and row.p_fdr < 0.05
    assert set(result.term) == {"volume", "age", "C(site)[T.B]", "C(site)[T.C]"}


def test_region_correlations_equal_scipy_and_statsmodels_with_bonferroni(region_table):
    import statsmodels.formula.api as smf
    from scipy import stats as scipy_stats

    pearson = region_correlations(region_table, "density", "volume").set_index("region")
    spearman = region_correlations(region_table, "density", "volume", method="spearman").set_index("region")
    partial = region_correlations(region_table, "density", "volume", ["age", "site"], "partial").set_index("region")
    for name, data in region_table.groupby("region"):
        data = data.dropna()
        expected = scipy_stats.pearsonr(data.density, data.volume)
        assert pearson.loc[name, "r"] == pytest.approx(expected.statistic, abs=1e-12)
        assert pearson.loc[name, "p"] == pytest.approx(expected.pvalue, rel=1e-10)
        expected = scipy_stats.spearmanr(data.density, data.volume)
        assert spearman.loc[name, "r"] == pytest.approx(expected.statistic, abs=1e-12)
        assert spearman.loc[name, "p"] == pytest.approx(expected.pvalue, rel=1e-10)
        fit = smf.ols("density ~ volume + age + C(site)", data).fit()  # partial r: the predictor's t-test
        t = fit.tvalues["volume"]
        assert partial.loc[name, "p"] == pytest.approx(fit.pvalues["volume"], rel=1e-10)
        assert partial.loc[name, "r"] == pytest.approx(t / np.sqrt(t**2 + fit.df_resid), abs=1e-12)
        assert partial.loc[name, "n"] == len(data)
    np.testing.assert_allclose(partial["p_bonferroni"], np.minimum(partial["p"] * 4, 1), rtol=1e-12)
    assert partial["p_bonferroni"].idxmin() == "hippocampus" and partial.loc["hippocampus", "p_bonferroni"] < 0.05
    with pytest.raises(ValueError, match="takes no covariates"):
        region_correlations(region_table, "density", "volume", ["age"], "pearson")


def test_a_perfect_correlation_stays_within_one_as_scipys():
    """Two-valued data on a line: the residual products round past ±1 (here, with this machine's BLAS, to
    −1 − 2e-16: the demo test once failed on such a region); r is clipped as scipy clips it."""
    rng = np.random.default_rng(0)
    x = rng.choice([0.0, 1.0], 16) * rng.random() + rng.random()
    y = x * rng.normal() * 5 + rng.normal()
    table = pd.DataFrame({"participant_id": range(16), "region": "a", "y": y, "x": x})
    row = region_correlations(table, "y", "x").iloc[0]
    expected = stats.pearsonr(y, x)
    assert row.r == expected.statistic == -1.0 and row.p == pytest.approx(expected.pvalue, abs=1e-300)


def test_region_correlation_permutation_p(region_table):
    table = region_correlations(region_table, "density", "volume", ["age", "site"], "partial", permutations=999,
                                seed=3).set_index("region")
    assert table.loc["hippocampus", "p_permutation"] == pytest.approx(1 / 1000)  # no permutation reaches it
    nulls = table.drop(index="hippocampus")
    assert (nulls["p_permutation"] > 0.01).all()
    assert nulls["p_permutation"].to_numpy() == pytest.approx(nulls["p"].to_numpy(), abs=0.06)  # as the t-test
    again = region_correlations(region_table, "density", "volume", ["age", "site"], "partial", permutations=999,
                                seed=3).set_index("region")
    assert again["p_permutation"].equals(table["p_permutation"])


@pytest.mark.parametrize("blocks", [None, "whole", "within"])
def test_region_permutation_is_freedman_lane_with_a_max_t_family_wise_p(region_table, blocks):
    """Against a brute-force refit of every permutation (statsmodels OLS): the outcome's residuals given the
    covariates permuted and added back to their fit, Y* = Ŷ_Z + P·e; a region with a missing row takes the others
    in the order the permutation puts them. The family-wise p counts the largest |t| over the regions. With blocks
    (the rows as 30 people's 3 scans each), the permutations move whole people or scans within them."""
    import statsmodels.formula.api as smf

    permutations, seed = 30, 7
    region_table = region_table.assign(person=region_table["participant_id"].str[-2:].astype(int) // 3)
    table = region_correlations(region_table, "density", "volume", ["age", "site"], "partial",
                                permutations=permutations, seed=seed, blocks=blocks and "person",
                                whole_blocks=blocks == "whole").set_index("region")
    people = pd.Index(pd.unique(region_table["participant_id"]))
    exchange = None if blocks is None else ExchangeabilityBlocks(
        region_table.drop_duplicates("participant_id")["person"].to_numpy(), blocks == "whole")
    null_t = {}
    observed = {}
    for name, data in region_table.groupby("region", sort=False):
        data = data.dropna().reset_index(drop=True)
        reduced = smf.ols("density ~ age + C(site)", data).fit()
        observed[name] = abs(smf.ols("density ~ volume + age + C(site)", data).fit().tvalues["volume"])
        position = people.get_indexer(data["participant_id"])
        t = []
        for index in range(permutations):
            order = permutation(seed, index, len(people), exchange)
            taken = [np.flatnonzero(position == p)[0] for p in order if p in set(position)]
            permuted = data.assign(density=reduced.fittedvalues + reduced.resid.to_numpy()[taken])
            t.append(abs(smf.ols("density ~ volume + age + C(site)", permuted).fit().tvalues["volume"]))
        null_t[name] = np.array(t)
    maxima = np.max(list(null_t.values()), axis=0)
    for name, t in null_t.items():
        assert table.loc[name, "p_permutation"] == pytest.approx((1 + np.sum(t >= observed[name] - 1e-9)) / 31)
        assert table.loc[name, "p_fwe"] == pytest.approx((1 + np.sum(maxima >= observed[name] - 1e-9)) / 31)
    assert (table["p_fwe"] >= table["p_permutation"]).all()


@pytest.mark.slow
def test_the_family_wise_p_holds_its_level_under_a_planted_null_where_per_region_p_does_not():
    """250 cohorts without any effect, 20 correlated regions each: the share of cohorts with any region at p_fwe
    < 0.05 lies within the 99.9 % binomial bounds of 0.05; any region at an uncorrected permutation p < 0.05
    happens far more often."""
    rng = np.random.default_rng(11)
    cohorts, n, regions = 250, 30, 20
    people = [f"sub-{i}" for i in range(n)]
    any_fwe = any_uncorrected = 0
    for cohort in range(cohorts):
        shared = rng.normal(size=(n, 1))
        volume = rng.normal(size=(n, regions))
        relevance = 0.5 * shared + rng.normal(size=(n, regions))  # regions correlated, none with its volume
        table = pd.DataFrame({"participant_id": np.repeat(people, regions), "region": np.tile(range(regions), n),
                              "y": relevance.ravel(), "x": volume.ravel(),
                              "age": np.repeat(rng.normal(size=n), regions)})
        result = region_correlations(table, "y", "x", ["age"], "partial", permutations=99, seed=cohort)
        any_fwe += (result["p_fwe"] < 0.05).any()
        any_uncorrected += (result["p_permutation"] < 0.05).any()
    low, high = stats.binom.ppf([0.0005, 0.9995], cohorts, 0.05) / cohorts
    assert low <= any_fwe / cohorts <= high
    assert any_uncorrected / cohorts > 0.5


def test_region_mixed_models_with_a_site_intercept_equal_statsmodels(region_table):
    import statsmodels.formula.api as smf

    result = region_models(region_table, "density ~ volume + age", groups="site")
    data = region_table[region_table.region == "thalamus"]
    fit = smf.mixedlm("density ~ volume + age", data, groups=data["site"]).fit(reml=True)
    row = result.set_index(["region", "term"]).loc[("thalamus", "age")]
    assert row.estimate == pytest.approx(fit.params["age"], rel=1e-8)
    assert row.statistic == pytest.approx(fit.tvalues["age"], rel=1e-8)
    with pytest.raises(ValueError, match=r"grouping columns \['scanner'\]"):
        region_models(region_table, "density ~ volume", groups="scanner")


@pytest.mark.parametrize("df", [1, 2, 5, 123, 4000, 100_000])
def test_two_sided_p_equals_scipy_student_t(df):
    """The interpolated p-values (engine.analysis.stats._two_sided_p) against scipy's stdtr on a dense grid."""
    rng = np.random.default_rng(df)
    t = np.concatenate([np.linspace(-12, 12, 400_001), rng.standard_normal(100_000) * 5,
                        [0.0, np.inf, -np.inf, np.nan, 9.999999, 10.0, -10.0]])
    reference = 2 * special.stdtr(df, -np.abs(t))
    p = _two_sided_p(t, df)
    finite = np.isfinite(reference) & (reference > 0)
    np.testing.assert_allclose(p[finite], reference[finite], rtol=1e-11, atol=0)
    assert p[np.isinf(t)].tolist() == [0.0, 0.0] and np.isnan(p[np.isnan(t)]).all() and p[t == 0].max() == 1.0


def test_participants_nested_in_sites_equal_statsmodels_variance_components():
    """``groups=[site, participant_id]``: a random intercept per site and per participant within it, statsmodels'
    MixedLM with the participants as a variance component."""
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(7)
    people = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(30)],
                           "site": np.repeat(["A", "B", "C"], 10), "level": rng.normal(0, 2, 30)})
    scans = people.loc[np.repeat(people.index, 3)].reset_index(drop=True).assign(
        region="hippocampus", years=np.tile([0.0, 1.5, 3.0], 30))
    scans["volume"] = (scans["site"].map({"A": 0.0, "B": 3.0, "C": -2.0}) + scans["level"] - 0.8 * scans["years"]
                       + rng.normal(0, 0.5, len(scans)))
    result = region_models(scans, "volume ~ years", groups=["site", "participant_id"]).set_index("term")
    reference = smf.mixedlm("volume ~ years", scans, groups="site",
                            vc_formula={"participant_id": "0 + C(participant_id)"}).fit(reml=True)
    assert result.loc["years", "estimate"] == pytest.approx(reference.fe_params["years"], rel=1e-6)
    assert result.loc["years", "se"] == pytest.approx(reference.bse["years"], rel=1e-6)
    assert result.loc["years", "estimate"] == pytest.approx(-0.8, abs=0.1)
