"""Several scans per participant: BIDS sessions read into one row per scan, every split participant-grouped, the
synthetic cohort's sessions the same head aged, the store's rows scans with participant and session coordinates."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from engine.analysis.stats import ExchangeabilityBlocks, region_models, voxelwise_ols
from engine.data.inputs import (
    BidsIndex,
    InputError,
    Modality,
    read_participants,
    read_scans,
    resolve_files,
    scan_ids,
)
from engine.data.store import ingest, open_cohort
from engine.data.synth import FREESURFER_LABEL_PATHS, MODALITY_PATHS, TRUTH_REGIONS, generate_cohort
from engine.data.synth.cohort import in_session
from engine.models.relevance import open_relevance
from engine.models.splits import SplitSettings, grouped_folds, stratified_split
from engine.models.validation import truth_mask
from tests.helpers import MODALITIES, REPO, cli, write_catalog

SESSION_PATHS = {name: in_session(template) for name, template in MODALITY_PATHS.items()}


def bids_tree(root, sessions: dict[str, pd.DataFrame | None], participants: pd.DataFrame, folders=None):
    """A BIDS tree without images: participants.tsv, each participant's ses- folders and sessions table."""
    root.mkdir(parents=True, exist_ok=True)
    participants.to_csv(root / "participants.tsv", sep="\t", index=False)
    for pid, table in sessions.items():
        labels = folders[pid] if folders and pid in folders else list(table.session_id) if table is not None else []
        for label in labels:
            (root / pid / label / "anat").mkdir(parents=True, exist_ok=True)
        if table is not None:
            (root / pid).mkdir(exist_ok=True)
            table.to_csv(root / pid / f"{pid}_sessions.tsv", sep="\t", index=False)
    return root


@pytest.fixture
def two_people(tmp_path):
    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02"], "sex": ["F", "M"], "group": ["AD", "CN"]})
    sessions = {  # sub-01's sessions out of label order in time: acq_time decides
        "sub-01": pd.DataFrame({"session_id": ["ses-10", "ses-2"], "age": [71.5, 70.0],
                                "acq_time": ["2014-03-01", "2012-09-15"], "scanner": ["Prisma", "Trio"]}),
        "sub-02": pd.DataFrame({"session_id": ["ses-1"], "age": [64.0], "acq_time": ["2013-01-01"],
                                "scanner": ["Trio"]}),
    }
    return participants, sessions, tmp_path / "bids"


def test_sessions_tables_join_the_participants_one_row_per_scan_in_time_order(two_people):
    participants, sessions, root = two_people
    bids_tree(root, sessions, participants)
    scans = read_scans(root, "participants.tsv")
    expected = pd.DataFrame({
        "participant_id": ["sub-01", "sub-01", "sub-02"], "session_id": ["ses-2", "ses-10", "ses-1"],
        "sex": ["F", "F", "M"], "group": ["AD", "AD", "CN"], "age": [70.0, 71.5, 64.0],
        "acq_time": ["2012-09-15", "2014-03-01", "2013-01-01"], "scanner": ["Trio", "Prisma", "Trio"]})
    pd.testing.assert_frame_equal(scans, expected, check_like=False)
    assert scan_ids(scans) == ["sub-01_ses-2", "sub-01_ses-10", "sub-02_ses-1"]


def test_a_cohort_without_sessions_reads_as_its_participants_table(tiny_cohort):
    pd.testing.assert_frame_equal(read_scans(tiny_cohort, "participants.tsv"),
                                  read_participants(tiny_cohort / "participants.tsv"))


def _folder_without_row(participants, sessions, root):
    bids_tree(root, sessions, participants, folders={"sub-01": ["ses-2", "ses-10", "ses-3"]})


def _row_without_folder(participants, sessions, root):
    bids_tree(root, sessions, participants, folders={"sub-01": ["ses-2"]})


