"""The cohort store: exact round trips, labelled queries, incremental ingest, bad inputs."""

from __future__ import annotations

import gzip
import shutil

import dask.array
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr

from engine.data.inputs import InputError, Modality, read_participants
from engine.data.masker import Masker
from engine.data.store import IngestError, ingest, open_cohort, store_attributes
from engine.tasks import Execution
from tests.helpers import MODALITIES, run_ingest


def source(cohort, modality: Modality, pid: str):
    return nib.load(cohort / modality.template.format(participant_id=pid))


def test_round_trip_is_exact_inside_the_mask(tiny_cohort, tmp_path, client):
    store = tmp_path / "images.zarr"
    report = run_ingest(tiny_cohort, store, execution=Execution(client))
    assert report.appended == 24 and report.written == {m.name: 24 for m in MODALITIES}
    ds = open_cohort(store)
    mask = np.asanyarray(nib.load(tiny_cohort / "mask.nii.gz").dataobj) > 0
    assert np.array_equal(np.asanyarray(Masker.of(ds).mask_image().dataobj) > 0, mask)
    for modality in MODALITIES:
        for pid in ("sub-0001", "sub-0017", "sub-0024"):
            original = source(tiny_cohort, modality, pid)
            restored = Masker.of(ds).to_nifti(ds[modality.name].sel(subject=pid))
            assert restored.get_data_dtype() == original.get_data_dtype()
            assert np.array_equal(restored.affine, original.affine)
            restored_data, original_data = np.asanyarray(restored.dataobj), np.asanyarray(original.dataobj)
            assert np.array_equal(restored_data[mask], original_data[mask])
            assert not restored_data[~mask].any()


def test_store_is_lazy_chunked_and_labelled(tiny_cohort, tmp_path):
    store = tmp_path / "images.zarr"
    run_ingest(tiny_cohort, store, subjects_per_chunk=5, voxels_per_chunk=2048)
    ds = open_cohort(store)
    assert isinstance(ds.T1.data, dask.array.Array)
    assert ds.T1.dims == ("subject", "voxel") and ds.T1.data.chunksize == (5, 2048)
    assert ds.attrs["grid"]["shape"] == [23, 28, 23] and ds.T1.attrs["space"] == "MNI152"
    participants = pd.read_csv(tiny_cohort / "participants.tsv", sep="\t")
    older = ds.where(ds.age > 60, drop=True)
    assert list(older.subject.values) == list(participants.participant_id[participants.age > 60])
    women = ds.sel(subject=ds.sex == "F")
    assert list(women.subject.values) == list(participants.participant_id[participants.sex == "F"])
    by_site = ds.GM.sum("voxel").groupby("site").mean().compute()
    assert set(by_site.site.values) == set(participants.site)
    np.testing.assert_allclose(ds.age.values, participants.age.values)


def test_ingest_is_incremental(cohort_copy, tmp_path, client):
    store = tmp_path / "images.zarr"
    table = read_participants(cohort_copy / "participants.tsv")
    first = run_ingest(cohort_copy, store, table.iloc[:10], on_error="skip", execution=Execution(client))
    assert first.appended == 10 and len(first.problems) == 14 * len(MODALITIES)  # files of unlisted participants
    before = open_cohort(store).T1.values.copy()

    second = run_ingest(cohort_copy, store, execution=Execution(client))
    assert (second.appended, second.unchanged) == (14, 10)
    assert second.written == {m.name: 14 for m in MODALITIES}
    ds = open_cohort(store)
    assert list(ds.subject.values) == list(table.participant_id)
    assert np.array_equal(ds.T1.values[:10], before)

    again = run_ingest(cohort_copy, store, execution=Execution(client))
    assert (again.appended, again.unchanged, again.written) == (0, 24, {})

    # a changed file is rewritten in place, only that modality of that participant
    path = cohort_copy / MODALITIES[0].template.format(participant_id="sub-0005")
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 2, image.affine, image.header), path)
    changed = run_ingest(cohort_copy, store, execution=Execution(client))
    assert (changed.unchanged, changed.written) == (23, {"T1": 1})
    ds = open_cohort(store)
    np.testing.assert_array_equal(ds.T1.sel(subject="sub-0005").values, 2 * before[4])
    np.testing.assert_array_equal(ds.T1.values[:4], before[:4])

    # metadata edits reach the coordinates without rewriting images
    table.loc[table.participant_id == "sub-0002", "age"] = 99.0
    table["group"] = "control"
    run_ingest(cohort_copy, store, table, execution=Execution(client))
    ds = open_cohort(store)
    assert float(ds.age.sel(subject="sub-0002")) == 99.0 and set(ds.group.values) == {"control"}


