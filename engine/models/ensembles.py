"""Ensembles: every member of every ensemble as one pool of tasks, then each ensemble's predictions (the mean
over members) and metrics beside the baselines (the training mean, ridge on the voxels)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from engine.analysis.association import classification_outcomes
from engine.data.inputs import by_scan, key_columns, scan_ids
from engine.data.store import keyed, open_cohort
from engine.layout import ModelsLayout, atomic_output
from engine.models.heap import heap_kept
from engine.models.metrics import classification_metrics, out_of_sample_gap, regression_metrics
from engine.models.splits import SPLITS, read_split_table, split_hash
from engine.models.training import TrainingConfig, targets_of, train_member
from engine.models.volumes import scale_rows
from engine.tasks import INLINE, Execution

#: The ``member`` of the ensemble mean's rows in every table (members are "0", "1", ...).
ENSEMBLE = "ensemble"
#: The ``member`` of the predict-the-training-mean baseline's rows in ``metrics.parquet``.
BASELINE = "predict_train_mean"
#: The ``member`` of the ridge baseline's rows: ridge regression on the members' stored input voxels.
RIDGE = "ridge_voxels"
#: A binary classification's linear baselines on the same voxels (engine.models.baselines), by classifier.
LINEAR_CLASSIFIERS = {"svm": "linear_svm_voxels", "logistic": "logistic_voxels"}
#: … and on a per-scan feature table (``baseline_features``: lesion load, regional volumes).
FEATURE_CLASSIFIERS = {"svm": "linear_svm_features", "logistic": "logistic_features"}
#: Every baseline's name in the ``member`` column of the metrics (the rows that are not trained members).
BASELINES = (BASELINE, RIDGE, *LINEAR_CLASSIFIERS.values(), *FEATURE_CLASSIFIERS.values())


@dataclass(frozen=True)
class _MemberTraining:
    """One member to train into ``out_dir`` (a task of :func:`train_ensembles`)."""

    store: str
    config: TrainingConfig
    split: pd.Series
    member: int
    out_dir: str
    classes: list | None


def _train_member_task(item: _MemberTraining) -> dict:
    with heap_kept():
        return train_member(item.store, item.config, item.split, item.member, item.out_dir, item.classes)


@dataclass(frozen=True)
class EnsembleJob:
    """One ensemble to train: ``members`` members of ``config`` on ``store`` into ``out_dir`` (``models/``)."""

    store: str | Path
    config: TrainingConfig
    members: int
    out_dir: str | Path
    split: pd.Series
    bias_correction: str = "validation"  # where a brain-age gap's age bias is fitted (metrics.BIAS_CORRECTIONS)
    baseline_features: pd.DataFrame | None = None  # per scan (store row): a two-class classification's baselines


def train_ensemble(store: str | Path, config: TrainingConfig, members: int, out_dir: str | Path,
                   split: pd.Series, execution: Execution = INLINE, bias_correction: str = "validation") -> dict:
    """Train one ensemble: :func:`train_ensembles` of one job."""
    return train_ensembles([EnsembleJob(store, config, members, out_dir, split, bias_correction)], execution)[0]


def train_ensembles(jobs: Sequence[EnsembleJob], execution: Execution = INLINE) -> list[dict]:
    """Train every job's members as one pool of long tasks of ``execution`` (one per member, on a GPU where the
    cluster has or starts one; progress phase ``train``), so a worker whose member stopped early starts the
    next ensemble's member instead of waiting for its own ensemble's last one. A job whose members are all
    trained is combined (:func:`combine_members`) by a task of the same pool while the others train.

    Members whose card already holds this config and split are kept. Writes each job's ``split.tsv``,
    ``predictions.parquet`` (every member and the ensemble mean) and ``metrics.parquet``; returns one
    summary per job.
    """
    plans = [_plan_ensemble(job) for job in jobs]
    untrained = [len(plan["items"]) for plan in plans]
    job_of = {str(Path(job.out_dir)): index for index, job in enumerate(jobs)}
    tasks = deque(_Combination(index, job, plan["classes"])
                  for index, (job, plan) in enumerate(zip(jobs, plans, strict=True)) if not untrained[index])
    tasks.extend(item for plan in plans for item in plan["items"])
    total = sum(job.members for job in jobs)
    done = total - sum(untrained)
    execution.report("train", done, total)
    combined = {}
    for task, result in execution.map(_train_or_combine, tasks, long=True):
        if isinstance(task, _Combination):
            combined[task.index] = result
            continue
        done += 1
        execution.report("train", done, total)
        index = job_of[task.out_dir]
        untrained[index] -= 1
        if not untrained[index]:
            tasks.append(_Combination(index, jobs[index], plans[index]["classes"]))
    return [{**combined[index], "trained": len(plan["items"])} for index, plan in enumerate(plans)]


@dataclass(frozen=True)
class _Combination:
    """The ``index``-th job, its members trained, to combine (a task of :func:`train_ensembles`)."""

    index: int
    job: EnsembleJob
    classes: list | None


def _train_or_combine(task: _MemberTraining | _Combination) -> dict:
    """A task of :func:`train_ensembles`: a member's training, or an ensemble's combination (stale members gone)."""
    if isinstance(task, _MemberTraining):
        return _train_member_task(task)
    job = task.job
    files = ModelsLayout(Path(job.out_dir))
    for stale in files.members():
        if stale >= job.members:
            for path in files.member_files(stale):
                path.unlink(missing_ok=True)
    return combine_members(files.root, open_cohort(job.store), job.config, job.members, task.classes,
                           job.bias_correction, job.baseline_features)


def _plan_ensemble(job: EnsembleJob) -> dict:
    """A job's classes, its ``split.tsv`` written, and the task items of its members that are not current."""
    config, split = job.config, job.split
    files = ModelsLayout(Path(job.out_dir))
    files.root.mkdir(parents=True, exist_ok=True)
    dataset = open_cohort(job.store)
    classes = None
    if config.task == "classification":
        if config.target not in dataset.coords:
            raise ValueError(f"target {config.target!r} is not a participant column of the store")
        classes = sorted({value for value in dataset[config.target].values if not pd.isna(value)}, key=str)
        if config.positive_class is not None:  # the positive class goes last: explained and called "positive"
            positive = [value for value in classes if str(value) == config.positive_class]
            if not positive:
                raise ValueError(f"positive_class {config.positive_class!r} is not a value of {config.target!r} "
                                 f"({[str(value) for value in classes]})")
            classes = [value for value in classes if value != positive[0]] + positive
    with atomic_output(files.split) as partial:
        keyed(split.rename_axis("subject").reset_index(), dataset).to_csv(partial, sep="\t", index=False)

    def current(member: int) -> bool:
        path = files.card(member)
        if not path.is_file():
            return False
        card = json.loads(path.read_text())
        same_config = card["config"] == config.as_dict()
        return same_config and card.get("split") == split_hash(split)

    items = [_MemberTraining(str(job.store), config, split, member, str(files.root), classes)
             for member in range(job.members) if not current(member)]
    return {"classes": classes, "items": items}


