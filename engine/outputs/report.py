"""The HTML report of a workspace: one self-contained file with every figure embedded.

:func:`build_report` writes ``<workspace>/report.html`` with seven sections, each rendering only
what the workspace holds (a note says what is missing): the cohort, registration QC (measures
per participant, the flagged ones over template contours), the models (predicted
against chronological age, the bias-corrected brain-age gap), relevance (mean maps per method
over the MNI template, group maps by age band or by TP/FP/TN/FN, top regions by sum, density
and gain), validation (ground-truth scores, robustness across members), associations
(thresholded maps with cluster tables, ROI tables with FDR) and provenance. Figures are
matplotlib/nilearn PNGs (Agg backend) in base64; nothing is downloaded.

:mod:`engine.outputs.browser` opens it in headless Chromium (screenshots, a rendering check).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr
import yaml
from matplotlib.figure import Figure

from engine.analysis import mask_relevance
from engine.analysis.association import Term
from engine.analysis.atlas import fsaverage_labels, region_gain, region_reduce
from engine.data.inputs import scan_id, scan_ids
from engine.data.labels import label_table
from engine.layout import atomic_output
from engine.models.ensembles import ENSEMBLE
from engine.models.training import TrainingConfig
from engine.models.validation import SubjectGroups, subject_groups
from engine.outputs.workspace import Workspace, mni_template
from engine.tasks import INLINE, Execution

#: Sections shown once per ensemble when a workspace holds several named ensembles.
ENSEMBLE_SECTIONS = ("models", "relevance", "validation")
#: Sections with many brain figures: drawn first when sections are tasks on a cluster.
SLOW_SECTIONS = ("relevance", "associations")
SECTIONS = {"cohort": "Cohort", "registration": "Registration", "models": "Models", "relevance": "Relevance",
            "validation": "Validation", "associations": "Associations", "experiments": "Experiments",
            "provenance": "Provenance"}
#: Sections shown only where the workspace has them.
OPTIONAL_SECTIONS = ("experiments",)
SPLIT_COLOURS = {"train": "#9ecae1", "validation": "#fdae6b", "test": "#d62728"}
FIGURE_DPI = 80
MAX_TABLE_ROWS = 25
MAX_OVERLAYS = 6


def build_report(workspace: str | Path | Workspace, *, methods: Sequence[str] | None = None,
                 age_bands: Sequence[float] = (40, 60), top_k: int = 10, execution: Execution = INLINE,
                 out: str | Path | None = None) -> Path:
    """Write the report (atomically) to ``out`` (default ``<workspace>/report.html``) and return its path.

    ``methods``: the attribution methods to show (default: all in ``relevance.zarr``);
    ``age_bands``: age cut points of the group maps (``(40, 60)``: < 40, 40–60, ≥ 60);
    ``top_k``: regions in the bar charts. Each section (of each ensemble) is drawn by a task of ``execution``,
    the slowest first (progress phase ``report``, counting sections).
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    if list(age_bands) != sorted(set(age_bands)):
        raise ValueError(f"age_bands must be strictly increasing cut points, got {list(age_bands)}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    ensembles = ws.ensembles or [None]
    per_ensemble = ensembles != [None]
    sections = {key: title for key, title in SECTIONS.items() if key not in OPTIONAL_SECTIONS or ws.has(key)}
    settings = (tuple(methods) if methods is not None else None, tuple(age_bands), top_k)
    items = [_Section(str(ws.path), key, name if key in ENSEMBLE_SECTIONS and per_ensemble else ws.ensemble,
                      *settings)
             for key in sorted(sections, key=lambda key: key not in SLOW_SECTIONS)
             for name in (ensembles if key in ENSEMBLE_SECTIONS and per_ensemble else [None])]
    drawn = {}
    for done, (item, parts) in enumerate(execution.map(_section, items), start=1):
        drawn[item.key, item.ensemble] = parts
        execution.report("report", done, len(items))
    body = []
    for key, title in sections.items():
        if key in ENSEMBLE_SECTIONS and per_ensemble:  # one part per named ensemble, side by side
            parts = _ensembles_compared(ws, ensembles) if key == "models" else []
            for name in ensembles:
                parts += [f"<h3>Ensemble {html.escape(name)}</h3>", *drawn[key, name]]
        else:
            parts = drawn[key, ws.ensemble]
        body.append(f'<section id="{key}"><h2>{title}</h2>\n' + "\n".join(parts) + "</section>")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    nav = " · ".join(f'<a href="#{key}">{title}</a>' for key, title in sections.items())
    page = _PAGE.format(title=html.escape(f"relcohort report: {ws.path.name}"), path=html.escape(str(ws.path)),
                        stamp=stamp, nav=nav, body="\n".join(body))
    out = Path(out) if out is not None else ws.layout.report
    with atomic_output(out) as partial:
        partial.write_text(page, encoding="utf-8")
    return out


@dataclass(frozen=True)
class _Section:
    """One section of one ensemble's part of the report to draw (a task of :func:`build_report`)."""

    workspace: str
    key: str
    ensemble: str | None
    methods: tuple[str, ...] | None
    age_bands: tuple[float, ...]
    top_k: int


def _section(item: _Section) -> list[str]:
    """The HTML parts of one section."""
    ws = Workspace(item.workspace, item.ensemble)
    if item.key == "relevance":
        return _relevance(ws, item.methods, list(item.age_bands), item.top_k)
    return {"cohort": _cohort, "registration": _registration, "models": _models, "validation": _validation,
            "associations": _associations, "experiments": _experiments, "provenance": _provenance}[item.key](ws)


# ---------------------------------------------------------------------------------------
# HTML pieces


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(frame: pd.DataFrame, caption: str | None = None, digits: int = 3) -> str:
    shown = frame.head(MAX_TABLE_ROWS).copy()
    more = f" (first {MAX_TABLE_ROWS} of {len(frame)} rows)" if len(frame) > MAX_TABLE_ROWS else ""
    for column in shown.columns:  # long region names may break after "_", lists after ";"
        if pd.api.types.is_numeric_dtype(shown[column]):
            continue
        shown[column] = shown[column].astype(object).map(
            lambda value: value if not isinstance(value, str)
            else html.escape(value).replace("_", "_<wbr>").replace("; ", ";<br>"))
    table = shown.to_html(index=False, border=0, classes="table", na_rep="–", escape=False,
                          float_format=lambda value: f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0
                          else f"{value:.{digits}f}")
    title = f"<p class=caption>{html.escape(caption + more)}</p>" if caption else ""
    return f'<div class="table-wrap">{title}{table}</div>'


def _subplots(rows: int, columns: int, size: tuple[float, float], **options):
    figure = Figure(figsize=size, facecolor="white")
    return figure, figure.subplots(rows, columns, **options)


def _figure(fig, caption: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, facecolor=fig.get_facecolor())
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = html.escape(caption)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{alt}</figcaption></figure>")


# ---------------------------------------------------------------------------------------
# Cohort


def _participant_columns(ws: Workspace) -> list[str]:
    images = ws.images
    return [name for name in images.attrs.get("participant_columns", []) if name in images.coords]


def _rows_described(images) -> str:
    """'participants', or with sessions the scans per participant and the follow-up intervals."""
    if "session_id" not in images.coords:
        return "participants"
    scans = pd.DataFrame({"participant_id": images.participant_id.values})
    per_participant = scans.groupby("participant_id").size()
    text = (f"scans of <b>{len(per_participant)}</b> participants ({per_participant.min()}–{per_participant.max()} "
            f"per participant, {int((per_participant > 1).sum())} scanned more than once")
    if "age" in images.coords:
        intervals = pd.Series(images.age.values).groupby(scans["participant_id"]).diff().dropna()
        if len(intervals):
            text += (f"; follow-up intervals median {intervals.median():.1f} years, range "
                     f"{intervals.min():.1f}–{intervals.max():.1f}")
    return text + ")"


def _cohort(ws: Workspace) -> list[str]:
    if not ws.has("images"):
        return [_note("No images.zarr in this workspace: the ingest stage has not run.")]
    images = ws.images
    attrs = images.attrs
    parts = [f"<p><b>{images.sizes['subject']}</b> {_rows_described(images)} with complete images × "
             f"{images.sizes['voxel']} voxels; modalities {html.escape(', '.join(attrs['modalities']))}; "
             f"grid {tuple(attrs['grid']['shape'])} in {html.escape(attrs['grid']['space'])}.</p>"]
    columns = [name for name in _participant_columns(ws) if name not in ("participant_id", "session_id")]
    rows = []
    for name in columns:
        values = pd.Series(images[name].values)
        if pd.api.types.is_numeric_dtype(values):
            rows.append({"column": name, "summary": f"mean {values.mean():.1f}, SD {values.std():.1f}, "
                                                    f"range {values.min():.1f}–{values.max():.1f}"})
        else:
            counts = values.astype(str).value_counts().sort_index()
            rows.append({"column": name, "summary": ", ".join(f"{key} {count}" for key, count in counts.items())})
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Participant columns"))
        parts.append(_figure(_cohort_figure(images, columns), "Distributions of the participant columns"))
    skipped = attrs.get("ingest", {}).get("skipped", [])
    incomplete = int(attrs.get("n_subjects", images.sizes["subject"])) - images.sizes["subject"]
    if skipped:
        parts.append(_table(pd.DataFrame(skipped)[["participant_id", "file", "problem"]],
                            f"Excluded at ingest ({len(skipped)}), and why"))
    else:
        parts.append(_note("No participant was excluded at ingest."))
    if incomplete:
        parts.append(_note(f"{incomplete} stored row(s) are not wholly ingested and are left out."))
    return parts


def _registration(ws: Workspace) -> list[str]:
    qc = ws.registration_qc
    if qc is None:
        return [_note("No registration stage: the images were on the template grid already.")]
    flagged = qc[qc["flagged"] | qc["diverged"]]
    transforms = ", ".join(sorted(qc["transform"].unique()))
    parts = [f"<p><b>{len(qc)}</b> participant(s) registered to the template ({html.escape(transforms)}); "
             "QC per participant: correlation and normalised mutual information of the registered reference scan "
             "with the template inside the template mask, and Dice of the participant's brain mask with the "
             f"template's. Flagged: a robust z (median / MAD over the cohort) below the catalog's flag_z on any "
             f"measure ({int(qc['flagged'].sum())} flagged). Diverged, and left out of the images: a correlation "
             f"below min_correlation or a z below fail_z ({int(qc['diverged'].sum())}).</p>",
             _figure(_qc_figure(qc), "QC measures per participant (flagged in red)")]
    parts.append(_table(flagged if len(flagged) else qc.nsmallest(min(len(qc), 5), "correlation"),
                        "Flagged or diverged participants" if len(flagged) else
                        "Lowest correlation with the template (none flagged)"))
    shown = flagged if len(flagged) else qc.nsmallest(1, "correlation")
    for _, row in shown.head(MAX_OVERLAYS).iterrows():
        parts.append(_figure(_overlay_figure(ws, row), f"{html.escape(_scan_of(row))}: registered "
                             f"{html.escape(row['reference'])} scan with the template brain's outline"))
    return parts


def _qc_figure(qc: pd.DataFrame):
    from engine.data.registration import QC_MEASURES

    fig, axes = _subplots(1, len(QC_MEASURES), (3.2 * len(QC_MEASURES), 2.8), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, measure in zip(axes[0], QC_MEASURES, strict=True):
        jitter = rng.uniform(-0.15, 0.15, len(qc))
        colours = np.where(qc["flagged"], "#d62728", "#4c72b0")
        ax.scatter(jitter, qc[measure], c=colours, s=12)
        ax.set_xticks([])
        ax.set_xlim(-0.5, 0.5)
        ax.set_title(measure)
    fig.tight_layout()
    return fig


def _scan_of(row: pd.Series) -> str:
    """A QC row's scan: its participant, or participant and session."""
    return scan_id(row["participant_id"], row.get("session_id"))


def _overlay_figure(ws: Workspace, row: pd.Series):
    from nilearn import plotting

    participant = ws.layout.registered.participant(_scan_of(row))
    fig = Figure(figsize=(8, 2.6), dpi=FIGURE_DPI)
    display = plotting.plot_anat(str(participant.image(row["reference"])), figure=fig, display_mode="ortho",
                                 title=f"{_scan_of(row)} (r {row['correlation']:.2f})", draw_cross=False)
    display.add_contours(str(ws.layout.registered.mask), levels=[0.5], colors="r", linewidths=1)
    return fig


def _cohort_figure(images, columns: list[str]):
    fig, axes = _subplots(1, len(columns), (4 * len(columns), 3), squeeze=False)
    sex = images["sex"].values.astype(str) if "sex" in columns else None
    for ax, name in zip(axes[0], columns, strict=True):
        values = images[name].values
        if pd.api.types.is_numeric_dtype(values.dtype):
            if sex is not None and name != "sex":
                groups = sorted(set(sex))
                ax.hist([values[sex == group] for group in groups], bins=15, stacked=True, label=groups)
                ax.legend(fontsize=8)
            else:
                ax.hist(values, bins=15, color="#4c72b0")
            ax.set_ylabel("participants")
        else:
            counts = pd.Series(values.astype(str)).value_counts().sort_index()
            ax.bar(counts.index, counts.to_numpy(), color="#4c72b0")
            ax.tick_params(axis="x", labelrotation=45 if len(counts) > 4 else 0)
        ax.set_title(name)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Models


def _models(ws: Workspace) -> list[str]:
    if not ws.has("models"):
        return [_note("No models/metrics.parquet: no trained models (the train stage has not run, or the relevance "
                      "maps were made elsewhere and imported).")]
    metrics, predictions = ws.metrics, ws.predictions
    config = ws.training or TrainingConfig()
    target = config.target
    parts = [f"<p>Ensemble of {predictions.loc[predictions.member != ENSEMBLE, 'member'].nunique()} member(s) "
             f"{html.escape(config.model)} predicting <b>{html.escape(target)}</b> "
             f"({html.escape(config.task)}); member {ENSEMBLE} in the predictions is "
             "their mean.</p>", _table(metrics, "Metrics per member and split"), _training_table(ws)]
    if "predicted" in predictions:
        parts.append(_figure(_scatter_figure(predictions, target),
                             f"Predicted against observed {target} per member and for the ensemble"))
        correction = (ws.bias_correction or {}).get(ENSEMBLE, {})
        if "not_fitted" in correction:
            parts.append(_note(f"No bias-corrected brain-age gap: {correction['not_fitted']} "
                               f"(train.bias_correction: {correction['method']})."))
        if predictions.get("brain_age_gap_corrected") is not None and \
                predictions["brain_age_gap_corrected"].notna().any():
            fitted_on = {"validation": "fitted on the validation split",
                         "cross_fit": "fitted for each fold of the test split on the other folds",
                         "test": "fitted on the test split itself"}.get(correction.get("method"), "")
            if correction.get("method") == "test":
                parts.append(_note("The age-bias correction was fitted on the test participants it corrects "
                                   "(train.bias_correction: test): their corrected gaps are in-sample and "
                                   "understate the gap's dependence on age in new participants."))
            parts.append(_figure(_gap_figure(predictions),
                                 "Ensemble brain-age gap of the test participants against age, before and after "
                                 f"removing its age bias (cubic in age, {fitted_on})"))
    else:
        classes = [column.removeprefix("p_") for column in predictions if column.startswith("p_")]
        test = predictions[(predictions.member == ENSEMBLE) & (predictions.split == "test")]
        predicted = np.asarray(classes, dtype=object)[test[[f"p_{name}" for name in classes]].to_numpy().argmax(1)]
        confusion = pd.crosstab(pd.Series(test["observed"].astype(str).to_numpy(), name="observed"),
                                pd.Series(predicted.astype(str), name="predicted"))
        parts.append(_table(confusion.reset_index(), "Ensemble confusion matrix on the test set"))
    return parts


def _training_table(ws: Workspace) -> str:
    """How each member's training went, from its card: kept and last epoch, restarts and why, whether it learned
    anything (its kept validation loss at least 5 % below predicting a constant), seconds."""
    rows = []
    folds = ws.layout.models.folds()
    members = [(fold, models, member) for fold, models in zip(folds or [None], ws.layout.models.trained(), strict=True)
               for member in models.members()]
    for fold, models, member in members:
        card = json.loads(models.card(member).read_text())
        kept = card["history"][card["best_epoch"] - 1]
        rows.append({**({"fold": fold} if folds else {}), "member": member, "seed": card["seed"],
                     "kept epoch": card["best_epoch"],
                     "epochs run": card["epochs_run"], "validation loss": kept["validation_loss"],
                     "constant's loss": card.get("constant_loss"),
                     "restarts": "; ".join(f"seed {restart['seed']}: {restart.get('reason', 'constant output')} at "
                                           f"epoch {restart.get('epoch', restart.get('collapsed_at_epoch'))}"
                                           for restart in card.get("restarts", [])) or "–",
                     "learned nothing": card.get("learned_nothing"), "seconds": card["seconds"]})
    return _table(pd.DataFrame(rows), "Training per member (a member restarts from a fresh seed when it collapses to "
                  "a constant output, or when patience ends it no better than predicting a constant)")


def _ensembles_compared(ws: Workspace, ensembles: list[str]) -> list[str]:
    """The named ensembles' test metrics side by side (ensemble means and baselines; imported maps have none)."""
    rows = []
    for name in ensembles:
        member = ws.for_ensemble(name)
        if not member.has("models"):
            continue
        metrics = member.metrics
        config = member.training or TrainingConfig()
        test = metrics[(metrics.split == "test") & ~metrics.member.str.fullmatch(r"\d+")]
        rows.append(test.assign(ensemble=name, inputs=", ".join(config.modalities)))
    if not rows:
        return []
    table = pd.concat(rows, ignore_index=True)
    first = ["ensemble", "inputs", "member"]
    return [_table(table[first + [column for column in table.columns if column not in [*first, "split"]]],
                   "Test metrics of every ensemble (ensemble mean and baselines; members below)")]


def _scatter_figure(predictions: pd.DataFrame, target: str):
    members = sorted(predictions.member.unique(), key=lambda member: (member == ENSEMBLE, member.zfill(6)))
    fig, axes = _subplots(1, len(members), (3.6 * len(members), 3.6), squeeze=False, sharey=True)
    low, high = predictions[["observed", "predicted"]].min().min(), predictions[["observed", "predicted"]].max().max()
    for ax, member in zip(axes[0], members, strict=True):
        part = predictions[predictions.member == member]
        for split, colour in SPLIT_COLOURS.items():
            rows = part[part.split == split]
            ax.scatter(rows.observed, rows.predicted, s=10, color=colour, label=split, alpha=0.8)
        test = part[part.split == "test"]
        mae = (test.predicted - test.observed).abs().mean()
        r = np.corrcoef(test.observed, test.predicted)[0, 1] if len(test) > 1 else np.nan
        ax.plot([low, high], [low, high], color="grey", lw=1)
        ax.set_title(f"{ENSEMBLE if member == ENSEMBLE else f'member {member}'}: test MAE {mae:.1f}, r {r:.2f}",
                     fontsize=9)
        ax.set_xlabel(f"observed {target}")
    axes[0, 0].set_ylabel(f"predicted {target}")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _gap_figure(predictions: pd.DataFrame):
    test = predictions[(predictions.member == ENSEMBLE) & (predictions.split == "test")]
    fig, axes = _subplots(1, 2, (8, 3.2), sharey=True)
    for ax, column, title in zip(axes, ("brain_age_gap", "brain_age_gap_corrected"),
                                 ("raw gap", "bias-corrected gap"), strict=True):
        ax.scatter(test.observed, test[column], s=12, color="#d62728")
        ax.axhline(0, color="grey", lw=1)
        slope = np.polyfit(test.observed, test[column], 1)[0] if len(test) > 1 else np.nan
        ax.set_title(f"{title} (slope {slope:.2f} per year)", fontsize=9)
        ax.set_xlabel("age")
    axes[0].set_ylabel("predicted − age (years)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Relevance


def _relevance(ws: Workspace, methods, age_bands: list[float], top_k: int) -> list[str]:
    if not ws.has("relevance"):
        return [_note("No relevance.zarr: the explain stage has not run.")]
    relevance = ws.relevance
    stored = list(relevance.attribution.values)
    methods = list(methods) if methods else stored
    absent = [method for method in methods if method not in stored]
    if absent:
        return [_note(f"Method(s) {absent} are not in relevance.zarr (it holds {stored}).")]
    subjects = relevance.sizes["subject"]
    parts = [f"<p>Ensemble-mean relevance of {relevance.sizes['member']} member(s) over {subjects} participant(s), "
             f"methods {html.escape(', '.join(methods))}. Maps are thresholded at the 95th percentile of |R| "
             "and shown over the MNI152 template.</p>"]
    maps = relevance.relevance_mean.sel(attribution=methods)
    mean_maps = maps.mean("subject").compute()
    for method in methods:
        parts.append(_figure(_mean_map_figure(ws, mean_maps.sel(attribution=method), method),
                             f"{method}: mean relevance (orthogonal slices and glass brain)"))
    groups = explanation_groups(ws, relevance, age_bands)
    if groups.masks:
        parts.append(_figure(_group_figure(ws, maps, groups.masks, methods),
                             f"Mean relevance by {groups.kind}: {', '.join(groups.masks)}"))
    else:
        parts.append(_note("No groups to compare (no age coordinate or classification predictions)."))
    patients = individual_patients(ws, relevance)
    if patients:
        parts.append(_figure(_individual_figure(ws, maps, patients, methods),
                             f"Individual patients: the {len(patients)} true positives called with the highest "
                             "probability, each map thresholded at its own 95th percentile of |R|"))
    atlas = ws.atlas()
    parts.append(f"<p>Top {top_k} regions of the {html.escape(atlas.name)} atlas by mean region sum, density "
                 f"(sum per voxel) and gain of |R| ({html.escape(groups.gain_description)}).</p>")
    for method in methods:
        regions = region_reduce(maps.sel(attribution=method).drop_vars("attribution"), atlas).compute()
        parts.append(_figure(_top_regions_figure(regions, groups, top_k, method),
                             f"{method}: top regions by sum, density and gain"))
    return parts


def explanation_groups(ws: Workspace, relevance, age_bands: list[float]) -> SubjectGroups:
    """The explained subjects' outcome groups (binary classification) or age bands, named with their sizes."""
    predictions = None
    if ws.training is not None and ws.training.task == "classification":
        predictions = ws.predictions[ws.predictions.member == ENSEMBLE]
    age = relevance.age.values if "age" in relevance.coords else None
    groups = subject_groups(relevance.subject.values, age, predictions, age_bands)
    return replace(groups, masks={f"{name} (n={mask.sum()})": mask for name, mask in groups.masks.items()})


def individual_patients(ws: Workspace, relevance, count: int = 4) -> dict[str, str]:
    """A binary classification's explained true positives with the highest ensemble probability of the positive
    class (at most ``count``), as row label → caption; empty for other tasks."""
    if ws.training is None or ws.training.task != "classification" or "outcome" not in ws.predictions:
        return {}
    ensemble = ws.predictions[ws.predictions.member == ENSEMBLE]
    positive = [column for column in ensemble if column.startswith("p_")][-1]
    rows = ensemble.assign(subject=scan_ids(ensemble))
    rows = rows[(rows["outcome"] == "TP") & rows["subject"].isin(set(relevance.subject.values))]
    chosen = rows.sort_values(positive, ascending=False).head(count)
    return {row.subject: f"{row.subject} ({positive} {getattr(row, positive):.2f})" for row in chosen.itertuples()}


def _individual_figure(ws: Workspace, maps, patients: dict[str, str], methods: list[str]):
    from nilearn import plotting

    fig, axes = _subplots(len(methods), len(patients), (2.6 * len(patients), 3.0 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        for column, (subject, caption) in enumerate(patients.items()):
            values = maps.sel(attribution=method, subject=subject).compute()
            threshold, vmax = _robust_limit(values.values)
            ax = axes[row, column]
            ax.set_axis_off()
            ax.set_title(f"{method}\n{caption}", fontsize=8)
            plotting.plot_glass_brain(ws.to_nifti(values), axes=ax, display_mode="z", threshold=threshold, vmax=vmax,
                                      vmin=-vmax, plot_abs=False, colorbar=False)
    return fig


def _robust_limit(values: np.ndarray) -> tuple[float, float]:
    """Display threshold (95th percentile of |R|) and colour limit (99.5th) of a map."""
    magnitude = np.abs(values[np.isfinite(values)])
    if not magnitude.size or magnitude.max() == 0:
        return 0.0, 1.0
    threshold = float(np.percentile(magnitude, 95))
    if threshold >= magnitude.max():  # a blocky map (region occlusion): its top value fills over 5 % of the voxels
        threshold = float(magnitude[magnitude < magnitude.max()].max(initial=0.0))
    return threshold, float(np.percentile(magnitude, 99.5)) or float(magnitude.max())


def _mean_map_figure(ws: Workspace, mean_map, method: str):
    from nilearn import plotting

    threshold, vmax = _robust_limit(mean_map.values)
    image = ws.to_nifti(mean_map)
    fig = Figure(figsize=(13, 3.0), facecolor="white")
    stat_axes, glass_axes = fig.add_axes((0, 0, 0.56, 1)), fig.add_axes((0.57, 0, 0.43, 1))
    plotting.plot_stat_map(image, bg_img=mni_template(), axes=stat_axes, threshold=threshold, vmax=vmax,
                           title=method, colorbar=True, draw_cross=False)
    plotting.plot_glass_brain(image, axes=glass_axes, threshold=threshold, vmax=vmax, plot_abs=False,
                              colorbar=False, vmin=-vmax)
    return fig


def _group_figure(ws: Workspace, maps, groups: dict, methods: list[str]):
    from nilearn import plotting

    fig, axes = _subplots(len(methods), len(groups), (2.6 * len(groups), 3.0 * len(methods)), squeeze=False)
    for row, method in enumerate(methods):
        by_method = maps.sel(attribution=method)
        means = {name: by_method.isel(subject=np.flatnonzero(mask)).mean("subject").compute()
                 for name, mask in groups.items()}
        threshold, vmax = _robust_limit(np.concatenate([mean.values for mean in means.values()]))
        for column, (name, mean) in enumerate(means.items()):
            ax = axes[row, column]
            ax.set_axis_off()
            shown = bool((np.abs(np.nan_to_num(mean.values)) > threshold).any())  # nilearn warns of an empty map
            ax.set_title(f"{method}\n{name}" + ("" if shown else "\n(nothing above the threshold)"), fontsize=8)
            plotting.plot_glass_brain(ws.to_nifti(mean) if shown else None, axes=ax, display_mode="z",
                                      threshold=threshold if shown else None, vmax=vmax, vmin=-vmax,
                                      plot_abs=False, colorbar=False)
    return fig


def _top_regions_figure(regions, groups: SubjectGroups, top_k: int, method: str):
    scores = {"sum": regions["sum"].mean("subject"), "density": regions["mean"].mean("subject")}
    if groups.gain_numerator is not None:
        numerator, denominator = (xr.DataArray(mask, dims="subject")
                                  for mask in (groups.gain_numerator, groups.gain_denominator))
        scores["gain"] = region_gain(regions["abs_sum"], numerator, denominator)
    fig, axes = _subplots(1, len(scores), (4.4 * len(scores), 0.28 * top_k + 1.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        series = values.to_series().dropna().sort_values(ascending=False).head(top_k)[::-1]
        ax.barh(series.index, series.to_numpy(), color="#4c72b0")
        ax.set_title(f"{method}: {name}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Validation


def _validation(ws: Workspace) -> list[str]:
    if not ws.layout.scores.is_file():
        parts = [_note("No validation/scores.parquet: no ground truth was given to score the methods against.")]
    else:
        scores = ws.scores
        ensemble = scores[scores.member == ENSEMBLE].drop(columns="member")
        parts = ["<p>Scores of the ensemble-mean maps against the ground truth (on R and on |R|): relevance-mass "
                 "accuracy against its uniform expectation, voxel ROC-AUC (0.5 = chance) and the precision of the "
                 "top regions by relevance density against chance.</p>",
                 _table(ensemble[["attribution", "scored",
                                  *[c for c in ensemble if c not in ("attribution", "scored")]]],
                        "Ground-truth scores (ensemble)"),
                 _figure(_scores_figure(scores), "ROC-AUC and relevance-mass accuracy per method (dots: members)")]
    if ws.layout.robustness.is_file():
        robustness = ws.robustness.rename(columns={
            "l2_distance": "L2 distance", "top_k_overlap_sum": "top-k overlap, sum (%)",
            "top_k_overlap_density": "top-k overlap, density (%)", "top_k_overlap_gain": "top-k overlap, gain (%)"})
        for column in robustness.columns[robustness.columns.str.endswith("(%)")]:
            robustness[column] = 100 * robustness[column]
        parts.append(_table(robustness, "Robustness across ensemble members (Eitel & Ritter 2019), on |R| per group: "
                                        "L2 distance of max-scaled mean maps and mean pairwise overlap of the top "
                                        "regions by sum, density and gain (gain_definition)", 1))
    else:
        parts.append(_note("No robustness table (it needs at least two ensemble members)."))
    if ws.layout.sanity.is_file():
        parts.append(_table(ws.sanity, "Sanity check (Adebayo et al. 2018): rank correlation between the maps of "
                                       "member 0 and of the same network with every layer re-drawn (near 0 passes, "
                                       "near 1: the map does not depend on what the model learned)", 3))
    for mask, described in (("lesion", "white-matter lesion"), ("pvs", "perivascular-space")):
        if ws.layout.mask_comparison(mask).is_file():
            parts += _mask_comparison(ws, mask, described)
    return parts


def _mask_comparison(ws: Workspace, mask: str, described: str) -> list[str]:
    """The seed study's comparison of the relevance per mask voxel with each participant's average voxel."""
    comparison = ws.mask_comparison(mask)
    min_voxels = int(comparison["min_voxels"].iloc[0])
    caption = (f"Relevance per {described} voxel (a_wml_voxel) against the participant's average relevance per "
               f"nonzero voxel (a_voxel), participants with more than {min_voxels} mask voxels: paired Wilcoxon "
               "signed-rank test, matched-pairs rank-biserial r, Hodges–Lehmann shift with its 95 % CI")
    parts = [_table(comparison.drop(columns="min_voxels"), caption, 3)]
    if comparison["n"].max() > 0:
        figure = mask_relevance.comparison_figure(ws.mask_indices(mask), min_voxels)
        parts.append(_figure(figure, f"Relevance per {described} voxel against each participant's average "
                                     f"({mask}_indices.parquet has every index per participant)"))
    return parts


def _scores_figure(scores: pd.DataFrame):
    methods = list(dict.fromkeys(scores.attribution))
    fig, axes = _subplots(1, 2, (11, 3.4))
    positions = np.arange(len(methods))
    for offset, (scored, colour) in zip((-0.2, 0.2), (("R", "#4c72b0"), ("|R|", "#dd8452")), strict=True):
        part = scores[scores.scored == scored]
        ensemble = part[part.member == ENSEMBLE].set_index("attribution").reindex(methods)
        members = part[part.member != ENSEMBLE]
        ratio = ensemble.mass_accuracy / ensemble.mass_accuracy_uniform
        axes[0].bar(positions + offset, ensemble.roc_auc, width=0.4, color=colour, label=scored)
        axes[1].bar(positions + offset, ratio, width=0.4, color=colour, label=scored)
        for ax, values in ((axes[0], members.roc_auc),
                           (axes[1], members.mass_accuracy / members.mass_accuracy_uniform)):
            ax.scatter(positions[[methods.index(m) for m in members.attribution]] + offset, values, s=8,
                       color="black")
    axes[0].axhline(0.5, color="grey", lw=1)
    axes[1].axhline(1, color="grey", lw=1)
    axes[0].set_title("voxel ROC-AUC", fontsize=9)
    axes[1].set_title("relevance-mass accuracy ÷ uniform", fontsize=9)
    for ax in axes:
        ax.set_xticks(positions, methods, rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# Associations


def _associations(ws: Workspace) -> list[str]:
    if not ws.has("associations"):
        return [_note("No association analyses in this workspace (associations/<name>/summary.json).")]
    parts = _ensembles_side_by_side(list(ws.associations.values()))
    for analysis in ws.associations.values():
        summary = analysis.summary
        fields = {key: summary[key] for key in ("outcome", "predictor", "covariates", "scans", "random_intercept",
                                                "permute", "correction", "alpha", "n", "participants", "df", "model",
                                                "permutations", "n_significant", "significant")
                  if key in summary}
        if "family" in summary:  # the regions tested: what the corrections run over
            family = summary["family"]
            fields["family"] = (f"{family['size']} regions (include {', '.join(family['include'])}"
                                + (f"; exclude {', '.join(family['exclude'])}" if family["exclude"] else "") + ")")
        described = "; ".join(f"{key} {_plain(value)}" for key, value in fields.items())
        parts.append(f"<h3>{html.escape(analysis.name)} ({html.escape(analysis.scope)})</h3>"
                     f"<p>{html.escape(described)}</p>")
        if analysis.scope == "voxel":
            parts += _voxel_association(analysis)
        elif analysis.scope == "roi":
            parts += _roi_association(analysis)
        elif analysis.scope == "subject" and analysis.model is not None:
            parts += _subject_association(analysis)
        elif analysis.scope == "gain" and analysis.regions is not None:
            reference = str(analysis.summary.get("reference"))
            groups = analysis.regions[analysis.regions["group"] != reference]
            top = groups.sort_values("gain", ascending=False).groupby("group").head(MAX_TABLE_ROWS // 2)
            parts.append(_table(top, f"{analysis.name}: regions by gain against {reference} (mean region sum of the "
                                     "group ÷ the reference's), with the groups' mean sum and density"))
        elif analysis.similarity is not None:
            parts.append(_table(analysis.similarity.describe().T.reset_index(names="measure"),
                                f"{analysis.name}: per-participant similarity of the two maps"))
    return parts


def _ensembles_side_by_side(analyses: list) -> list[str]:
    """The study's correlation tables of several ensembles side by side: analyses whose outcome is the same
    relevance term of different ensembles against the same predictor, in the same regions, one figure each."""
    groups: dict[tuple, dict[str, object]] = {}
    for analysis in analyses:
        summary = analysis.summary
        term = Term.parse(summary.get("outcome", ""))
        if analysis.correlations is None or term.source != "relevance" or term.ensemble is None:
            continue
        key = (term.name, term.normalisation, summary.get("predictor"), summary.get("labels"), summary.get("model"))
        groups.setdefault(key, {})[term.ensemble] = analysis
    parts = []
    for (method, _, predictor, _, statistic), by_ensemble in groups.items():
        if len(by_ensemble) < 2:
            continue
        tables = {name: analysis.correlations.set_index("region") for name, analysis in by_ensemble.items()}
        regions = sorted(set.intersection(*(set(table.index) for table in tables.values())),
                         key=lambda region: np.nanmean([table.loc[region, "r"] for table in tables.values()]))
        shown = regions[:MAX_TABLE_ROWS // 2] + [region for region in regions[-(MAX_TABLE_ROWS // 2):]
                                                 if region not in regions[:MAX_TABLE_ROWS // 2]]
        fig, ax = _subplots(1, 1, (7, 0.3 * len(shown) + 1.4))
        height = 0.8 / len(tables)
        for index, (name, table) in enumerate(tables.items()):
            rows = table.loc[shown]
            significant = rows["p_bonferroni"].to_numpy() < next(iter(by_ensemble.values())).alpha
            positions = np.arange(len(shown)) + (index - (len(tables) - 1) / 2) * height
            ax.barh(positions, rows["r"], height=height, color=f"C{index}", label=name)
            ax.scatter(rows["r"].to_numpy()[significant], positions[significant], marker="*", color="black", s=14,
                       zorder=3)
        ax.set_yticks(np.arange(len(shown)), shown, fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"relevance.<ensemble>.{method} and {predictor}", fontsize=8)
        ax.set_xlabel(f"{statistic} r (*: Bonferroni p < α)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        parts.append(_figure(fig, f"{', '.join(by_ensemble)} side by side: {statistic} r per region of "
                                  f"relevance.<ensemble>.{method} and {predictor} "
                                  f"({', '.join(analysis.name for analysis in by_ensemble.values())})"))
    return parts


def _subject_association(analysis) -> list[str]:
    """The model table and the participants' outcome against the predictor with the least-squares line."""
    outcome, predictor = analysis.summary.get("outcome"), analysis.summary.get("predictor")
    parts = [_table(analysis.model, f"{analysis.name}: {outcome} ~ {predictor} + covariates, one value per "
                                    "participant", 4)]
    data = analysis.data
    if data is not None and pd.api.types.is_numeric_dtype(data[predictor]):
        fig, ax = _subplots(1, 1, (4.6, 3.4))
        ax.scatter(data[predictor], data[outcome], s=12, color="#4c72b0")
        slope, intercept = np.polyfit(data[predictor], data[outcome], 1)
        line = np.linspace(data[predictor].min(), data[predictor].max(), 2)
        ax.plot(line, slope * line + intercept, color="#d62728", lw=1)
        ax.set_xlabel(predictor, fontsize=8)
        ax.set_ylabel(outcome, fontsize=8)
        fig.tight_layout()
        parts.append(_figure(fig, f"{analysis.name}: {outcome} against {predictor} (n = {len(data)})"))
    return parts


def _experiments(ws: Workspace) -> list[str]:
    """Per experiment: each condition's ensemble test metric on every repeat (a repeat's conditions joined: they
    share its split), and the paired tests."""
    parts = []
    for experiment in ws.experiments.values():
        summary, results = experiment.summary, experiment.results
        metric = summary["metric"]
        chosen = results[(results["metric"] == metric) & (results["member"] == ENSEMBLE)]
        by_repeat = chosen.pivot_table(index="repeat", columns="condition", values="value")[
            list(summary["by_condition"])]
        repeats = "retrainings on one split" if summary["same_split"] else "participant-grouped splits"
        conditions = "; ".join(f"{name}: {_plain(changes) or 'the recipe'}"
                               for name, changes in summary["conditions"].items())
        parts.append(f"<h3>{html.escape(experiment.name)}</h3><p>{html.escape(metric)} of the ensemble on the test "
                     f"split, {summary['repeats']} {repeats}; conditions: {html.escape(conditions)}</p>")
        fig, ax = _subplots(1, 1, (1.4 + 1.1 * by_repeat.shape[1], 3.4))
        positions = np.arange(by_repeat.shape[1])
        for _, row in by_repeat.iterrows():
            ax.plot(positions, row.to_numpy(), color="#bbbbbb", lw=0.8, zorder=1)
        for position, condition in enumerate(by_repeat.columns):
            ax.scatter(np.full(len(by_repeat), position), by_repeat[condition], s=18, color=f"C{position}", zorder=2)
            ax.hlines(by_repeat[condition].median(), position - 0.25, position + 0.25, color="black", lw=1.5)
        ax.set_xticks(positions, by_repeat.columns, fontsize=8, rotation=20)
        ax.set_ylabel(metric, fontsize=8)
        fig.tight_layout()
        parts.append(_figure(fig, f"{experiment.name}: {metric} per repeat (lines join a repeat's conditions; bars: "
                                  "medians)"))
        columns = ["first", "second", "n", "median_difference", "hodges_lehmann", "ci_low", "ci_high",
                   "rank_biserial", "statistic", "p", "p_holm"]
        parts.append(_table(experiment.comparisons[columns], f"{experiment.name}: paired Wilcoxon signed-rank test "
                            "per pair of conditions (second − first), Holm-corrected over the pairs", 4))
    return parts


def _plain(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}: {item}" for key, item in value.items())
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _voxel_association(analysis) -> list[str]:
    from nilearn import plotting

    parts = []
    if "t" not in analysis.maps:
        return [_note(f"{analysis.path}: no t.nii.gz map to show.")]
    if analysis.corrected_p is None:
        image, label = analysis.map("t"), "t (uncorrected: no corrected p map)"
    else:
        image, label = analysis.thresholded("t"), f"t where {analysis.corrected_p} < {analysis.alpha:g}"
    if not np.any(np.nan_to_num(image.get_fdata())):
        parts.append(_note(f"No voxel survives {analysis.corrected_p} < {analysis.alpha:g}; "
                           "the unthresholded t map is shown."))
        image, label = analysis.map("t"), "t (nothing significant)"
    values = np.nan_to_num(image.get_fdata())
    image = nib.Nifti1Image(values.astype(np.float32), image.affine)
    vmax = float(np.abs(values).max()) or 1.0
    fig = Figure(figsize=(13, 3.0), facecolor="white")
    stat_axes, glass_axes = fig.add_axes((0, 0, 0.56, 1)), fig.add_axes((0.57, 0, 0.43, 1))
    plotting.plot_stat_map(image, bg_img=mni_template(), axes=stat_axes, vmax=vmax, title=analysis.name,
                           colorbar=True, draw_cross=False, symmetric_cbar=True)  # one sign keeps its colours
    plotting.plot_glass_brain(image, axes=glass_axes, vmax=vmax, vmin=-vmax, plot_abs=False, colorbar=False)
    parts.append(_figure(fig, f"{analysis.name}: {label}"))
    if analysis.clusters is not None:
        parts.append(_table(analysis.clusters, f"{analysis.name}: clusters (peaks in mm, atlas regions)", 3)
                     if len(analysis.clusters) else _note("No clusters."))
    return parts


def _roi_correlations(analysis, correlations: pd.DataFrame) -> list[str]:
    """The study's table (region, r, p, p_bonferroni, n) and the regions ranked by r (red: Bonferroni p < α)."""
    ordered = correlations.sort_values("r", ascending=False)
    statistic = analysis.summary.get("model", "correlation")
    parts = [_table(ordered, f"{analysis.name}: {statistic} r per region of {analysis.summary.get('outcome')} and "
                             f"{analysis.summary.get('predictor')}, corrections across the "
                             f"{len(correlations)} regions of the family", 3)]
    shown = ordered.dropna(subset=["r"])
    shown = pd.concat([shown.head(MAX_TABLE_ROWS // 2), shown.tail(MAX_TABLE_ROWS // 2)]).drop_duplicates("region")
    shown = shown.sort_values("r")
    fig, ax = _subplots(1, 1, (7, 0.26 * len(shown) + 1.2))
    significant = shown["p_bonferroni"].to_numpy() < analysis.alpha
    ax.barh(shown["region"].astype(str), shown["r"], color=np.where(significant, "#d62728", "#9e9e9e"))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"{statistic} r (red: Bonferroni p < α)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    parts.append(_figure(fig, f"{analysis.name}: regions ranked by r"))
    cortical = correlations[correlations["region"].astype(str).str.match(r"ctx-[lr]h-")]
    if len(cortical):
        parts.append(_figure(_surface_figure(cortical, f"{statistic} r"),
                             f"{analysis.name}: r of the cortical (Desikan–Killiany) regions on fsaverage5, lateral "
                             "and medial (regions without a value in grey)"))
    return parts


def _surface_figure(regions: pd.DataFrame, label: str):
    """``regions``' ``r`` painted on nilearn's inflated fsaverage5, each vertex coloured by its DK region."""
    from nilearn import datasets, plotting

    mesh = datasets.load_fsaverage("fsaverage5")
    table = label_table("freesurfer")
    lookup = np.full(int(table.index.max()) + 1, np.nan)
    lookup[table.index] = pd.Series(regions["r"].to_numpy(), index=regions["region"].astype(str)).reindex(
        table["name"]).to_numpy()
    limit = float(np.nanmax(np.abs(regions["r"]))) if regions["r"].notna().any() else 1.0
    fig = Figure(figsize=(12, 2.8), facecolor="white")
    views = [("left", "lateral"), ("left", "medial"), ("right", "medial"), ("right", "lateral")]
    for n, (hemisphere, view) in enumerate(views):
        axis = fig.add_subplot(1, 4, n + 1, projection="3d")
        plotting.plot_surf_stat_map(mesh.inflated.parts[hemisphere], lookup[fsaverage_labels()[hemisphere]],
                                    hemi=hemisphere, view=view, axes=axis, figure=fig, cmap="RdBu_r", vmax=limit,
                                    symmetric_cbar=True, colorbar=n == len(views) - 1, title=f"{hemisphere} {view}")
    fig.suptitle(label, fontsize=9)
    return fig


def _roi_association(analysis) -> list[str]:
    if analysis.correlations is not None:
        return _roi_correlations(analysis, analysis.correlations)
    regions = analysis.regions
    if regions is None:
        return [_note(f"{analysis.path}: no regions.parquet.")]
    predictor = analysis.summary.get("predictor")
    if "term" in regions and predictor in set(regions["term"]):
        regions = regions[regions["term"] == predictor]
    ordered = regions.sort_values("p")
    parts = [_table(ordered, f"{analysis.name}: per-region models of {predictor}, by p (FDR-adjusted in p_fdr)", 3)]
    shown = ordered.head(MAX_TABLE_ROWS)[::-1]
    fig, ax = _subplots(1, 1, (7, 0.26 * len(shown) + 1.2))
    significant = shown["p_fdr"].to_numpy() < analysis.alpha
    ax.barh(shown["region"].astype(str) + " · " + shown["term"].astype(str), shown["statistic"],
            color=np.where(significant, "#d62728", "#9e9e9e"))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("statistic (red: p_fdr < α)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    parts.append(_figure(fig, f"{analysis.name}: statistic per region"))
    return parts


# ---------------------------------------------------------------------------------------
# Provenance


def _provenance(ws: Workspace) -> list[str]:
    if not ws.has("provenance"):
        return [_note("No provenance.json: the workspace was not made by `relcohort run`.")]
    runs, last = ws.provenance.runs, ws.provenance.last
    if last is None:
        return [_note("provenance.json records no run.")]
    facts = pd.DataFrame([{"catalog": last.catalog_file, "sha256": last.catalog_sha256[:16], "seeds": last.seeds,
                           "cluster": last.cluster, "python": last.python, "platform": last.platform}])
    times = pd.DataFrame([{"started": run.started, "state": run.state or "running",
                           **{stage: summary.get("seconds") for stage, summary in run.stages.items()}}
                          for run in runs])
    versions = pd.DataFrame(list(last.packages.items()), columns=["package", "version"])
    catalog = yaml.safe_dump(last.catalog, sort_keys=False)
    return [_table(facts, "Last run"), _table(times.iloc[::-1], "Runs, newest first: seconds per stage", 3),
            _table(versions, "Package versions"),
            f"<details><summary>Catalog of the last run</summary><pre>{html.escape(catalog)}</pre></details>"]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1320px; padding: 0 16px; color: #222;
       background: #fff; }}
nav {{ position: sticky; top: 0; background: #f4f4f4; padding: 6px 10px; border-bottom: 1px solid #ccc; }}
section {{ border-top: 2px solid #4c72b0; margin-top: 18px; padding-top: 4px; }}
figure {{ margin: 8px 0; }} figure img {{ max-width: 100%; }}
figcaption, .caption {{ font-size: 0.85em; color: #555; }}
table.table {{ border-collapse: collapse; font-size: 0.85em; }}
table.table td, table.table th {{ padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
table.table td {{ max-width: 30em; }}  /* long names wrap where _table allows */
.table-wrap {{ overflow-x: auto; margin: 8px 0; }} .note {{ color: #666; font-style: italic; }}
pre {{ background: #f7f7f7; padding: 8px; font-size: 0.8em; }}
</style></head>
<body>
<h1>{title}</h1>
<p class="caption">Workspace {path}; report written {stamp}.</p>
<nav>{nav}</nav>
{body}
<script>
// report.html?section=<id> shows one section (for screenshots); the body records how many images decoded.
const only = new URLSearchParams(location.search).get("section");
if (only) {{
  document.querySelectorAll("section").forEach(s => {{ s.hidden = s.id !== only; }});
  document.querySelector("nav").hidden = true;
}}
window.addEventListener("load", () => {{
  const images = [...document.images];
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = images.length;
}});
</script>
</body></html>
"""
