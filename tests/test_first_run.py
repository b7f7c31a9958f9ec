"""A first run on one's own data: each mistake a new user makes is named by ``relcohort validate`` before any work,
and ``relcohort run`` stops on it with one message, exit code 1, no traceback and nothing written."""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from engine.data.inputs import read_participants
from engine.data.store import open_cohort, store_attributes
from tests.helpers import Study, cli


@pytest.fixture
def study(tiny_cohort, tmp_path) -> Study:
    return Study(tiny_cohort, tmp_path)


def _mask_without_space(study: Study) -> None:
    mask = nib.load(study.root / "mask.nii.gz")
    unnamed = nib.Nifti1Image(np.asanyarray(mask.dataobj), mask.affine)
    unnamed.set_sform(mask.affine, code=1)  # scanner space: no template named
    unnamed.set_qform(mask.affine, code=1)
    nib.save(unnamed, study.root / "mask.nii.gz")
    del study.catalog["cohort"]["space"]


def _duplicate_participant(study: Study) -> None:
    table = pd.read_csv(study.participants, sep="\t")
    pd.concat([table, table.iloc[[1]]]).to_csv(study.participants, sep="\t", index=False)


def _mixed_grids(study: Study) -> None:
    for pid in pd.read_csv(study.participants, sep="\t").participant_id[::2]:
        study.regrid(study.root / f"{pid}/anat/{pid}_T1w.nii.gz", 16.0)


def _two_in_a_class(study: Study) -> None:
    table = pd.read_csv(study.participants, sep="\t")
    table["group"] = ["AD" if index < 2 else "CN" for index in range(len(table))]
    table.to_csv(study.participants, sep="\t", index=False)


def _age_as_text(study: Study) -> None:
    table = pd.read_csv(study.participants, sep="\t", dtype=str)
    table.loc[3, "age"] = "forty"
    table.to_csv(study.participants, sep="\t", index=False)


def _four_dimensional(path) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.stack([np.asanyarray(image.dataobj)] * 2, axis=-1), image.affine), path)


def _garbled_t1(study: Study) -> None:
    (study.root / "sub-0001/anat/sub-0001_T1w.nii.gz").write_bytes(b"not an image")


def _read_only_workspace(study: Study) -> None:
    locked = study.folder / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here: no folder is read-only for root")
    study.catalog["workspace"] = str(locked / "ws")


