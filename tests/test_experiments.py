"""Repeated experiments: conditions × participant-grouped repeats in one pool, a tidy result table, paired
Wilcoxon tests against scipy, resumable, and conditions that name unknown settings refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from engine.analysis.stats import paired_wilcoxon
from engine.models.experiments import compare_conditions
from engine.outputs.report import build_report
from tests.helpers import cli, write_catalog

EXPERIMENT = {"name": "scaling", "repeats": 3, "conditions": {"zscore": {}, "minmax": {"input_scaling": "minmax"},
                                                              "pif": {"model": "mrinet_pif"}}}
TRAIN = {"target": "age", "modalities": ["T1"], "members": 1, "epochs": 1, "batch_size": 4,
         "split": {"fractions": [0.5, 0.25, 0.25], "stratify": ["age", "sex"], "seed": 0}}


@pytest.mark.slow
def test_an_experiment_trains_every_condition_on_every_repeat_and_tests_the_pairs(tiny_cohort, tmp_path):
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"),
                            cohort={"directory": str(tiny_cohort), "mask": "mask.nii.gz"}, train=TRAIN,
                            features=None, explain=None, associate=None, report=None, experiments=[EXPERIMENT],
                            cluster={"profile": "local", "n_workers": 2})
    result = cli("run", catalog)
    assert result.exit_code == 0, result.stderr + result.stdout
    root = tmp_path / "ws/experiments/scaling"
    results = pd.read_parquet(root / "results.parquet")
    ensemble = results[(results.member == "ensemble") & (results.metric == "mae")]
    assert sorted(zip(ensemble.condition, ensemble.repeat, strict=True)) == sorted(
        (condition, repeat) for condition in EXPERIMENT["conditions"] for repeat in range(3))
    tests = {path.name: pd.read_csv(path / "split.tsv", sep="\t").set_index("participant_id")["split"]
             for path in sorted((root / "zscore").iterdir())}
    assert len({tuple(split.sort_index()) for split in tests.values()}) == 3  # a new split per repeat
    for repeat in range(3):  # every condition of a repeat on the same split
        splits = [pd.read_csv(root / condition / f"repeat_{repeat}/split.tsv", sep="\t") for condition in
                  EXPERIMENT["conditions"]]
        assert all(split.equals(splits[0]) for split in splits)
    comparisons = pd.read_parquet(root / "comparisons.parquet")
    assert len(comparisons) == 3
    pivot = ensemble.pivot(index="repeat", columns="condition", values="value")
    for _, row in comparisons.iterrows():
        reference = stats.wilcoxon(pivot[row["second"]], pivot[row["first"]])
        assert row["p"] == pytest.approx(reference.pvalue) and row["statistic"] == pytest.approx(reference.statistic)
    cards = {path: path.stat().st_mtime_ns for path in root.rglob("member_*.json")}
    assert len(cards) == 9
    again = cli("run", catalog)
    assert again.exit_code == 0, again.stderr
    assert {path: path.stat().st_mtime_ns for path in root.rglob("member_*.json")} == cards  # nothing retrained
    summary = json.loads((root / "summary.json").read_text())
    assert summary["metric"] == "mae" and set(summary["by_condition"]) == set(EXPERIMENT["conditions"])
    from engine.outputs.report import build_report

    report = " ".join(build_report(tmp_path / "ws").read_text().split())
    assert "scaling: paired Wilcoxon signed-rank test per pair of conditions" in report
    assert "scaling: mae per repeat" in report


def test_paired_wilcoxon_and_its_effect_sizes_equal_scipy_and_hand_counts():
    rng = np.random.default_rng(2)
    first = rng.normal(0, 1, 12)
    second = first + rng.normal(0.8, 0.5, 12)
    result = paired_wilcoxon(first, second)
    reference = stats.wilcoxon(second, first)
    assert result["p"] == pytest.approx(reference.pvalue) and result["statistic"] == reference.statistic
    difference = second - first
    ranks = stats.rankdata(np.abs(difference))
    assert result["rank_biserial"] == pytest.approx((ranks[difference > 0].sum() - ranks[difference < 0].sum())
                                                    / ranks.sum())
    walsh = [(difference[i] + difference[j]) / 2 for i in range(12) for j in range(i, 12)]
    assert result["hodges_lehmann"] == pytest.approx(np.median(walsh))
    assert result["ci_low"] < result["hodges_lehmann"] < result["ci_high"]
    table = pd.DataFrame({"condition": ["a"] * 12 + ["b"] * 12, "repeat": list(range(12)) * 2,
                          "member": "ensemble", "metric": "mae", "value": np.r_[first, second]})
    compared = compare_conditions(table, "mae").iloc[0]
    assert compared["p"] == pytest.approx(reference.pvalue) and compared["p_holm"] == pytest.approx(reference.pvalue)
    third = first + rng.normal(0.1, 1.0, 12)
    table = pd.concat([table, table[table.condition == "a"].assign(condition="c", value=third)], ignore_index=True)
    declared = compare_conditions(table, "mae", pairs=[("a", "c"), ("a", "b")])
    assert list(zip(declared["first"], declared["second"], strict=True)) == [("a", "c"), ("a", "b")]
    p_values = [stats.wilcoxon(third, first).pvalue, reference.pvalue]
    smaller, larger = sorted(p_values)
    holm = {smaller: min(1, 2 * smaller), larger: min(1, max(2 * smaller, larger))}  # Holm by hand, two tests
    assert declared["p_holm"].tolist() == pytest.approx([holm[p] for p in p_values])
    with pytest.raises(ValueError, match=r"pairs name conditions \['d'\]"):
        compare_conditions(table, "mae", pairs=[("a", "d")])


@pytest.mark.parametrize(("conditions", "message"), [
    ({"a": {}, "b": {"input_scalling": "minmax"}}, "conditions.b: input_scalling: Extra inputs are not permitted"),
    ({"a": {}, "b": {"members": 3}}, r"conditions.b: \['members'\] are the experiment's"),
    ({"a": {}, "b": {"modalities": ["T2"]}}, r"conditions.b.modalities: \['T2'\] are not modalities"),
])
def test_a_condition_that_names_an_unknown_setting_is_a_catalog_error(conditions, message, tmp_path):
    catalog = write_catalog(tmp_path / "catalog.yaml", train=TRAIN, explain=None, associate=None, features=None,
                            experiments=[{"name": "x", "conditions": conditions}])
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_a_conditions_fine_tuning_source_is_found_from_the_catalogs_folder(tmp_path):
    """``finetune_from`` in a condition is a path relative to the catalog, like the train section's; one that does
    not exist is named by validate with its condition."""
    from pipelines.catalog import load_catalog

    conditions = {"scratch": {"finetune_from": None}, "pretrained": {"finetune_from": "../other/models"}}
    (tmp_path / "cat").mkdir()
    catalog = write_catalog(tmp_path / "cat/catalog.yaml", train=TRAIN, explain=None, associate=None, features=None,
                            experiments=[{"name": "transfer", "members": 2, "conditions": conditions}])
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "experiments.transfer.conditions.pretrained.finetune_from" in result.stderr
    assert "does not exist" in result.stderr
    (tmp_path / "other/models").mkdir(parents=True)
    loaded = load_catalog(catalog)[0]
    experiment = loaded.experiments[0]
    recipes = experiment.recipes(loaded.train)
    assert recipes["pretrained"].finetune_from == tmp_path / "other/models"
    assert recipes["scratch"].finetune_from is None and experiment.members == 2


def test_a_demo_disease_needs_patients(tmp_path):
    catalog = write_catalog(tmp_path / "catalog.yaml", cohort={"demo": {"subjects": 8, "disease": "ms"}})
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "cohort.demo.disease needs patients" in result.stderr
    result = cli("synth", tmp_path / "out", "--subjects", "2", "--patients", "0.5", "--disease", "flu")
    assert result.exit_code == 1 and "--disease must be one of alzheimer, ms, got 'flu'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_declared_comparisons_name_two_of_the_conditions(tmp_path):
    experiment = {"name": "x", "conditions": {"a": {}, "b": {"input_scaling": "minmax"}},
                  "comparisons": [["a", "c"]]}
    catalog = write_catalog(tmp_path / "catalog.yaml", train=TRAIN, explain=None, associate=None, features=None,
                            experiments=[experiment])
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "comparisons: ['a', 'c'] must be two different conditions of ['a', 'b']" in \
        result.stderr


def test_the_experiment_stage_in_this_process_tests_the_declared_pairs(tiny_cohort, tiny_store, tmp_path):
    """The stage with inline execution: every (condition, repeat) trained on that repeat's split, the declared
    pair tested with scipy's Wilcoxon over the repeats, and status naming each condition's mean."""
    import shutil

    from engine.tasks import INLINE
    from pipelines.catalog import load_catalog
    from pipelines.stages import ExperimentStage

    train = {**TRAIN, "epochs": 1}
    experiment = {"name": "scaling", "repeats": 2, "conditions": {"zscore": {}, "minmax": {"input_scaling": "minmax"},
                                                                   "max": {"input_scaling": "max"}},
                  "comparisons": [["zscore", "minmax"]]}
    catalog, _ = load_catalog(write_catalog(tmp_path / "catalog.yaml", workspace=str(tmp_path / "ws"),
                                            cohort={"directory": str(tiny_cohort), "mask": "mask.nii.gz"},
                                            train=train, features=None, explain=None, associate=None, report=None,
                                            experiments=[experiment]))
    shutil.copytree(tiny_store, catalog.layout.images)
    summary = ExperimentStage().run(catalog, INLINE)
    assert set(summary["experiments"]["scaling"]) == {"metric", "zscore", "minmax", "max"}
    files = catalog.layout.experiment("scaling")
    results = pd.read_parquet(files.results)
    ensemble = results[(results.member == "ensemble") & (results.metric == "mae")]
    assert len(ensemble) == 6 and set(results["member"]) >= {"0", "ensemble", "ridge_voxels"}
    comparisons = pd.read_parquet(files.comparisons)
    assert comparisons[["first", "second"]].values.tolist() == [["zscore", "minmax"]]
    pivot = ensemble.pivot(index="repeat", columns="condition", values="value")
    assert comparisons["p"].iloc[0] == pytest.approx(stats.wilcoxon(pivot["minmax"], pivot["zscore"]).pvalue)
    status = ExperimentStage().status(catalog.layout)
    mean = pivot["zscore"].mean()
    assert "mae over 2 repeats:" in status and f"zscore {mean:.3f} ± {pivot['zscore'].std():.3f}" in status
    html = build_report(catalog.layout.root).read_text()  # the report's experiment section: dots and the test
    assert "<h3>scaling</h3>" in html and "2 participant-grouped splits" in html
    assert "minmax: input_scaling: minmax" in html and "Holm-corrected over the pairs" in html
    assert f"<td>{comparisons['p'].iloc[0]:.4f}</td>" in html
