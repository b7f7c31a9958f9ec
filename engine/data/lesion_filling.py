"""Lesion filling: an image's lesion voxels replaced by intensities of the participant's own normal-appearing white
matter, so a model trained on the filled images cannot see the lesions (Eitel et al. 2019 filled their MS
patients' FLAIR lesions, after Valverde et al. 2014, and fine-tuned anew).

Each lesion voxel takes the intensity of a normal-appearing white-matter voxel drawn at random (seeded by the
scan, so a rerun fills alike): the filled lesion has the participant's own white-matter intensity distribution.
Every other voxel keeps its value exactly. Normal-appearing white matter is white matter (a modality of the store,
or the MNI152 2009 white-matter prior on the cohort grid) outside the lesions.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.data.masker import Masker
from engine.data.store import derive_modality, open_cohort, store_attributes
from engine.tasks import INLINE, Execution

#: The white matter from the MNI152 2009 prior, not from a modality.
MNI152 = "mni152"


class LesionFilling(BaseModel):
    """A modality derived from ``image`` with the lesions of ``lesions`` filled (the catalog's
    ``ingest.fill_lesions.<name>``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(..., description="the modality whose lesions are filled, e.g. FLAIR")
    lesions: str = Field(..., description="lesion mask or probability modality")
    threshold: float = Field(0.5, gt=0, le=1, description="lesion where the lesion modality is at least this")
    white_matter: str = Field(MNI152, description="white matter: a probability or mask modality, or mni152 (the "
                              "MNI152 2009 white-matter prior, images in that space)")
    white_matter_threshold: float = Field(0.5, gt=0, le=1, description="white matter where it is at least this")
    seed: int = Field(0, ge=0, description="seed of the draws (with each scan's label)")

    @property
    def sources(self) -> list[str]:
        return [self.image, self.lesions, *([] if self.white_matter == MNI152 else [self.white_matter])]


def fill_lesions(image: np.ndarray, lesions: np.ndarray, white_matter: np.ndarray, subjects: list[str],
                 seed: int = 0) -> np.ndarray:
    """``image`` (scans × voxels) with each scan's ``lesions`` voxels (boolean, scans × voxels) replaced by values
    drawn from its normal-appearing white matter (``white_matter`` & ~``lesions``; ``white_matter`` per scan or
    one row for all), seeded by ``seed`` and the scan's label. A scan with lesions but no normal-appearing white
    matter is an error naming it."""
    filled = np.array(image, copy=True)
    white_matter = np.broadcast_to(white_matter, image.shape)
    for row, subject in enumerate(subjects):
        lesion = lesions[row]
        if not lesion.any():
            continue
        normal = white_matter[row] & ~lesion & np.isfinite(image[row])
        if not normal.any():
            raise ValueError(f"{subject}: no normal-appearing white matter to fill its {int(lesion.sum())} lesion "
                             "voxels from")
        rng = np.random.default_rng([seed, zlib.crc32(subject.encode())])
        filled[row, lesion] = rng.choice(image[row, normal], size=int(lesion.sum()))
    return filled


@dataclass(frozen=True)
class _Filling:
    """The derived modality's computation (picklable, run by the store's tasks)."""

    settings: LesionFilling
    prior: np.ndarray | None  # the MNI152 white matter on the store's voxels

    def __call__(self, values: dict[str, np.ndarray], subjects: list[str]) -> np.ndarray:
        settings = self.settings
        white_matter = (self.prior[None] if self.prior is not None
                        else values[settings.white_matter] >= settings.white_matter_threshold)
        return fill_lesions(values[settings.image].astype(np.float32), values[settings.lesions] >= settings.threshold,
                            white_matter, subjects, settings.seed)


def derive_filled(store: str, name: str, settings: LesionFilling, execution: Execution = INLINE) -> int:
    """Write (or bring up to date) modality ``name`` of ``store``: ``settings.image`` with its lesions filled.
    Returns the rows computed."""
    prior = _mni152_white_matter(store, settings.white_matter_threshold) if settings.white_matter == MNI152 else None
    if prior is not None and not prior.any():
        raise ValueError(f"fill_lesions.{name}: the MNI152 white-matter prior has no voxel in the store's mask")
    return derive_modality(store, name, settings.sources, _Filling(settings, prior),
                           settings.model_dump(mode="json"), execution=execution)


def _mni152_white_matter(store: str, threshold: float) -> np.ndarray:
    return _prior_on(str(store), str(store_attributes(store)["mask_sha256"]), threshold)


@lru_cache(maxsize=4)
def _prior_on(store: str, mask_sha256: str, threshold: float) -> np.ndarray:
    """nilearn's bundled MNI152 2009 white-matter probability, resampled (linear) to the store's voxels, at least
    ``threshold``."""
    from nilearn.datasets import load_mni152_wm_template
    from nilearn.image import resample_to_img

    masker = Masker.of(open_cohort(store, include_incomplete=True))
    reference = masker.to_nifti(np.zeros(len(masker), np.float32))
    resampled = resample_to_img(load_mni152_wm_template(resolution=1), reference, interpolation="linear",
                                force_resample=True, copy_header=True)
    return masker.transform(np.asarray(resampled.dataobj)) >= threshold