#: Case → (how the study is broken, what the message must name).
CASES = {
    "mask without a recognised space": (_mask_without_space, ["cohort.space", "names no template space",
                                                              "cohort.space: MNI152NLin2009cAsym"]),
    "a typo in the target": (lambda study: study.catalog["train"].update(target="groupp"),
                             ["train.target", "'groupp' is not a column", "did you mean 'group'"]),
    "a positive class the column does not have": (lambda study: study.catalog["train"].update(positive_class="ALZ"),
                                                  ["train.positive_class", "'ALZ'", "AD, CN"]),
    "a duplicate participant": (_duplicate_participant, ["cohort.participants", "duplicate participant IDs",
                                                         "sub-0002"]),
    "no mask": (lambda study: (study.root / "mask.nii.gz").unlink(), ["cohort.mask", "mask.nii.gz does not exist"]),
    "a mask on another grid": (lambda study: study.regrid(study.root / "mask.nii.gz", 16.0),
                               ["modalities.T1", "differs from the brain mask's", "voxel size 16"]),
    "images of mixed grids": (_mixed_grids, ["modalities.T1", "sub-0001_T1w.nii.gz", "differs from the brain mask"]),
    "a path template naming an unknown column": (
        lambda study: study.catalog["modalities"].update(T1="{participant_id}/{session}/{participant_id}_T1w.nii.gz"),
        ["modalities.T1.path", "'session' is not a column"]),
    "an empty participants table": (lambda study: study.participants.write_text("participant_id\tage\tsex\n"),
                                    ["cohort.participants", "lists no participants"]),
    "ages as text": (_age_as_text, ["cohort.participants", "age 'forty' on line 5 is not a number", "sub-0004"]),
    "one class with too few participants for every split": (_two_in_a_class, [
        "train.split", "class 'AD' of 'group' has", "split; every class needs at least two"]),
    "a regression on a text column": (lambda study: study.catalog["train"].update(task="regression",
                                                                                  positive_class=None),
                                      ["train.target", "'group' holds text", "task: classification"]),
    "an analysis term naming an ensemble that does not exist": (
        lambda study: study.catalog["associate"][0].update(outcome="relevance.t2.lrp"),
        ["associate[0].outcome", "names ensemble 't2'"]),
    "a subject filter naming an unknown column": (
        lambda study: study.catalog["associate"][0].update(subjects={"where": {"agee": {"min": 60}}}),
        ["associate[0].subjects.where", "'agee' is not a column", "did you mean 'age'"]),
    "a subject filter naming an ensemble that does not exist": (
        lambda study: study.catalog["associate"][0].update(subjects={"ensemble": "t2", "split": ["test"]}),
        ["associate[0].subjects.ensemble", "names ensemble 't2'"]),
    "a workspace inside the cohort folder": (
        lambda study: study.catalog.update(workspace=str(study.root / "derivatives" / "ws")),
        ["workspace", "is inside the cohort folder"]),
    "a read-only workspace": (_read_only_workspace, ["workspace", "cannot write in"]),
    "a FreeSurfer folder that does not exist": (
        lambda study: study.catalog.update(features={"freesurfer": {"subjects_dir": "derivatives/freesurfr"}}),
        ["features.freesurfer.subjects_dir", "derivatives/freesurfr is not a folder"]),
    "a ground truth that does not exist": (
        lambda study: study.catalog["explain"].update(truth=str(study.root / "truth.nii.gz")),
        ["explain.truth", "truth.nii.gz does not exist"]),
    "a 4D brain mask": (lambda study: _four_dimensional(study.root / "mask.nii.gz"),
                        ["cohort.mask", "the brain mask must be 3D, got shape"]),
    "a 4D image": (lambda study: _four_dimensional(study.root / "sub-0001/anat/sub-0001_T1w.nii.gz"),
                   ["modalities.T1", "participant sub-0001", "expected a 3D image, got shape"]),
    "an unreadable image": (_garbled_t1, ["modalities.T1", "participant sub-0001", "sub-0001_T1w.nii.gz: unreadable"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_names_the_problem_and_run_stops_before_any_work(study, case):
    breaks, expected = CASES[case]
    breaks(study)
    catalog = study.write()
    for command in ("validate", "run"):
        result = cli(command, catalog)
        assert result.exit_code == 1, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
        for fragment in expected:
            assert fragment in result.stderr, (command, fragment, result.stderr)
    assert not study.workspace.exists()  # the run stopped before it made anything, its cluster never started


def test_a_workspace_that_is_a_file_or_holds_another_store_is_named_and_left_as_it_is(study):
    import zarr

    catalog = study.write()
    study.workspace.write_text("my notes")
    result = cli("run", catalog)
    assert result.exit_code == 1 and "is a file, not a folder" in result.stderr
    assert study.workspace.read_text() == "my notes"
    study.workspace.unlink()
    zarr.open_group(study.workspace / "images.zarr", mode="w").attrs["layout"] = "someone-else/1"
    result = cli("run", catalog)
    assert result.exit_code == 1 and "images.zarr is not a relcohort images store" in result.stderr
    assert zarr.open_group(study.workspace / "images.zarr").attrs["layout"] == "someone-else/1"


def test_a_participants_table_with_a_byte_order_mark_and_windows_line_endings_is_read_as_any_other(study):
    table = pd.read_csv(study.participants, sep="\t")
    text = table.to_csv(sep="\t", index=False).replace("\n", "\r\n")
    study.participants.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert cli("validate", study.write()).exit_code == 0
    read = read_participants(study.participants)
    assert list(read.columns) == list(table.columns) and read.participant_id.tolist() == table.participant_id.tolist()
    assert read.group.tolist() == table.group.tolist()  # no stray carriage return


def test_declaring_the_space_after_a_run_updates_the_store_instead_of_being_ignored(study):
    _mask_without_space(study)
    study.catalog.update(train=None, explain=None, associate=None)
    assert cli("run", study.write()).exit_code == 0  # ingest alone needs no atlas
    assert store_attributes(study.workspace / "images.zarr")["grid"]["space"] == "unknown"
    study.catalog["cohort"]["space"] = "MNI152NLin2009cAsym"
    study.catalog["features"] = {"gray_matter": "GM"}  # regions of an MNI atlas: needs the space
    result = cli("run", study.write())
    assert result.exit_code == 0, result.stderr
    images = open_cohort(study.workspace / "images.zarr")
    assert images.attrs["grid"]["space"] == images.GM.attrs["space"] == "MNI152NLin2009cAsym"
    assert (study.workspace / "features/regional_gm_volume.parquet").is_file()


def test_a_new_mask_after_a_run_is_refused_naming_the_store_and_how_to_rebuild_it(study):
    study.catalog.update(train=None, explain=None, associate=None)
    assert cli("run", study.write()).exit_code == 0
    stamp = (study.workspace / "images.zarr/zarr.json").stat().st_mtime_ns
    mask = nib.load(study.root / "mask.nii.gz")
    smaller = np.asanyarray(mask.dataobj).copy()
    smaller[: smaller.shape[0] // 2] = 0
    nib.save(nib.Nifti1Image(smaller, mask.affine, mask.header), study.root / "mask.nii.gz")
    for command in ("validate", "run"):
        result = cli(command, study.write())
        assert result.exit_code == 1 and "Traceback" not in result.stderr
        assert "cohort.mask" in result.stderr and "was built with another brain mask" in result.stderr
        assert f"delete {study.workspace / 'images.zarr'}" in result.stderr
    assert (study.workspace / "images.zarr/zarr.json").stat().st_mtime_ns == stamp


def test_a_problem_met_during_a_stage_ends_in_one_sentence_and_debug_shows_the_traceback(study):
    table = study.folder / "cognition.tsv"
    table.write_text("id\tscore\nsub-0001\t3\n")  # no participant_id column: found when the features stage reads it
    study.catalog.update(train=None, explain=None, associate=None, features={"tables": [str(table)]})
    result = cli("run", study.write())
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "features" in result.stderr and "cognition.tsv" in result.stderr and "participant_id" in result.stderr
    debug = cli("run", study.write(), "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr + debug.stdout
