"""Cluster profiles: where a catalog run's Dask tasks execute.

A profile is configuration plus ``describe()`` and one ``start()`` that yields a
:class:`RunningCluster`: the connected ``distributed.Client``, whether GPU workers start on
demand, and the per-pool usage the run records.
The catalog's ``cluster:`` section picks the profile by its ``profile`` field.
"""

from cluster.profiles import PROFILES, ClusterProfile, LocalProfile, SlurmProfile
from cluster.running import RunningCluster
from cluster.slurm import ClusterSetupError

__all__ = ["PROFILES", "ClusterProfile", "ClusterSetupError", "LocalProfile", "RunningCluster", "SlurmProfile"]
