"""What a scanner makes of an anatomy: T1w and FLAIR contrasts with site scaling, bias field and noise; FA
and PVS-probability maps."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from engine.data.grid import Grid
from engine.data.synth.anatomy import Anatomy, Participant, PlantedEffects, age_fraction, smooth_field

# Per site: intensity gain, contrast exponent, noise SD (fraction of white-matter T1 signal).
SITE_SCANNER = {"site-A": (1.00, 1.00, 0.03), "site-B": (1.15, 0.90, 0.04), "site-C": (0.85, 1.10, 0.05)}
# Tissue signal on each contrast: CSF, GM, WM, white-matter hyperintensity.
TISSUE_SIGNAL = {"T1w": (0.18, 0.55, 0.85, 0.62), "FLAIR": (0.05, 0.62, 0.48, 1.25)}
INTENSITY_SCALE = 1000.0


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
    signal = gain * np.power(signal, gamma) * np.exp(smooth_field(rng, grid, 60.0, 0.06)[0])
    signal = ndimage.gaussian_filter(signal, 0.5)
    tissue = (anatomy.gm + anatomy.wm + anatomy.csf) > 0.05
    signal = signal + rng.normal(0, noise_sd * TISSUE_SIGNAL["T1w"][2], grid.shape)
    return (np.clip(signal, 0, None) * tissue * INTENSITY_SCALE).astype(np.float32)


def render_fa(anatomy: Anatomy, participant: Participant, rng, effects: PlantedEffects) -> np.ndarray:
    """FA-like map: high along Juelich tracts, falling with age there, lowered in lesions."""
    decline = effects.fa_decline * np.exp(rng.normal(0, effects.rate_variability)) * age_fraction(participant.age)
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
