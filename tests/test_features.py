"""Structural features: FreeSurfer stats files in their published format, voxel-map features."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

from engine.analysis import features
from engine.analysis.atlas import cohort_atlas
from engine.analysis.features import (
    aparc_table,
    aseg_table,
    freesurfer_measure,
    freesurfer_table,
    join_on_participant,
    lesion_load,
    lesion_mask,
    read_stats,
    regional_volume,
    tract_mean,
)
from engine.data.inputs import read_participants
from engine.data.labels import label_table
from engine.data.store import open_cohort
from engine.tasks import Execution
from tests.helpers import HAND_GRID as GRID
from tests.helpers import HAND_SHAPE as SHAPE

# FreeSurfer 7.x output as written by mri_segstats / mris_anatomical_stats (abridged rows).
ASEG = """\
# Title Segmentation Statistics 
# 
# generating_program mri_segstats
# cvs_version 7.1.1
# cmdline mri_segstats --seed 1234 --seg mri/aseg.mgz --sum stats/aseg.stats --pv mri/norm.mgz --empty 
# sysname  Linux
# hostname node17
# machine  x86_64
# user     lab
# anatomy_type volume
# 
# SUBJECTS_DIR /data/derivatives/freesurfer
# subjectname sub-01
# Measure BrainSeg, BrainSegVol, Brain Segmentation Volume, 1162365.000000, mm^3
# Measure BrainSegNotVent, BrainSegVolNotVent, Brain Segmentation Volume Without Ventricles, 1137802.000000, mm^3
# Measure lhCortex, lhCortexVol, Left hemisphere cortical gray matter volume, 240365.586231, mm^3
# Measure EstimatedTotalIntraCranialVol, eTIV, Estimated Total Intracranial Volume, 1482637.110000, mm^3
# SegVolFile mri/aseg.mgz 
# ColorTable $FREESURFER_HOME/ASegStatsLUT.txt 
# NRows 3 
# NTableCols 10 
# TableCol  1 ColHeader Index 
# TableCol  1 FieldName Index 
# TableCol  1 Units     NA 
# ColHeaders  Index SegId NVoxels Volume_mm3 StructName normMean normStdDev normMin normMax normRange  
  1   4     9281     9281.0  Left-Lateral-Ventricle            33.6402    12.5271    12.0000    87.0000    75.0000 
  2  17     4095     4095.3  Left-Hippocampus                  77.9861     9.2031    32.0000   107.0000    75.0000 
  3  53     4201     4201.1  Right-Hippocampus                 78.1262     9.0532    38.0000   106.0000    68.0000 
