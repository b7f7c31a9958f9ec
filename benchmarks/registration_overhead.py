"""The register stage against bare ANTs calls, and its speed-up from one worker to two.

    python benchmarks/registration_overhead.py [--participants 6] [--voxel-size 2]

Native scans of the demo cohort (as ``benchmarks/registration.py`` makes them) are registered three ways, each in a
fresh process with one ITK thread per task: (1) bare ANTsPy, per participant the calls the stage makes — SyN of
the T1 to the template, FLAIR co-registered rigidly at 4 mm, T1, FLAIR and GM resampled onto the template grid,
the warp's Jacobian determinant — written with ``ants.image_write``, participants one after another; (2)
``register_cohort`` on a LocalCluster of one worker (the stage: reading and checking the scans, the brain mask,
QC measures, atomic folders, the QC table); (3) the same on two workers. The overhead is (2) / (1) − 1 and the
speed-up (2) / (3), each from wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import save_results  # sibling script
from registration import cohort  # sibling script

HERE = Path(__file__).parent
MODALITIES = ("T1", "FLAIR", "GM")


def bare_ants(folder: Path, voxel_size: float, scratch: Path) -> float:
    """Wall seconds of the stage's ANTs calls, participant after participant, on the stage's template."""
    import os

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    import ants

    from engine.data.inputs import Modality, read_participants, resolve_files
    from engine.data.registration import COREGISTRATION_MM, RegistrationSettings, write_template
    from engine.data.synth import MODALITY_PATHS
    from engine.layout import RegisteredLayout

    files, _ = resolve_files(folder, read_participants(folder / "participants.tsv"),
                             [Modality(name, MODALITY_PATHS[name]) for name in MODALITIES])
    registered = RegisteredLayout(scratch / "template")
    write_template(RegistrationSettings(transform="syn", voxel_size=voxel_size), registered)
    template = ants.image_read(str(registered.template))
    started = time.perf_counter()
    for pid, paths in sorted(files.items()):
        t1, flair, gm = (ants.image_read(str(paths[name])) for name in MODALITIES)
        syn = ants.registration(fixed=template, moving=t1, type_of_transform="SyN", outprefix=f"{scratch}/{pid}_")
        fixed, coarse = (ants.resample_image(image, (COREGISTRATION_MM,) * 3, False, 0) for image in (t1, flair))
        rigid = ants.registration(fixed=fixed, moving=coarse, type_of_transform="Rigid",
                                  outprefix=f"{scratch}/{pid}_flair_")
        outputs = {
            "T1": ants.apply_transforms(template, t1, syn["fwdtransforms"]),
            "FLAIR": ants.apply_transforms(template, flair, [*syn["fwdtransforms"], *rigid["fwdtransforms"]]),
            "GM": ants.apply_transforms(template, gm, syn["fwdtransforms"]),
            "jacobian": ants.create_jacobian_determinant_image(
                template, next(path for path in syn["fwdtransforms"] if path.endswith("Warp.nii.gz"))),
        }
        for name, image in outputs.items():
            ants.image_write(image, str(scratch / f"{pid}_{name}.nii.gz"))
    return time.perf_counter() - started


def stage(folder: Path, voxel_size: float, scratch: Path, workers: int) -> float:
    """Wall seconds of ``register_cohort`` on a LocalCluster of ``workers`` (template written beforehand)."""
    from cluster import LocalProfile
    from engine.data.inputs import Modality, read_participants, resolve_files
    from engine.data.registration import RegistrationSettings, register_cohort, write_template
    from engine.data.synth import MODALITY_PATHS
    from engine.layout import RegisteredLayout
    from engine.tasks import Execution

    modalities = [Modality("T1", MODALITY_PATHS["T1"]), Modality("FLAIR", MODALITY_PATHS["FLAIR"], space="own"),
                  Modality("GM", MODALITY_PATHS["GM"], kind="probability", modulate=True)]
    files, _ = resolve_files(folder, read_participants(folder / "participants.tsv"), modalities)
    settings = RegistrationSettings(transform="syn", voxel_size=voxel_size, min_correlation=0)
    registered = RegisteredLayout(scratch / "registered")
    write_template(settings, registered)
    with LocalProfile(n_workers=workers).start() as running:
        running.client.run(lambda: __import__("ants"))  # workers start and import ANTs before the clock
        started = time.perf_counter()
        register_cohort(registered, files, modalities, settings, execution=Execution(running.client))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--voxel-size", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        folder, how = Path(args.one[0]), args.one[1]
        with tempfile.TemporaryDirectory() as scratch:
            seconds = (bare_ants(folder, args.voxel_size, Path(scratch)) if how == "bare"
                       else stage(folder, args.voxel_size, Path(scratch), int(how)))
        print(json.dumps({"how": how, "seconds": seconds}))
        return
    folder = cohort(args.work, args.participants)
    seconds = {}
    for how in ("bare", "1", "2"):
        done = subprocess.run([sys.executable, __file__, "--voxel-size", str(args.voxel_size), "--one", str(folder),
                               how], capture_output=True, text=True, check=True)
        seconds[how] = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    row = {"participants": args.participants, "transform": "syn", "voxel_size": args.voxel_size,
           "bare_ants_seconds": seconds["bare"], "stage_1_worker_seconds": seconds["1"],
           "stage_2_workers_seconds": seconds["2"], "overhead": seconds["1"] / seconds["bare"] - 1,
           "speedup_1_to_2_workers": seconds["1"] / seconds["2"]}
    print(f"bare ANTs {row['bare_ants_seconds']:.1f} s, the stage on 1 worker {row['stage_1_worker_seconds']:.1f} s "
          f"(overhead {100 * row['overhead']:+.1f} %), on 2 workers {row['stage_2_workers_seconds']:.1f} s "
          f"(speed-up {row['speedup_1_to_2_workers']:.2f}×)")
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "registration_overhead.json", [row])


if __name__ == "__main__":
    main()
