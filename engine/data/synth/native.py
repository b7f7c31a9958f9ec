"""Native scans: a template-space image seen by a scanner after the head moved, with the pose known (the
ground truth of registration)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage


def native_poses(seed: int, index: int) -> dict[str, np.ndarray]:
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