"""

LH_APARC = """\
# Table of FreeSurfer cortical parcellation anatomical statistics 
# 
# CreationTime 2021/03/10-12:22:07-GMT
# generating_program mris_anatomical_stats
# cvs_version 7.1.1
# cmdline mris_anatomical_stats -th3 -mgz -cortex ../label/lh.cortex.label -f ../stats/lh.aparc.stats -b -a ../label/lh.aparc.annot -c ../label/aparc.annot.ctab sub-01 lh white 
# sysname  Linux
# 
# SUBJECTS_DIR /data/derivatives/freesurfer
# anatomy_type surface
# subjectname sub-01
# hemi lh
# AnnotationFile ../label/lh.aparc.annot
# Measure Cortex, NumVert, Number of Vertices, 150123, unitless
# Measure Cortex, WhiteSurfArea, White Surface Total Area, 89456.4, mm^2
# Measure Cortex, MeanThickness, Mean Thickness, 2.45012, mm
# NTableCols 10
# TableCol  1 ColHeader StructName
# TableCol  1 FieldName Structure Name
# TableCol  1 Units     NA
# ColHeaders StructName NumVert SurfArea GrayVol ThickAvg ThickStd MeanCurv GausCurv FoldInd CurvInd
bankssts                                 1493    1004   2554  2.729 0.441     0.108     0.023       13     1.4
caudalanteriorcingulate                  1012     668   2108  2.615 0.693     0.130     0.022       15     0.9
entorhinal                                518     376   2025  3.256 0.786     0.119     0.028        5     0.5
"""


def test_aseg_stats_in_the_published_format(tmp_path):
    path = tmp_path / "aseg.stats"
    path.write_text(ASEG)
    measures, table, header = read_stats(path)
    assert measures["eTIV"] == (1482637.11, "mm^3") and header["subjectname"] == "sub-01"
    assert list(table.columns[:5]) == ["Index", "SegId", "NVoxels", "Volume_mm3", "StructName"]
    tidy = aseg_table("sub-01", path).set_index(["structure", "measure"])
    assert tidy.loc[("Left-Hippocampus", "volume"), "value"] == 4095.3
    assert tidy.loc[("Left-Hippocampus", "volume"), "hemisphere"] == "lh"
    assert tidy.loc[("eTIV", "global"), "value"] == 1482637.11


def test_aparc_stats_in_the_published_format(tmp_path):
    path = tmp_path / "lh.aparc.stats"
    path.write_text(LH_APARC)
    tidy = aparc_table("sub-01", path)
    entorhinal = tidy[tidy.structure == "entorhinal"].set_index("measure")
    assert entorhinal.loc["thickness_mean", "value"] == 3.256
    assert entorhinal.loc["gray_matter_volume", "value"] == 2025
    assert entorhinal.loc["surface_area", "unit"] == "mm^2" and entorhinal.loc["vertices", "value"] == 518
    assert set(tidy.hemisphere) == {"lh"}
    assert tidy[(tidy.structure == "MeanThickness")].value.item() == 2.45012


def test_freesurfer_table_over_a_subjects_dir(tmp_path, client, monkeypatch):
    for pid in ("sub-01", "sub-02", "sub-03"):
        stats_dir = tmp_path / pid / "stats"
        stats_dir.mkdir(parents=True)
        (stats_dir / "aseg.stats").write_text(ASEG)
        for parcellation in ("aparc", "aparc.DKTatlas"):
            (stats_dir / f"lh.{parcellation}.stats").write_text(LH_APARC)
            (stats_dir / f"rh.{parcellation}.stats").write_text(LH_APARC.replace("# hemi lh", "# hemi rh"))
    table = freesurfer_table(tmp_path, ["sub-01", "sub-02"], parcellations=("aparc", "aparc.DKTatlas"))
    assert set(table.participant_id) == {"sub-01", "sub-02"}
    thickness = table[(table.measure == "thickness_mean") & (table.structure == "aparc.DKTatlas:entorhinal")]
    assert sorted(thickness.hemisphere) == ["lh", "lh", "rh", "rh"]
    monkeypatch.setattr(features, "STATS_PARTICIPANTS_PER_TASK", 2)  # two tasks on the workers, the same table
    ids = ["sub-03", "sub-01", "sub-02"]
    pd.testing.assert_frame_equal(freesurfer_table(tmp_path, ids, execution=Execution(client)), freesurfer_table(tmp_path, ids))
    (tmp_path / "sub-02/stats/rh.aparc.stats").unlink()
    for on in (None, client):
        with pytest.raises(FileNotFoundError, match=r"participant sub-02: FreeSurfer stats file .*rh.aparc.stats"):
            freesurfer_table(tmp_path, ["sub-01", "sub-02"], execution=Execution(on))


def test_freesurfer_measures_are_named_as_freesurfer_labels_name_the_parcels(tmp_path):
    """aseg rows keep their names (FreeSurfer 6's Thalamus-Proper read as 7's Thalamus), aparc rows become the
    ctx-lh-/ctx-rh- labels of aparc+aseg (Destrieux's the ctx_lh_ labels of aparc.a2009s+aseg), header measures
    stay per participant; all are FreeSurfer label names. A structure FreeSurfer found no voxel (or vertex) of is
    missing, not 0."""
    destrieux = {"bankssts ": "G_front_sup", "caudalanteriorcingulate": "S_central", "entorhinal": "Pole_temporal"}
    absent = ASEG.replace("9281     9281.0", "   0        0.0")  # as aseg.stats lists a structure it did not find
    for pid, aseg in (("sub-01", ASEG), ("sub-02", absent.replace("Right-Hippocampus   ", "Left-Thalamus-Proper"))):
        stats_dir = tmp_path / pid / "stats"
        stats_dir.mkdir(parents=True)
        (stats_dir / "aseg.stats").write_text(aseg)
        for parcellation in ("aparc", "aparc.DKTatlas", "aparc.a2009s"):
            text = LH_APARC
            if parcellation == "aparc.a2009s":
                for name, renamed in destrieux.items():
                    text = text.replace(name, renamed.ljust(len(name)))
            (stats_dir / f"rh.{parcellation}.stats").write_text(
                text.replace("# hemi lh", "# hemi rh").replace("3.256", "3.111"))
            if pid == "sub-02" and parcellation == "aparc":  # no vertex in this participant's left entorhinal
                text = text.replace("entorhinal                                518", "entorhinal                                  0")
            (stats_dir / f"lh.{parcellation}.stats").write_text(text)
    table = freesurfer_table(tmp_path, ["sub-01", "sub-02"], parcellations=("aparc", "aparc.DKTatlas", "aparc.a2009s"))
    volume = freesurfer_measure(table, "volume").set_index(["participant_id", "region"])["value"]
    assert volume["sub-01", "Right-Hippocampus"] == 4201.1 and volume["sub-02", "Left-Thalamus"] == 4201.1
    thickness = freesurfer_measure(table, "aparc.DKTatlas.thickness_mean").set_index(["participant_id", "region"])
    assert thickness.loc[("sub-02", "ctx-lh-entorhinal"), "value"] == 3.256
    assert thickness.loc[("sub-02", "ctx-rh-entorhinal"), "value"] == 3.111
    assert len(thickness) == 2 * 2 * 3  # participants × hemispheres × regions, aparc's rows not mixed in
    assert np.isnan(volume["sub-02", "Left-Lateral-Ventricle"]) and volume["sub-01", "Left-Lateral-Ventricle"] == 9281
    aparc = freesurfer_measure(table, "aparc.thickness_mean").set_index(["participant_id", "region"])["value"]
    assert np.isnan(aparc["sub-02", "ctx-lh-entorhinal"]) and aparc["sub-02", "ctx-rh-entorhinal"] == 3.111
    a2009s = freesurfer_measure(table, "aparc.a2009s.thickness_mean").set_index(["participant_id", "region"])["value"]
    assert a2009s["sub-01", "ctx_lh_Pole_temporal"] == 3.256 and a2009s["sub-01", "ctx_rh_G_front_sup"] == 2.729
    names = set(label_table("freesurfer")["name"])
    for measure in (volume, thickness, a2009s):
        assert set(measure.index.get_level_values("region")) <= names
    etiv = freesurfer_measure(table, "eTIV")
    assert list(etiv.columns) == ["participant_id", "value"] and (etiv["value"] == 1482637.11).all()
    with pytest.raises(ValueError, match=r"no measure 'aparc.thickness'.*aparc.thickness_mean"):
        freesurfer_measure(table, "aparc.thickness")


def test_malformed_stats_files_are_named(tmp_path):
    path = tmp_path / "aseg.stats"
    path.write_text(ASEG.replace("  3  53     4201     4201.1", "  3  53     4201"))
    with pytest.raises(ValueError, match=r"aseg.stats, line \d+: 9 fields, the ColHeaders line has 10"):
        read_stats(path)
    path.write_text("just text\n")
    with pytest.raises(ValueError, match="table row before the '# ColHeaders' line"):
        read_stats(path)


def _hand_data(values, grid=GRID):
    indices = np.nonzero(np.ones(SHAPE, bool))
    coords = {"subject": [f"s{n}" for n in range(values.shape[0])], "i": ("voxel", indices[0]),
              "j": ("voxel", indices[1]), "k": ("voxel", indices[2])}
    attrs = {"grid_shape": list(grid.shape), "grid_affine": grid.affine.tolist(), "space": grid.space}
    return xr.DataArray(values, dims=("subject", "voxel"), coords=coords, attrs=attrs, name="map")


def test_voxel_map_features_equal_numpy(hand_atlas):
    labels, _, folder = hand_atlas
    rng = np.random.default_rng(4)
    gm = _hand_data(rng.random((5, labels.size)))
    atlas = cohort_atlas(gm, str(folder / "labels.nii.gz"), folder / "labels.tsv")
    flat_labels = labels.ravel()
    volume = regional_volume(gm, atlas).compute()
    for label, name in zip(atlas.regions.index, atlas.region_names, strict=True):
        expected = gm.values[:, flat_labels == label].sum(1) * 27.0  # 3 mm voxels
        np.testing.assert_allclose(volume.sel(region=name), expected, rtol=1e-12)
    fa = gm * 0.6
    means = tract_mean(fa, atlas, threshold=0.2).compute()
    inside = fa.values[:, flat_labels == 3]
    expected = np.array([row[row > 0.2].mean() for row in inside])
    np.testing.assert_allclose(means.sel(region="Left_Hippocampus"), expected, rtol=1e-12)
    lesions = _hand_data((rng.random((5, labels.size)) > 0.9).astype(np.uint8))
    load = lesion_load(lesions)
    np.testing.assert_array_equal(load.lesion_voxels, (lesions.values > 0).sum(1))
    np.testing.assert_allclose(load.lesion_volume_mm3, (lesions.values > 0).sum(1) * 27.0)
    probability = _hand_data(rng.random((5, labels.size)))  # a lesion-probability map, thresholded as the study
    load = lesion_load(lesion_mask(probability, threshold=0.8)).compute()
    np.testing.assert_array_equal(load.lesion_voxels, (probability.values >= 0.8).sum(1))
    assert load.lesion_voxels.min() > 0 and load.lesion_voxels.max() < labels.size / 3


def test_planted_effects_show_in_regional_features(effects_store):
    ds = open_cohort(effects_store)
    gmv = regional_volume(ds.GM, cohort_atlas(ds, "neuromorphometrics", merge_hemispheres=True)).compute()
    assert stats.pearsonr(ds.age, gmv.sel(region="Hippocampus")).statistic < -0.4
    fa = tract_mean(ds.FA, cohort_atlas(ds, "juelich"), threshold=0.2).compute()
    tracts = [name for name in fa.region.values if name.startswith("WM_") and fa.sel(region=name).notnull().all()]
    assert len(tracts) >= 5
    assert stats.pearsonr(ds.age, fa.sel(region=tracts).mean("region")).statistic < -0.4
    assert stats.spearmanr(ds.age, lesion_load(ds.WMH).lesion_voxels).statistic > 0.4


def test_joining_feature_tables_names_unknown_ids(tiny_cohort):
    participants = read_participants(tiny_cohort / "participants.tsv")
    features = pd.DataFrame({"participant_id": ["sub-0001", "sub-0002"], "pvs_count": [12, 30]})
    joined = join_on_participant(features, participants)
    assert len(joined) == 24 and joined.pvs_count.notna().sum() == 2
    with pytest.raises(ValueError, match=r"pvs.tsv: participant IDs \['sub-9999'\] match no participant"):
        join_on_participant(pd.DataFrame({"participant_id": ["sub-9999"], "pvs_count": [1]}), participants,
                            source="pvs.tsv")
    with pytest.raises(ValueError, match="appear more than once"):
        join_on_participant(pd.concat([features, features]), participants)


def test_lesion_relevance_indices_equal_a_hand_computation():
    rng = np.random.default_rng(4)
    subjects = ["sub-a", "sub-b", "sub-c"]
    lesions = rng.random((3, 50)) < 0.1
    lesions[2] = False  # a participant without lesions
    relevance = rng.normal(0, 1, (3, 50))
    relevance[lesions] += 2.0  # relevance concentrated in lesions
    lesion_data = xr.DataArray(lesions.astype(np.uint8), dims=("subject", "voxel"), coords={"subject": subjects})
    maps = xr.DataArray(relevance, dims=("subject", "voxel"), coords={"subject": subjects})
    result = features.lesion_relevance(lesion_data, maps.isel(subject=[1, 0, 2])).compute()
    for position, subject in enumerate(["sub-b", "sub-a", "sub-c"]):
        row, inside = relevance[subjects.index(subject)], lesions[subjects.index(subject)]
        positive = np.clip(row, 0, None)
        assert result.lesion_voxels[position] == inside.sum()
        assert result.lesion_relevance[position] == pytest.approx(row[inside].sum())
        if inside.any():
            share = positive[inside].sum() / positive.sum()
            assert result.lesion_positive_share[position] == pytest.approx(share)
            assert result.uniform_share[position] == pytest.approx(inside.mean())
            assert result.share_ratio[position] == pytest.approx(share / inside.mean())
            assert result.share_ratio[position] > 1
        else:
            assert np.isnan(result.lesion_positive_share[position]) and np.isnan(result.share_ratio[position])
    no_positive = maps.copy(data=-np.abs(relevance)).chunk()  # e.g. a Grad-CAM map that is zero everywhere
    with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
        warnings.simplefilter("error", RuntimeWarning)  # no 0/0 inside the Dask tasks (as on the workers)
        quiet = features.lesion_relevance(lesion_data, no_positive).compute()
    assert quiet.lesion_positive_share.isnull().all() and (quiet.lesion_voxels == lesions.sum(axis=1)).all()
    with pytest.raises(ValueError, match="no lesion mask"):
        features.lesion_relevance(lesion_data.isel(subject=[0]), maps)
    with pytest.raises(ValueError, match="not the same cohort mask"):
        features.lesion_relevance(lesion_data.isel(voxel=slice(0, 40)), maps)
