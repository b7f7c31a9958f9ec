"""How much a split by scan overstates accuracy when participants have several scans (the leakage Wen et al. 2020
found in many AD CNN studies).

A synthetic cohort with 1–3 sessions per participant (the same head aged over 1–4-year follow-ups) is ingested,
and a ridge regression on the gray-matter maps predicts age at each scan (``engine.models.baselines``). Over ten
split seeds, 80 % of the cohort trains and 20 % is tested, dealt either by participant (``stratified_split`` of
the scans table: all of a participant's scans on one side) or by scan (each scan as if it were a participant, so
a participant's other scans may train the model that predicts them). The table gives the test MAE of each, and
the share of test scans whose participant also had a scan in training.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from record import save_results  # sibling script

from engine.data.inputs import Modality, read_scans, scan_ids
from engine.data.store import ingest, open_cohort
from engine.data.synth import MODALITY_PATHS, generate_cohort
from engine.data.synth.cohort import in_session
from engine.models.baselines import ridge_baseline
from engine.models.splits import SplitSettings, stratified_split

SEEDS = range(10)


def measure(root: Path, store: Path) -> list[dict]:
    scans = read_scans(root, "participants.tsv")
    ingest(store, scans, root, [Modality("GM", in_session(MODALITY_PATHS["GM"]))], root / "mask.nii.gz")
    maps = open_cohort(store).GM.persist()
    age = scans["age"].to_numpy(float)
    as_participants = scans.assign(participant_id=scan_ids(scans)).drop(columns="session_id")
    errors = {"participant": [], "scan": []}
    shared = []
    for seed in SEEDS:
        settings = SplitSettings(fractions=(0.6, 0.2, 0.2), seed=seed)
        for split_by, table in (("participant", scans), ("scan", as_participants)):
            test = stratified_split(table, settings).to_numpy() == "test"
            fit = ridge_baseline(maps, age, ~test)
            errors[split_by].append(float(np.abs(fit.predictions[test] - age[test]).mean()))
            if split_by == "scan":
                trained = set(scans.participant_id[~test])
                shared.append(float(scans.participant_id[test].isin(trained).mean()))
    rows = []
    for split_by, values in errors.items():
        rows.append({"split_by": split_by, "test_mae_mean": float(np.mean(values)),
                     "test_mae_sd": float(np.std(values, ddof=1)), "seeds": len(values),
                     "test_scans_whose_participant_trained": float(np.mean(shared)) if split_by == "scan" else 0.0,
                     "participants": int(scans.participant_id.nunique()), "scans": len(scans)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=150)
    parser.add_argument("--voxel-size", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "cohort"
        generate_cohort(root, args.participants, args.voxel_size, seed=0, max_sessions=3)
        rows = measure(root, Path(scratch) / "images.zarr")
    for row in rows:
        print(f"split by {row['split_by']:<11}: test MAE {row['test_mae_mean']:.2f} ± {row['test_mae_sd']:.2f} years "
              f"({row['seeds']} seeds; {row['participants']} participants, {row['scans']} scans)")
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "split_leakage.json", rows)


if __name__ == "__main__":
    main()