def _listed_twice(participants, sessions, root):
    sessions["sub-02"] = pd.concat([sessions["sub-02"]] * 2)
    bids_tree(root, sessions, participants)


def _column_in_both(participants, sessions, root):
    bids_tree(root, sessions, participants.assign(age=[70.0, 64.0]))


def _sex_disagrees(participants, sessions, root):
    sessions["sub-01"]["sex"] = ["F", "M"]
    bids_tree(root, sessions, participants.drop(columns="sex"))


def _age_backwards(participants, sessions, root):
    sessions["sub-01"]["age"] = [69.0, 70.0]  # ses-10 (2014) younger than ses-2 (2012)
    bids_tree(root, sessions, participants)


def _one_without_sessions(participants, sessions, root):
    bids_tree(root, {"sub-01": sessions["sub-01"]}, participants)


def _not_a_session_label(participants, sessions, root):
    sessions["sub-02"]["session_id"] = ["baseline"]
    bids_tree(root, sessions, participants)


#: Case → (how the tree is broken, what the message must name).
BAD_SESSIONS = {
    "a session folder without a row": (_folder_without_row, ["participant sub-01", "session ses-3",
                                                             "without a row in sub-01_sessions.tsv"]),
    "a row without a session folder": (_row_without_folder, ["participant sub-01", "session ses-10",
                                                             "has no folder"]),
    "a scan listed twice": (_listed_twice, ["sub-02_sessions.tsv", "duplicate sessions", "ses-1"]),
    "a column in both tables": (_column_in_both, ["participant sub-01", "['age']", "cohort.per_session"]),
    "sessions disagreeing on sex": (_sex_disagrees, ["participant sub-01", "disagree on 'sex'"]),
    "ages going backwards": (_age_backwards, ["participant sub-01", "session ses-10", "age goes backwards"]),
    "a participant without sessions": (_one_without_sessions, ["participant sub-02", "no session folder"]),
    "a session label without ses-": (_not_a_session_label, ["participant sub-02", "'baseline'", "'ses-'"]),
}


@pytest.mark.parametrize("case", list(BAD_SESSIONS))
def test_bad_sessions_are_named_by_participant_session_and_file(two_people, case):
    participants, sessions, root = two_people
    breaks, expected = BAD_SESSIONS[case]
    breaks(participants, sessions, root)
    with pytest.raises(InputError) as error:
        read_scans(root, "participants.tsv")
    for fragment in expected:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_a_column_declared_per_session_takes_the_sessions_value(two_people):
    participants, sessions, root = two_people
    sessions["sub-02"] = sessions["sub-02"].drop(columns="age")  # the participant's value fills it
    bids_tree(root, sessions, participants.assign(age=[60.0, 64.0]))
    scans = read_scans(root, "participants.tsv", per_session=["age"])
    assert scans["age"].tolist() == [70.0, 71.5, 64.0]


