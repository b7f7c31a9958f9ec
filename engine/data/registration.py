"""Native scans onto the cohort's template grid with ANTs (ANTsPy), the transforms kept both ways, and QC.

One participant is one task (:func:`register_participant`). Its reference scan (e.g. T1) is
brought onto the template: ``none`` only resamples it into the template box through the scanner
affine (the unregistered arm of a registration study), ``rigid`` / ``affine`` / ``syn`` register
it with ANTs. Every other modality follows the reference's transforms with the interpolation of
its kind, after a rigid co-registration to the reference scan when it lives in its own space
(FLAIR, FA), or is taken as is when it is already on the template grid. Probability maps can be
modulated by the Jacobian determinant so that their sums are volumes of the participant's brain.

Everything lands in ``registered/participants/<id>/`` (:class:`engine.layout.ParticipantRegistration`),
written into a ``.part`` folder and renamed, so a killed run never leaves a transform that looks
complete. :func:`to_native` and :func:`to_template` map any image between the participant's native
reference scan and the template grid.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd
from isal import igzip
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.data.grid import MNI_SPACE, Grid, mni_grid
from engine.data.inputs import InputError, Modality, load_image, scan_ids, spatial_shape
from engine.layout import (
    ParticipantRegistration,
    RegisteredLayout,
    atomic_output,
    file_sha256,
    forget,
    is_current,
    mark_current,
    output_key,
)
from engine.tasks import INLINE, Execution

#: ANTs' names of the registrations.
TRANSFORMS = {"rigid": "Rigid", "affine": "Affine", "syn": "SyN"}
#: How each kind of image is resampled.
INTERPOLATORS = {"intensity": "linear", "probability": "linear", "label": "genericLabel",
                 "mask": "nearestNeighbor"}
#: ``template: mni152``: nilearn's bundled MNI152 2009 T1 template and brain mask (1 mm), read offline.
BUNDLED_TEMPLATE = "mni152"
QC_MEASURES = ("correlation", "nmi", "dice")
#: Rigid co-registration to the reference scan runs on both scans resampled to this voxel size (mm): a rigid
#: map needs no finer grid (the FLAIR–T1 correlation after it equals that at 1.5 mm, at a fraction of the time).
COREGISTRATION_MM = 4.0
#: Fewer registered participants than this: no robust z, nothing flagged.
MIN_QC_COHORT = 8
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class RegistrationSettings(BaseModel):
    """How native scans reach the template grid; the catalog's ``register:`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(BUNDLED_TEMPLATE, description="'mni152' (nilearn's MNI152 2009 T1, offline) or a "
                          "NIfTI template path (brain-extracted)")
    template_mask: Path | None = Field(None, description="brain mask of a template file (default: template > 0)")
    space: str | None = Field(None, description="name of a template file's space (mni152: MNI152NLin2009aSym)")
    reference: str = Field("T1", description="the modality the transforms are estimated from")
    transform: Literal["none", "rigid", "affine", "syn"] = Field(
        "syn", description="none: resampled into the template box by the scanner affine only")
    compare: list[Literal["none", "rigid", "affine", "syn"]] = Field(
        [], description="the reference scan also brought onto the grid by these transforms, each as a modality of "
        "its own, <reference>_<transform> (e.g. T1_affine): the registration study's conditions")
    voxel_size: float = Field(2.0, gt=0, le=12, description="isotropic voxel size of the output grid in mm")
    skull_strip: Literal["none", "deepbet"] = Field(
        "none", description="deepbet: extract the brain from the reference scan first; none: scans are "
        "brain-extracted already (or brain_mask names a mask modality)")
    brain_mask: str | None = Field(None, description="a mask modality in the reference's space: each "
                                   "participant's brain mask (applied before registration; QC Dice)")
    on_error: Literal["fail", "skip"] = Field("fail", description="stop on a bad scan or failed registration, or "
                                              "skip that participant and record why")
    flag_z: float = Field(3.5, gt=0, description="QC: robust z below -flag_z on any measure flags a participant")
    fail_z: float = Field(6.0, gt=0, description="QC: robust z below -fail_z on any measure: the registration "
                          "diverged (far below the cohort); the participant is left out")
    min_correlation: float = Field(0.25, ge=-1, lt=1, description="QC: a correlation with the template below this: "
                                   "the registration diverged; the participant is left out")
    seed: int = Field(1, ge=1, description="ANTs' random seed (sampling of the metric; nonzero: ANTs takes 0 as "
                      "the clock); one ITK thread per task")

    @field_validator("compare")
    @classmethod
    def _other_transforms(cls, compare: list[str], info) -> list[str]:
        if len(set(compare)) != len(compare) or info.data.get("transform") in compare:
            raise ValueError(f"compare: transforms other than the transform ({info.data.get('transform')}), each "
                             f"once; got {compare}")
        return compare

    def compared_modalities(self) -> dict[str, str]:
        """The modalities :attr:`compare` adds: name → transform."""
        return {f"{self.reference}_{transform}": transform for transform in self.compare}

    @property
    def space_name(self) -> str:
        return self.space or (MNI_SPACE if self.template == BUNDLED_TEMPLATE else "template")


