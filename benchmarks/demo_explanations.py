"""What the demo run's models and explanations achieved: brain-age accuracy and ground-truth scores.

    make demo && .venv/bin/python benchmarks/demo_explanations.py [--workspace workspace/demo]

Reads the workspace that ``relcohort run catalog.yaml`` wrote, for each of its ensembles (the
demo's ``t1`` and ``flair``): ``models/metrics.parquet`` (test MAE of each member and the
ensemble against predicting the training mean and ridge) and ``validation/scores.parquet`` /
``sanity.parquet`` / ``robustness.parquet`` (each method's ensemble-mean maps against the planted
focal regions, the parameter randomisation test, and agreement across members per age band).
Writes ``benchmarks/results/demo_explanations.json`` and prints the Markdown tables of the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from record import save_results  # sibling script

from engine.layout import Layout


def tables(layout: Layout) -> tuple[dict, str]:
    metrics = pd.read_parquet(layout.models.metrics)
    test = metrics[metrics["split"] == "test"].set_index("member")
    scores = pd.read_parquet(layout.scores)
    ensemble = scores[scores["member"] == "ensemble"].pivot(index="attribution", columns="scored")
    robustness = pd.read_parquet(layout.robustness)
    sanity = pd.read_parquet(layout.sanity).set_index("attribution")
    records = json.loads(json.dumps({"ensemble": layout.ensemble, "test": test.to_dict(orient="index"),
                                     "scores": scores.to_dict(orient="records"),
                                     "sanity": sanity.reset_index().to_dict(orient="records"),
                                     "robustness": robustness.to_dict(orient="records")}, default=float))

    lines = ["| test set | N | MAE (y) | r | R² |", "|---|---|---|---|---|"]
    for who, row in test.iterrows():
        lines.append(f"| {who} | {row['n']:.0f} | {row['mae']:.2f} | {row['r']:.2f} | {row['r2']:.2f} |")
    chance = scores.iloc[0]
    lines += ["", "| method | ROC-AUC R | ROC-AUC \\|R\\| "
              f"| top-10 precision R (chance {chance.top_k_precision_uniform:.3f}) "
              f"| top-10 precision \\|R\\| | mass accuracy (uniform {chance.mass_accuracy_uniform:.3f}) "
              "| randomisation ρ R / \\|R\\| |", "|---|---|---|---|---|---|---|"]
    for method in ensemble.index:
        row = ensemble.loc[method]
        randomised = (f"{sanity.loc[method, 'spearman']:.2f} / {sanity.loc[method, 'spearman_abs']:.2f}"
                      if method in sanity.index else "–")
        lines.append(
            f"| {method} | {row[('roc_auc', 'R')]:.2f} | {row[('roc_auc', '|R|')]:.2f} "
            f"| {row[('top_k_precision', 'R')]:.2f} | {row[('top_k_precision', '|R|')]:.2f} "
            f"| {row[('mass_accuracy', 'R')]:.3f} | {randomised} |")
    lines += ["", f"| method | group (gain: {robustness['gain_definition'].iloc[0]}) | n | member L2 distance "
              "| top-10 overlap sum / density / gain |", "|---|---|---|---|---|"]
    for _, agreement in robustness.iterrows():
        lines.append(f"| {agreement['method']} | {agreement['group']} | {agreement['n']} "
                     f"| {agreement['l2_distance']:.1f} | {agreement['top_k_overlap_sum']:.1f} / "
                     f"{agreement['top_k_overlap_density']:.1f} / {agreement['top_k_overlap_gain']:.1f} |")
    return records, "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(__file__).parents[1] / "workspace" / "demo")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    layout = Layout(args.workspace)
    records = []
    for name in layout.ensemble_names():
        record, table = tables(layout.for_ensemble(name))
        records.append(record)
        print(f"\n### ensemble {name or '(unnamed)'}\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(args.out / "demo_explanations.json", records)


if __name__ == "__main__":
    main()
