"""Associations over a cohort store: planted effects found, FDR validity, cluster tables, term errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from engine.analysis.association import Sources, Term, cluster_table, voxel_analysis
from engine.analysis.atlas import Atlas
from engine.analysis.stats import adjust_p, voxelwise_ols
from engine.data import store
from engine.data.grid import Grid
from engine.data.masker import Masker
from engine.data.synth import TRUTH_REGIONS
from engine.models.validation import truth_mask


@pytest.fixture(scope="module")
def effects_sources(effects_cohort, effects_store):
    images = store.open_cohort(effects_store)
    participants = pd.DataFrame({name: images[name].values for name in ("age", "sex", "site")},
                                index=pd.Index(images["subject"].values, name="participant_id"))
    return Sources(images, participants), effects_cohort


def test_planted_gray_matter_loss_is_found_with_permutation_fwe(effects_sources):
    sources, cohort = effects_sources
    result = voxel_analysis(sources, "images.GM", "age", ["sex", "site"], ["fwe", "fdr_bh"], permutations=200)
    assert result.attrs["n"] == 60 and result.sizes["permutation"] == 200
    significant = (result.p_fwe < 0.05).values
    for label, structure in [(1, "hippocampus"), (2, "amygdala"), (3, "thalamus")]:
        planted = truth_mask(cohort / TRUTH_REGIONS, sources.images, [label])
        assert np.median(result.t.values[planted]) < -3, structure  # gray matter falls with age there
        assert (significant & planted & (result.t.values < 0)).any(), structure
    assert ((result.p_fdr <= result.p_fwe) | result.p_fwe.isnull()).mean() > 0.99  # FDR is the more lenient


def test_fdr_keeps_the_false_discovery_proportion_in_null_voxels_at_five_percent(effects_sources):
    """Real GM maps (real spatial correlation) as the outcome, a random per-subject predictor, and
    a planted effect in 10 % of the voxels: BH's false-discovery proportion averages ≤ α·m0/m.

    The mean over 60 seeds is held to that bound plus two standard errors (measured: 0.047 ± 0.009
    against 0.045); unadjusted p < 0.05 gives about 0.3.
    """
    sources, _ = effects_sources
    maps = sources.images["GM"].compute()
    n_subjects, n_voxels = maps.shape
    covariates = sources.participants[["age"]].reset_index(drop=True)
    proportions, power, null_share = [], [], []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        predictor = rng.normal(size=n_subjects)
        planted = rng.random(n_voxels) < 0.1
        outcome = maps.copy(data=maps.values + np.outer(predictor, planted * 0.1))
        result = voxelwise_ols(outcome, predictor, covariates)
        discoveries = adjust_p(result.p.values, "fdr_bh") < 0.05
        proportions.append((discoveries & ~planted).sum() / max(discoveries.sum(), 1))
        power.append((discoveries & planted).sum() / planted.sum())
        null_share.append((~planted).mean())
    bound = 0.05 * np.mean(null_share) + 2 * np.std(proportions) / np.sqrt(len(proportions))
    assert np.mean(proportions) <= bound, (np.mean(proportions), bound)
    assert np.mean(power) > 0.8  # and the planted voxels are found


def test_cluster_table_counts_sizes_peaks_and_regions_by_hand():
    grid = Grid((6, 6, 6), np.diag([2.0, 2.0, 2.0, 1.0]), "MNI152NLin2009cAsym")
    i, j, k = (axis.ravel() for axis in np.indices(grid.shape))
    t = np.zeros(i.size)
    index = np.ravel_multi_index((i, j, k), grid.shape)
    blob = [(1, 1, 1), (1, 1, 2), (2, 2, 3)]  # corner-connected: one 26-neighbourhood cluster
    for n, voxel in enumerate(blob):
        t[index == np.ravel_multi_index(voxel, grid.shape)] = 3 + n
    t[index == np.ravel_multi_index((4, 4, 4), grid.shape)] = -6  # a single negative voxel
    statistic = xr.DataArray(t, dims="voxel", coords={"i": ("voxel", i), "j": ("voxel", j), "k": ("voxel", k)})
    labels = np.where(i < 2, 1, 2).astype(np.int32)
    atlas = Atlas("hand", labels, pd.DataFrame({"name": ["Left_thing", "Right_thing"]}, index=[1, 2]))
    table = cluster_table(statistic, np.abs(t) > 2, Masker(grid, (i, j, k)), atlas)
    assert list(table.cluster) == [1, 2] and list(table.voxels) == [3, 1] and list(table.sign) == ["positive",
                                                                                                   "negative"]
    assert table.volume_mm3[0] == pytest.approx(3 * 8.0) and table.peak_t[0] == 5 and table.peak_t[1] == -6
    assert (table.peak_x[0], table.peak_y[0], table.peak_z[0]) == (4.0, 4.0, 6.0)
    assert table.peak_region[0] == "Right_thing" and table.regions[0] == "Left_thing (2); Right_thing (1)"


def test_terms_that_name_nothing_are_refused_clearly(effects_sources):
    sources, _ = effects_sources
    with pytest.raises(ValueError, match=r"relevance.lrp: the workspace has no relevance maps"):
        voxel_analysis(sources, "relevance.lrp", "age", [], ["fdr_bh"])
    with pytest.raises(ValueError, match=r"images.T2: no modality 'T2' in the images store"):
        voxel_analysis(sources, "images.T2", "age", [], ["fdr_bh"])
    with pytest.raises(ValueError, match="handedness: no column 'handedness'"):
        voxel_analysis(sources, "images.GM", "handedness", [], ["fdr_bh"])
    with pytest.raises(ValueError, match=r"features.lesions.volume: no feature table 'lesions'"):
        voxel_analysis(sources, "images.GM", "features.lesions.volume", [], ["fdr_bh"])
    with pytest.raises(ValueError, match="needs a map as outcome or predictor"):
        voxel_analysis(sources, "age", "sex", [], ["fdr_bh"])


def test_relevance_terms_are_raw_sum_normalised_or_absolute(effects_sources):
    sources, _ = effects_sources
    rng = np.random.default_rng(3)
    values = rng.normal(0.2, 1.0, (1, 4, sources.images.sizes["voxel"]))
    subjects = list(sources.images.subject.values[:4])
    relevance = xr.Dataset({"relevance_mean": (("attribution", "subject", "voxel"), values)},
                           coords={"attribution": ["lrp"], "subject": subjects})
    with_relevance = Sources(sources.images, sources.participants, relevance)
    raw = with_relevance.map(Term.parse("relevance.lrp")).values
    normalised = with_relevance.map(Term.parse("relevance.lrp.normalised")).values
    absolute = with_relevance.map(Term.parse("relevance.lrp.absolute")).values
    np.testing.assert_array_equal(raw, values[0])
    np.testing.assert_allclose(normalised, values[0] / np.abs(values[0]).sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(np.abs(normalised).sum(axis=1), 1.0)
    np.testing.assert_array_equal(absolute, np.abs(values[0]))


def test_subject_analysis_equals_statsmodels_on_the_test_participants(effects_sources):
    import statsmodels.formula.api as smf

    from engine.analysis.association import subject_analysis

    sources, _ = effects_sources
    subjects = [str(subject) for subject in sources.images.subject.values]
    rng = np.random.default_rng(5)
    age = sources.participants.loc[subjects, "age"].to_numpy()
    gap = rng.normal(0, 4, len(subjects))
    lesions = pd.DataFrame({"participant_id": subjects,
                            "volume": 50 + 3 * gap + 0.5 * age + rng.normal(0, 5, len(age))})
    lesions.loc[2, "volume"] = np.nan  # a participant without the value is dropped
    split = np.where(np.arange(len(subjects)) % 2 == 0, "test", "train")  # subjects[2] is a test participant
    predictions = pd.DataFrame({"participant_id": subjects, "split": split, "gap": gap})
    with_tables = Sources(sources.images, sources.participants, tables={"lesions": lesions}, predictions=predictions)
    model, data = subject_analysis(with_tables, "features.lesions.volume", "predictions.gap", ["age", "sex"])
    test = [subject for subject, part in zip(subjects, split, strict=True) if part == "test"]
    assert set(data.participant_id) == set(test) - {subjects[2]}  # the test split, less the missing value
    frame = pd.DataFrame({"volume": lesions.set_index("participant_id").loc[test, "volume"].to_numpy(),
                          "gap": gap[np.isin(subjects, test)], "age": sources.participants.loc[test, "age"].to_numpy(),
                          "sex": sources.participants.loc[test, "sex"].to_numpy()}).dropna()
    fit = smf.ols("volume ~ gap + age + C(sex)", frame).fit()
    row = model.set_index("term").loc["predictions.gap"]
    assert row.estimate == pytest.approx(fit.params["gap"], rel=1e-10)
    assert row.p == pytest.approx(fit.pvalues["gap"], rel=1e-10) and row.n == fit.nobs == len(data)
    assert row.partial_r == pytest.approx(fit.tvalues["gap"] / np.sqrt(fit.tvalues["gap"] ** 2 + fit.df_resid))
    assert {"age", "sex[T.M]"} <= set(model.term)
    with pytest.raises(ValueError, match="one value per participant"):
        subject_analysis(with_tables, "images.GM", "age")


def test_terms_are_parsed_once_and_a_malformed_one_is_refused_by_the_catalog():
    from pydantic import ValidationError

    from engine.analysis.association import Term
    from pipelines.catalog import AnalysisSettings

    assert Term.parse("relevance.lrp") == Term("relevance.lrp", "relevance", "lrp")
    assert Term.parse("features.regional_gm_volume.volume_mm3") == Term(
        "features.regional_gm_volume.volume_mm3", "features", "regional_gm_volume", "volume_mm3")
    assert Term.parse("predictions.brain_age_gap_corrected").name == "brain_age_gap_corrected"
    assert Term.parse("images.GM").is_map and not Term.parse("age").is_map
    assert Term.parse("age") == Term("age", "participants", "age")
    with pytest.raises(ValueError, match=r"features\.<table>\.<column>"):
        Term.parse("features.tract_fa")
    with pytest.raises(ValueError, match="needs a name after the dot"):
        Term.parse("relevance.")
    assert Term.parse("relevance.lrp.absolute") == Term("relevance.lrp.absolute", "relevance", "lrp",
                                                         normalisation="absolute")
    with pytest.raises(ValueError, match="takes one of raw, normalised, absolute, got 'scaled'"):
        Term.parse("relevance.t1.lrp.scaled")
    assert Term.parse("relevance.flair.lrp.normalised") == Term(
        "relevance.flair.lrp.normalised", "relevance", "lrp", normalisation="normalised", ensemble="flair")
    assert Term.parse("relevance.flair.lrp") == Term("relevance.flair.lrp", "relevance", "lrp", ensemble="flair")
    assert Term.parse("predictions.t1.brain_age_gap") == Term("predictions.t1.brain_age_gap", "predictions",
                                                              "brain_age_gap", ensemble="t1")
    with pytest.raises(ValidationError, match=r"outcome[\s\S]*features\.<table>\.<column>"):
        AnalysisSettings(name="bad", outcome="features.tract_fa", predictor="age", scope="roi")
    with pytest.raises(ValidationError, match="takes no covariates; use statistic: partial"):
        AnalysisSettings(name="bad", outcome="relevance.lrp", predictor="features.t.v", scope="roi",
                         statistic="pearson", covariates=["age"])
    with pytest.raises(ValidationError, match="statistic spearman applies to roi analyses only"):
        AnalysisSettings(name="bad", outcome="relevance.lrp", predictor="age", statistic="spearman")
    with pytest.raises(ValidationError, match=r"covariates[\s\S]*needs a name"):
        AnalysisSettings(name="bad", outcome="relevance.lrp", predictor="age", covariates=["images."])


def test_relevance_in_each_participants_parcels_against_freesurfer_volumes_equals_scipy():
    """The study's region table: relevance summed in each participant's own parcels, Pearson r with the same
    parcel's FreeSurfer volume across participants (scipy), Bonferroni across the regions both sides have."""
    from scipy import stats as scipy_stats

    from engine.analysis.association import roi_analysis
    from engine.analysis.atlas import ParticipantLabels
    from engine.data.labels import label_table

    rng = np.random.default_rng(5)
    subjects = [f"sub-{n:02d}" for n in range(12)]
    labels = rng.choice([0, 17, 53, 4, 1028], size=(12, 400)).astype(np.int16)
    maps = rng.normal(0.0, 1.0, (12, 400))
    images = xr.Dataset({"R": (("subject", "voxel"), maps), "APARC": (("subject", "voxel"), labels)},
                        coords={"subject": subjects})
    volumes = {"Left-Hippocampus": 17, "Right-Hippocampus": 53, "Left-Lateral-Ventricle": 4}
    rows = [{"participant_id": pid, "structure": name, "hemisphere": "lh", "measure": "volume",
             "value": float(rng.normal(4000, 300)), "unit": "mm^3"} for pid in subjects for name in volumes]
    rows += [{"participant_id": pid, "structure": "eTIV", "hemisphere": "both", "measure": "global",
              "value": 1.5e6, "unit": "mm^3"} for pid in subjects]
    freesurfer = pd.DataFrame(rows)
    participants = pd.DataFrame({"age": np.arange(12.0)}, index=pd.Index(subjects, name="participant_id"))
    sources = Sources(images, participants, tables={"freesurfer": freesurfer})
    parcels = ParticipantLabels("APARC", images["APARC"], label_table("freesurfer"))
    table = roi_analysis(sources, "images.R", "features.freesurfer.volume", [], parcels, "sum",
                         correlation="pearson").set_index("region")
    assert sorted(table.index) == sorted(volumes)  # ctx-lh-superiorfrontal has no FreeSurfer volume: not joined
    for name, label in volumes.items():
        relevance = [maps[n, labels[n] == label].sum() for n in range(12)]
        volume = freesurfer[freesurfer.structure == name].set_index("participant_id").loc[subjects, "value"]
        expected = scipy_stats.pearsonr(relevance, volume)
        assert abs(table.loc[name, "r"] - expected.statistic) < 1e-10
        assert abs(table.loc[name, "p"] - expected.pvalue) < 1e-10
        assert abs(table.loc[name, "p_bonferroni"] - min(1.0, 3 * expected.pvalue)) < 1e-10

    # a parcel three participants do not have is missing for them (their sum is not 0): r over the other nine
    absent = labels.copy()
    absent[[2, 5, 7]] = np.where(absent[[2, 5, 7]] == 53, 17, absent[[2, 5, 7]])
    images["APARC"] = (("subject", "voxel"), absent)
    parcels = ParticipantLabels("APARC", images["APARC"], label_table("freesurfer"))
    table = roi_analysis(Sources(images, participants, tables={"freesurfer": freesurfer}), "images.R",
                         "features.freesurfer.volume", [], parcels, "sum", correlation="pearson").set_index("region")
    having = [n for n in range(12) if n not in (2, 5, 7)]
    relevance = [maps[n, absent[n] == 53].sum() for n in having]
    volume = freesurfer[freesurfer.structure == "Right-Hippocampus"].set_index("participant_id")["value"]
    expected = scipy_stats.pearsonr(relevance, volume.loc[[subjects[n] for n in having]])
    assert table.loc["Right-Hippocampus", "n"] == 9 and table.loc["Left-Hippocampus", "n"] == 12
    assert abs(table.loc["Right-Hippocampus", "r"] - expected.statistic) < 1e-10
    with pytest.raises(ValueError, match=r"features.freesurfer.aparc.thickness_mean: the FreeSurfer table has no "
                                         r"measure 'aparc.thickness_mean' \(available: eTIV, volume\)"):
        roi_analysis(sources, "images.R", "features.freesurfer.aparc.thickness_mean", [], parcels, "sum",
                     correlation="pearson")
    etiv = sources.subject_values(Term.parse("features.freesurfer.eTIV"), subjects[:2])
    assert list(etiv) == [1.5e6, 1.5e6]


