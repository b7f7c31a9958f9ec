"""The streaming ridge baseline against scikit-learn's RidgeCV on the same data: time and peak memory.

    .venv/bin/python benchmarks/ridge_baseline.py [--sizes 240x50000 1000x100000 2000x200000]

For each N subjects × V voxels, float32 maps with a planted linear age signal are written once to
a Zarr array under ``benchmarks/work/`` (chunks of 16 subjects × 65,536 voxels, as the images
store's). ``engine.models.baselines.ridge_baseline`` reads them lazily (its Gram reduction over
voxel blocks, on Dask's threaded scheduler, 2 threads); ``RidgeCV`` (the same α grid, efficient
leave-one-out) gets the array loaded into memory as float64, which it needs. Both fit on the same
60 % training subjects; their predictions agree (max |difference| reported). Peak memory is
tracemalloc's peak above the start of each fit (numpy and Dask report their buffers to it); the
in-memory input of RidgeCV is reported separately. Writes ``benchmarks/results/ridge_baseline.json``
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from record import save_results  # sibling script
from sklearn.linear_model import RidgeCV

from engine.models.baselines import DEFAULT_ALPHAS, ridge_baseline

WORK = Path(__file__).parent / "work" / "ridge"


def cohort(subjects: int, voxels: int) -> tuple[zarr.Array, np.ndarray]:
    """Maps (cached) whose voxels carry age with noise, and the ages."""
    rng = np.random.default_rng(0)
    age = rng.uniform(18, 82, subjects)
    path = WORK / f"{subjects}x{voxels}.zarr"
    if not path.exists():
        array = zarr.create_array(path, shape=(subjects, voxels), chunks=(16, 65536), dtype="float32")
        loading = rng.normal(0, 1, voxels).astype(np.float32) / np.sqrt(voxels)
        for start in range(0, subjects, 16):
            rows = slice(start, min(start + 16, subjects))
            noise = rng.normal(0, 1, (rows.stop - rows.start, voxels)).astype(np.float32)
            array[rows] = noise + np.outer((age[rows] - 50) / 18, loading * 40).astype(np.float32)
    return zarr.open_array(path, mode="r"), age


def peak(function):
    """(result, seconds, peak bytes above the start) of one call."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    _, high = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, high


def measure(subjects: int, voxels: int) -> dict:
    array, age = cohort(subjects, voxels)
    train = np.zeros(subjects, bool)
    train[np.random.default_rng(1).permutation(subjects)[: int(0.6 * subjects)]] = True
    maps = xr.DataArray(da.from_zarr(array), dims=("subject", "voxel"))
    with dask.config.set(scheduler="threads", num_workers=2):
        ours, ours_seconds, ours_peak = peak(lambda: ridge_baseline(maps, age, train))
    loaded = array[:].astype(np.float64)
    theirs, theirs_seconds, theirs_peak = peak(
        lambda: RidgeCV(alphas=DEFAULT_ALPHAS).fit(loaded[train], age[train]).predict(loaded))
    return {"subjects": subjects, "voxels": voxels, "relcohort_seconds": ours_seconds,
            "relcohort_peak_mb": ours_peak / 2**20, "ridgecv_seconds": theirs_seconds,
            "ridgecv_peak_mb": theirs_peak / 2**20, "ridgecv_input_mb": loaded.nbytes / 2**20,
            "store_mb": subjects * voxels * 4 / 2**20, "alpha": ours.alpha,
            "max_prediction_difference": float(np.abs(ours.predictions - theirs).max())}


def table(rows: list[dict]) -> str:
    lines = ["| N × voxels | maps (float32) | relcohort: s / peak MB | RidgeCV: s / peak MB (+ input in memory) "
             "| max \\|Δ prediction\\| (y) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['subjects']:,} × {r['voxels']:,} | {r['store_mb']:,.0f} MB "
                     f"| {r['relcohort_seconds']:.1f} / {r['relcohort_peak_mb']:,.0f} "
                     f"| {r['ridgecv_seconds']:.1f} / {r['ridgecv_peak_mb']:,.0f} (+ {r['ridgecv_input_mb']:,.0f}) "
                     f"| {r['max_prediction_difference']:.1e} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["240x50000", "1000x100000", "2000x200000"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        subjects, voxels = (int(part) for part in size.split("x"))
        rows.append(measure(subjects, voxels))
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "ridge_baseline.json", rows)
    print(table(rows))


if __name__ == "__main__":
    main()
