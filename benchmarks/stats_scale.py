"""Scale check of the voxel-wise model: time, tasks and peak memory from N = 2,500 to 40,000 subjects.

    python benchmarks/stats_scale.py [--subjects 2500 5000 10000 20000 40000] [--voxels 60530]

Each size runs in a fresh process: ``voxelwise_ols(maps, age, covariates)`` with sex and a
three-level site as covariates, on lazily generated float32 maps (N × voxels, 64 subjects per
chunk: the 4 mm demo mask has 60,530 voxels, so N = 40,000 is 9.7 GB that never exists at
once), on the default threaded scheduler. Reports wall time, seconds per 1,000 subjects, the
number of tasks run and the process's peak resident memory. Writes
``<out>/stats_scale.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SUBJECTS_PER_CHUNK = 64


def run_one(subjects: int, voxels: int) -> dict:
    import dask.array as da
    import numpy as np
    import pandas as pd
    import xarray as xr
    from dask.callbacks import Callback

    from engine.analysis.stats import voxelwise_ols

    rng = np.random.default_rng(0)
    age = rng.uniform(18, 82, subjects)
    covariates = pd.DataFrame({"sex": rng.choice(["F", "M"], subjects), "site": rng.choice(["A", "B", "C"], subjects)})
    noise = da.random.default_rng(1).standard_normal((subjects, voxels), dtype=np.float32,
                                                      chunks=(SUBJECTS_PER_CHUNK, voxels))
    maps = xr.DataArray(noise + da.from_array((0.01 * age).astype(np.float32)[:, None],
                                              chunks=(SUBJECTS_PER_CHUNK, 1)), dims=("subject", "voxel"))

    class CountTasks(Callback):
        tasks = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            CountTasks.tasks += 1

    started = time.perf_counter()
    with CountTasks():
        result = voxelwise_ols(maps, age, covariates, ["sex", "site"])
    seconds = time.perf_counter() - started
    assert result.attrs["n"] == subjects and np.isfinite(result.t.values).all()
    return {"subjects": subjects, "voxels": voxels, "gigabytes": subjects * voxels * 4 / 1e9, "seconds": seconds,
            "seconds_per_1000_subjects": 1000 * seconds / subjects, "tasks": CountTasks.tasks,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "median_t": float(np.median(result.t.values))}


def table(results: list[dict]) -> str:
    lines = ["| subjects | maps (GB, float32) | time (s) | s per 1,000 subjects | tasks | peak memory (MB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['subjects']:,} | {r['gigabytes']:.1f} | {r['seconds']:.1f} | {r['seconds_per_1000_subjects']:.2f} "
              f"| {r['tasks']:,} | {r['peak_rss_mb']:.0f} |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[2500, 5000, 10000, 20000, 40000])
    parser.add_argument("--voxels", type=int, default=60530)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # run one size in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.voxels)))
        return
    results = []
    for subjects in args.subjects:
        completed = subprocess.run([sys.executable, __file__, "--one", str(subjects), "--voxels", str(args.voxels)],
                                   capture_output=True, text=True, check=True)
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stats_scale.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
