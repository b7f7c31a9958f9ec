"""Registration cost: seconds and peak memory of one participant's registration, per transform and grid.

    python benchmarks/registration.py [--participants 4] [--voxel-sizes 4 2] [--out benchmarks/results]

Native scans of the demo cohort (simulated at 2 mm, written at 1.5 mm in random head poses, FLAIR
in a pose of its own; cached under benchmarks/work/) are registered with ``register_participant``
in a fresh process per (transform, voxel size) — T1 as the reference, FLAIR co-registered rigidly,
GM modulated — one ITK thread, as the stage runs them. Reported: median seconds per participant
and the largest peak RSS of the processes. Results go to ``<out>/registration.json`` and a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
TRANSFORMS = ("none", "affine", "syn")


def cohort(work: Path, participants: int) -> Path:
    from engine.data.synth import generate_cohort

    folder = work / f"native_{participants}"
    if not (folder / "participants.tsv").is_file():
        generate_cohort(folder, participants, voxel_size=2.0, seed=11, overwrite=True, native_voxel_size=1.5)
    return folder


def one_run(folder: Path, transform: str, voxel_size: float, registered: Path) -> dict:
    """In this process: register every participant once; seconds each and the peak RSS."""
    from engine.data.inputs import Modality, read_participants, resolve_files
    from engine.data.registration import RegistrationSettings, register_cohort
    from engine.data.synth import MODALITY_PATHS
    from engine.layout import RegisteredLayout

    modalities = [Modality("T1", MODALITY_PATHS["T1"]), Modality("FLAIR", MODALITY_PATHS["FLAIR"], space="own"),
                  Modality("GM", MODALITY_PATHS["GM"], kind="probability", modulate=True)]
    files, _ = resolve_files(folder, read_participants(folder / "participants.tsv"), modalities)
    settings = RegistrationSettings(transform=transform, voxel_size=voxel_size, min_correlation=0)
    started = time.perf_counter()
    result = register_cohort(RegisteredLayout(registered), files, modalities, settings)
    return {"transform": transform, "voxel_size": voxel_size, "participants": len(files),
            "seconds_each": sorted(result.qc["seconds"].tolist()), "wall_seconds": time.perf_counter() - started,
            "correlation_median": float(result.qc["correlation"].median()),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--voxel-sizes", type=float, nargs="+", default=[4.0, 2.0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--one", nargs=3, metavar=("FOLDER", "TRANSFORM", "VOXEL_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        folder, transform, voxel_size = Path(args.one[0]), args.one[1], float(args.one[2])
        registered = args.work / f"registered_{transform}_{voxel_size:g}"
        subprocess.run(["rm", "-rf", str(registered)], check=True)
        print(json.dumps(one_run(folder, transform, voxel_size, registered)))
        return
    folder = cohort(args.work, args.participants)
    rows = []
    for voxel_size in args.voxel_sizes:
        for transform in TRANSFORMS:
            done = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--one", str(folder), transform,
                                   str(voxel_size)], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "native_voxel_size": 1.5, "rows": rows}
    (args.out / "registration.json").write_text(json.dumps(record, indent=2))
    print("| transform | grid (mm) | s per participant (median) | peak RSS (MiB) | correlation with template |")
    print("|---|---|---|---|---|")
    for row in rows:
        seconds = row["seconds_each"][len(row["seconds_each"]) // 2]
        print(f"| {row['transform']} | {row['voxel_size']:g} | {seconds:.1f} | {row['peak_rss_mib']:.0f} | "
              f"{row['correlation_median']:.2f} |")


if __name__ == "__main__":
    main()
