"""How strong, and how far from trivial, the age signal of a synthetic cohort is.

    python benchmarks/demo_signal.py [WORKSPACE]      (default: workspace/demo, after `make demo`)

Reports the correlation with age of each planted feature, measured from the files the way a
user would (aseg.stats, WMH masks, GM maps in atlas regions), and the 5-fold cross-validated
MAE of a ridge regression on the stored voxels of each modality against the predict-the-mean
baseline: a linear floor for what a brain-age CNN should beat, and a check that age is not
trivially separable. Writes ``benchmarks/results/demo_signal.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict

from engine.data.store import open_cohort


def aseg_volume(path: Path, structures: tuple[str, ...]) -> float:
    volume = 0.0
    for line in path.read_text().splitlines():
        fields = line.split()
        if line and not line.startswith("#") and fields[4] in structures:
            volume += float(fields[3])
    return volume


def main(workspace: Path) -> dict:
    ds = open_cohort(workspace / "images.zarr")
    cohort = workspace / "demo_cohort"
    age = ds.age.values.astype(float)
    pids = list(ds.subject.values)
    aseg = [cohort / f"derivatives/freesurfer/{pid}/stats/aseg.stats" for pid in pids]
    features = {
        "hippocampus volume (aseg)": [aseg_volume(p, ("Left-Hippocampus", "Right-Hippocampus")) for p in aseg],
        "amygdala volume (aseg)": [aseg_volume(p, ("Left-Amygdala", "Right-Amygdala")) for p in aseg],
        "thalamus volume (aseg)": [aseg_volume(p, ("Left-Thalamus", "Right-Thalamus")) for p in aseg],
        "lateral ventricles (aseg)": [aseg_volume(p, ("Left-Lateral-Ventricle", "Right-Lateral-Ventricle"))
                                      for p in aseg],
        "total GM (GM maps)": ds.GM.sum("voxel").values,
        "WMH voxels (masks)": ds.WMH.astype(int).sum("voxel").values,
        "mean FA where cohort FA > 0.35": ds.FA.where(ds.FA.mean("subject") > 0.35).mean("voxel").values,
    }
    correlations = {name: float(stats.spearmanr(age, values).statistic) for name, values in features.items()}

    folds = KFold(5, shuffle=True, random_state=0)
    prediction = {}
    for modality in ("GM", "T1", "FLAIR", "FA"):
        x = ds[modality].values.astype(np.float64)
        x = (x - x.mean(0)) / (x.std(0) + 1e-9)
        predicted = cross_val_predict(RidgeCV(alphas=np.logspace(0, 6, 13)), x, age, cv=folds)
        prediction[modality] = {"mae": float(np.abs(predicted - age).mean()),
                                "r": float(np.corrcoef(predicted, age)[0, 1])}
    result = {
        "subjects": len(age), "age_sd": float(age.std()),
        "mean_baseline_mae": float(np.abs(age - age.mean()).mean()),
        "spearman_with_age": correlations, "ridge_voxels_cv": prediction,
    }
    print(f"{len(age)} subjects, age SD {result['age_sd']:.1f} y, predict-the-mean MAE "
          f"{result['mean_baseline_mae']:.2f} y\n")
    print("| planted feature | Spearman ρ with age |\n|---|---|")
    for name, rho in correlations.items():
        print(f"| {name} | {rho:+.2f} |")
    print("\n| ridge on stored voxels (5-fold CV) | MAE (y) | r |\n|---|---|---|")
    for modality, scores in prediction.items():
        print(f"| {modality} | {scores['mae']:.2f} | {scores['r']:.2f} |")
    out = Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_signal.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "workspace" / "demo")
