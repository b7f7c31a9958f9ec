"""Ingest throughput: relcohort's Dask ingest against a bare nibabel load loop on the same files.

    python benchmarks/ingest_throughput.py [--subjects 128] [--voxel-sizes 4 2] [--out benchmarks/results]

For each voxel size a demo cohort is generated once (cached under benchmarks/work/), the files
are read once to warm the page cache, then timed:
  * nibabel loop: one process loads every image (``np.asanyarray(nib.load(f).dataobj)``);
  * relcohort ingest into a fresh store on the local profile's cluster, 1 worker and 2 workers
    (hashing, header checks, masking, Zarr writes; cluster start-up excluded);
  * relcohort re-ingest of the unchanged cohort (hash and skip).
Results go to ``<out>/ingest.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from record import save_results  # sibling script

from cluster import LocalProfile
from engine.data.inputs import Modality, read_participants
from engine.data.store import ingest
from engine.data.synth import MODALITY_PATHS, generate_cohort
from engine.tasks import Execution

MODALITIES = [Modality(name, template, "uint8" if name == "WMH" else "float32")
              for name, template in MODALITY_PATHS.items()]


def cohort_files(cohort: Path) -> list[Path]:
    participants = read_participants(cohort / "participants.tsv")
    return [cohort / m.template.format(participant_id=pid) for pid in participants.participant_id for m in MODALITIES]


def nibabel_loop(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        np.asanyarray(nib.load(path).dataobj)
    return time.perf_counter() - started


def relcohort_ingest(cohort: Path, store: Path, client) -> float:
    participants = read_participants(cohort / "participants.tsv")
    started = time.perf_counter()
    ingest(store, participants, cohort, MODALITIES, cohort / "mask.nii.gz", execution=Execution(client))
    return time.perf_counter() - started


def ensure_cohort(voxel_size: float, subjects: int, work: Path) -> Path:
    """The benchmark cohort (seed 1) under ``work``, generated on first use."""
    cohort = work / f"cohort_{subjects}_{voxel_size:g}mm"
    if not (cohort / "participants.tsv").is_file():
        with LocalProfile(n_workers=2).start() as cluster:
            generate_cohort(cohort, subjects, voxel_size, seed=1, execution=Execution(cluster.client), overwrite=True)
    return cohort


def measure(voxel_size: float, subjects: int, work: Path) -> dict:
    cohort = ensure_cohort(voxel_size, subjects, work)
    files = cohort_files(cohort)
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    nibabel_loop(files)  # warm the page cache
    baseline = min(nibabel_loop(files) for _ in range(3))
    result = {"voxel_size_mm": voxel_size, "subjects": subjects, "files": len(files), "file_megabytes": megabytes,
              "nibabel_loop_s": baseline, "nibabel_subjects_per_s": subjects / baseline}
    for workers in (1, 2):
        with LocalProfile(n_workers=workers, threads_per_worker=1).start() as cluster:
            times = []
            for _ in range(3):
                store = work / "images.zarr"
                shutil.rmtree(store, ignore_errors=True)
                times.append(relcohort_ingest(cohort, store, cluster.client))
            result[f"relcohort_{workers}w_s"] = min(times)
            result[f"relcohort_{workers}w_subjects_per_s"] = subjects / min(times)
            result[f"relcohort_{workers}w_rerun_s"] = relcohort_ingest(cohort, store, cluster.client)
        shutil.rmtree(work / "images.zarr", ignore_errors=True)
    result["ratio_per_worker"] = result["relcohort_1w_subjects_per_s"] / result["nibabel_subjects_per_s"]
    result["ratio_2w_per_worker"] = result["relcohort_2w_subjects_per_s"] / 2 / result["nibabel_subjects_per_s"]
    return result


def table(results: list[dict]) -> str:
    lines = ["| grid | subjects × files | nibabel loop (subj/s) | relcohort 1 worker (subj/s) | ratio / worker "
             "| relcohort 2 workers (subj/s) | ratio / worker | unchanged re-run (s, 2 workers) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['voxel_size_mm']:g} mm | {r['subjects']} × {r['files'] // r['subjects']} "
            f"| {r['nibabel_subjects_per_s']:.1f} | {r['relcohort_1w_subjects_per_s']:.1f} "
            f"| **{r['ratio_per_worker']:.2f}** | {r['relcohort_2w_subjects_per_s']:.1f} "
            f"| {r['ratio_2w_per_worker']:.2f} | {r['relcohort_2w_rerun_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=128)
    parser.add_argument("--voxel-sizes", type=float, nargs="+", default=[4.0, 2.0])
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(size, args.subjects, args.work) for size in args.voxel_sizes]
    save_results(args.out / "ingest.json", results)
    print(table(results))


if __name__ == "__main__":
    main()
