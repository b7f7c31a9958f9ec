"""The four classification studies' catalogs run end to end, each from an empty workspace, and what they found.

    python benchmarks/classification_studies.py [--only ad ms robustness registration] [--keep]

Runs ``relcohort run docs/catalog-<study>.yaml`` for the Alzheimer-like classifier (ad), multiple sclerosis with
pre-training on the ad workspace's models (ms), robustness over retrainings (robustness) and the registration study
(registration), in that order, each workspace deleted first (``--keep``: reuse what is there), and records each
run's wall-clock seconds with its results: test metrics of the ensembles and baselines, the planted Alzheimer
regions' ranks in the gain tables, the experiments' conditions and paired tests, lesion relevance and the
robustness table. With ``--only``, those studies' rows are replaced and the others kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from record import save_results  # sibling script

from engine.models.ensembles import BASELINES, ENSEMBLE

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("ad", "ms", "robustness", "registration")
#: Neuromorphometrics regions (hemispheres merged) of the atrophy planted in the Alzheimer-like patients.
PLANTED_AD_REGIONS = ("Hippocampus", "Amygdala", "Ent_entorhinal_area", "ITG_inferior_temporal_gyrus",
                      "MTG_middle_temporal_gyrus", "TMP_temporal_pole")


def test_metrics(ws, ensemble: str | None = None) -> dict:
    """Test-split metrics of the ensemble and every baseline."""
    metrics = ws.for_ensemble(ensemble).metrics
    test = metrics[metrics["split"] == "test"].set_index("member")
    columns = ["balanced_accuracy", "roc_auc", "sensitivity", "specificity"]
    return {member: {name: round(float(row[name]), 4) for name in columns}
            for member, row in test[columns].iterrows() if member in (ENSEMBLE, *BASELINES)}


def experiment_record(ws, name: str) -> dict:
    """Mean, SD and range over the repeats of each condition's ensemble and baselines, and the paired tests."""
    experiment = ws.experiments[name]
    results = experiment.results[experiment.results["metric"].isin(["balanced_accuracy", "roc_auc"])
                                 & experiment.results["member"].isin([ENSEMBLE, *BASELINES])]
    by_condition = results.groupby(["condition", "member", "metric"], sort=False)["value"].agg(
        ["mean", "std", "min", "max"])
    comparisons = experiment.comparisons[["first", "second", "median_difference", "rank_biserial", "p", "p_holm"]]
    return {"metric": experiment.summary["metric"], "repeats": experiment.summary["repeats"],
            "by_condition": {f"{condition}.{member}.{metric}": {key: round(float(value), 4)
                                                                for key, value in row.items()}
                             for (condition, member, metric), row in by_condition.iterrows()},
            "comparisons": comparisons.round(4).to_dict("records")}


def gain_ranks(ws, analysis: str, group: str) -> dict:
    """The ranks (1 = largest gain) of the planted regions in a gain table, and its top 5."""
    table = ws.associations[analysis].regions
    ranked = table[table["group"] == group].sort_values("gain", ascending=False).reset_index(drop=True)
    ranks = {region: int(ranked.index[ranked["region"] == region][0]) + 1 for region in PLANTED_AD_REGIONS
             if (ranked["region"] == region).any()}
    return {"regions": len(ranked), "top5": list(ranked["region"].head(5)), "planted_ranks": ranks}


def findings(study: str) -> dict:
    from engine import open_workspace

    ws = open_workspace(REPO / "workspace" / study)
    if study == "ad":
        return {"test": test_metrics(ws), **{name: gain_ranks(ws, name, "AD") for name in ws.associations}}
    if study == "ms":
        record = {f"test_{name}": test_metrics(ws, name) for name in ("flair", "filled")}
        for name in ("flair", "filled"):
            lesions = ws.for_ensemble(name).mask_comparison("lesion")
            record[f"lesion_relevance_{name}"] = lesions.round(4).to_dict("records")
            table = ws.associations[f"tracts_{name}"].regions
            record[f"tracts_{name}_top5"] = list(table[table["group"] == "MS"].sort_values(
                "gain", ascending=False)["region"].head(5))
        return {**record, "transfer": experiment_record(ws, "transfer")}
    if study == "robustness":
        members = ws.metrics[(ws.metrics["split"] == "test") & ~ws.metrics["member"].isin([ENSEMBLE, *BASELINES])]
        return {"members_balanced_accuracy": [round(float(value), 4) for value in members["balanced_accuracy"]],
                "test": test_metrics(ws), "robustness": ws.robustness.round(4).to_dict("records")}
    return {"registration": experiment_record(ws, "registration")}


