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
