"""How many participants the brain-age CNN needs: the demo's T1 recipe at several cohort sizes.

    .venv/bin/python benchmarks/sample_size.py [--subjects 480 960] [--members 2] [--modality T1]
                                               [--input-scaling max] [--train patience=40]
                                               [--work benchmarks/work]

For each N, a catalog with the demo's cohort (seed, 4 mm) and the demo's ``t1`` ensemble recipe
(``catalog.yaml``'s train section with its ``t1`` changes, ``members`` members) but N participants
and only one modality (``--modality``: T1, or another of the demo's, e.g. GM, the gray-matter
maps, with the same recipe; ``--input-scaling`` replaces the recipe's, ``--train KEY=VALUE`` any other
of its settings, e.g. ``patience=40``: no early stop before the last epoch) is written to
``<work>/sample_size_<modality>[_<scaling>]_<N>/catalog.yaml`` and run with ``relcohort run``
(synth → ingest → train; nothing else). The 60 / 20 / 20 % split is stratified as in the demo.
Reads each run's ``metrics.parquet``: test MAE and r of every member, the ensemble, ridge regression
on the same scaled inputs (``ridge_voxels``) and predicting the training mean.
Writes ``benchmarks/results/sample_size.json`` (T1; else ``sample_size_<modality>[_<scaling>][_<key>-<value>…].json``)
and prints the Markdown table of the README.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from record import save_results  # sibling script

ROOT = Path(__file__).resolve().parent.parent


def catalog_for(subjects: int, members: int, modality: str, scaling: str | None, changes: dict,
                folder: Path) -> Path:
    """The demo catalog cut down to its T1 ensemble's recipe (with ``changes``) on ``modality`` and ``subjects``
    participants."""
    demo = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    train = {key: value for key, value in demo["train"].items() if key != "ensembles"}
    if modality not in demo["modalities"]:
        raise SystemExit(f"--modality {modality}: the demo catalog has {', '.join(demo['modalities'])}")
    train.update(demo["train"]["ensembles"]["t1"], members=members, modalities=[modality])
    if scaling:
        train["input_scaling"] = scaling
    train.update(changes)
    catalog = {"workspace": "workspace",
               "cohort": {"demo": {**demo["cohort"]["demo"], "subjects": subjects}},
               "modalities": {modality: demo["modalities"][modality]},
               "train": train, "ingest": demo["ingest"], "cluster": demo["cluster"]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def measure(subjects: int, members: int, modality: str, scaling: str | None, changes: dict, work: Path) -> dict:
    name = "_".join([modality, *([scaling] if scaling else []), str(subjects)])
    catalog = catalog_for(subjects, members, modality, scaling, changes, work / f"sample_size_{name}")
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "relcohort"), "run", str(catalog)], check=True)
    metrics = pd.read_parquet(catalog.parent / "workspace" / "models" / "metrics.parquet")
    test = metrics[metrics["split"] == "test"].set_index("member")
    scaling = yaml.safe_load(catalog.read_text())["train"]["input_scaling"]
    return {"modality": modality, "input_scaling": scaling, "train_changes": changes, "subjects": subjects,
            "training": int(metrics.loc[metrics["split"] == "train", "n"].iloc[0]),
            "test_subjects": int(test["n"].iloc[0]), "members": members,
            "test": {who: {"mae": float(row["mae"]), "r": float(row["r"])} for who, row in test.iterrows()},
            "seconds": time.perf_counter() - started}


def table(results: list[dict]) -> str:
    lines = ["| N (training) | members, test MAE (y) | ensemble | ridge on the same inputs | mean-age baseline |",
             "|---|---|---|---|---|"]
    for r in results:
        test = r["test"]
        members = ", ".join(f"{test[str(m)]['mae']:.2f}" for m in range(r["members"]))
        lines.append(f"| {r['subjects']} ({r['training']}) | {members} | **{test['ensemble']['mae']:.2f}** "
                     f"| {test['ridge_voxels']['mae']:.2f} | {test['predict_train_mean']['mae']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[480, 960])
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--modality", default="T1", help="the demo modality the CNN and ridge see: T1, FLAIR, GM, FA")
    parser.add_argument("--input-scaling", help="instead of the recipe's: zscore, zscore_brain, minmax, max")
    parser.add_argument("--train", nargs="+", default=[], metavar="KEY=VALUE",
                        help="other changes to the recipe's train settings (values in YAML), e.g. patience=40")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    changes = {}
    for change in args.train:
        key, separator, value = change.partition("=")
        if not separator:
            parser.error(f"--train {change!r}: expected KEY=VALUE")
        changes[key] = yaml.safe_load(value)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(subjects, args.members, args.modality, args.input_scaling, changes, args.work)
               for subjects in args.subjects]
    variant = "_".join([args.modality.lower(), *([args.input_scaling] if args.input_scaling else []),
                        *(f"{key}-{value}" for key, value in changes.items())])
    name = "sample_size.json" if variant == "t1" else f"sample_size_{variant}.json"
    save_results(args.out / name, results)
    print(f"{variant}:\n{table(results)}")


if __name__ == "__main__":
    main()
