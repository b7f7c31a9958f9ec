"""Cluster profiles: where a catalog run's Dask tasks execute.

A profile is configuration plus one ``start()`` that yields a connected ``distributed.Client``.
The catalog's ``cluster:`` section picks the profile by its ``profile`` field.
"""

from cluster.profiles import PROFILES, ClusterProfile, LocalProfile, SlurmProfile
from cluster.slurm import ClusterSetupError

__all__ = ["PROFILES", "ClusterProfile", "ClusterSetupError", "LocalProfile", "SlurmProfile"]
