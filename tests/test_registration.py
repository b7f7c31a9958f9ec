"""Registration to the template with ANTs: planted poses recovered, volumes kept by modulation,
the way back, the unregistered arm against nilearn, QC, bad inputs and resuming."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template, load_mni152_template
from nilearn.image import resample_to_img

from engine import open_workspace
from engine.data.inputs import InputError, Modality
from engine.data.registration import (
    RegistrationError,
    RegistrationSettings,
    _divergence,
    dice,
    normalized_mutual_information,
    register_cohort,
    robust_z,
    to_ants,
    to_native,
    to_nifti,
    to_template,
)
from engine.data.store import open_cohort
from engine.data.synth.native import native_scan, random_pose
from engine.layout import Layout, RegisteredLayout
from pipelines.stages import RegisterStage

ants = pytest.importorskip("ants")

MODALITIES = [Modality("T1", ""), Modality("GM", "", kind="probability", modulate=True),
              Modality("tissue", "", dtype="int16", kind="label"),
              Modality("FLAIR", "", space="own")]
SETTINGS = RegistrationSettings(transform="affine", voxel_size=4.0)


@pytest.fixture(scope="module")
def template_brain():
    """nilearn's MNI152 T1 brain, its GM probability and a tissue label image (1 GM, 2 other brain) at 2 mm."""
    t1, mask = load_mni152_template(resolution=2), load_mni152_brain_mask(resolution=2).get_fdata() > 0
    gm = resample_to_img(load_mni152_gm_template(resolution=2), t1, interpolation="linear", force_resample=True,
                         copy_header=True).get_fdata() * mask
    tissue = np.where(gm > 0.5, 1, np.where(mask, 2, 0)).astype(np.int16)
    return {"T1": nib.Nifti1Image((t1.get_fdata() * mask).astype(np.float32), t1.affine),
            "GM": nib.Nifti1Image(gm.astype(np.float32), t1.affine), "tissue": nib.Nifti1Image(tissue, t1.affine)}


def _participant(folder, pid, images, pose, flair_pose):
    """Native scans of the template brain in ``pose`` (FLAIR: the T1 contrast in a pose of its own; the
    tissue labels as FreeSurfer's .mgz, as aseg.mgz would come)."""
    files = {}
    for name, image in images.items():
        scan = native_scan(image, pose, 2.5, order=0 if name == "tissue" else 1,
                           dtype=np.int16 if name == "tissue" else np.float32)
        if name == "tissue":
            files[name] = folder / f"{pid}_{name}.mgz"
            nib.MGHImage(np.asanyarray(scan.dataobj), scan.affine).to_filename(files[name])
        else:
            files[name] = folder / f"{pid}_{name}.nii.gz"
            scan.to_filename(files[name])
    files["FLAIR"] = folder / f"{pid}_FLAIR.nii.gz"
    native_scan(images["T1"], flair_pose @ pose, 3.0).to_filename(files["FLAIR"])
    return files


@pytest.fixture(scope="module")
def registered(tmp_path_factory, template_brain):
    folder = tmp_path_factory.mktemp("native")
    rng = np.random.default_rng(7)
    poses, files = {}, {}
    for k in range(3):
        pid = f"sub-{k:02d}"
        poses[pid] = random_pose(rng)
        files[pid] = _participant(folder, pid, template_brain, poses[pid],
                                  random_pose(rng, rotation_deg=5, scale=(1, 1), shift_mm=5))
    layout = RegisteredLayout(folder / "registered")
    result = register_cohort(layout, files, MODALITIES, SETTINGS)
    return layout, files, poses, result