def _parcel_sources(labels: np.ndarray, maps: np.ndarray, volumes: dict[str, np.ndarray]):
    """Participants' own parcels on a 20 × 20 × 1 grid of 2 mm voxels (8 mm³), a map and FreeSurfer volumes."""
    from engine.analysis.atlas import ParticipantLabels
    from engine.data.labels import label_table

    subjects = [f"sub-{n:02d}" for n in range(len(labels))]
    i, j = np.divmod(np.arange(400), 20)
    images = xr.Dataset({"R": (("subject", "voxel"), maps), "APARC": (("subject", "voxel"), labels)},
                        coords={"subject": subjects, "i": ("voxel", i), "j": ("voxel", j),
                                "k": ("voxel", np.zeros(400, int))},
                        attrs={"grid": Grid((20, 20, 1), np.diag([2.0, 2.0, 2.0, 1.0])).to_attrs()})
    freesurfer = pd.DataFrame([{"participant_id": pid, "structure": name, "hemisphere": "lh", "measure": "volume",
                                "value": values[n], "unit": "mm^3"}
                               for name, values in volumes.items() for n, pid in enumerate(subjects)])
    participants = pd.DataFrame({"age": np.arange(len(labels), dtype=float)},
                                index=pd.Index(subjects, name="participant_id"))
    return (Sources(images, participants, tables={"freesurfer": freesurfer}),
            ParticipantLabels("APARC", images["APARC"], label_table("freesurfer")))


