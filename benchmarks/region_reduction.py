"""Region reduction: relcohort's one-pass reduction vs nilearn's NiftiLabelsMasker and a bare read.

    python benchmarks/region_reduction.py [--subjects 128] [--voxel-sizes 4 2] [--atlas neuromorphometrics]

For each voxel size the cached cohort of ``ingest_throughput.py`` (generated if missing) is
ingested into a store, then, warm cache, best of three:
  * nilearn: ``NiftiLabelsMasker(strategy="sum")`` over the subjects' GM NIfTI files;
  * relcohort: ``region_reduce(ds.GM, atlas)`` (count, sum, mean, |sum|, positive sum) computed;
  * bare read: every chunk of the same Zarr array read and decompressed (``.sum()``);
  * the same two on a signed map (GM − 0.5), as relevance maps are, on one thread.
Each runs on one thread (``scheduler="synchronous"``) and on the default threaded scheduler.
Writes ``<out>/region_reduction.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import dask
import nibabel as nib
from ingest_throughput import MODALITIES, ensure_cohort  # sibling script
from nilearn.maskers import NiftiLabelsMasker
from record import best_of, save_results

from engine.analysis.atlas import cohort_atlas, region_reduce
from engine.data.inputs import read_participants
from engine.data.masker import Masker
from engine.data.store import ingest, open_cohort


def measure(voxel_size: float, subjects: int, atlas_name: str, work: Path) -> dict:
    cohort = ensure_cohort(voxel_size, subjects, work)
    store = work / f"regions_{subjects}_{voxel_size:g}mm.zarr"
    shutil.rmtree(store, ignore_errors=True)
    ingest(store, read_participants(cohort / "participants.tsv"), cohort, MODALITIES, cohort / "mask.nii.gz")
    ds = open_cohort(store)
    atlas = cohort_atlas(ds, atlas_name)
    files = [cohort / MODALITIES[2].template.format(participant_id=pid) for pid in ds.subject.values]
    labels = Masker.of(ds).to_nifti(atlas.voxel_labels)
    masker = NiftiLabelsMasker(labels, mask_img=nib.load(cohort / "mask.nii.gz"), strategy="sum",
                               standardize=None).fit()
    stored_megabytes = ds.GM.nbytes / 1e6

    result = {"voxel_size_mm": voxel_size, "subjects": subjects, "voxels": ds.sizes["voxel"],
              "regions": len(atlas.regions), "stored_megabytes": stored_megabytes}
    masker.transform(files)  # warm the page cache
    result["nilearn_s"] = best_of(lambda: masker.transform(files))
    for scheduler in ("synchronous", "threads"):
        with dask.config.set(scheduler=scheduler):
            region_reduce(ds.GM, atlas).compute()
            result[f"relcohort_{scheduler}_s"] = best_of(lambda: region_reduce(ds.GM, atlas).compute())
            result[f"read_{scheduler}_s"] = best_of(lambda: ds.GM.data.sum().compute())
        result[f"speedup_vs_nilearn_{scheduler}"] = result["nilearn_s"] / result[f"relcohort_{scheduler}_s"]
        result[f"share_of_read_{scheduler}"] = result[f"read_{scheduler}_s"] / result[f"relcohort_{scheduler}_s"]
    signed = ds.GM - 0.5  # signed maps, as relevance maps are, need a second pass for |values|
    with dask.config.set(scheduler="synchronous"):
        result["relcohort_signed_s"] = best_of(lambda: region_reduce(signed, atlas).compute())
        result["read_signed_s"] = best_of(lambda: signed.data.sum().compute())
    result["share_of_read_signed"] = result["read_signed_s"] / result["relcohort_signed_s"]
    shutil.rmtree(store, ignore_errors=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| grid | subjects × voxels, regions | nilearn masker (s) | relcohort 1 thread (s) | × nilearn "
             "| bare read 1 thread (s) | share of read throughput | relcohort 2 threads (s) | × nilearn "
             "| share of read | signed maps, 1 thread: share of read |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['voxel_size_mm']:g} mm | {r['subjects']} × {r['voxels']}, {r['regions']} | {r['nilearn_s']:.2f} "
            f"| {r['relcohort_synchronous_s']:.3f} | **{r['speedup_vs_nilearn_synchronous']:.0f}×** "
            f"| {r['read_synchronous_s']:.3f} | **{r['share_of_read_synchronous']:.0%}** "
            f"| {r['relcohort_threads_s']:.3f} | {r['speedup_vs_nilearn_threads']:.0f}× "
            f"| {r['share_of_read_threads']:.0%} | {r['share_of_read_signed']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=128)
    parser.add_argument("--voxel-sizes", type=float, nargs="+", default=[4.0, 2.0])
    parser.add_argument("--atlas", default="neuromorphometrics")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(size, args.subjects, args.atlas, args.work) for size in args.voxel_sizes]
    save_results(args.out / "region_reduction.json", results)
    print(table(results))


if __name__ == "__main__":
    main()
