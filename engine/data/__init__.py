"""The data layer: the cohort grid, the (subject × voxel) Zarr store and its ingest, the masker
(rows ⇄ volumes ⇄ NIfTI), and the synthetic demo cohort."""
