"""Model inputs read from the cohort store: rows scaled per participant and placed in the mask's box, batches
for an epoch, and the random changes of augmentation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.data.masker import Masker
from engine.data.store import open_cohort

#: How each channel is scaled inside the mask, per participant and modality (``input_scaling``).
SCALINGS = ("zscore", "zscore_brain", "minmax", "max")


def scale_rows(rows, scaling: str):
    """Rows ``(…, voxel)`` (NumPy or Dask) scaled along the voxels, per row: over all the mask's
    voxels, ``zscore``, ``minmax`` to [0, 1] or ``max``, division by the largest magnitude; or
    ``zscore_brain`` over the row's nonzero voxels (the participant's own brain or head: background
    zeros inside the cohort mask neither shift nor spread the scale, and stay 0 — so maps of the
    model are 0 there too, and where few participants' heads reach, voxel-wise statistics rest on
    a few of them)."""
    if scaling == "zscore_brain":
        inside = rows != 0
        count = np.maximum(inside.sum(axis=-1, keepdims=True), 1)
        shift = rows.sum(axis=-1, keepdims=True) / count
        spread = np.sqrt((np.where(inside, rows - shift, 0) ** 2).sum(axis=-1, keepdims=True) / count)
        return np.where(inside, (rows - shift) / np.where(spread > 0, spread, 1), 0).astype(rows.dtype)
    if scaling == "zscore":
        shift, spread = rows.mean(axis=-1, keepdims=True), rows.std(axis=-1, keepdims=True)
    elif scaling == "minmax":
        shift = rows.min(axis=-1, keepdims=True)
        spread = rows.max(axis=-1, keepdims=True) - shift
    elif scaling == "max":
        shift, spread = 0, np.abs(rows).max(axis=-1, keepdims=True)
    else:
        raise ValueError(f"unknown input scaling {scaling!r}; known: {', '.join(SCALINGS)}")
    return ((rows - shift) / np.where(spread > 0, spread, 1)).astype(rows.dtype)


class CohortVolumes:
    """Model inputs read from a store: ``read(positions)`` → float32 ``(batch, modality, x, y, z)``.

    Positions index the store's complete subjects (``open_cohort`` order). Each channel is scaled
    per participant and modality by :func:`scale_rows` (``scaling``: ``zscore`` over the mask, so
    site gain and contrast drop out, or ``zscore_brain`` over the participant's nonzero voxels;
    ``minmax`` to [0, 1] or ``max``, division by the maximum, as the seed studies did); voxels
    outside the mask are zero. The volume is the mask's bounding box:
    ``box``, the store's :class:`~engine.data.masker.Masker` on that box, turns maps back into
    rows (``box.transform``).
    """

    def __init__(self, store: str | Path, modalities: Sequence[str], scaling: str = "zscore"):
        if scaling not in SCALINGS:
            raise ValueError(f"unknown input scaling {scaling!r}; known: {', '.join(SCALINGS)}")
        self.scaling = scaling
        self.store = Path(store)
        self.dataset = open_cohort(self.store)
        missing = [name for name in modalities if name not in self.dataset.data_vars]
        if missing:
            raise ValueError(f"{self.store}: no modality {missing}; it has {list(self.dataset.data_vars)}")
        self.modalities = list(modalities)
        self.box = Masker.of(self.dataset).box()
        self.subjects = self.dataset.subject.values

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model inputs' spatial shape: the mask's bounding box."""
        return self.box.grid.shape

    @property
    def left_right_axis(self) -> int:
        """The voxel axis closest to world x (left–right): the axis a sagittal flip mirrors."""
        return int(np.argmax(np.abs(self.box.grid.affine[0, :3])))

    def rows(self, positions: Sequence[int]) -> np.ndarray:
        """Scaled store rows, ``(batch, modality, voxel)`` float32."""
        positions = np.asarray(positions)
        return scale_rows(np.stack([self.dataset[name].isel(subject=positions).values.astype(np.float32)
                                    for name in self.modalities], axis=1), self.scaling)

    def read(self, positions: Sequence[int]) -> np.ndarray:
        return self.box.inverse_transform(self.rows(positions))

    def chunk_of(self, positions: np.ndarray) -> np.ndarray:
        """The store chunk each position falls in (reading one subject reads its whole chunk)."""
        chunk = self.dataset[self.modalities[0]].encoding.get("chunks", (1,))[0]
        return np.asarray(positions) // chunk


def epoch_batches(volumes: CohortVolumes, positions: np.ndarray, batch_size: int, rng: np.random.Generator,
                  cache: dict | None, cache_bytes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled batches of positions; each yields ``(positions, inputs)``.

    When the subjects fit in ``cache_bytes`` they are read once and kept in ``cache``; otherwise
    each epoch reads buffers of whole store chunks in random order and shuffles within them.
    """
    per_subject = 4 * len(volumes.modalities) * math.prod(volumes.shape)
    if cache is not None and len(positions) * per_subject <= cache_bytes:
        if "inputs" not in cache:
            cache["inputs"] = {int(p): v for p, v in zip(positions, volumes.read(positions), strict=True)}
        order = rng.permutation(positions)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            yield batch, np.stack([cache["inputs"][int(p)] for p in batch])
        return
    chunks = volumes.chunk_of(positions)
    buffer_subjects = max(batch_size, cache_bytes // per_subject)
    order = [positions[chunks == chunk] for chunk in rng.permutation(np.unique(chunks))]
    while order:
        taken = []
        while order and sum(len(part) for part in taken) < buffer_subjects:
            taken.append(order.pop())
        buffer = rng.permutation(np.concatenate(taken))
        inputs = volumes.read(buffer)
        for start in range(0, len(buffer), batch_size):
            yield buffer[start:start + batch_size], inputs[start:start + batch_size]


class Augmentation(BaseModel):
    """Random changes to each training input, drawn anew every epoch (the seed studies: ±2 voxels, flip 0.5)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    translation: int = Field(0, ge=0, le=16, description="shift by up to ± this many voxels along each axis "
                             "(zero-filled)")
    flip: float = Field(0.0, ge=0, le=1, description="probability of a left–right (sagittal) mirror image")


def augment(inputs: np.ndarray, settings: Augmentation, rng: np.random.Generator,
            left_right_axis: int = 0) -> np.ndarray:
    """Each input ``(channels, x, y, z)`` of the batch mirrored along ``left_right_axis`` with probability
    ``settings.flip``, then shifted by whole voxels drawn uniformly from ±``settings.translation`` per
    axis (voxels shifted in are zero, like the background)."""
    if not settings.translation and not settings.flip:
        return inputs
    augmented = np.zeros_like(inputs)
    for index, volume in enumerate(inputs):
        if settings.flip and rng.random() < settings.flip:
            volume = np.flip(volume, axis=1 + left_right_axis)
        shifts = rng.integers(-settings.translation, settings.translation + 1, size=3)
        target = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shifts, volume.shape[1:], strict=True))
        source = tuple(slice(max(-s, 0), n - max(s, 0)) for s, n in zip(shifts, volume.shape[1:], strict=True))
        augmented[index][(slice(None), *target)] = volume[(slice(None), *source)]
    return augmented