def tempting_cohort(n_participants: int = 60, seed: int = 1) -> pd.DataFrame:
    """1–4 scans per participant, follow-ups a few years apart: rows whose row-wise split splits people."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_participants):
        age, sex = rng.uniform(50, 85), rng.choice(["F", "M"])
        for number in range(int(rng.integers(1, 5))):
            rows.append({"participant_id": f"sub-{index:03d}", "session_id": f"ses-{number + 1}",
                         "age": age + 2 * number, "sex": sex})
    return pd.DataFrame(rows)


def test_every_scan_of_a_participant_lands_in_one_split_stratified_by_the_first_scan():
    scans = tempting_cohort()
    settings = SplitSettings(fractions=(0.6, 0.2, 0.2), seed=4)
    rowwise = stratified_split(scans.assign(participant_id=scan_ids(scans)).drop(columns="session_id"), settings)
    assert (pd.Series(rowwise.to_numpy()).groupby(scans["participant_id"]).nunique() > 1).any()  # the temptation
    split = stratified_split(scans, settings)
    assert list(split.index) == scan_ids(scans)
    per_participant = pd.Series(split.to_numpy()).groupby(scans["participant_id"].to_numpy())
    assert (per_participant.nunique() == 1).all()  # no participant in two splits
    counts = per_participant.first().value_counts()
    for name, fraction in zip(("train", "validation", "test"), settings.fractions, strict=True):
        assert abs(counts[name] - fraction * scans.participant_id.nunique()) <= 1  # participants, not scans
    baseline = scans.drop_duplicates("participant_id").drop(columns="session_id")
    pd.testing.assert_series_equal(per_participant.first().rename("split"),
                                   stratified_split(baseline, settings).rename_axis(None))


def test_cross_fitting_folds_keep_participants_whole_and_balance_their_ages():
    scans = tempting_cohort(n_participants=73)
    folds = grouped_folds(scans, 5, SplitSettings(seed=2))
    assert list(folds.index) == scan_ids(scans) and set(folds) == set(range(5))
    per_participant = pd.Series(folds.to_numpy()).groupby(scans["participant_id"].to_numpy())
    assert (per_participant.nunique() == 1).all()  # each participant's scans in one fold
    sizes = per_participant.first().value_counts()
    assert sizes.max() - sizes.min() <= 1  # 73 participants: folds of 14 and 15
    baseline = scans.drop_duplicates("participant_id").set_index("participant_id")
    bands = pd.qcut(baseline["age"].rank(method="first"), 5, labels=False)
    spread = pd.crosstab(bands, per_participant.first().reindex(baseline.index))
    assert (spread.max(axis=1) - spread.min(axis=1) <= 1).all()  # every age band spread evenly over the folds
    with pytest.raises(ValueError, match="at least 2 folds"):
        grouped_folds(scans, 1)


@pytest.fixture(scope="module")
def session_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("sessions") / "cohort"
    generate_cohort(out, 16, voxel_size=8.0, seed=21, max_sessions=3)
    return out


def test_the_synthetic_sessions_are_the_same_head_aged_over_its_follow_ups(session_cohort):
    scans = read_scans(session_cohort, "participants.tsv")
    assert set(pd.read_csv(session_cohort / "participants.tsv", sep="\t").columns) == {"participant_id", "sex",
                                                                                      "site"}
    assert scans.groupby("participant_id").size().max() > 1  # some participants were scanned again
    planted = pd.read_csv(session_cohort / "planted_effects.tsv", sep="\t")
    assert scan_ids(planted) == scan_ids(scans)
    for pid, sessions in planted.groupby("participant_id"):
        assert sessions["head_scale"].nunique() == 1  # one head
        assert (np.diff(sessions["age"]) >= 1.0).all() and (np.diff(sessions["age"]) <= 4.0).all()
        assert (np.diff(sessions["hippocampus_loss"]) > 0).all()  # the planted ageing, within the person
        if len(sessions) > 1:
            first, later = (nib.load(session_cohort / SESSION_PATHS["GM"].format(participant_id=pid, session_id=s))
                            .get_fdata() for s in sessions.session_id.iloc[[0, -1]])
            assert np.corrcoef(first.ravel(), later.ravel())[0, 1] > 0.95  # the same anatomy
            assert later.sum() < first.sum()  # less gray matter years later


def test_each_scan_is_a_row_of_the_store_with_its_participant_and_session(session_cohort, tmp_path):
    """T1 found by pybids from its BIDS entities, GM by its template (the two find the same files:
    test_pybids_finds_the_files_the_templates_name)."""
    modalities = {"T1": {"bids": {"suffix": "T1w"}}, "GM": SESSION_PATHS["GM"]}
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"),
                            cohort={"directory": str(session_cohort)}, modalities=modalities,
                            features=None, train=None, explain=None, associate=None, report={},
                            cluster={"profile": "local", "n_workers": 1})
    assert cli("validate", catalog).exit_code == 0
    result = cli("run", catalog)
    assert result.exit_code == 0, result.stderr
    images = open_cohort(tmp_path / "ws/images.zarr")
    scans = read_scans(session_cohort, "participants.tsv")
    assert list(images.subject.values) == scan_ids(scans)
    assert list(images.participant_id.values) == list(scans.participant_id)
    assert list(images.session_id.values) == list(scans.session_id)
    np.testing.assert_array_equal(images.age.values, scans.age.to_numpy(float))
    mask = nib.load(session_cohort / "mask.nii.gz").get_fdata() > 0
    for row in (0, len(scans) - 1):
        path = session_cohort / SESSION_PATHS["T1"].format(**scans.iloc[row][["participant_id", "session_id"]])
        np.testing.assert_array_equal(images.T1.values[row], nib.load(path).get_fdata(dtype=np.float32)[mask])
    per_participant = scans.groupby("participant_id").size()
    intervals = scans.groupby("participant_id")["age"].diff().dropna()
    report = " ".join((tmp_path / "ws/report.html").read_text().split())
    assert (f"<b>{len(scans)}</b> scans of <b>16</b> participants ({per_participant.min()}–{per_participant.max()} "
            f"per participant, {(per_participant > 1).sum()} scanned more than once; follow-up intervals median "
            f"{intervals.median():.1f} years") in report


def test_a_template_without_the_session_and_an_analysis_that_does_not_say_which_scans_are_named(session_cohort,
                                                                                                 tmp_path):
    scans = read_scans(session_cohort, "participants.tsv")
    with pytest.raises(InputError, match=r"must contain \{session_id\}"):
        resolve_files(session_cohort, scans, MODALITIES[:1])  # templates without {session_id}
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"),
                            cohort={"directory": str(session_cohort)}, modalities=SESSION_PATHS,
                            features=None, explain=None, report=None,
                            associate=[{"name": "gm_age", "outcome": "images.GM", "predictor": "age"}])
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "associate.gm_age.scans" in result.stderr and f"{len(scans)} scans of 16 participants" in result.stderr


@pytest.mark.parametrize(("analysis", "message"), [
    ({"scope": "voxel"}, "set permute"),
    ({"scope": "subject", "outcome": "predictions.predicted"}, "random_intercept: participant_id"),
    ({"scope": "voxel", "permute": "participants", "permutations": 9, "correction": ["fdr_bh"]},
     "use correction: \\[fwe\\]"),
    ({"scope": "voxel", "scans": "baseline", "permute": "participants", "permutations": 9}, "needs scans: all"),
])
def test_inference_that_takes_repeated_scans_as_independent_is_refused(analysis, message):
    from engine.analysis.association import AnalysisSettings

    with pytest.raises(ValueError, match=message):
        AnalysisSettings(**{"name": "a", "outcome": "images.GM", "predictor": "age", "scans": "all", **analysis})


SESSION_ANALYSES = [
    {"name": "hippocampus_mixed", "scope": "roi", "outcome": "images.GM", "labels": "APARC_ASEG",
     "region_statistic": "sum", "predictor": "years_since_baseline", "covariates": ["baseline_age"],
     "regions": {"include": ["*-Hippocampus"]}, "scans": "all", "random_intercept": "participant_id"},
    {"name": "prediction_mixed", "scope": "subject", "outcome": "predictions.predicted", "predictor": "age",
     "scans": "all", "random_intercept": "participant_id"},
    {"name": "prediction_baseline", "scope": "subject", "outcome": "predictions.predicted", "predictor": "age",
     "scans": "baseline"},
    {"name": "gm_blocks", "outcome": "images.GM", "predictor": "baseline_age", "scans": "all",
     "permute": "participants", "permutations": 19, "correction": ["fwe"]},
    {"name": "gm_mean", "scope": "roi", "statistic": "pearson", "outcome": "images.GM", "predictor": "age",
     "scans": "mean"},
    {"name": "relevance_last", "scope": "similarity", "outcome": "relevance.gradient_x_input",
     "predictor": "images.GM", "scans": "last"},
]


def test_a_session_cohort_runs_cross_fitted_with_repeated_measures_statistics(session_cohort, tmp_path):
    """Train (3 participant-grouped folds), explain every scan out of sample, and associate with each choice of
    scans; the mixed model is statsmodels' MixedLM on the analysis's own data."""
    import statsmodels.formula.api as smf

    modalities = {**{name: SESSION_PATHS[name] for name in ("T1", "GM")},
                  "APARC_ASEG": {"path": in_session(FREESURFER_LABEL_PATHS["APARC_ASEG"]), "dtype": "int16",
                                 "kind": "label", "labels": "freesurfer"}}
    catalog = write_catalog(
        tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"), cohort={"directory": str(session_cohort)},
        modalities=modalities, features=None, report=None, cluster={"profile": "local", "n_workers": 1},
        train={"target": "age", "modalities": ["T1"], "members": 1, "epochs": 2, "batch_size": 4,
               "split": {"folds": 3, "fractions": [0.6, 0.2, 0.2]}},
        explain={"methods": ["gradient_x_input"], "subjects": "test"}, associate=SESSION_ANALYSES)
    result = cli("run", catalog)
    assert result.exit_code == 0, result.stderr + result.stdout
    scans = read_scans(session_cohort, "participants.tsv")
    models = tmp_path / "ws/models"
    folds = pd.read_csv(models / "split.tsv", sep="\t")
    assert scan_ids(folds.sort_values(["participant_id", "session_id"])) == scan_ids(scans)
    assert (folds.groupby("participant_id")["fold"].nunique() == 1).all()
    for fold in range(3):  # a fold's test participants are in no other split of that fold
        split = pd.read_csv(models / f"fold_{fold}/split.tsv", sep="\t")
        tested = set(split.loc[split.split == "test", "participant_id"])
        assert tested == set(folds.loc[folds.fold == fold, "participant_id"])
        assert not tested & set(split.loc[split.split != "test", "participant_id"])
    predictions = pd.read_parquet(models / "predictions.parquet")
    ensemble = predictions[predictions.member == "ensemble"].set_index(["participant_id", "session_id"])
    assert len(ensemble) == len(scans) and (ensemble["split"] == "test").all()
    assert (ensemble["fold"] == folds.set_index(["participant_id", "session_id"])["fold"].reindex(
        ensemble.index)).all()
    relevance = open_relevance(tmp_path / "ws/relevance.zarr")
    assert sorted(relevance.subject.values) == sorted(scan_ids(scans))
    np.testing.assert_array_equal(relevance.fold.values, ensemble["fold"].reindex(
        list(zip(relevance.participant_id.values, relevance.session_id.values, strict=True))).to_numpy())

    associations = tmp_path / "ws/associations"
    data = pd.read_parquet(associations / "prediction_mixed/data.parquet")
    model = pd.read_parquet(associations / "prediction_mixed/model.parquet").set_index("term")
    reference = smf.mixedlm("predicted ~ age", data.rename(columns={"predictions.predicted": "predicted"}),
                            groups=data["participant_id"]).fit(reml=True)
    assert len(data) == len(scans)
    for column, value in (("estimate", reference.fe_params["age"]), ("se", reference.bse["age"]),
                          ("p", reference.pvalues["age"])):
        np.testing.assert_allclose(model.loc["age", column], value, rtol=1e-6)
    baseline = pd.read_parquet(associations / "prediction_baseline/data.parquet")
    first = scans.groupby("participant_id", sort=False).head(1)
    assert scan_ids(baseline) == scan_ids(first)
    summaries = {analysis["name"]: json.loads((associations / analysis["name"] / "summary.json").read_text())
                 for analysis in SESSION_ANALYSES}
    assert summaries["gm_blocks"]["n"] == len(scans) and summaries["gm_blocks"]["permutations"] == 19
    assert summaries["gm_mean"]["n"] == 16 and summaries["hippocampus_mixed"]["model"] == "mixed"
    assert summaries["relevance_last"]["n"] == 16


def test_the_mixed_model_recovers_the_ageing_planted_within_participants(session_cohort, tmp_path):
    """Hippocampal gray matter per scan (GM summed over each scan's own aparc+aseg hippocampus labels), fitted with
    a random intercept per participant (``region_models(..., groups="participant_id")``, statsmodels MixedLM): its
    slope on the years since the first scan is negative, significant and within two standard errors of the
    planted loss (each participant's first volume × the planted fraction lost per year, planted_effects.tsv)."""
    import statsmodels.formula.api as smf

    scans = read_scans(session_cohort, "participants.tsv")
    modalities = [Modality("GM", SESSION_PATHS["GM"]),
                  Modality("APARC_ASEG", in_session(FREESURFER_LABEL_PATHS["APARC_ASEG"]), "int16")]
    ingest(tmp_path / "images.zarr", scans, session_cohort, modalities, session_cohort / "mask.nii.gz")
    images = open_cohort(tmp_path / "images.zarr")
    voxel_mm3 = float(np.prod(np.abs(np.diag(np.asarray(images.attrs["grid"]["affine"]))[:3])))
    hippocampus = np.where(np.isin(images.APARC_ASEG.values, [17, 53]), images.GM.values, 0).sum(axis=1) * voxel_mm3
    table = scans[["participant_id", "age"]].assign(volume=hippocampus, region="hippocampus")
    table["baseline_age"] = table.groupby("participant_id")["age"].transform("first")
    table["years"] = table["age"] - table["baseline_age"]
    fit = region_models(table, "volume ~ years + baseline_age", groups="participant_id").set_index("term")
    reference = smf.mixedlm("volume ~ years + baseline_age", table, groups="participant_id").fit(reml=True)
    np.testing.assert_allclose(fit.loc["years", "estimate"], reference.fe_params["years"], rtol=1e-6)

    planted = pd.read_csv(session_cohort / "planted_effects.tsv", sep="\t").assign(volume=hippocampus)
    slopes = [(people.volume.iloc[0] * (people.hippocampus_loss.iloc[0] - people.hippocampus_loss.iloc[-1])
               / (1 - people.hippocampus_loss.iloc[0]) / (people.age.iloc[-1] - people.age.iloc[0]))
              for _, people in planted.groupby("participant_id") if len(people) > 1]
    estimate, se, p = fit.loc["years", ["estimate", "se", "p"]]
    assert estimate < 0 and p < 0.05
    assert abs(estimate - np.mean(slopes)) <= 2 * se, (estimate, se, np.mean(slopes))


def test_pybids_finds_the_files_the_templates_name(session_cohort, tiny_cohort):
    for root, templates in ((session_cohort, SESSION_PATHS), (tiny_cohort, MODALITY_PATHS)):
        scans = read_scans(root, "participants.tsv")
        index = BidsIndex(root)
        for name, suffix in (("T1", "T1w"), ("FLAIR", "FLAIR")):
            found = index.files(name, {"suffix": suffix, "datatype": "anat"}, scans)
            expected, problems = resolve_files(root, scans, [Modality(name, templates[name])])
            assert not found.problems and not problems
            assert found.by_scan == {scan: paths[name] for scan, paths in expected.items()}


def test_bids_files_that_cannot_be_told_apart_or_belong_to_nobody_are_named(session_cohort, tmp_path):
    root = shutil.copytree(session_cohort, tmp_path / "cohort", ignore=shutil.ignore_patterns("derivatives"))
    first = root / "sub-0001/ses-01/anat/sub-0001_ses-01_T1w.nii.gz"
    shutil.copy(first, first.with_name("sub-0001_ses-01_run-2_T1w.nii.gz"))
    shutil.copytree(root / "sub-0002", root / "sub-9999", ignore=shutil.ignore_patterns("*.tsv"))
    for path in (root / "sub-9999").rglob("*.nii.gz"):
        path.rename(path.with_name(path.name.replace("sub-0002", "sub-9999")))
    found = BidsIndex(root).files("T1", {"suffix": "T1w"}, read_scans(root, "participants.tsv"))
    messages = [str(problem) for problem in found.problems]
    assert any("participant sub-0001" in text and "session ses-01" in text and "two files match" in text
               and "run" in text for text in messages), messages
    assert any("sub-9999" in text and "not in the participants" in text for text in messages), messages
    assert found.by_scan["sub-0002_ses-01"].name == "sub-0002_ses-01_T1w.nii.gz"
    (root / "dataset_description.json").write_text("{ not json")
    with pytest.raises(InputError, match="pybids cannot read the BIDS dataset"):
        BidsIndex(root)


@pytest.mark.slow
def test_whole_participant_permutation_finds_the_planted_between_participant_ageing(tmp_path):
    """40 synthetic participants with 1–3 sessions: gray matter against the age at the first scan (a
    between-participant effect), tested voxel-wise with whole participants permuted, is significant (p_fwe < 0.05)
    and negative inside the planted hippocampal, amygdalar and thalamic loss."""
    root = tmp_path / "cohort"
    generate_cohort(root, 40, voxel_size=8.0, seed=21, max_sessions=3)
    scans = read_scans(root, "participants.tsv")
    ingest(tmp_path / "images.zarr", scans, root, [Modality("GM", SESSION_PATHS["GM"])], root / "mask.nii.gz")
    images = open_cohort(tmp_path / "images.zarr")
    first_age = scans.groupby("participant_id")["age"].transform("first").to_numpy()
    result = voxelwise_ols(images.GM, first_age, permutations=499, seed=1,
                           blocks=ExchangeabilityBlocks(scans["participant_id"].to_numpy()))
    planted = truth_mask(root / TRUTH_REGIONS, images, [1, 2, 3])
    assert np.median(result.t.values[planted]) < -3
    assert ((result.p_fwe.values < 0.05) & planted & (result.t.values < 0)).any()


def test_the_sessions_catalog_in_docs_is_valid():
    result = cli("validate", REPO / "docs" / "catalog-sessions.yaml")
    assert result.exit_code == 0, result.stderr


def test_scans_baseline_last_and_mean_take_the_scans_they_name(session_cohort, tmp_path):
    """``chosen_scans``: the first or last scan of each participant, or their scans averaged (maps against
    numpy's mean of the participant's rows, ages and a per-scan table's values against pandas'); a per-participant
    table joins every scan of its participant."""
    from engine.analysis.association import Sources, chosen_scans
    from engine.analysis.features import join_on_participant
    from engine.data.store import row_columns

    scans = read_scans(session_cohort, "participants.tsv")
    ingest(tmp_path / "images.zarr", scans, session_cohort, [Modality("GM", SESSION_PATHS["GM"])],
           session_cohort / "mask.nii.gz")
    images = open_cohort(tmp_path / "images.zarr")
    per_scan = scans[["participant_id", "session_id"]].assign(value=np.arange(len(scans), dtype=float))
    trait = pd.DataFrame({"participant_id": scans.participant_id.unique()}).assign(trait=lambda t: t.index * 10.0)
    joined = join_on_participant(trait, scans[["participant_id", "session_id"]])
    assert (joined.set_index("participant_id")["trait"] == trait.set_index("participant_id")["trait"]
            .reindex(scans.participant_id)).all()
    sources = Sources(images, row_columns(images), tables={"extra": per_scan})

    first, last = (scans.groupby("participant_id", sort=False).nth(end) for end in (0, -1))
    assert list(chosen_scans(sources, "baseline").images.subject.values) == scan_ids(first)
    assert list(chosen_scans(sources, "last").images.subject.values) == scan_ids(last)
    assert chosen_scans(sources, "all") is sources

    mean = chosen_scans(sources, "mean")
    people = list(mean.images.subject.values)
    assert sorted(people) == sorted(scans.participant_id.unique())
    gm = images.GM.values.astype(np.float64)
    expected = np.stack([gm[(scans.participant_id == person).to_numpy()].mean(axis=0) for person in people])
    np.testing.assert_allclose(mean.images.GM.values, expected, rtol=1e-6)
    np.testing.assert_allclose(mean.participants.loc[people, "age"], scans.groupby("participant_id")["age"].mean()
                               .reindex(people))
    np.testing.assert_allclose(mean.tables["extra"].set_index("participant_id")["value"].reindex(people),
                               per_scan.groupby("participant_id")["value"].mean().reindex(people))
    with pytest.raises(ValueError, match="choose scans: baseline, last or mean"):
        chosen_scans(sources, None)


def test_each_scans_freesurfer_subject_comes_from_a_template():
    from pipelines.catalog import FreeSurferSettings

    keys = pd.DataFrame({"participant_id": ["sub-01", "sub-01"], "session_id": ["ses-1", "ses-2"]})
    assert FreeSurferSettings(subjects_dir="fs").subject_folders(keys) == ["sub-01_ses-1", "sub-01_ses-2"]
    longitudinal = FreeSurferSettings(subjects_dir="fs", subject="{participant_id}_{session_id}.long.{participant_id}")
    assert longitudinal.subject_folders(keys) == ["sub-01_ses-1.long.sub-01", "sub-01_ses-2.long.sub-01"]
    assert FreeSurferSettings(subjects_dir="fs").subject_folders(keys[["participant_id"]]) == ["sub-01", "sub-01"]
    with pytest.raises(ValueError, match="not \\['site'\\]"):
        FreeSurferSettings(subjects_dir="fs", subject="{site}_{participant_id}")


def test_each_scan_is_registered_on_its_own_and_ingested_as_its_row(tmp_path):
    """Native scans with sessions: one registration per scan (QC keyed by participant and session), the store's
    rows the registered scans."""
    catalog = write_catalog(
        tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"),
        cohort={"demo": {"subjects": 4, "voxel_size": 8.0, "seed": 3, "native_voxel_size": 6.0, "sessions": 2}},
        register={"transform": "affine", "voxel_size": 8.0, "on_error": "skip"},
        modalities={"T1": SESSION_PATHS["T1"]}, features=None, train=None, explain=None, associate=None,
        report=None, cluster={"profile": "local", "n_workers": 1})
    result = cli("run", catalog)
    assert result.exit_code == 0, result.stderr + result.stdout
    scans = read_scans(tmp_path / "ws/demo_cohort", "participants.tsv")
    qc = pd.read_parquet(tmp_path / "ws/registered/qc.parquet")
    assert sorted(scan_ids(qc)) == sorted(scan_ids(scans)) and list(qc.columns[:2]) == ["participant_id",
                                                                                        "session_id"]
    assert sorted(open_cohort(tmp_path / "ws/images.zarr").subject.values) == sorted(scan_ids(scans))
    assert all((tmp_path / "ws/registered/participants" / scan / "T1.nii.gz").is_file() for scan in scan_ids(scans))


def test_a_cross_fitted_ensemble_explains_its_test_scans_and_demo_analyses_say_which_scans(tmp_path):
    import yaml

    catalog = yaml.safe_load((REPO / "docs/catalog-sessions.yaml").read_text())
    catalog["workspace"] = str(tmp_path / "ws")
    catalog["explain"]["subjects"] = "validation"
    del catalog["associate"][0]["scans"]
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    result = cli("validate", tmp_path / "catalog.yaml")
    assert result.exit_code == 1 and "the ensemble is cross-fitted (split.folds)" in result.stderr
    catalog["explain"]["subjects"] = "test"
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    result = cli("validate", tmp_path / "catalog.yaml")
    assert result.exit_code == 1 and "associate.hippocampus_within.scans: the demo cohort has sessions" in result.stderr