def test_interrupted_growth_is_repaired_and_never_looks_complete(tiny_cohort, tmp_path):
    store = tmp_path / "images.zarr"
    table = read_participants(tiny_cohort / "participants.tsv")
    run_ingest(tiny_cohort, store, table.iloc[:8], on_error="skip")
    group = zarr.open_group(store, mode="r+")
    group["T1"].resize((12, group["T1"].shape[1]))  # as if killed while growing
    with pytest.raises(ValueError, match="interrupted while growing"):
        open_cohort(store)
    report = run_ingest(tiny_cohort, store, table.iloc[:12], on_error="skip")
    assert report.appended == 4 and open_cohort(store).sizes["subject"] == 12

    # rows whose hash is not committed are hidden
    zarr.open_group(store, mode="r+")["ingest/FA"][3] = ""
    assert "sub-0004" not in open_cohort(store).subject.values
    assert open_cohort(store, include_incomplete=True).sizes["subject"] == 12
    rerun = run_ingest(tiny_cohort, store, table.iloc[:12], on_error="skip")
    assert rerun.written == {"FA": 1} and open_cohort(store).sizes["subject"] == 12


# ---------------------------------------------------------------------------------------
# Bad input: each names the participant, the file and the problem; nothing stored is lost.


def _path(cohort, pid, modality="T1"):
    return cohort / dict((m.name, m.template) for m in MODALITIES)[modality].format(participant_id=pid)


def _truncate(cohort):
    path = _path(cohort, "sub-0007")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "sub-0007", path, "unreadable or truncated image"


def _garbage(cohort):
    path = _path(cohort, "sub-0007", "FLAIR")
    path.write_bytes(gzip.compress(b"this is not an image" * 50))
    return "sub-0007", path, "unreadable or truncated image"


def _four_d(cohort):
    path = _path(cohort, "sub-0007", "GM")
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), path)
    return "sub-0007", path, "expected a 3D image"


def _shifted_grid(cohort):
    path = _path(cohort, "sub-0007", "FA")
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)
    return "sub-0007", path, "grid differs from the cohort's"


def _other_shape(cohort):
    path = _path(cohort, "sub-0007")
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:-1], image.affine), path)
    return "sub-0007", path, "grid differs from the cohort's"


def _nan_voxels(cohort):
    path = _path(cohort, "sub-0007")
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).copy()
    data[11, 14, 11] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    return "sub-0007", path, "NaN/Inf voxel(s) inside the brain mask"


def _missing_file(cohort):
    path = _path(cohort, "sub-0007", "FLAIR")
    path.unlink()
    return "sub-0007", path, "no FLAIR file"


def _unlisted_file(cohort):
    source_dir = cohort / "sub-0007"
    shutil.copytree(source_dir, cohort / "sub-0099")
    for path in (cohort / "sub-0099").rglob("*.nii.gz"):
        path.rename(path.with_name(path.name.replace("sub-0007", "sub-0099")))
    return None, _path(cohort, "sub-0099"), "who is not in the participants table"


def _lossy_dtype(cohort):
    path = _path(cohort, "sub-0007", "WMH")
    image = nib.load(path)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[11, 14, 11] = 0.5
    nib.save(nib.Nifti1Image(data, image.affine), path)
    return "sub-0007", path, "do not fit the modality's dtype uint8"


BAD_INPUTS = [_truncate, _garbage, _four_d, _shifted_grid, _other_shape, _nan_voxels, _missing_file,
              _unlisted_file, _lossy_dtype]


