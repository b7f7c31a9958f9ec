"""The masker: the cohort's voxels on their grid, and rows ⇄ volumes ⇄ NIfTI images.

Every store array is a ``(…, voxel)`` row matrix inside the cohort brain mask; the ``voxel``
dimension carries each voxel's grid indices as the coordinates ``i, j, k`` and the store's
attributes carry the grid (shape, affine, space). A :class:`Masker` holds both, in the spirit
of nilearn's maskers::

    masker = Masker.of(ds)                      # from any store Dataset or DataArray
    masker.to_nifti(ds.T1.sel(subject="sub-01"))  # one row → NIfTI image on the cohort grid
    masker.to_nifti(lrp.mean("subject"))          # reductions too: the grid lives in the masker
    masker.inverse_transform(rows)              # (…, voxel) → (…, x, y, z) volumes
    masker.transform(volumes)                   # and back
    masker.box()                                # the same voxels in their bounding box (model inputs)

Reductions drop xarray attributes, so build the masker from the store once and pass it on.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import xarray as xr

from engine.data.grid import Grid

VOXEL_COORDS = ("i", "j", "k")


def grid_of(data: xr.Dataset | xr.DataArray) -> Grid:
    """The voxel grid a store's dataset or array carries in its attributes."""
    attrs = data.attrs
    if "grid" in attrs:
        return Grid.from_attrs(attrs["grid"])
    if "grid_shape" in attrs:
        return Grid(tuple(attrs["grid_shape"]), np.array(attrs["grid_affine"]), attrs.get("space", "unknown"))
    raise ValueError("no voxel grid in the attributes (reductions drop them): build the Masker from the store, "
                     "e.g. Masker.of(ds), and pass it on")


@dataclass(frozen=True, eq=False)
class Masker:
    """The cohort's voxels: a :class:`~engine.data.grid.Grid` and the grid ``indices`` (i, j, k) of each voxel."""

    grid: Grid
    indices: tuple[np.ndarray, np.ndarray, np.ndarray]

    def __post_init__(self):
        indices = tuple(np.asarray(axis, dtype=np.intp) for axis in self.indices)
        if len(indices) != 3 or len({len(axis) for axis in indices}) != 1:
            raise ValueError("a masker needs three index arrays (i, j, k) of equal length")
        if any((axis < 0).any() or (axis >= size).any() for axis, size in zip(indices, self.grid.shape, strict=True)):
            raise ValueError(f"voxel indices fall outside the grid {self.grid.shape}")
        object.__setattr__(self, "indices", indices)

    @classmethod
    def of(cls, data: xr.Dataset | xr.DataArray) -> Masker:
        """The masker of a store's dataset or array (``images.zarr``, ``relevance.zarr`` or a row of either)."""
        missing = [axis for axis in VOXEL_COORDS if axis not in data.coords]
        if missing:
            raise ValueError(f"no voxel coordinates {missing}: not an array of a relcohort store")
        return cls(grid_of(data), tuple(data[axis].values for axis in VOXEL_COORDS))

    def __len__(self) -> int:
        return len(self.indices[0])

    def box(self) -> Masker:
        """The same voxels in their bounding box: a grid just large enough, its affine shifted to the box."""
        origin = np.array([axis.min() for axis in self.indices])
        shape = tuple(int(axis.max() - start + 1) for axis, start in zip(self.indices, origin, strict=True))
        affine = self.grid.affine.copy()
        affine[:3, 3] = self.grid.affine[:3, :3] @ origin + self.grid.affine[:3, 3]
        return Masker(Grid(shape, affine, self.grid.space),
                      tuple(axis - start for axis, start in zip(self.indices, origin, strict=True)))

    # -- rows ⇄ volumes

    def inverse_transform(self, rows, fill=0, dtype=None) -> np.ndarray:
        """``(…, voxel)`` rows → ``(…, x, y, z)`` volumes on the grid, ``fill`` outside the mask."""
        rows = np.asarray(rows)
        self._check_length(rows.shape[-1])
        volumes = np.full(rows.shape[:-1] + self.grid.shape, fill, dtype=dtype or rows.dtype)
        volumes[(..., *self.indices)] = rows
        return volumes

    def transform(self, volumes) -> np.ndarray:
        """``(…, x, y, z)`` volumes on the grid → ``(…, voxel)`` rows in store order."""
        volumes = np.asarray(volumes)
        if volumes.shape[-3:] != self.grid.shape:
            raise ValueError(f"volumes of shape {volumes.shape[-3:]} are not on the grid {self.grid.shape}")
        return volumes[(..., *self.indices)]

    # -- NIfTI

    def to_nifti(self, row, fill=0) -> nib.Nifti1Image:
        """One map — a ``(voxel,)`` DataArray (a row or any reduction) or array — as a NIfTI image on the grid.

        Booleans become float32 (0/1); ``fill`` goes outside the mask (e.g. ``np.nan`` for statistics).
        """
        if isinstance(row, xr.DataArray):
            extra = [dim for dim in row.dims if dim != "voxel"]
            if "voxel" not in row.dims or any(row.sizes[dim] != 1 for dim in extra):
                raise ValueError(f"to_nifti needs one map with dims ('voxel',), got {dict(row.sizes)}; select or "
                                 "reduce the other dimensions first, e.g. .sel(attribution='lrp').mean('subject')")
            row = row.squeeze(extra, drop=True) if extra else row
            own = zip(VOXEL_COORDS, self.indices, strict=True)
            if all(axis in row.coords for axis in VOXEL_COORDS) and not all(
                    np.array_equal(row[axis].values, indices) for axis, indices in own):
                raise ValueError("the map's voxels (i, j, k) are not this masker's: it comes from another store")
        values = np.asarray(row)
        if values.ndim != 1:
            raise ValueError(f"to_nifti needs one map (voxel,), got shape {values.shape}")
        values = values.astype(np.float32) if values.dtype == bool else values
        return self._image(self.inverse_transform(values, fill))

    def mask_image(self) -> nib.Nifti1Image:
        """The cohort brain mask (uint8) as a NIfTI image."""
        return self._image(self.inverse_transform(np.ones(len(self), np.uint8)))

    def _image(self, volume: np.ndarray) -> nib.Nifti1Image:
        image = nib.Nifti1Image(volume, self.grid.affine)
        image.header.set_xyzt_units("mm")
        code = 4 if self.grid.space.upper().startswith("MNI") else 2  # NIfTI xform codes: MNI_152 or ALIGNED_ANAT
        image.header.set_sform(self.grid.affine, code=code)
        image.header.set_qform(self.grid.affine, code=code)
        return image

    def _check_length(self, n: int) -> None:
        if n != len(self):
            raise ValueError(f"rows have {n} voxels, the cohort mask {len(self)}")