#: What the papers reported, for the table (Eitel thesis; Böhle et al. 2019; Eitel et al. 2019; Eitel & Ritter 2019).
PAPERS = {
    "ad": "accuracy 87.96 % (969 ADNI scans); gain largest in temporal lobe, hippocampus, amygdala",
    "ms": "ROC AUC 85.46 % scratch, 96.08 % pre-trained, 90.92 % lesions filled; SVM raw FLAIR 66.92 %, lesion "
          "load 94.62 %",
    "robustness": "balanced accuracy 83.06–90.12 %; top-10 overlap (sum/density/gain) LRP 96.8/88.4/78.0 %, guided "
                  "backprop 96.6/80.6/68.6 %, gradient×input 72.6/69.0/46.4 %",
    "registration": "balanced accuracy / ROC AUC: none 76.2 / 85.0 %, linear 82.6 / 90.4 %, non-linear 83.3 / 91.0 %",
}


def _mean(record: dict, key: str) -> str:
    values = record["by_condition"].get(key)
    return "–" if values is None else f"{100 * values['mean']:.1f} ± {100 * values['std']:.1f}"


def headline(row: dict) -> str:
    """The row's main findings in one cell."""
    study = row["study"]
    if study == "ad":
        ensemble, svm = row["test"]["ensemble"], row["test"]["linear_svm_voxels"]
        methods = {"gain_lrp_beta0": "LRP β 0", "gain_lrp_beta0_5": "LRP β 0.5", "gain_lrp_beta1": "LRP β 1",
                   "gain_guided_backprop": "guided backprop"}
        sweep = "; ".join(f"{label}: " + ", ".join(f"{region.split('_')[0]} {rank}"
                                                   for region, rank in row[name]["planted_ranks"].items())
                          for name, label in methods.items() if name in row)
        return (f"ensemble balanced accuracy {100 * ensemble['balanced_accuracy']:.1f} %, AUC "
                f"{100 * ensemble['roc_auc']:.1f} %; linear SVM {100 * svm['balanced_accuracy']:.1f} %, "
                f"{100 * svm['roc_auc']:.1f} %; gain ranks of the planted regions (of "
                f"{row['gain_lrp_beta1']['regions']}): {sweep}")
    if study == "ms":
        transfer = row["transfer"]
        tests = "; ".join(f"{c['first']} → {c['second']} p {c['p']:.3f} (Holm {c['p_holm']:.3f})"
                          for c in transfer["comparisons"])
        return (f"ROC AUC over {transfer['repeats']} splits (%): scratch {_mean(transfer, 'scratch.ensemble.roc_auc')},"
                f" pre-trained {_mean(transfer, 'pretrained.ensemble.roc_auc')}, filled "
                f"{_mean(transfer, 'filled.ensemble.roc_auc')}; SVM raw FLAIR "
                f"{_mean(transfer, 'scratch.linear_svm_voxels.roc_auc')}, lesion load "
                f"{_mean(transfer, 'scratch.linear_svm_features.roc_auc')}; {tests}")
    if study == "robustness":
        accuracies = row["members_balanced_accuracy"]
        overlaps = "; ".join(f"{r['attribution']} " + "/".join(f"{100 * r[f'top_k_overlap_{ranking}']:.0f}"
                                                                for ranking in ("sum", "density", "gain"))
                             for r in row["robustness"] if r["group"] == "TP")
        return (f"members' balanced accuracy {100 * min(accuracies):.1f}–{100 * max(accuracies):.1f} %; TP top-10 "
                f"overlap sum/density/gain (%): {overlaps}")
    record = row["registration"]
    return "; ".join(f"{name} {_mean(record, f'{name}.ensemble.balanced_accuracy')} / "
                     f"{_mean(record, f'{name}.ensemble.roc_auc')}" for name in ("none", "affine", "syn")) + \
        " (balanced accuracy / ROC AUC, %)"


def table(rows: list[dict]) -> str:
    """The benchmarks page's table: each study's minutes, findings and the paper's numbers."""
    lines = ["| study | catalog | minutes | here | the paper |", "|---|---|---|---|---|"]
    lines += [f"| {row['study']} | `{row['catalog']}` | {row['wall_seconds'] / 60:.1f} | {headline(row)} | "
              f"{PAPERS[row['study']]} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=STUDIES, default=list(STUDIES))
    parser.add_argument("--keep", action="store_true", help="reuse the workspaces as they are")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    relcohort = Path(sys.executable).parent / "relcohort"
    rows = []
    for study in args.only:
        workspace = REPO / "workspace" / study
        if workspace.exists() and not args.keep:
            shutil.rmtree(workspace)
        started = time.perf_counter()
        subprocess.run([str(relcohort), "run", str(REPO / "docs" / f"catalog-{study}.yaml")], check=True)
        seconds = time.perf_counter() - started
        rows.append({"study": study, "catalog": f"docs/catalog-{study}.yaml", "wall_seconds": round(seconds, 1),
                     **findings(study)})
        print(f"{study}: {seconds / 60:.1f} min; {headline(rows[-1])}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "classification_studies.json"
    kept = [row for row in json.loads(path.read_text())["results"] if row["study"] not in args.only] \
        if path.is_file() else []  # the studies not run this time, as recorded before
    save_results(path, sorted([*kept, *rows], key=lambda row: STUDIES.index(row["study"])))


if __name__ == "__main__":
    main()
