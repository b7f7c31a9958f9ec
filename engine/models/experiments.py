"""Repeated experiments: a training recipe under several conditions (registration, scaling, pre-training,
lesions filled, …), each trained on R participant-grouped, stratified splits (or R times on one split: robustness
over retrainings), every member of every (condition, repeat) one task of one pool; one tidy table of the test
metrics and, per pair of conditions, a paired Wilcoxon signed-rank test over the repeats.

A condition's ensemble on repeat r is an ordinary models folder (``<condition>/repeat_<r>/``), so a rerun keeps
every member already trained for the same config and split, and a run killed midway resumes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from statsmodels.stats.multitest import multipletests

from engine.analysis.stats import paired_wilcoxon
from engine.layout import ExperimentLayout
from engine.models.ensembles import ENSEMBLE, EnsembleJob, train_ensembles
from engine.models.training import TrainingConfig
from engine.tasks import INLINE, Execution

#: The metric compared by default, by task (lower is better for mae).
DEFAULT_METRIC = {"regression": "mae", "classification": "roc_auc"}


@dataclass(frozen=True)
class Recipe:
    """What a condition trains: its members' config and number, where a brain-age bias is fitted, and a two-class
    classification's per-scan feature table for the feature baselines (or None)."""

    config: TrainingConfig
    members: int
    bias_correction: str = "validation"
    baseline_features: pd.DataFrame | None = None


@dataclass(frozen=True)
class ExperimentRun:
    """One condition's ensemble on one repeat: its recipe, split and folder."""

    condition: str
    repeat: int
    recipe: Recipe
    split: pd.Series
    out_dir: Path


def run_experiment(store: str | Path, runs: Sequence[ExperimentRun], execution: Execution = INLINE) -> pd.DataFrame:
    """Train every run's members as one pool of tasks (members already trained are kept) and return the tidy
    results: condition, repeat, member (the members and ``ensemble``, and the baselines), split, metric, value —
    test-split metrics only."""
    jobs = [EnsembleJob(store, run.recipe.config, run.recipe.members, run.out_dir, run.split,
                        run.recipe.bias_correction, run.recipe.baseline_features) for run in runs]
    results = train_ensembles(jobs, execution)
    rows = []
    for run, result in zip(runs, results, strict=True):
        metrics = result["metrics"]
        test = metrics[metrics["split"] == "test"].drop(columns=["split", "n"], errors="ignore")
        long = test.melt(id_vars="member", var_name="metric", value_name="value").dropna(subset=["value"])
        rows.append(long.assign(condition=run.condition, repeat=run.repeat))
    table = pd.concat(rows, ignore_index=True)
    return table[["condition", "repeat", "member", "metric", "value"]]


def compare_conditions(results: pd.DataFrame, metric: str, member: str = ENSEMBLE,
                       conditions: Sequence[str] | None = None,
                       pairs: Sequence[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Per pair of conditions, the paired Wilcoxon signed-rank test of ``member``'s ``metric`` over the repeats both
    have (:func:`~engine.analysis.stats.paired_wilcoxon`: second − first, rank-biserial effect size,
    Hodges–Lehmann shift with its 95 % CI), and Holm's correction over the pairs (the declared family): ``pairs``,
    or every pair of ``conditions`` in order (default: the results' conditions)."""
    chosen = results[(results["metric"] == metric) & (results["member"] == member)]
    if chosen.empty:
        raise ValueError(f"no {metric!r} of member {member!r} in the results (metrics: "
                         f"{sorted(results['metric'].unique())})")
    by_repeat = chosen.pivot_table(index="repeat", columns="condition", values="value")
    names = list(conditions) if conditions is not None else list(dict.fromkeys(chosen["condition"]))
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(names, 2))
    unknown = sorted({name for pair in pairs for name in pair} - set(by_repeat.columns))
    if unknown:
        raise ValueError(f"pairs name conditions {unknown} without {metric!r} results (conditions: "
                         f"{sorted(by_repeat.columns)})")
    rows = []
    for first, second in pairs:
        paired = by_repeat[[first, second]].dropna()
        rows.append({"metric": metric, "member": member, "first": first, "second": second,
                     **paired_wilcoxon(paired[first], paired[second])})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = multipletests(table["p"], method="holm")[1]
    return table


def experiment_runs(files: ExperimentLayout, conditions: dict[str, Recipe], splits: list[pd.Series],
                    same_split: bool = False) -> list[ExperimentRun]:
    """Every (condition, repeat) run into its folder of ``files``: condition → recipe; ``splits`` one per repeat.
    ``same_split`` (robustness over retrainings): one split, each repeat a new seed of the members.

    Runs go repeat by repeat (every condition of repeat 0, then of repeat 1, …): the pool trains them in this
    order, so the paired repeats complete one after the other, and a condition slower than the others (more
    epochs before early stopping, restarts) is spread over the pool's time instead of making its tail."""
    runs = []
    for repeat, split in enumerate(splits):
        for condition, recipe in conditions.items():
            seeded = replace(recipe, config=recipe.config.model_copy(update={"seed": recipe.config.seed + repeat})
                             ) if same_split else recipe
            runs.append(ExperimentRun(condition, repeat, seeded, split, files.run(condition, repeat).root))
    return runs
