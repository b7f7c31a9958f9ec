"""Several scans per participant: BIDS sessions read into one row per scan, every split participant-grouped, the
synthetic cohort's sessions the same head aged, the store's rows scans with participant and session coordinates."""

from __future__ import annotations

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
from engine.models.splits import SplitSettings, grouped_folds, stratified_split
from engine.models.validation import truth_mask
from tests.helpers import MODALITIES, cli, write_catalog

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


def test_a_session_cohort_names_what_it_cannot_take_yet_and_a_template_without_the_session(session_cohort,
                                                                                           tmp_path):
    scans = read_scans(session_cohort, "participants.tsv")
    with pytest.raises(InputError, match=r"must contain \{session_id\}"):
        resolve_files(session_cohort, scans, MODALITIES[:1])  # templates without {session_id}
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"),
                            cohort={"directory": str(session_cohort)}, modalities=SESSION_PATHS,
                            features=None, explain=None, associate=None, report=None)
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "train" in result.stderr and f"{len(scans)} scans of 16 participants" in result.stderr



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
