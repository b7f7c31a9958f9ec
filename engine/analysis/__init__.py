"""Regions and statistics: atlases and region reductions, structural feature tables, voxel-wise and
region-wise models, and the association analyses that name their terms."""
