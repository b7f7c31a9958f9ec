"""Voxel grids: shape + affine + space name, and the standard MNI152 grid at any voxel size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Space of the nilearn-bundled MNI152 2009a symmetric templates used by the demo cohort.
MNI_SPACE = "MNI152NLin2009aSym"

# The FSL/SPM MNI152 bounding box (mm): x -90..90, y -126..90, z -72..108.
_MNI_ORIGIN = np.array([90.0, -126.0, -72.0])
_MNI_EXTENT = np.array([181.0, 217.0, 181.0])


@dataclass(frozen=True, eq=False)
class Grid:
    """A 3D voxel grid: ``shape``, the voxel→world ``affine`` (4×4) and the ``space`` name."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    space: str = "unknown"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))
        if len(self.shape) != 3 or self.affine.shape != (4, 4):
            raise ValueError(f"a grid needs a 3D shape and a 4x4 affine, got {self.shape} and {self.affine.shape}")

    def __eq__(self, other) -> bool:
        return (isinstance(other, Grid) and self.shape == other.shape and self.space == other.space
                and np.array_equal(self.affine, other.affine))

    def __hash__(self) -> int:
        return hash((self.shape, self.affine.tobytes(), self.space))

    @property
    def voxel_size(self) -> np.ndarray:
        """Voxel edge lengths in mm."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm³."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    def world_coordinates(self, indices: np.ndarray | None = None) -> np.ndarray:
        """World (mm) coordinates of voxel ``indices`` (n×3), or of every voxel in C order."""
        if indices is None:
            indices = np.indices(self.shape).reshape(3, -1).T
        return indices @ self.affine[:3, :3].T + self.affine[:3, 3]

    def matches(self, shape, affine, atol: float = 1e-4) -> bool:
        """True if ``shape`` and ``affine`` describe this grid (affine to ``atol`` mm)."""
        return tuple(shape) == self.shape and np.allclose(affine, self.affine, atol=atol)

    def to_attrs(self) -> dict:
        """JSON-friendly attributes, the inverse of :meth:`from_attrs`."""
        return {"shape": list(self.shape), "affine": self.affine.tolist(), "space": self.space}

    @classmethod
    def from_attrs(cls, attrs: dict) -> Grid:
        return cls(tuple(attrs["shape"]), np.array(attrs["affine"]), attrs.get("space", "unknown"))


def mni_grid(voxel_size: float) -> Grid:
    """The MNI152 bounding box at an isotropic ``voxel_size`` in mm (FSL's LAS orientation).

    2 mm gives the familiar 91×109×91 grid, 4 mm gives 46×55×46.
    """
    if not voxel_size > 0:
        raise ValueError(f"voxel size must be positive, got {voxel_size}")
    shape = tuple(math.ceil(e / voxel_size - 1e-9) for e in _MNI_EXTENT)
    affine = np.diag([-voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = _MNI_ORIGIN
    return Grid(shape, affine, MNI_SPACE)