def test_affine_registration_recovers_the_planted_pose_and_modulation_keeps_native_volumes(registered):
    layout, files, poses, result = registered
    assert result.registered == 3 and not result.problems
    mask = nib.load(layout.mask).get_fdata() > 0
    for pid, pose in poses.items():
        participant = layout.participant(pid)
        qc = json.loads(participant.qc.read_text())
        assert qc["correlation"] > 0.9 and qc["dice"] > 0.9  # the template itself, moved (and resampled twice)
        # native volume per template volume is |det pose| everywhere for an affine registration
        jacobian = nib.load(participant.jacobian).get_fdata()[mask]
        assert np.median(jacobian) == pytest.approx(abs(np.linalg.det(pose[:3, :3])), rel=0.02)
        # modulated GM sums to the native scan's GM volume (numpy, on the native grid)
        native_gm = nib.load(files[pid]["GM"])
        native_volume = native_gm.get_fdata().sum() * abs(np.linalg.det(native_gm.affine[:3, :3]))
        modulated = nib.load(participant.image("GM"))
        assert modulated.get_fdata().sum() * 4.0**3 == pytest.approx(native_volume, rel=0.01)


def test_other_modalities_follow_by_space_and_kind(registered, template_brain):
    layout, files, _, _ = registered
    template_tissue = resample_to_img(template_brain["tissue"], nib.load(layout.mask), interpolation="nearest",
                                      force_resample=True, copy_header=True).get_fdata()
    for pid in files:
        participant = layout.participant(pid)
        tissue = nib.load(participant.image("tissue"))
        assert tissue.get_data_dtype() == np.int16
        assert set(np.unique(tissue.get_fdata())) <= {0, 1, 2}  # labels are never blended
        for label in (1, 2):
            assert dice(tissue.get_fdata() == label, template_tissue == label) > 0.75
        # FLAIR in its own pose: rigidly co-registered to the T1 scan first, then the T1's transforms
        assert participant.coregistration("FLAIR").is_file()
        t1, flair = (nib.load(participant.image(name)).get_fdata() for name in ("T1", "FLAIR"))
        inside = t1 > 0
        assert np.corrcoef(t1[inside], flair[inside])[0, 1] > 0.95


def test_to_native_and_back(registered):
    layout, files, _, _ = registered
    pid = "sub-01"
    native = nib.load(files[pid]["T1"])
    back = to_native(nib.load(layout.participant(pid).image("T1")), layout, pid)
    assert back.shape == native.shape and np.allclose(back.affine, native.affine)
    inside = native.get_fdata() > 0.1
    assert np.corrcoef(back.get_fdata()[inside], native.get_fdata()[inside])[0, 1] > 0.9  # via the 4 mm grid
    again = to_template(back, layout, pid)
    on_grid = nib.load(layout.participant(pid).image("T1")).get_fdata()
    brain = nib.load(layout.mask).get_fdata() > 0
    assert np.corrcoef(again.get_fdata()[brain], on_grid[brain])[0, 1] > 0.95
    labels = to_native(nib.load(layout.participant(pid).image("tissue")), layout, pid, kind="label")
    assert set(np.unique(labels.get_fdata())) <= {0, 1, 2}
    with pytest.raises(FileNotFoundError, match="sub-99 is not registered"):
        to_native(back, layout, "sub-99")


def test_unregistered_arm_equals_nilearn_resampling(tmp_path, template_brain):
    """``transform: none`` only resamples through the scanner affines: what nilearn does."""
    pose = np.eye(4)
    pose[:3, 3] = (3.0, -4.0, 2.0)
    native = native_scan(template_brain["T1"], pose, 2.5)
    native.to_filename(tmp_path / "t1.nii.gz")
    layout = RegisteredLayout(tmp_path / "registered")
    settings = RegistrationSettings(transform="none", voxel_size=4.0, min_correlation=0)
    no_lesions = nib.Nifti1Image(np.zeros(native.shape, np.uint8), native.affine)  # a valid, empty lesion mask
    no_lesions.to_filename(tmp_path / "wmh.nii.gz")
    register_cohort(layout, {"sub-01": {"T1": tmp_path / "t1.nii.gz", "WMH": tmp_path / "wmh.nii.gz"}},
                    [Modality("T1", ""), Modality("WMH", "", dtype="uint8", kind="mask")], settings)
    assert not np.asanyarray(nib.load(layout.participant("sub-01").image("WMH")).dataobj).any()
    ours = nib.load(layout.participant("sub-01").image("T1")).get_fdata()
    reference = resample_to_img(native, nib.load(layout.mask), interpolation="linear", force_resample=True,
                                copy_header=True).get_fdata()
    inside = nib.load(layout.mask).get_fdata() > 0
    assert np.abs(ours - reference)[inside].max() < 1e-3 * np.abs(reference).max()
    assert not layout.participant("sub-01").affine.exists()  # no transform to keep
    assert np.all(nib.load(layout.participant("sub-01").jacobian).get_fdata() == 1)


