"""A repeated experiment's trainings on one Dask worker against two.

    python benchmarks/experiment_workers.py [--participants 80] [--repeats 5] [--epochs 8 20]

An Alzheimer-like synthetic cohort (half patients, 4 mm) is ingested once; the experiment is Böhle et al.'s
four-block CNN under two conditions (z-scored and min–max scaled inputs) on ``--repeats`` participant-grouped,
stratified splits, one member each: 2 × repeats trainings, every one a task of one pool
(``engine.models.experiments.run_experiment``). It runs in a fresh process on a LocalCluster of one worker, then of
two (one thread each), each into an empty folder; the clock starts once the workers have started and imported
the engine's training modules and torch (with what torch's first optimiser imports lazily: seconds, once per
process); the speed-up is the ratio of the wall-clock seconds. A run's ensemble metrics and linear baselines are
a task of the same pool, queued once its members are trained; a row per ``--epochs`` shows how the fixed costs
(workers reading the store, model set-up, metrics) weigh against the trainings. A member that learns nothing is
trained again from a new seed (``collapse_restarts``), so one training may take two or three times as long as the
others: the last one to finish bounds the two workers' time.

``ceiling``: the speed-up two processes can reach on this machine at all, measured in the same sitting: the same
four-block CNN training steps (one thread, the members' input box) in one process alone against two processes at once,
2 × alone ÷ the slower of the two (median of three rounds). Two cores of a virtual machine share caches and
memory bandwidth, so two trainings at once each run slower than one alone.
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

HERE = Path(__file__).parent
CONDITIONS = {"zscore": {}, "minmax": {"input_scaling": "minmax"}}


def cohort_store(work: Path, participants: int) -> Path:
    """The ingested cohort (made once per size)."""
    from engine.data.inputs import Modality, read_participants
    from engine.data.store import ingest
    from engine.data.synth import MODALITY_PATHS, generate_cohort

    folder, store = work / f"ad_{participants}", work / f"ad_{participants}.zarr"
    if not (store / "zarr.json").exists():
        generate_cohort(folder, participants, 4.0, seed=7, patients=0.5, overwrite=True)
        ingest(store, read_participants(folder / "participants.tsv"), folder, [Modality("T1", MODALITY_PATHS["T1"])],
               folder / "mask.nii.gz")
    return store


def experiment(store: Path, out: Path, workers: int, repeats: int, epochs: int) -> float:
    """Wall seconds of the experiment's trainings on a LocalCluster of ``workers``."""
    from cluster import LocalProfile
    from engine.data.store import open_cohort, row_columns
    from engine.layout import ExperimentLayout
    from engine.models.experiments import Recipe, experiment_runs, run_experiment
    from engine.models.splits import SplitSettings, stratified_split
    from engine.models.training import TrainingConfig
    from engine.tasks import Execution

    recipe = TrainingConfig(target="diagnosis", task="classification", positive_class="AD", model="cnn4",
                            modalities=["T1"], epochs=epochs, batch_size=8, learning_rate=1e-3,
                            early_stopping="balanced_accuracy")
    participants = row_columns(open_cohort(store)).reset_index(drop=True)
    split = SplitSettings(fractions=(0.6, 0.2, 0.2))
    splits = [stratified_split(participants, split.model_copy(update={"seed": seed}), ["diagnosis"])
              for seed in range(repeats)]
    conditions = {name: Recipe(recipe.model_copy(update=changes), 1) for name, changes in CONDITIONS.items()}
    runs = experiment_runs(ExperimentLayout(out), conditions, splits)
    with LocalProfile(n_workers=workers).start() as running:
        running.client.run(_warm_up)  # process start-up costs before the clock
        started = time.perf_counter()
        run_experiment(store, runs, Execution(running.client))
        return time.perf_counter() - started


def _warm_up() -> None:
    """A worker's one-time start-up: the engine's training modules imported, and what torch's first optimiser
    imports lazily."""
    import torch

    import engine.models.ensembles  # noqa: F401

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def training_steps(shape: tuple[int, int, int], steps: int = 20) -> float:
    """Seconds of ``steps`` training steps of the four-block CNN on a batch of 8 at ``shape``, one thread."""
    import torch

    from engine.models.networks import FourBlockCNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FourBlockCNN(shape)
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    inputs, labels = torch.randn(8, 1, *shape), torch.randint(0, 2, (8,))

    def step() -> None:
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimiser.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - started


def ceiling(store: Path, rounds: int = 3) -> float:
    """The most two processes speed up these training steps here: 2 × one alone ÷ the slower of two at once."""
    from engine.models.volumes import CohortVolumes

    shape = CohortVolumes(store, ["T1"]).shape
    command = [sys.executable, __file__, "--steps", ",".join(map(str, shape))]

    def seconds(process: subprocess.Popen) -> float:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"the training-steps process failed ({process.returncode})")
        return float(out.strip().splitlines()[-1])

    ratios = []
    for _ in range(rounds):
        alone = seconds(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        pair = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        ratios.append(2 * alone / max(seconds(process) for process in pair))
    return float(sorted(ratios)[len(ratios) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--one", nargs=2, metavar=("STORE", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps:
        print(training_steps(tuple(int(n) for n in args.steps.split(","))))
        return
    if args.one:
        with tempfile.TemporaryDirectory() as scratch:
            seconds = experiment(Path(args.one[0]), Path(scratch), int(args.one[1]), args.repeats, args.epochs[0])
        print(json.dumps({"seconds": seconds}))
        return
    store = cohort_store(args.work, args.participants)
    rows = []
    for epochs in args.epochs:
        seconds = {}
        for workers in (1, 2):
            done = subprocess.run([sys.executable, __file__, "--repeats", str(args.repeats), "--epochs", str(epochs),
                                   "--one", str(store), str(workers)], capture_output=True, text=True, check=True)
            seconds[workers] = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        limit = ceiling(store)
        rows.append({"participants": args.participants, "conditions": len(CONDITIONS), "repeats": args.repeats,
                     "trainings": len(CONDITIONS) * args.repeats, "epochs": epochs, "model": "cnn4",
                     "one_worker_seconds": seconds[1], "two_workers_seconds": seconds[2],
                     "speedup": seconds[1] / seconds[2], "ceiling": limit})
        print(f"{rows[-1]['trainings']} trainings of {epochs} epochs: 1 worker {seconds[1]:.1f} s, 2 workers "
              f"{seconds[2]:.1f} s (speed-up {rows[-1]['speedup']:.2f}×; this machine's ceiling {limit:.2f}×)")
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "experiment_workers.json", rows)


if __name__ == "__main__":
    main()
