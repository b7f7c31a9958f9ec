"""Voxel-wise OLS and permutation max-T: relcohort vs nilearn ``permuted_ols``, statsmodels, a bare read.

    python benchmarks/voxelwise_stats.py [--subjects 128] [--voxel-sizes 4 2] [--permutations 1000 1000]

For each voxel size the cached cohort of ``ingest_throughput.py`` (generated if missing) is
ingested, and the model ``GM ~ age + sex + site`` (site dummy-coded) is fitted at every voxel:
  * relcohort: ``voxelwise_ols`` read straight from the Zarr store (the synchronous and the
    threaded Dask scheduler), without (best of three) and with permutations (best of two, as
    nilearn's permutation run);
  * nilearn: ``permuted_ols`` on the same values already in memory (its best case), ``n_perm=0``
    and the same permutation count, ``n_jobs=1``; and end to end as a nilearn user runs it, with
    ``NiftiMasker`` loading the participants' GM NIfTI files first;
  * statsmodels: ``OLS`` per voxel on 300 voxels, scaled to all voxels;
  * bare read: every chunk of the same Zarr array read and decompressed.
Writes ``<out>/voxelwise_stats.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import statsmodels.api as sm
from ingest_throughput import MODALITIES, ensure_cohort  # sibling script
from nilearn.maskers import NiftiMasker
from nilearn.mass_univariate import permuted_ols
from record import best_of, save_results

from engine.analysis.stats import design_matrix, voxelwise_ols
from engine.data.inputs import read_participants
from engine.data.store import ingest, load_coordinates, open_cohort

STATSMODELS_VOXELS = 300


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure(voxel_size: float, subjects: int, permutations: int, work: Path) -> dict:
    cohort = ensure_cohort(voxel_size, subjects, work)
    store = work / f"stats_{subjects}_{voxel_size:g}mm.zarr"
    shutil.rmtree(store, ignore_errors=True)
    ingest(store, read_participants(cohort / "participants.tsv"), cohort, MODALITIES, cohort / "mask.nii.gz")
    ds = load_coordinates(open_cohort(store))
    covariates = ds[["age", "sex", "site"]].to_dataframe()[["sex", "site"]].reset_index(drop=True)
    age = ds["age"].values
    in_memory = ds.GM.values.astype(np.float64)
    confounds = design_matrix(covariates, ["sex", "site"]).drop(columns="intercept").to_numpy()

    result = {"voxel_size_mm": voxel_size, "subjects": subjects, "voxels": ds.sizes["voxel"],
              "permutations": permutations, "stored_megabytes": ds.GM.nbytes / 1e6}
    for scheduler in ("synchronous", "threads"):
        with dask.config.set(scheduler=scheduler):
            fit = voxelwise_ols(ds.GM, age, covariates, ["sex", "site"])
            result[f"relcohort_{scheduler}_s"] = best_of(
                lambda: voxelwise_ols(ds.GM, age, covariates, ["sex", "site"]))
            result[f"read_{scheduler}_s"] = best_of(lambda: ds.GM.data.sum().compute())
            result[f"relcohort_permutations_{scheduler}_s"] = best_of(
                lambda: voxelwise_ols(ds.GM, age, covariates, ["sex", "site"], permutations=permutations), repeats=2)
    result["nilearn_s"] = best_of(lambda: permuted_ols(age[:, None], in_memory, confounds, model_intercept=True,
                                                       n_perm=0, n_jobs=1, verbose=0, output_type="dict"))
    reference = permuted_ols(age[:, None], in_memory, confounds, model_intercept=True, n_perm=0, n_jobs=1,
                             verbose=0, output_type="dict")
    files = [cohort / MODALITIES[2].template.format(participant_id=pid) for pid in ds.subject.values]
    masker = NiftiMasker(nib.load(cohort / "mask.nii.gz"), standardize=False).fit()
    masker.transform(files)  # warm the page cache
    result["nilearn_load_s"] = best_of(lambda: masker.transform(files))
    result["nilearn_end_to_end_s"] = result["nilearn_load_s"] + result["nilearn_s"]
    result["max_t_difference_vs_nilearn"] = float(np.nanmax(np.abs(fit.t.values - reference["t"][0])))
    result["nilearn_permutations_s"] = best_of(
        lambda: permuted_ols(age[:, None], in_memory, confounds, model_intercept=True, n_perm=permutations,
                             n_jobs=1, verbose=0, output_type="dict", random_state=0), repeats=2)
    design = np.column_stack([age, design_matrix(covariates, ["sex", "site"]).to_numpy()])
    voxels = np.linspace(0, ds.sizes["voxel"] - 1, STATSMODELS_VOXELS).astype(int)
    result["statsmodels_s"] = timed(lambda: [sm.OLS(in_memory[:, v], design).fit().tvalues[0] for v in voxels]) * (
        ds.sizes["voxel"] / STATSMODELS_VOXELS)

    for scheduler in ("synchronous", "threads"):
        per_permutation = (result[f"relcohort_permutations_{scheduler}_s"] - result[f"relcohort_{scheduler}_s"])
        result[f"per_permutation_{scheduler}_ms"] = 1000 * per_permutation / permutations
        result[f"speedup_vs_nilearn_{scheduler}"] = result["nilearn_s"] / result[f"relcohort_{scheduler}_s"]
        result[f"speedup_vs_nilearn_end_to_end_{scheduler}"] = (result["nilearn_end_to_end_s"]
                                                               / result[f"relcohort_{scheduler}_s"])
        result[f"share_of_read_{scheduler}"] = result[f"read_{scheduler}_s"] / result[f"relcohort_{scheduler}_s"]
    nilearn_permutations = result["nilearn_permutations_s"] - result["nilearn_s"]
    result["nilearn_per_permutation_ms"] = 1000 * nilearn_permutations / permutations
    for scheduler in ("synchronous", "threads"):
        result[f"permutation_speedup_{scheduler}"] = (result["nilearn_per_permutation_ms"]
                                                      / result[f"per_permutation_{scheduler}_ms"])
    shutil.rmtree(store, ignore_errors=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| grid | subjects × voxels | statsmodels loop (s) | nilearn: NiftiMasker load + permuted_ols (s) "
             "| relcohort from Zarr, scheduler sync / threads (s) | × nilearn end to end | × nilearn compute only "
             "| bare read (s) | share of read throughput | permutations | nilearn per permutation (ms) "
             "| relcohort per permutation (ms) | × nilearn |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['voxel_size_mm']:g} mm | {r['subjects']} × {r['voxels']} | {r['statsmodels_s']:.0f} "
            f"| {r['nilearn_load_s']:.2f} + {r['nilearn_s']:.3f} "
            f"| {r['relcohort_synchronous_s']:.3f} / {r['relcohort_threads_s']:.3f} "
            f"| **{r['speedup_vs_nilearn_end_to_end_synchronous']:.0f}× / "
            f"{r['speedup_vs_nilearn_end_to_end_threads']:.0f}×** "
            f"| {r['speedup_vs_nilearn_synchronous']:.1f}× / {r['speedup_vs_nilearn_threads']:.1f}× "
            f"| {r['read_synchronous_s']:.3f} / {r['read_threads_s']:.3f} "
            f"| **{r['share_of_read_synchronous']:.0%} / {r['share_of_read_threads']:.0%}** | {r['permutations']} "
            f"| {r['nilearn_per_permutation_ms']:.1f} | {r['per_permutation_synchronous_ms']:.1f} / "
            f"{r['per_permutation_threads_ms']:.1f} | **{r['permutation_speedup_synchronous']:.1f}× / "
            f"{r['permutation_speedup_threads']:.1f}×** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=128)
    parser.add_argument("--voxel-sizes", type=float, nargs="+", default=[4.0, 2.0])
    parser.add_argument("--permutations", type=int, nargs="+", default=[1000, 1000],
                        help="permutation count per voxel size")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(size, args.subjects, count, args.work)
               for size, count in zip(args.voxel_sizes, args.permutations, strict=True)]
    save_results(args.out / "voxelwise_stats.json", results)
    print(table(results))


if __name__ == "__main__":
    main()