def test_compared_transforms_are_the_reference_registered_as_bare_ants_does_it(tmp_path, template_brain):
    """``compare``: the reference scan also on the grid by other transforms, as modalities T1_<transform>; rigid
    equals ``ants.registration`` + ``ants.apply_transforms`` called directly, none equals nilearn's resampling, and
    on a head planted 8 % larger and turned, the affine (the main transform) fits the template best, then rigid,
    then none."""
    import ants

    from engine.data.registration import _ants_environment

    pose = random_pose(np.random.default_rng(3), rotation_deg=8, scale=(1.08, 1.08), shift_mm=6)
    native_scan(template_brain["T1"], pose, 2.5).to_filename(tmp_path / "t1.nii.gz")
    layout = RegisteredLayout(tmp_path / "registered")
    settings = RegistrationSettings(transform="affine", compare=["rigid", "none"], voxel_size=4.0)
    assert settings.compared_modalities() == {"T1_rigid": "rigid", "T1_none": "none"}
    register_cohort(layout, {"sub-01": {"T1": tmp_path / "t1.nii.gz"}}, [Modality("T1", "")], settings)
    participant = layout.participant("sub-01")
    images = {name: nib.load(participant.image(name)).get_fdata() for name in ("T1", "T1_rigid", "T1_none")}
    template = ants.image_read(str(layout.template))
    with _ants_environment(settings.seed):
        moving = ants.image_read(str(tmp_path / "t1.nii.gz"))
        fit = ants.registration(fixed=template, moving=moving, type_of_transform="Rigid")
        bare = ants.apply_transforms(fixed=template, moving=moving, transformlist=fit["fwdtransforms"]).numpy()
    inside = nib.load(layout.mask).get_fdata() > 0
    assert np.corrcoef(images["T1_rigid"][inside], bare[inside])[0, 1] > 0.999
    reference = resample_to_img(nib.load(tmp_path / "t1.nii.gz"), nib.load(layout.mask), interpolation="linear",
                                force_resample=True, copy_header=True).get_fdata()
    assert np.abs(images["T1_none"] - reference)[inside].max() < 1e-3 * np.abs(reference).max()
    fits = {name: np.corrcoef(image[inside], template.numpy()[inside])[0, 1] for name, image in images.items()}
    assert fits["T1"] > fits["T1_rigid"] > fits["T1_none"], fits
    with pytest.raises(ValueError, match="compare: transforms other than the transform"):
        RegistrationSettings(transform="affine", compare=["affine"])


def test_ants_images_match_antspys_own_nibabel_reader():
    rng = np.random.default_rng(3)
    affine = random_pose(rng) @ np.diag([1.2, 0.9, 2.0, 1.0])
    affine[:3, 3] += (10, -20, 30)
    image = nib.Nifti1Image(rng.random((7, 8, 9)).astype(np.float32), affine)
    image.header.set_xyzt_units("mm", "sec")
    ours, theirs = to_ants(image), ants.from_nibabel_nifti(image)
    np.testing.assert_allclose(ours.origin, theirs.origin, atol=1e-6)
    np.testing.assert_allclose(ours.spacing, theirs.spacing, atol=1e-6)
    np.testing.assert_allclose(ours.direction, theirs.direction, atol=1e-6)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    np.testing.assert_allclose(to_nifti(ours).affine, affine, atol=1e-5)