def _ridge_metrics(dataset: xr.Dataset, config: TrainingConfig, ensemble: pd.DataFrame) -> dict:
    """Test metrics of ridge regression on the members' inputs (the stored voxels of their modalities side
    by side, each scaled per participant as the members' are), fitted on the training split with α by
    leave-one-out (:mod:`engine.models.baselines`)."""
    from engine.models.baselines import ridge_baseline

    split = by_scan(ensemble)["split"].reindex(dataset.subject.values).to_numpy()
    target = dataset[config.target].values.astype(np.float64)
    fit = ridge_baseline(_member_inputs(dataset, config), target, split == "train")
    test = split == "test"
    return regression_metrics(target[test], fit.predictions[test])


def _member_inputs(dataset: xr.Dataset, config: TrainingConfig) -> xr.DataArray:
    """The members' inputs as (subject × voxel) maps: the stored voxels of their modalities side by side, each
    scaled per participant as the members' are."""
    return xr.DataArray(da.concatenate([scale_rows(dataset[name].data.astype(np.float32), config.input_scaling)
                                        for name in config.modalities], axis=1), dims=("subject", "voxel"))


def _classifier_metrics(dataset: xr.Dataset, config: TrainingConfig, ensemble: pd.DataFrame,
                        classes: list, features: pd.DataFrame | None = None) -> list[dict]:
    """Test metrics of a linear SVM and a logistic regression on the members' inputs (as :func:`_ridge_metrics`
    takes them), C by cross-validation on the training split (:func:`~engine.models.baselines.
    linear_classifier_baseline`); with ``features`` (per scan, indexed by store row) the same two on those
    columns, z-scored with the training scans' means and SDs (the studies' SVM on lesion load)."""
    from engine.models.baselines import linear_classifier_baseline

    split = by_scan(ensemble)["split"].reindex(dataset.subject.values).to_numpy()
    labels = targets_of(dataset, config, classes).astype(int)
    inputs = {"voxels": (_member_inputs(dataset, config).persist(), labels)}
    if features is not None:
        values = features.reindex(dataset.subject.values).to_numpy(np.float64)
        complete = np.isfinite(values).all(axis=1)  # a scan without its features is left out
        train = (split == "train") & complete
        spread = values[train].std(axis=0)
        scaled = np.nan_to_num((values - values[train].mean(axis=0)) / np.where(spread > 0, spread, 1))
        inputs["features"] = (xr.DataArray(scaled, dims=("subject", "voxel")), np.where(complete, labels, -1))
    rows = []
    for source, (data, targets) in inputs.items():
        test = (split == "test") & (targets >= 0)
        for kind, member in LINEAR_CLASSIFIERS.items():
            fit = linear_classifier_baseline(data, targets, split == "train", kind, seed=config.seed)
            scores = np.column_stack([-fit.decision, fit.decision])[test]
            rows.append({"member": member if source == "voxels" else FEATURE_CLASSIFIERS[kind], "split": "test",
                         **classification_metrics(targets[test], scores)})
    return rows