def test_a_parcel_under_the_minimum_size_is_missing_and_the_family_is_declared():
    """A participant's parcel under min_region_mm3 has no value (n per region falls, r is scipy's over the rest);
    the family (FreeSurfer's subcortical gray matter group, less the amygdala) decides what is tested and the
    Bonferroni factor, by hand; an entry matching no region is named."""
    from scipy import stats as scipy_stats

    from engine.analysis.association import RegionFamily, roi_analysis

    rng = np.random.default_rng(8)
    n = 14
    structures = {"Left-Hippocampus": 17, "Left-Amygdala": 18, "Left-Thalamus": 10, "Left-Lateral-Ventricle": 4}
    labels = rng.choice(list(structures.values()), size=(n, 400)).astype(np.int16)
    labels[:4][labels[:4] == 17] = 4
    labels[:4, :2] = 17  # participants 0-3: a two-voxel (16 mm³) hippocampus
    maps = rng.normal(size=(n, 400))
    volumes = {name: rng.normal(4000, 300, n) for name in structures}
    sources, parcels = _parcel_sources(labels, maps, volumes)
    family = RegionFamily(include=["subcortical_gray_matter"], exclude=["Left-Amygdala"])
    table = roi_analysis(sources, "images.R", "features.freesurfer.volume", [], parcels, "sum",
                         correlation="pearson", family=family, min_region_mm3=20).set_index("region")
    assert sorted(table.index) == ["Left-Hippocampus", "Left-Thalamus"] == sorted(table.attrs["family"])
    kept = np.arange(4, n)
    expected = scipy_stats.pearsonr([maps[p, labels[p] == 17].sum() for p in kept], volumes["Left-Hippocampus"][kept])
    assert table.loc["Left-Hippocampus", "n"] == n - 4 and table.loc["Left-Thalamus", "n"] == n
    assert abs(table.loc["Left-Hippocampus", "r"] - expected.statistic) < 1e-10
    assert (table["family_size"] == 2).all()
    np.testing.assert_allclose(table["p_bonferroni"], np.minimum(2 * table["p"], 1), rtol=1e-12)
    everything = roi_analysis(sources, "images.R", "features.freesurfer.volume", [], parcels, "sum",
                              correlation="pearson").set_index("region")
    assert len(everything) == 4 and everything.loc["Left-Hippocampus", "n"] == n  # 16 mm³ ≥ one voxel (8 mm³)
    with pytest.raises(ValueError, match=r"regions: \['Left-Hipocampus'\] match no region of the analysis"):
        roi_analysis(sources, "images.R", "features.freesurfer.volume", [], parcels, "sum", correlation="pearson",
                     family=RegionFamily(include=["Left-Hipocampus"]))
    # a regression per region carries every correction, and the predictor's Freedman–Lane p's are the partial
    # correlation's (its OLS t is the partial correlation's t)
    models = roi_analysis(sources, "images.R", "features.freesurfer.volume", ["age"], parcels, "sum",
                          permutations=49, seed=1, family=family, min_region_mm3=20)
    tested = models[models["term"] == "features.freesurfer.volume"].set_index("region")
    partial = roi_analysis(sources, "images.R", "features.freesurfer.volume", ["age"], parcels, "sum",
                           correlation="partial", permutations=49, seed=1, family=family,
                           min_region_mm3=20).set_index("region")
    assert {"p_bonferroni", "p_fdr", "p_permutation", "p_fwe", "family_size"} <= set(models.columns)
    for column in ("p", "p_bonferroni", "p_fdr", "p_permutation", "p_fwe", "n"):
        np.testing.assert_allclose(tested[column], partial.loc[tested.index, column], rtol=1e-9)
    assert models.loc[models["term"] == "age", "p_fwe"].isna().all()