@pytest.mark.parametrize("break_input", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_fails_clearly_and_keeps_what_is_stored(cohort_copy, tmp_path, break_input):
    store = tmp_path / "images.zarr"
    table = read_participants(cohort_copy / "participants.tsv")
    run_ingest(cohort_copy, store, table.iloc[:4], on_error="skip")
    stored = open_cohort(store).T1.values.copy()

    pid, path, problem = break_input(cohort_copy)
    with pytest.raises(IngestError) as failure:
        run_ingest(cohort_copy, store)
    message = str(failure.value)
    assert problem in message and str(path) in message
    if pid:
        assert f"participant {pid}" in message
    ds = open_cohort(store)
    assert np.array_equal(ds.T1.values[:4], stored)
    assert pid not in ds.subject.values and "sub-0099" not in ds.subject.values
    assert store_attributes(store)["ingest"]["state"] in ("incomplete", "complete")

    report = run_ingest(cohort_copy, store, on_error="skip")
    assert any(problem in str(found) and str(path) in str(found) for found in report.problems)
    skipped = store_attributes(store)["ingest"]["skipped"]
    assert any(entry["file"] == str(path) and problem in entry["problem"] for entry in skipped)
    ds = open_cohort(store)
    assert ds.sizes["subject"] == (24 if pid is None else 23) and pid not in ds.subject.values
    assert np.array_equal(ds.T1.values[:4], stored)


def test_a_bad_replacement_keeps_the_stored_version(cohort_copy, tmp_path):
    store = tmp_path / "images.zarr"
    run_ingest(cohort_copy, store)
    stored = open_cohort(store).T1.sel(subject="sub-0007").values.copy()
    _nan_voxels(cohort_copy)
    report = run_ingest(cohort_copy, store, on_error="skip")
    assert len(report.problems) == 1
    ds = open_cohort(store)
    assert "sub-0007" in ds.subject.values
    assert np.array_equal(ds.T1.sel(subject="sub-0007").values, stored)


@pytest.mark.parametrize("content, problem", [
    ("participant_id\tage\nsub-0001\t30\nsub-0001\t40\n", "duplicate participant IDs"),
    ("subject\tage\nsub-0001\t30\n", "no 'participant_id' column"),
    ("participant_id\tage\nsub-0001\tthirty\n", "age 'thirty' on line 2 is not a number"),
    ("participant_id\tage\nsub-0001\t30\textra\tfields\n", "line 2 has 4 fields, the header has 2"),
    ("participant_id\tage\n\t30\n", "empty participant_id"),
    ("", "malformed participants table: it is empty"),
])
def test_malformed_participants_tables(tmp_path, content, problem):
    path = tmp_path / "participants.tsv"
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as failure:
        read_participants(path)
    assert str(path) in str(failure.value)


def test_store_refuses_a_different_mask(tiny_cohort, tmp_path):
    store = tmp_path / "images.zarr"
    run_ingest(tiny_cohort, store, read_participants(tiny_cohort / "participants.tsv").iloc[:2], on_error="skip")
    other = tmp_path / "other_mask.nii.gz"
    mask = nib.load(tiny_cohort / "mask.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(mask.shape, np.uint8), mask.affine), other)
    with pytest.raises(InputError, match="brain mask differs"):
        ingest(store, read_participants(tiny_cohort / "participants.tsv"), tiny_cohort, MODALITIES, other)


@pytest.mark.parametrize("extension, image_class", [(".mgz", nib.MGHImage), (".nii", nib.Nifti1Image)])
def test_freesurfer_mgz_and_uncompressed_nifti_round_trip(cohort_copy, tmp_path, extension, image_class):
    table = read_participants(cohort_copy / "participants.tsv").iloc[:3]
    for pid in table.participant_id:
        original = source(cohort_copy, MODALITIES[0], pid)
        image_class(np.asanyarray(original.dataobj), original.affine).to_filename(
            cohort_copy / f"{pid}_T1{extension}")
    modality = Modality("T1", "{participant_id}_T1" + extension)
    store = tmp_path / "images.zarr"
    report = ingest(store, table, cohort_copy, [modality], cohort_copy / "mask.nii.gz")
    assert report.written == {"T1": 3}
    ds = open_cohort(store)
    mask = np.asanyarray(nib.load(cohort_copy / "mask.nii.gz").dataobj) > 0
    for pid in table.participant_id:
        expected = np.asanyarray(source(cohort_copy, MODALITIES[0], pid).dataobj)[mask]
        assert np.array_equal(np.asanyarray(Masker.of(ds).to_nifti(ds.T1.sel(subject=pid)).dataobj)[mask], expected)


def test_incompatible_catalog_changes_are_refused_before_the_store_changes(tiny_cohort, tmp_path):
    store = tmp_path / "images.zarr"
    table = read_participants(tiny_cohort / "participants.tsv")
    run_ingest(tiny_cohort, store, table.iloc[:4], on_error="skip")
    clash = table.assign(T1="x")
    with pytest.raises(InputError, match="column 'T1' clashes"):
        run_ingest(tiny_cohort, store, clash)
    retyped = table.assign(site=range(len(table)))
    with pytest.raises(InputError, match="column 'site' was text"):
        run_ingest(tiny_cohort, store, retyped)
    relabelled = [Modality(m.name, m.template, "float64" if m.name == "FA" else m.dtype) for m in MODALITIES]
    with pytest.raises(InputError, match="FA is stored as float32"):
        ingest(store, table, tiny_cohort, relabelled, tiny_cohort / "mask.nii.gz")
    assert store_attributes(store)["n_subjects"] == 4 and open_cohort(store).sizes["subject"] == 4


@pytest.mark.parametrize("name, image_class, dtype", [
    ("a.nii.gz", nib.Nifti1Image, "<f4"), ("a.nii", nib.Nifti1Image, ">i2"), ("a.nii.gz", nib.Nifti2Image, "<f8"),
    ("a.mgz", nib.MGHImage, ">f4"), ("a.mgh", nib.MGHImage, ">i4"),
])
def test_load_image_equals_nibabel(tmp_path, name, image_class, dtype):
    from engine.data.inputs import load_image
    from engine.layout import file_sha256

    rng = np.random.default_rng(0)
    affine = np.diag([-2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = [90, -126, -72]
    data = (rng.normal(0, 100, (7, 8, 9))).astype(np.dtype(dtype).newbyteorder("="))
    path = tmp_path / name
    image_class(data, affine).to_filename(path)
    image, sha256 = load_image(path)
    reference = nib.load(path)
    assert type(image) is type(reference)
    assert np.array_equal(np.asanyarray(image.dataobj), np.asanyarray(reference.dataobj))
    assert np.array_equal(image.affine, reference.affine) and sha256 == file_sha256(path)


def test_rewrites_land_on_their_own_rows_whatever_the_table_order(cohort_copy, tmp_path):
    store = tmp_path / "images.zarr"
    run_ingest(cohort_copy, store)
    before = open_cohort(store).GM.values.copy()
    for pid, factor in (("sub-0003", 0.5), ("sub-0002", 0.25)):  # same subject chunk, reverse order
        path = _path(cohort_copy, pid, "GM")
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * np.float32(factor), image.affine), path)
    shuffled = read_participants(cohort_copy / "participants.tsv").iloc[::-1]
    assert run_ingest(cohort_copy, store, shuffled).written == {"GM": 2}
    after = open_cohort(store).GM
    np.testing.assert_array_equal(after.sel(subject="sub-0003").values, before[2] * np.float32(0.5))
    np.testing.assert_array_equal(after.sel(subject="sub-0002").values, before[1] * np.float32(0.25))
    np.testing.assert_array_equal(after.sel(subject="sub-0001").values, before[0])


def test_label_volumes_hold_only_their_tables_labels(tiny_cohort, tmp_path):
    """A label volume (FreeSurfer numbers: Desikan–Killiany's 1028 and Destrieux's 11116 are both known) with a
    label its table lacks is refused naming the participant, the file and the label; with on_error=skip the
    others are stored, as integers."""
    root = tmp_path / "labels"
    root.mkdir()
    shutil.copy(tiny_cohort / "mask.nii.gz", root / "mask.nii.gz")
    mask = nib.load(root / "mask.nii.gz")
    table = read_participants(tiny_cohort / "participants.tsv").iloc[:3]
    for n, pid in enumerate(table.participant_id):
        labels = np.where(np.asanyarray(mask.dataobj) > 0, 17, 0).astype(np.int16)
        labels[10, 10, 10] = (1028, 9999, 11116)[n]
        nib.save(nib.MGHImage(labels.astype(np.int32), mask.affine), root / f"{pid}_aparc+aseg.mgz")
    modality = Modality("APARC", "{participant_id}_aparc+aseg.mgz", "int16", kind="label", labels="freesurfer")
    with pytest.raises(IngestError, match=r"sub-0002.*label\(s\) \[9999\] are not in the modality's label table"):
        ingest(tmp_path / "a.zarr", table, root, [modality], root / "mask.nii.gz")
    report = ingest(tmp_path / "b.zarr", table, root, [modality], root / "mask.nii.gz", on_error="skip")
    assert [problem.participant for problem in report.problems] == ["sub-0002"]
    assert "sub-0002_aparc+aseg.mgz" in str(report.problems[0].file)
    stored = open_cohort(tmp_path / "b.zarr")["APARC"]
    assert stored.dtype == np.int16 and set(np.unique(stored.values)) == {17, 1028, 11116}