# ---------------------------------------------------------------------------------------
# Template and output grid


def template_files(settings: RegistrationSettings) -> tuple[Path, Path | None]:
    """The template image and its brain mask (``None``: template > 0)."""
    if settings.template != BUNDLED_TEMPLATE:
        return Path(settings.template), settings.template_mask
    from nilearn import datasets

    return Path(datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", None


def output_grid(settings: RegistrationSettings) -> Grid:
    """The grid registered images land on: the template's bounding box at ``voxel_size``."""
    if settings.template == BUNDLED_TEMPLATE:
        return mni_grid(settings.voxel_size)
    image = nib.load(template_files(settings)[0])
    extent = np.array(image.shape[:3]) * np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    shape = tuple(math.ceil(e / settings.voxel_size - 1e-9) for e in extent)
    directions = image.affine[:3, :3] / np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    affine = np.eye(4)
    affine[:3, :3] = directions * settings.voxel_size
    affine[:3, 3] = image.affine[:3, 3]
    return Grid(shape, affine, settings.space_name)


def write_template(settings: RegistrationSettings, out: RegisteredLayout) -> dict:
    """The brain-extracted template and the cohort mask on the output grid, into ``registered/``
    (unless current); returns their key, which every participant's registration depends on."""
    from nilearn.image import resample_img

    grid = output_grid(settings)
    image_file, mask_file = template_files(settings)
    key = output_key(settings.model_dump(mode="json", include={"template", "template_mask", "space", "voxel_size"}),
                     {"template": file_sha256(image_file),
                      "template_mask": file_sha256(mask_file) if mask_file is not None else None})
    if is_current(out.template, key) and out.mask.is_file():
        return key
    template = nib.load(image_file)
    if mask_file is None and settings.template == BUNDLED_TEMPLATE:
        from nilearn.datasets import load_mni152_brain_mask

        mask = load_mni152_brain_mask(resolution=1)
    else:
        mask = nib.load(mask_file) if mask_file is not None else nib.Nifti1Image(
            (np.asanyarray(template.dataobj) > 0).astype(np.uint8), template.affine)
    options = {"target_affine": grid.affine, "target_shape": grid.shape, "force_resample": True,
               "copy_header": True}
    brain = nib.Nifti1Image(template.get_fdata() * (np.asanyarray(mask.dataobj) > 0), template.affine)
    on_grid = resample_img(brain, interpolation="continuous", **options)
    mask_on_grid = resample_img(nib.Nifti1Image((np.asanyarray(mask.dataobj) > 0).astype(np.uint8), mask.affine),
                                interpolation="nearest", **options)
    forget(out.template)
    save_nifti(nib.Nifti1Image((mask_on_grid.get_fdata() > 0.5).astype(np.uint8), grid.affine), out.mask)
    save_nifti(nib.Nifti1Image(on_grid.get_fdata().astype(np.float32), grid.affine), out.template)
    mark_current(out.template, key)
    return key


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """Write a ``.nii.gz`` whole or not at all (:func:`engine.layout.atomic_output`)."""
    image.header.set_xyzt_units("mm", "sec")
    with atomic_output(path) as partial:
        partial.write_bytes(igzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


# ---------------------------------------------------------------------------------------
# NIfTI ⇄ ANTs images (NIfTI is RAS, ITK is LPS)


def to_ants(image: nib.spatialimages.SpatialImage):
    """An ANTs image with the voxels and world geometry of a 3D nibabel image (NIfTI or MGH)."""
    import ants

    affine = RAS_TO_LPS @ image.affine
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return ants.from_numpy(np.asarray(image.get_fdata(dtype=np.float32)).reshape(image.shape[:3]),
                           origin=tuple(affine[:3, 3]), spacing=tuple(spacing), direction=affine[:3, :3] / spacing)


def to_nifti(image, dtype=np.float32) -> nib.Nifti1Image:
    """A NIfTI image of an ANTs image."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.direction) * np.asarray(image.spacing)
    affine[:3, 3] = image.origin
    out = nib.Nifti1Image(image.numpy().astype(dtype), RAS_TO_LPS @ affine)
    out.header.set_xyzt_units("mm", "sec")
    return out


# ---------------------------------------------------------------------------------------
# Checks of a participant's scan


def check_scan(image, participant: str, path: Path, modality: str, kind: str = "intensity") -> None:
    """A clear :class:`InputError` for an image no registration can use. An empty or constant image is
    refused for intensity scans only: a lesion mask without lesions is all zeros."""
    shape = spatial_shape(image.shape)
    if len(shape) != 3:
        raise InputError(f"{modality}: expected a 3D image, got shape {image.shape}", participant, path)
    linear = np.asarray(image.affine, float)[:3, :3]
    if not np.isfinite(image.affine).all() or abs(np.linalg.det(linear)) < 1e-6:
        raise InputError(f"{modality}: degenerate header: the voxel-to-world affine is singular or not finite\n"
                         f"{np.round(image.affine, 4)}", participant, path)
    data = np.asanyarray(image.dataobj)
    if not np.isfinite(data).all():
        raise InputError(f"{modality}: the image has NaN or infinite voxels", participant, path)
    if data.size == 0 or (kind == "intensity" and data.min() == data.max()):
        value = data.flat[0] if data.size else "-"
        raise InputError(f"{modality}: the image is empty or constant (every voxel {value})", participant, path)


def _read_scan(path: Path, participant: str, modality: str, kind: str = "intensity"):
    try:
        image, _ = load_image(path)
    except FileNotFoundError:
        raise InputError(f"no {modality} file", participant, path) from None
    except Exception as error:  # nibabel raises many types for a broken file
        raise InputError(f"{modality}: unreadable image ({type(error).__name__}: {error})", participant, path) from None
    check_scan(image, participant, path, modality, kind)
    if len(image.shape) == 4:
        image = image.slicer[..., 0]
    return image


# ---------------------------------------------------------------------------------------
# QC measures


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """2·I(A;B) / (H(A) + H(B)) of the intensities binned into ``bins`` equal-width bins (0 to 1)."""
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    joint = joint / joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    h_a, h_b, h_ab = entropy(pa), entropy(pb), entropy(joint.ravel())
    return 2 * (h_a + h_b - h_ab) / (h_a + h_b) if h_a + h_b > 0 else 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else math.nan


def robust_z(values: pd.Series) -> pd.Series:
    """(x − median) / (1.4826 · MAD) over the cohort; 0 where the MAD is 0."""
    median = values.median()
    mad = 1.4826 * (values - median).abs().median()
    return (values - median) / mad if mad > 0 else values * 0.0


# ---------------------------------------------------------------------------------------
# One participant


@dataclass(frozen=True)
class RegistrationJob:
    """What one task needs: the participant, its files by modality and the settings."""

    participant: str
    files: dict[str, str]
    modalities: tuple[Modality, ...]
    settings: RegistrationSettings
    registered: str  # the registered/ folder
    key: dict


@contextlib.contextmanager
def _ants_environment(seed: int) -> Iterator[None]:
    """ANTs' random seed for the calls inside, and one ITK thread: like Dask's OMP_NUM_THREADS=1, one
    thread per task. ITK reads its thread count once per process, at its first use, so a process
    whose first ANTs call comes through here (a worker's registration task) registers reproducibly."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    import ants

    previous = ants.config._random_seed
    ants.config._random_seed = seed
    try:
        yield
    finally:
        ants.config._random_seed = previous


@lru_cache(maxsize=1)
def _brain_extractor():
    from deepbet import BrainExtraction

    with warnings.catch_warnings():  # deepbet ships TorchScript weights; nothing for a user to change
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
        return BrainExtraction(no_gpu=True)


def _skull_strip(image: nib.Nifti1Image) -> np.ndarray:
    """deepbet's brain mask of a T1 scan (its bundled weights, on CPU)."""
    nifti = nib.Nifti1Image(image.get_fdata(dtype=np.float32), image.affine)
    _, mask, _ = _brain_extractor().run(nifti)
    return np.asanyarray(mask.dataobj).astype(bool)


def register_participant(job: RegistrationJob) -> dict:
    """Register one participant and write ``registered/participants/<id>/``; returns its QC row.

    Raises :class:`InputError` naming the participant, file and problem for a bad scan or a
    failed registration; whether it diverged is decided over the cohort (:func:`register_cohort`).
    """
    with _ants_environment(job.settings.seed):
        return _register(job)


def _register(job: RegistrationJob) -> dict:
    import ants

    started = time.perf_counter()
    settings, pid = job.settings, job.participant
    registered = RegisteredLayout(Path(job.registered))
    by_name = {modality.name: modality for modality in job.modalities}
    reference_file = Path(job.files[settings.reference])
    native = _read_scan(reference_file, pid, settings.reference)
    brain = _brain_mask(native, job)
    native_brain = nib.Nifti1Image(np.where(brain, native.get_fdata(dtype=np.float32), 0), native.affine)

    template = ants.image_read(str(registered.template))
    mask_image = nib.load(registered.mask)
    template_mask = np.asanyarray(mask_image.dataobj) > 0
    grid = Grid(template.shape, mask_image.affine)
    with tempfile.TemporaryDirectory() as scratch, atomic_output(registered.participant(pid).root) as partial:
        partial.mkdir()
        out = ParticipantRegistration(partial)
        moving = to_ants(native_brain)
        forward: list[str] = []  # template → native points, ANTs order (last applied first)
        if settings.transform != "none":
            result = _ants_registration(template, moving, settings.transform, f"{scratch}/", pid, reference_file,
                                        settings.reference)
            affine = next(path for path in result["fwdtransforms"] if path.endswith(".mat"))
            shutil.copy(affine, out.affine)
            if settings.transform == "syn":
                shutil.copy(next(p for p in result["fwdtransforms"] if p.endswith("Warp.nii.gz")), out.warp)
                shutil.copy(next(p for p in result["invtransforms"] if p.endswith("InverseWarp.nii.gz")),
                            out.inverse_warp)
            forward = _forward_transforms(out)
        reference = _apply(template, moving, forward, "intensity")
        warped = reference.numpy()
        qc = {"participant_id": pid, "correlation": correlation(warped[template_mask], template.numpy()[template_mask]),
              "nmi": normalized_mutual_information(warped[template_mask], template.numpy()[template_mask])}
        brain_on_grid = _apply(template, to_ants(nib.Nifti1Image(brain.astype(np.float32), native.affine)), forward,
                               "mask").numpy() > 0.5
        qc["dice"] = dice(brain_on_grid, template_mask)
        jacobian = _jacobian(template, out)
        for name, path in job.files.items():
            modality = by_name[name]
            if name == settings.reference:
                image = reference
            else:
                image = _modality_on_grid(template, grid, native, Path(path), modality, forward, out, pid, scratch)
            values = image.numpy()
            if modality.modulate:
                values = values * jacobian
            nib.Nifti1Image(values.astype(modality.dtype if modality.kind in ("label", "mask") else np.float32),
                            grid.affine).to_filename(out.image(name))
        for name, transform in settings.compared_modalities().items():
            transforms = [] if transform == "none" else _ants_registration(
                template, moving, transform, f"{scratch}/{transform}_", pid, reference_file,
                settings.reference)["fwdtransforms"]
            compared = _apply(template, moving, transforms, "intensity")
            nib.Nifti1Image(compared.numpy().astype(np.float32), grid.affine).to_filename(out.image(name))
        nib.Nifti1Image(jacobian.astype(np.float32), grid.affine).to_filename(out.jacobian)
        nib.Nifti1Image(brain_on_grid.astype(np.uint8), grid.affine).to_filename(out.brain_mask)
        out.native_grid.write_text(json.dumps({"shape": list(native.shape[:3]), "affine": native.affine.tolist(),
                                               "file": str(reference_file)}))
        qc.update(reference=settings.reference, transform=settings.transform,
                  seconds=round(time.perf_counter() - started, 2))
        out.qc.write_text(json.dumps(qc))
    mark_current(registered.participant(pid).root, job.key)
    return qc


def _ants_registration(template, moving, transform: str, prefix: str, pid: str, path: Path, reference: str) -> dict:
    """ANTs' registration of the reference scan to the template by ``transform`` (not ``none``); a failure is an
    :class:`InputError` naming the participant and file."""
    import ants

    try:
        return ants.registration(fixed=template, moving=moving, outprefix=prefix,
                                 type_of_transform=TRANSFORMS[transform])
    except Exception as error:
        raise InputError(f"{reference}: registration ({transform}) failed ({type(error).__name__}: {error})",
                         pid, path) from None


def _brain_mask(native: nib.spatialimages.SpatialImage, job: RegistrationJob) -> np.ndarray:
    """The reference scan's brain: deepbet's, the ``brain_mask`` modality's, or its nonzero voxels."""
    settings, pid = job.settings, job.participant
    if settings.skull_strip == "deepbet":
        brain = _skull_strip(native)
    elif settings.brain_mask is not None:
        path = Path(job.files[settings.brain_mask])
        mask = _read_scan(path, pid, settings.brain_mask, "mask")
        if mask.shape[:3] != native.shape[:3] or not np.allclose(mask.affine, native.affine, atol=1e-3):
            raise InputError(f"{settings.brain_mask}: the brain mask is not on the {settings.reference} scan's grid",
                             pid, path)
        brain = np.asanyarray(mask.dataobj).reshape(native.shape[:3]) > 0
    else:
        brain = np.asanyarray(native.dataobj) != 0
    if not brain.any():
        raise InputError(f"{settings.reference}: the brain mask is empty", pid, job.files[settings.reference])
    return brain


def _forward_transforms(out: ParticipantRegistration) -> list[str]:
    """Template → native points (what resampling a native image onto the template grid needs)."""
    return [str(path) for path in (out.warp, out.affine) if path.exists()]


def _apply(fixed, moving, transforms: list[str], kind: str, invert: list[bool] | None = None):
    import ants

    if not transforms:  # none: the scanner affines alone place the image in the template box
        return ants.resample_image_to_target(moving, fixed, interp_type=INTERPOLATORS[kind])
    return ants.apply_transforms(fixed=fixed, moving=moving, transformlist=transforms,
                                 interpolator=INTERPOLATORS[kind], whichtoinvert=invert or [False] * len(transforms))


def _jacobian(template, out: ParticipantRegistration) -> np.ndarray:
    """Native volume per template volume: det of the affine times the warp's Jacobian determinant."""
    import ants

    jacobian = np.ones(template.shape)
    if out.affine.exists():
        matrix = np.asarray(ants.read_transform(str(out.affine)).parameters[:9]).reshape(3, 3)
        jacobian *= abs(np.linalg.det(matrix))
    if out.warp.exists():
        jacobian *= ants.create_jacobian_determinant_image(template, str(out.warp)).numpy()
    return jacobian


def _modality_on_grid(template, grid: Grid, native_reference, path: Path, modality: Modality, forward: list[str],
                      out: ParticipantRegistration, pid: str, scratch: str):
    """A non-reference modality on the template grid, by its space (``reference``: the reference scan's
    world space, on any grid, e.g. FreeSurfer's conformed volumes) and kind."""
    import ants

    image = _read_scan(path, pid, modality.name, modality.kind)
    moving = to_ants(image)
    if modality.space == "template":
        if not grid.matches(image.shape[:3], image.affine, atol=1e-3):
            raise InputError(f"{modality.name}: declared space 'template' but not on the template grid "
                             f"{grid.shape}", pid, path)
        return moving
    transforms = list(forward)
    if modality.space == "own":
        try:
            fixed, coarse = (ants.resample_image(image, (COREGISTRATION_MM,) * 3, False, 0)
                             for image in (to_ants(native_reference), moving))
            rigid = ants.registration(fixed=fixed, moving=coarse, type_of_transform="Rigid",
                                      outprefix=f"{scratch}/{modality.name}_")
        except Exception as error:
            raise InputError(f"{modality.name}: co-registration to the reference scan failed "
                             f"({type(error).__name__}: {error})", pid, path) from None
        shutil.copy(rigid["fwdtransforms"][0], out.coregistration(modality.name))
        transforms.append(str(out.coregistration(modality.name)))
    return _apply(template, moving, transforms, modality.kind)


# ---------------------------------------------------------------------------------------
# Back and forth between a participant's native scan and the template grid


def to_native(image: nib.spatialimages.SpatialImage, registered: RegisteredLayout, participant_id: str,
              kind: str = "intensity", grid: nib.spatialimages.SpatialImage | None = None) -> nib.Nifti1Image:
    """A template-grid image (a relevance map, a t map) on the participant's native reference scan, or on the
    grid of ``grid``, an image in the reference scan's space (e.g. FreeSurfer's aparc+aseg.mgz)."""
    participant = registered.participant(participant_id)
    if not participant.native_grid.is_file():
        raise FileNotFoundError(f"{participant.root}: participant {participant_id} is not registered")
    native = json.loads(participant.native_grid.read_text()) if grid is None else {
        "shape": grid.shape[:3], "affine": grid.affine}
    fixed = to_ants(nib.Nifti1Image(np.zeros(native["shape"], np.float32), np.array(native["affine"])))
    transforms, invert = [], []
    if participant.affine.exists():
        transforms, invert = [str(participant.affine)], [True]
    if participant.inverse_warp.exists():
        transforms, invert = [*transforms, str(participant.inverse_warp)], [*invert, False]
    with _ants_environment(1):
        return to_nifti(_apply(fixed, to_ants(image), transforms, kind, invert))


def to_template(image: nib.spatialimages.SpatialImage, registered: RegisteredLayout, participant_id: str,
                kind: str = "intensity") -> nib.Nifti1Image:
    """An image in the participant's native reference space (any grid) on the template grid."""
    import ants

    participant = registered.participant(participant_id)
    if not participant.native_grid.is_file():
        raise FileNotFoundError(f"{participant.root}: participant {participant_id} is not registered")
    template = ants.image_read(str(registered.template))
    with _ants_environment(1):
        return to_nifti(_apply(template, to_ants(image), _forward_transforms(participant), kind))


# ---------------------------------------------------------------------------------------
# The cohort


@dataclass
class RegistrationResult:
    """``qc``: one row per registered participant (robust z, ``flagged``, ``diverged``: left out);
    ``problems``: the :class:`InputError` of every participant left out."""

    qc: pd.DataFrame
    problems: list[InputError]
    registered: int  # registered in this run
    unchanged: int

    @property
    def flagged(self) -> list[str]:
        """The scans (:func:`~engine.data.inputs.scan_id`) flagged."""
        return scan_ids(self.qc[self.qc["flagged"]])

    @property
    def usable(self) -> list[str]:
        """The scans whose registered images go on to ingest."""
        return scan_ids(self.qc[~self.qc["diverged"]])


class RegistrationError(RuntimeError):
    """Registration stopped (``on_error: fail``); ``problems`` lists every participant's problem."""

    def __init__(self, problems: list[InputError]):
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{len(problems)} participant(s) could not be registered (those registered are kept):\n"
                         f"{lines}")


def participant_key(settings: RegistrationSettings, files: dict[str, Path], modalities: list[Modality],
                    template_key: str) -> dict:
    """A participant's registration is current while its files (by content), settings and template are."""
    described = {name: {"space": m.space, "kind": m.kind, "modulate": m.modulate, "dtype": m.dtype}
                 for name, m in ((m.name, m) for m in modalities) if name in files}
    decisions = {"on_error", "flag_z", "fail_z", "min_correlation"}  # taken over the cohort, after registering
    return output_key({"registration": settings.model_dump(mode="json", exclude=decisions),
                       "modalities": described},
                      {"template": template_key, **{name: file_sha256(path) for name, path in files.items()}})


def register_cohort(registered: RegisteredLayout, files: dict[str, dict[str, Path]], modalities: list[Modality],
                    settings: RegistrationSettings, problems: list[InputError] | None = None,
                    execution: Execution = INLINE,
                    sessions: Mapping[str, tuple[str, str]] | None = None) -> RegistrationResult:
    """Register every scan of ``files`` (``{scan_id: {modality: path}}``, a participant's only scan or one of their
    sessions') whose folder is not current, one task of ``execution`` each (progress phase ``register``).

    ``problems`` are those found before (missing files); with ``on_error: fail`` any problem raises
    :class:`RegistrationError` after the other scans are done. ``sessions``: in a cohort with sessions, each
    scan's (participant_id, session_id), the key columns of ``qc.parquet``, which this writes.
    """
    problems = list(problems or [])
    template_key = write_template(settings, registered)
    jobs, kept = [], []
    for pid, by_modality in sorted(files.items()):
        key = participant_key(settings, by_modality, modalities, template_key["key"])
        folder = registered.participant(pid).root
        if is_current(folder, key):
            kept.append(pid)
        else:
            jobs.append(RegistrationJob(pid, {name: str(path) for name, path in by_modality.items()},
                                        tuple(modalities), settings, str(registered.root), key))
    done, total = len(kept), len(kept) + len(jobs)
    execution.report("register", done, total)
    rows = [json.loads(registered.participant(pid).qc.read_text()) for pid in kept]
    for _, outcome in execution.map(_register_or_problem, jobs):
        (problems if isinstance(outcome, InputError) else rows).append(outcome)
        done += 1
        execution.report("register", done, total)
    qc = pd.DataFrame(rows, columns=["participant_id", *QC_MEASURES, "reference", "transform", "seconds"])
    for measure in QC_MEASURES:  # a robust z needs a cohort: none below MIN_QC_COHORT participants
        qc[f"z_{measure}"] = robust_z(qc[measure]) if len(qc) >= MIN_QC_COHORT else np.nan
    z = qc[[f"z_{m}" for m in QC_MEASURES]]
    qc["flagged"] = (z < -settings.flag_z).any(axis=1)
    qc["diverged"] = (qc["correlation"] < settings.min_correlation) | (z < -settings.fail_z).any(axis=1)
    qc = qc.sort_values("participant_id").reset_index(drop=True)
    for _, row in qc[qc["diverged"]].iterrows():
        person, session = (sessions or {}).get(row["participant_id"], (row["participant_id"], None))
        problems.append(InputError(f"{row['reference']}: registration diverged: {_divergence(row, settings)}",
                                   person, files[row["participant_id"]][row["reference"]], session))
    if sessions:  # the scan's label parted into its key columns
        keys = pd.DataFrame([sessions[label] for label in qc["participant_id"]], columns=["participant_id",
                                                                                          "session_id"])
        qc = pd.concat([keys, qc.drop(columns="participant_id")], axis=1)
    with atomic_output(registered.qc) as partial:
        qc.to_parquet(partial, index=False)
    with atomic_output(registered.problems) as partial:
        partial.write_text(json.dumps([problem.as_dict() for problem in problems], indent=1))
    result = RegistrationResult(qc, problems, len(rows) - len(kept), len(kept))
    if problems and settings.on_error == "fail":
        raise RegistrationError(problems)
    return result


def _divergence(row: pd.Series, settings: RegistrationSettings) -> str:
    if row["correlation"] < settings.min_correlation:
        return f"correlation with the template {row['correlation']:.3f} < min_correlation {settings.min_correlation}"
    worst = min(QC_MEASURES, key=lambda measure: row[f"z_{measure}"])
    return (f"{worst} {row[worst]:.3f} is {-row[f'z_{worst}']:.1f} robust SDs below the cohort's "
            f"(fail_z {settings.fail_z})")


def _register_or_problem(job: RegistrationJob):
    try:
        return register_participant(job)
    except InputError as problem:
        return problem