def prediction_metrics(predictions: pd.DataFrame, task: str, classes: list | None) -> pd.DataFrame:
    """Metrics per member and split of a predictions table (scans :data:`~engine.models.splits.EXCLUDED` from
    the splits are not counted)."""
    rows = []
    for (member, split_name), subset in predictions.groupby(["member", "split"]):
        if split_name not in SPLITS:
            continue
        if task == "regression":
            metrics = regression_metrics(subset["observed"], subset["predicted"])
        else:
            labels = subset["observed"].map({name: index for index, name in enumerate(classes)})
            metrics = classification_metrics(labels, subset[[f"p_{name}" for name in classes]])
        rows.append({"member": member, "split": split_name, **metrics})
    return pd.DataFrame(rows)


def combine_folds(out_dir: str | Path, folds: int, task: str) -> dict:
    """A cross-fitted ensemble's tables in ``out_dir`` from its folds' (``fold_<k>/``): ``split.tsv`` with each
    scan's ``fold`` (the one whose test set holds its participant), ``predictions.parquet`` of each scan by the
    fold that did not train on its participant (with ``fold``), and ``metrics.parquet``: those pooled
    out-of-sample predictions' metrics (``fold`` missing) and every fold's own rows."""
    files = ModelsLayout(Path(out_dir))
    splits, predictions, metrics = [], [], []
    classes = None
    for fold in range(folds):
        part = files.fold(fold)
        split = read_split_table(part.split)
        tested = set(split.loc[split["split"] == "test", "participant_id"])  # with every scan (some excluded)
        splits.append(split[split["participant_id"].isin(tested)].assign(fold=fold))
        table = pd.read_parquet(part.predictions)
        predictions.append(table[table["participant_id"].isin(tested)].assign(fold=fold))
        metrics.append(pd.read_parquet(part.metrics).assign(fold=fold))
        classes = classes or json.loads(part.card(0).read_text())["classes"]
    split = pd.concat(splits, ignore_index=True)
    predictions = pd.concat(predictions, ignore_index=True)
    pooled = prediction_metrics(predictions, task, classes)
    metrics = pd.concat([pooled.assign(fold=pd.NA), *metrics], ignore_index=True).astype({"fold": "Int64"})
    for table, path in ((predictions, files.predictions), (metrics, files.metrics)):
        with atomic_output(path) as partial:
            table.to_parquet(partial, index=False)
    with atomic_output(files.split) as partial:
        split.to_csv(partial, sep="\t", index=False)
    return {"members": int(pooled["member"].nunique()), "metrics": metrics, "predictions": predictions}