def test_qc_measures_equal_references():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    a = rng.normal(size=5000)
    b = 0.7 * a + rng.normal(size=5000)
    labels = [np.clip(np.digitize(x, np.linspace(x.min(), x.max(), 33)[1:-1]), 0, 31) for x in (a, b)]
    assert normalized_mutual_information(a, b) == pytest.approx(normalized_mutual_info_score(*labels), rel=1e-9)
    assert dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    z = robust_z(pd.Series([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert z.iloc[4] == pytest.approx((100 - 3) / (1.4826 * 1.0)) and z.iloc[2] == 0


def _broken_files(folder, good):
    """One participant per bad input, each with an otherwise good FLAIR, GM and tissue file."""
    shape_4d = nib.Nifti1Image(np.ones((5, 5, 5, 2), np.float32), np.eye(4))
    constant = nib.Nifti1Image(np.full((5, 5, 5), 3.0, np.float32), np.eye(4))
    with_nan = nib.Nifti1Image(np.where(np.eye(5)[..., None] > 0, np.nan, 1.0).astype(np.float32), np.eye(4))
    bad = {"sub-4d": shape_4d, "sub-constant": constant, "sub-nan": with_nan}
    files = {}
    for pid, image in bad.items():
        image.to_filename(folder / f"{pid}_T1.nii.gz")
        files[pid] = {**good, "T1": folder / f"{pid}_T1.nii.gz"}
    # a header whose sform maps every voxel onto one plane (nibabel refuses to write one: patch the bytes)
    singular = nib.Nifti1Image(np.random.default_rng(0).random((5, 5, 5)).astype(np.float32), np.eye(4))
    singular.header.set_qform(None, code=0)
    singular.header.set_sform(np.eye(4), code=1)
    raw = bytearray(singular.to_bytes())
    raw[312:324] = np.zeros(3, "<f4").tobytes()  # srow_z's first three entries
    (folder / "sub-singular_T1.nii").write_bytes(bytes(raw))
    files["sub-singular"] = {**good, "T1": folder / "sub-singular_T1.nii"}
    (folder / "sub-garbled_T1.nii.gz").write_bytes(b"not an image")
    files["sub-garbled"] = {**good, "T1": folder / "sub-garbled_T1.nii.gz"}
    return files


def test_bad_inputs_are_named_and_skipped_or_stop_without_losing_work(tmp_path, registered):
    _, files, _, _ = registered
    good = files["sub-00"]
    broken = _broken_files(tmp_path, {name: path for name, path in good.items() if name != "T1"})
    layout = RegisteredLayout(tmp_path / "registered")
    skip = SETTINGS.model_copy(update={"on_error": "skip"})
    result = register_cohort(layout, {"sub-00": good, **broken}, MODALITIES, skip)
    problems = {problem.participant: problem for problem in result.problems}
    assert set(problems) == set(broken) and result.qc["participant_id"].tolist() == ["sub-00"]
    assert "expected a 3D image" in problems["sub-4d"].problem
    assert "degenerate header" in problems["sub-singular"].problem
    assert "empty or constant" in problems["sub-constant"].problem
    assert "NaN or infinite" in problems["sub-nan"].problem
    assert "unreadable image" in problems["sub-garbled"].problem
    assert all("_T1.nii" in problem.file for problem in problems.values())
    assert layout.participant_ids() == ["sub-00"] and not list((layout.root / "participants").glob(".*"))
    # a registration that diverges is a problem too
    noise = nib.Nifti1Image(np.random.default_rng(1).random((40, 40, 40)).astype(np.float32),
                            np.diag([3.0, 3.0, 3.0, 1.0]))
    noise.to_filename(tmp_path / "noise.nii.gz")
    files = {"sub-00": good, "sub-noise": {**good, "T1": tmp_path / "noise.nii.gz"}}
    with pytest.raises(RegistrationError, match=r"sub-noise.*registration diverged: correlation") as failure:
        register_cohort(layout, files, MODALITIES, SETTINGS.model_copy(update={"min_correlation": 0.5}))
    assert isinstance(failure.value.problems[0], InputError)
    assert layout.participant("sub-00").qc.is_file()  # what was registered is kept
    # skipped: kept on disk and in the QC table, but left out of ingest; no registration is redone
    skipped = register_cohort(layout, files, MODALITIES, skip.model_copy(update={"min_correlation": 0.5}))
    assert skipped.registered == 0 and skipped.usable == ["sub-00"]
    noise_qc = skipped.qc.set_index("participant_id").loc["sub-noise"]
    assert noise_qc["diverged"]
    assert [problem.participant for problem in skipped.problems] == ["sub-noise"]
    assert [problem["participant_id"] for problem in json.loads(layout.problems.read_text())] == ["sub-noise"]
    status = RegisterStage().status(Layout(tmp_path))  # what `relcohort status` says of it
    assert status.startswith(f"{layout.root}: 2 participant(s) on the template grid ({SETTINGS.transform}), "
                             "1 diverged and left out")
    assert f"diverged sub-noise: correlation {noise_qc['correlation']:.3f}" in status and "sub-00" not in status
    far = pd.Series({"correlation": 0.6, "nmi": 0.1, "dice": 0.4, "z_correlation": -1.0, "z_nmi": -2.0,
                     "z_dice": -9.5})
    assert _divergence(far, SETTINGS) == "dice 0.400 is 9.5 robust SDs below the cohort's (fail_z 6.0)"


def test_rerun_registers_only_what_changed(tmp_path, registered, template_brain):
    done, files, poses, first = registered
    layout = RegisteredLayout(tmp_path / "registered")
    shutil.copytree(done.root, layout.root)  # the fixture's finished registrations, elsewhere
    copies = {pid: dict(by_modality) for pid, by_modality in files.items()}
    stamp = layout.participant("sub-02").qc.stat().st_mtime_ns
    again = register_cohort(layout, copies, MODALITIES, SETTINGS)
    assert (again.registered, again.unchanged) == (0, 3)
    pd.testing.assert_frame_equal(again.qc, first.qc)
    changed = tmp_path / "changed_T1.nii.gz"
    native_scan(template_brain["T1"], poses["sub-01"] @ np.diag([1.02, 1.0, 1.0, 1.0]), 2.5).to_filename(changed)
    copies["sub-01"]["T1"] = changed
    third = register_cohort(layout, copies, MODALITIES, SETTINGS)
    assert (third.registered, third.unchanged) == (1, 2)
    assert layout.participant("sub-02").qc.stat().st_mtime_ns == stamp
    other = SETTINGS.model_copy(update={"transform": "none", "min_correlation": 0.0})
    assert register_cohort(layout, copies, MODALITIES, other).registered == 3  # other settings: all again


@pytest.mark.slow
def test_native_demo_runs_from_catalog_to_report(tmp_path):
    """The command line on native scans: synth → register → ingest → features → report, then a rerun."""
    from tests.helpers import relcohort

    catalog = tmp_path / "native.yaml"
    catalog.write_text(yaml.safe_dump({
        "workspace": "ws",
        "cohort": {"demo": {"subjects": 10, "voxel_size": 4.0, "seed": 3, "native_voxel_size": 4.0}},
        "register": {"transform": "affine", "voxel_size": 6.0, "on_error": "skip"},
        "modalities": {"T1": "{participant_id}/anat/{participant_id}_T1w.nii.gz",
                       "GM": {"path": "derivatives/synth/{participant_id}/{participant_id}_label-GM_probseg.nii.gz",
                              "kind": "probability", "modulate": True},
                       "APARC": {"path": "derivatives/freesurfer/{participant_id}/mri/aparc+aseg.mgz",
                                 "dtype": "int16", "kind": "label", "labels": "freesurfer"}},
        "features": {"gray_matter": "GM"},
        "report": {},
    }))
    run = relcohort("run", catalog)
    assert run.returncode == 0, run.stdout + run.stderr
    workspace = tmp_path / "ws"
    images = open_cohort(workspace / "images.zarr")
    qc = pd.read_parquet(workspace / "registered" / "qc.parquet")
    usable = qc.loc[~qc["diverged"], "participant_id"].tolist()  # a diverged one is left out, and named
    assert len(qc) == 10 and len(usable) >= 8 and images.subject.values.tolist() == usable
    assert images.attrs["grid"]["space"] == "MNI152NLin2009aSym"
    assert np.allclose(np.abs(np.diag(np.array(images.attrs["grid"]["affine"]))[:3]), 6.0)
    # modulated GM on the 6 mm grid sums to each participant's native GM volume (the store keeps the
    # voxels inside the template's brain mask: most of it)
    cohort, registered = workspace / "demo_cohort", RegisteredLayout(workspace / "registered")
    for pid, stored in zip(images.subject.values, images.GM.sum("voxel").values * 6.0**3, strict=True):
        native = nib.load(cohort / "derivatives/synth" / pid / f"{pid}_label-GM_probseg.nii.gz").get_fdata().sum()
        on_grid = nib.load(registered.participant(pid).image("GM")).get_fdata().sum()
        assert on_grid * 6.0**3 == pytest.approx(native * 4.0**3, rel=0.02)
        assert 0.75 * on_grid * 6.0**3 < stored <= on_grid * 6.0**3 * 1.0001
    # each participant's own parcels (FreeSurfer's .mgz in the scan's space) on the template grid: labels
    # interpolated as labels (never blended), large structures keeping their native volume × the affine's scaling
    for pid, labels in zip(images.subject.values[:3], images.APARC.values[:3], strict=True):
        native = np.asanyarray(nib.load(cohort / f"derivatives/freesurfer/{pid}/mri/aparc+aseg.mgz").dataobj)
        assert set(np.unique(labels)) <= set(np.unique(native))
        scaling = np.median(nib.load(registered.participant(pid).jacobian).get_fdata()[
            nib.load(registered.mask).get_fdata() > 0])  # native volume per template volume
        for structure in ([2], [41], list(range(1001, 2036))):  # cerebral white matter, the whole cortex
            ratio = np.isin(labels, structure).sum() * 6.0**3 * scaling / (np.isin(native, structure).sum() * 4.0**3)
            assert 0.8 < ratio < 1.25, (pid, structure[0], ratio)
    report = (workspace / "report.html").read_text()
    assert "registered to the template" in report and "scan with the template brain&#x27;s outline" in report
    ws = open_workspace(workspace)  # the notebook's way back: a stored row onto the native scan
    pid = str(images.subject.values[0])
    native = ws.to_native(ws.images.T1.isel(subject=0), pid)
    scan = nib.load(cohort / pid / "anat" / f"{pid}_T1w.nii.gz")
    assert native.shape == scan.shape and np.allclose(native.affine, scan.affine)
    inside = scan.get_fdata() > 0
    assert np.corrcoef(native.get_fdata()[inside], scan.get_fdata()[inside])[0, 1] > 0.8
    status = relcohort("status", workspace)
    assert f"10 participant(s) on the template grid (affine), {10 - len(usable)} diverged and left out" in status.stdout
    for pid in qc.loc[qc["diverged"], "participant_id"]:
        assert f"diverged {pid}: correlation" in status.stdout
    rerun = relcohort("run", catalog)
    assert rerun.returncode == 0, rerun.stderr
    stages = json.loads((workspace / "provenance.json").read_text())["runs"][-1]["stages"]
    assert stages["register"]["registered"] == 0 and stages["register"]["unchanged"] == 10


def test_deepbet_extracts_the_brain_as_nilearns_mask_draws_it(tmp_path):
    """skull_strip: deepbet on the MNI152 T1 (with its non-brain signal) against nilearn's brain mask."""
    from engine.data.registration import _skull_strip, template_files

    head = nib.load(template_files(RegistrationSettings())[0])
    reference = load_mni152_brain_mask(resolution=1).get_fdata() > 0
    assert dice(_skull_strip(head), reference) > 0.95
    # through a registration: the head in a pose of its own, stripped, then registered
    native = native_scan(head, random_pose(np.random.default_rng(5)), 2.0, head=reference)
    native.to_filename(tmp_path / "head.nii.gz")
    layout = RegisteredLayout(tmp_path / "registered")
    settings = SETTINGS.model_copy(update={"skull_strip": "deepbet"})
    result = register_cohort(layout, {"sub-01": {"T1": tmp_path / "head.nii.gz"}}, [Modality("T1", "")], settings)
    assert result.qc.loc[0, "dice"] > 0.9 and result.qc.loc[0, "correlation"] > 0.9


def test_catalog_checks_the_register_section_with_its_fields(tmp_path):
    from pipelines.catalog import CatalogError, load_catalog

    def errors(**sections):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"workspace": "ws", "cohort": {"demo": {"subjects": 4}},
                                        "modalities": {"T1": "{participant_id}_T1.nii.gz"}, **sections}))
        with pytest.raises(CatalogError) as failure:
            load_catalog(path)
        return str(failure.value)

    assert "register.reference: 'T2' is not one of the modalities" in errors(register={"reference": "T2"})
    assert "register.transform" in errors(register={"transform": "bspline"})
    assert "modulate applies to kind 'probability'" in errors(
        register={}, modalities={"T1": "{participant_id}_T1.nii.gz",
                                 "GM": {"path": "{participant_id}_GM.nii.gz", "modulate": True}})
    assert "modulate needs a register section" in errors(modalities={
        "T1": "{participant_id}_T1.nii.gz",
        "GM": {"path": "{participant_id}_GM.nii.gz", "kind": "probability", "modulate": True}})
    assert "native_voxel_size writes native scans: add a register section" in errors(
        cohort={"demo": {"subjects": 4, "native_voxel_size": 2.0}})
    assert "register.brain_mask needs kind 'mask'" in errors(
        register={"brain_mask": "BM"}, modalities={"T1": "{participant_id}_T1.nii.gz", "BM": "{participant_id}_m.nii"})
    assert "register.compare: ['T1_none'] would be the reference registered another way" in errors(
        register={"compare": ["none"]}, modalities={"T1": "{participant_id}_T1.nii.gz",
                                                    "T1_none": "{participant_id}_T1_raw.nii.gz"})
    assert "train.modalities[0]: 'T1_rigid' is not one of the modalities" in errors(
        register={"compare": ["none"]}, train={"modalities": ["T1_rigid"]})
    catalog, _ = load_catalog(Path(__file__).parents[1] / "docs" / "catalog-native.yaml")
    assert catalog.registration.transform == "syn" and catalog.modalities["FLAIR"].space == "own"


