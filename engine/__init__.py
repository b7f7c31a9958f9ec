"""relcohort's library: cohort store, synthetic cohorts, atlases, models, attribution, statistics, report.

``engine.open_workspace(path)`` opens a run's outputs for notebooks (:mod:`engine.outputs.workspace`).
"""

__all__ = ["open_workspace"]


def __getattr__(name: str):
    # imported on first use: ``engine.data.store`` and friends must not pay for torch and nilearn
    if name == "open_workspace":
        from engine.outputs.workspace import open_workspace

        return open_workspace
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