def combine_members(out_dir: Path, dataset: xr.Dataset, config: TrainingConfig, members: int,
                    classes: list | None, bias_correction: str = "validation",
                    baseline_features: pd.DataFrame | None = None) -> dict:
    """Ensemble predictions (mean over members) and metrics per member and for the ensemble; a brain-age model's
    gap corrected for its age bias as ``bias_correction`` says (:func:`~engine.models.metrics.out_of_sample_gap`,
    recorded per member in ``bias_correction.json``)."""
    files = ModelsLayout(Path(out_dir))
    tables = [pd.read_parquet(files.member_predictions(member)) for member in range(members)]
    value_columns = ["predicted"] if config.task == "regression" else [f"p_{name}" for name in classes]
    ensemble = tables[0][[*key_columns(tables[0]), "split"]].copy()
    ensemble["member"] = ENSEMBLE
    for column in value_columns:
        ensemble[column] = np.mean([table[column].to_numpy() for table in tables], axis=0)
    predictions = pd.concat([*tables, ensemble], ignore_index=True)
    observed = pd.Series(dataset[config.target].values, index=dataset.subject.values)
    predictions["observed"] = observed.reindex(scan_ids(predictions)).to_numpy()
    outcomes = classification_outcomes(predictions) if config.task == "classification" else None
    if outcomes is not None:  # each scan's confusion group, by member and for the ensemble
        predictions["outcome"] = outcomes.to_numpy()
    if config.task == "regression" and config.target == "age":
        predictions["brain_age_gap"] = predictions["predicted"] - predictions["observed"]
        predictions["brain_age_gap_corrected"] = np.nan
        corrections = {}
        for member, rows in predictions.groupby("member").groups.items():
            part = predictions.loc[rows]
            try:
                corrected, corrections[member] = out_of_sample_gap(part["predicted"], part["observed"],
                                                                   part["split"], bias_correction,
                                                                   participants=part["participant_id"])
            except ValueError as error:  # too few participants to fit the polynomial on
                corrections[member] = {"method": bias_correction, "not_fitted": str(error)}
                continue
            predictions.loc[rows, "brain_age_gap_corrected"] = corrected
        with atomic_output(files.bias_correction) as partial:
            partial.write_text(json.dumps(corrections, indent=2))
    metrics = prediction_metrics(predictions, config.task, classes)
    if config.task == "regression":
        train = predictions[(predictions.member == ENSEMBLE) & (predictions.split == "train")]
        test = predictions[(predictions.member == ENSEMBLE) & (predictions.split == "test")]
        baseline = regression_metrics(test["observed"], np.full(len(test), train["observed"].mean()))
        ridge = _ridge_metrics(dataset, config, predictions[predictions.member == ENSEMBLE])
        metrics = pd.concat([metrics, pd.DataFrame([{"member": BASELINE, "split": "test", **baseline},
                                                    {"member": RIDGE, "split": "test", **ridge}])],
                            ignore_index=True)
    elif len(classes) == 2:
        linear = _classifier_metrics(dataset, config, predictions[predictions.member == ENSEMBLE], classes,
                                     baseline_features)
        metrics = pd.concat([metrics, pd.DataFrame(linear)], ignore_index=True)
    for table, path in ((predictions, files.predictions), (metrics, files.metrics)):
        with atomic_output(path) as partial:
            table.to_parquet(partial, index=False)
    return {"members": members, "metrics": metrics, "predictions": predictions}