def test_registration_is_reproducible_in_a_fresh_process(tmp_path, registered):
    """One ITK thread and a fixed seed: the same files give the same transform, bit for bit."""
    _, files, _, _ = registered
    script = f"""
import json, sys
from pathlib import Path
import nibabel as nib, numpy as np
from engine.data.registration import RegistrationSettings, register_cohort
from engine.data.inputs import Modality
from engine.layout import RegisteredLayout
files = {{"sub-00": {{"T1": Path({str(files["sub-00"]["T1"])!r})}}}}
maps = []
for run in (0, 1):
    layout = RegisteredLayout(Path({str(tmp_path)!r}) / f"run{{run}}")
    register_cohort(layout, files, [Modality("T1", "")], RegistrationSettings(transform="syn", voxel_size=6.0))
    maps.append(nib.load(layout.participant("sub-00").jacobian).get_fdata())
print(json.dumps(bool(np.array_equal(maps[0], maps[1]))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is True


def test_native_parcels_sum_each_map_taken_back_to_its_own_scan(registered):
    """NativeLabels: each participant's template-grid map goes back onto their native label volume (.mgz, another
    grid than the scan's reference) and is summed per label there; against one full-volume mask per label
    (the study's way) on the same mapped map, and the map's total kept: Σ R × native volume per template volume."""
    import xarray as xr

    from engine.analysis.atlas import NativeLabels, region_reduce
    from engine.data.grid import Grid
    from engine.data.masker import Masker

    layout, files, poses, _ = registered
    mask = nib.load(layout.mask)
    grid = Grid(mask.shape, mask.affine, "MNI152NLin2009cAsym")
    indices = np.nonzero(mask.get_fdata() > 0)
    values = np.random.default_rng(2).normal(1.0, 0.5, (len(files), indices[0].size))
    data = xr.DataArray(values, dims=("subject", "voxel"), name="R", attrs={"grid": grid.to_attrs()},
                        coords={"subject": list(files), **{axis: ("voxel", index)
                                                           for axis, index in zip("ijk", indices, strict=True)}})
    regions = pd.DataFrame({"name": ["gray matter", "other brain"]}, index=pd.Index([1, 2], name="label"))
    parcels = NativeLabels("tissue", {pid: paths["tissue"] for pid, paths in files.items()}, regions, layout)
    result = region_reduce(data, parcels)
    masker = Masker(grid, indices)
    for row, pid in enumerate(files):
        labels_image = nib.load(files[pid]["tissue"])
        labels = np.asanyarray(labels_image.dataobj)
        native_voxel = abs(np.linalg.det(labels_image.affine[:3, :3]))
        mapped = to_native(masker.to_nifti(values[row] / 4.0**3), layout, pid, grid=labels_image).get_fdata()
        for label, name in ((1, "gray matter"), (2, "other brain")):
            cell = result.sel(subject=pid, region=name)
            inside = labels == label
            assert int(cell["count"]) == inside.sum()
            assert float(cell["sum"]) == pytest.approx(mapped[inside].sum() * native_voxel, rel=1e-9)
            assert float(cell["mean"]) == pytest.approx(float(cell["sum"]) / inside.sum(), rel=1e-12)
        total = mapped.sum() * native_voxel
        assert total == pytest.approx(values[row].sum() * abs(np.linalg.det(poses[pid][:3, :3])), rel=0.03)
    with pytest.raises(ValueError, match=r"no native label volume for participant\(s\) \['sub-02'\]"):
        region_reduce(data, NativeLabels("tissue", {pid: files[pid]["tissue"] for pid in ("sub-00", "sub-01")},
                                         regions, layout))


def test_the_report_shows_each_registration_qc_and_the_worst_scan_over_the_template(registered):
    from engine.outputs.report import build_report

    layout = registered[0]
    html = build_report(layout.root.parent).read_text()  # a workspace holding only registered/
    qc = pd.read_parquet(layout.qc)
    worst = qc.nsmallest(1, "correlation").iloc[0]
    assert f"<b>{len(qc)}</b> participant(s) registered to the template (affine)" in html
    assert "Lowest correlation with the template (none flagged)" in html
    assert f"{worst['participant_id']}: registered T1 scan with the template brain" in html
    assert html.count("data:image/png;base64,") == 2  # the QC measures and the worst scan's overlay