def test_a_subject_filter_takes_a_split_an_outcome_and_column_values(effects_sources, tmp_path):
    """SubjectFilter against the hand-picked participants, and an analysis of the filtered sources against the same
    analysis of sources built from those participants alone."""
    import nibabel as nib

    from engine.analysis.association import AnalysisError, AnalysisSettings, SubjectFilter, analyse

    sources, _ = effects_sources
    subjects = np.array([str(subject) for subject in sources.images.subject.values])
    rng = np.random.default_rng(3)
    observed = rng.choice(["AD", "CN"], len(subjects))
    p_cn = rng.uniform(size=len(subjects))
    split = np.where(np.arange(len(subjects)) % 3 == 0, "test", "train")
    predictions = pd.DataFrame({"participant_id": subjects, "split": split, "observed": observed,
                                "p_AD": 1 - p_cn, "p_CN": p_cn})  # CN, the last class, is the positive one
    with_predictions = Sources(sources.images, sources.participants, predictions=predictions)
    age = sources.participants.loc[subjects, "age"].to_numpy()
    female = sources.participants.loc[subjects, "sex"].to_numpy() == "F"
    true_positive = (observed == "CN") & (p_cn >= 0.5)
    chosen = SubjectFilter(split=["test"], outcome=["TP"], where={"age": {"min": 30}})
    expected = subjects[(split == "test") & true_positive & (age >= 30)]
    assert len(expected) and chosen.subjects(with_predictions, [Term.of("predictions.p_CN")]) == list(expected)
    women_under_60 = SubjectFilter(where={"sex": ["F"], "age": {"max": 60}})
    assert women_under_60.subjects(sources, []) == list(subjects[female & (age <= 60)])
    with pytest.raises(ValueError, match="no participant meets"):
        SubjectFilter(where={"age": {"min": 200}}).subjects(sources, [])
    with pytest.raises(ValueError, match="need an ensemble"):
        chosen.subjects(with_predictions, [Term.of("images.GM")])
    with pytest.raises(ValueError, match="binary classification"):
        SubjectFilter(outcome=["TP"]).subjects(
            Sources(sources.images, sources.participants, predictions=predictions.drop(columns="p_AD")),
            [Term.of("predictions.p_CN")])

    settings = AnalysisSettings(name="older", outcome="images.GM", predictor="age", covariates=["sex"],
                                correction=["fdr_bh"], subjects={"where": {"age": {"min": 50}}, "split": ["train"]})
    with pytest.raises(AnalysisError, match="need an ensemble"):  # a split, but no relevance or predictions term
        analyse(with_predictions, settings, tmp_path / "older")
    settings = settings.model_copy(update={"subjects": SubjectFilter(where={"age": {"min": 50}})})
    summary = analyse(with_predictions, settings, tmp_path / "older")
    older = subjects[age >= 50]
    assert summary["n"] == len(older) < len(subjects) and summary["subjects"]["where"] == {"age": {"min": 50.0}}
    by_hand = voxel_analysis(Sources(sources.images.sel(subject=older), sources.participants.loc[older]),
                             "images.GM", "age", ["sex"], ["fdr_bh"], min_coverage=settings.min_coverage)
    t_map = Masker.of(sources.images).to_nifti(by_hand["t"].astype(np.float32), fill=np.nan).get_fdata()
    np.testing.assert_array_equal(nib.load(tmp_path / "older/t.nii.gz").get_fdata(), t_map)


def test_gain_density_and_sum_per_region_equal_numpy_on_a_constructed_case():
    """Böhle et al.'s region table: per group the mean region sum, mean density (sum ÷ voxels) and gain (group's
    mean sum ÷ the controls'), and each patient's fingerprint, against numpy; a region without voxels is left
    out, a reference group with a zero sum gives no gain."""
    from engine.analysis.association import gain_analysis
    from engine.analysis.atlas import Atlas

    rng = np.random.default_rng(5)
    n, voxels = 9, 12
    labels = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 4])  # region 5 has no voxel; region 4's controls sum to 0
    maps = np.abs(rng.normal(1, 0.5, (n, voxels)))
    diagnosis = np.array(["CN", "CN", "CN", "AD", "AD", "AD", "AD", "MCI", "MCI"])
    maps[diagnosis == "CN", 11] = 0.0
    subjects = [f"sub-{k}" for k in range(n)]
    images = xr.Dataset({"R": (("subject", "voxel"), maps)}, coords={"subject": subjects},
                        attrs={"grid": Grid((12, 1, 1), np.eye(4)).to_attrs()})
    sources = Sources(images, pd.DataFrame({"diagnosis": diagnosis}, index=pd.Index(subjects, name="subject")))
    atlas = Atlas("hand", labels, pd.DataFrame({"name": ["a", "b", "c", "d", "e"]}, index=[1, 2, 3, 4, 5]))
    table, fingerprints = gain_analysis(sources, "images.R", "diagnosis", "CN", atlas)
    table = table.set_index(["group", "region"])
    assert set(table.index.get_level_values("region")) == {"a", "b", "c", "d"}
    controls = diagnosis == "CN"
    for group in ("CN", "AD", "MCI"):
        members = diagnosis == group
        for label, name in ((1, "a"), (2, "b"), (3, "c")):
            region = labels == label
            sums = maps[:, region].sum(axis=1)
            row = table.loc[(group, name)]
            assert row["n"] == members.sum()
            np.testing.assert_allclose(row["sum"], sums[members].mean())
            np.testing.assert_allclose(row["density"], (sums / region.sum())[members].mean())
            np.testing.assert_allclose(row["gain"], sums[members].mean() / sums[controls].mean())
        assert np.isnan(table.loc[(group, "d"), "gain"])
    patients = fingerprints[fingerprints["region"] == "c"].set_index("participant_id")["gain"]
    c = maps[:, labels == 3].sum(axis=1)
    np.testing.assert_allclose(patients.reindex(np.array(subjects)[~controls]), c[~controls] / c[controls].mean())
    with pytest.raises(ValueError, match="reference 'HC' is not a value of diagnosis"):
        gain_analysis(sources, "images.R", "diagnosis", "HC", atlas)
