"""Relevance–feature associations over a workspace: terms by name, voxel-wise and ROI-wise analyses.

A term names what enters a model:

- ``relevance.<method>``: the ensemble-mean relevance map of an attribution method (a map), raw
  (``relevance.<ensemble>.<method>`` with several named ensembles, e.g. ``relevance.flair.lrp``);
  ``relevance.<method>.normalised`` divides each participant's map by its total Σ|R| (LRP
  relevance sums to about the prediction minus the output bias, so raw maps grow with predicted
  age everywhere; that sum crosses zero, the total magnitude does not), and
  ``relevance.<method>.absolute`` takes |R|;
- ``images.<modality>``: a modality of the images store, e.g. ``images.GM`` (a map);
- ``predictions.<column>``: the ensemble's value per subject, e.g. ``predictions.brain_age_gap_corrected``
  (``predictions.<ensemble>.<column>`` with several named ensembles);
- ``features.<table>.<column>``: a feature table's column, per subject (``lesion_load.lesion_volume_mm3``)
  or per subject and region when the table has a ``region`` column (``regional_gm_volume.volume_mm3``);
  ``features.freesurfer.<measure>``: a FreeSurfer measure per participant and structure, named as
  FreeSurfer's label table names it (``volume``, ``aparc.thickness_mean``) or per participant (``eTIV``);
- anything else: a participant column (``age``, ``sex``, ``site``, ...).

Voxel-wise analyses run :func:`engine.analysis.stats.voxelwise_ols` on the maps; ROI-wise ones reduce map
terms to one value per region (:func:`engine.analysis.atlas.region_reduce`: an atlas, or each
participant's own parcels) and fit :func:`engine.analysis.stats.region_models` or
:func:`engine.analysis.stats.region_correlations` per region.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, model_validator
from scipy import ndimage

from engine.analysis.atlas import Atlas, AtlasSettings, NativeLabels, ParticipantLabels, region_reduce
from engine.analysis.features import freesurfer_measure
from engine.analysis.stats import (
    ExchangeabilityBlocks,
    adjust_p,
    map_similarity,
    mixed_model,
    region_correlations,
    region_models,
    voxelwise_ols,
)
from engine.data.inputs import by_scan, key_columns, one_scan_each, scan_ids
from engine.data.labels import FREESURFER_GROUPS, matching_regions
from engine.data.masker import Masker
from engine.data.store import keyed
from engine.layout import AssociationLayout

MAP_SOURCES = ("relevance", "images")
#: The feature table of every participant's FreeSurfer stats (``features.freesurfer.<measure>``).
FREESURFER_TABLE = "freesurfer"
#: How a relevance term's maps enter a model: as stored, divided by their sum per participant, or |R|.
RELEVANCE_NORMALISATIONS = ("raw", "normalised", "absolute")
#: The p-value map written for each correction name (``none``: uncorrected).
CORRECTED_P = {"fwe": "p_fwe", "fdr_bh": "p_fdr", "bonferroni": "p_bonferroni", "none": "p"}


class AnalysisError(ValueError):
    """An association analysis of the catalog cannot run: the message names it and what is wrong."""


@dataclass(frozen=True)
class Term:
    """One name in an analysis, parsed once (see the module docstring for the forms)."""

    text: str
    source: str  # relevance, images, predictions, features or participants
    name: str  # the method, modality, prediction column, feature table or participant column
    column: str | None = None  # the column of a feature table
    normalisation: str = "raw"  # of a relevance map: raw, normalised (÷ Σ|R| per participant), absolute
    ensemble: str | None = None  # of relevance and predictions: the named ensemble (None: the only one)

    @classmethod
    def parse(cls, text: str) -> Term:
        source, _, rest = text.partition(".")
        if source == "relevance":  # relevance[.<ensemble>].<method>[.<normalisation>]
            parts = rest.split(".")
            if len(parts) == 2 and parts[1] in RELEVANCE_NORMALISATIONS:
                parts = [None, *parts]
            elif len(parts) < 3:
                parts = ([None] if len(parts) == 1 else []) + parts + ["raw"]
            ensemble, method, normalisation = parts if len(parts) == 3 else (None, "", "")
            if not method:
                raise ValueError(f"term {text!r}: relevance.<method> (or relevance.<ensemble>.<method>) needs a name "
                                 "after the dot")
            if normalisation not in RELEVANCE_NORMALISATIONS:
                raise ValueError(f"term {text!r}: relevance[.<ensemble>].<method>.<normalisation> takes one of "
                                 f"{', '.join(RELEVANCE_NORMALISATIONS)}, got {normalisation!r}")
            return cls(text, source, method, normalisation=normalisation, ensemble=ensemble)
        if source == "predictions":  # predictions[.<ensemble>].<column>
            ensemble, _, column = rest.rpartition(".")
            if not column:
                raise ValueError(f"term {text!r}: predictions.<column> needs a name after the dot")
            return cls(text, source, column, ensemble=ensemble or None)
        if source == "images":
            if not rest:
                raise ValueError(f"term {text!r}: {source}.<name> needs a name after the dot")
            return cls(text, source, rest)
        if source == "features":
            table, _, column = rest.partition(".")
            if not table or not column:
                raise ValueError(f"term {text!r}: a feature is features.<table>.<column>")
            return cls(text, source, table, column)
        return cls(text, "participants", text)

    @classmethod
    def of(cls, term: Term | str) -> Term:
        """``term`` parsed, if it is not a :class:`Term` already."""
        return term if isinstance(term, Term) else cls.parse(term)

    def __str__(self) -> str:
        return self.text

    @property
    def is_map(self) -> bool:
        """A (subject × voxel) map: ``relevance.<method>`` or ``images.<modality>``."""
        return self.source in MAP_SOURCES


#: With several scans per participant, the terms that part age into between (the age at the participant's first
#: scan) and within participants (years since then).
BASELINE_AGE, YEARS = "baseline_age", "years_since_baseline"

#: The roi table's column naming each row's exchangeability block (its participant).
BLOCK = "block"

#: A binary classification's outcomes, the last of the sorted classes positive.
OUTCOMES = ("TP", "FP", "TN", "FN")


def classification_outcomes(predictions: pd.DataFrame) -> pd.Series | None:
    """TP / FP / TN / FN per participant of a binary classification's ensemble predictions (``observed`` and one
    ``p_<class>`` column per class, sorted; the last class positive, called at p ≥ 0.5); None for other tasks."""
    classes = [column.removeprefix("p_") for column in predictions if column.startswith("p_")]
    if len(classes) != 2:
        return None
    positive = predictions["observed"].astype(str).to_numpy() == classes[1]
    called = predictions[f"p_{classes[1]}"].to_numpy() >= 0.5
    outcome = np.select([positive & called, ~positive & called, ~positive & ~called], ["TP", "FP", "TN"], "FN")
    outcome = np.where(predictions["observed"].isna().to_numpy(), None, outcome)  # unlabelled: no outcome
    return pd.Series(outcome, index=scan_ids(predictions), name="outcome")


@dataclass
class Sources:
    """What terms resolve against: the images store, each ensemble's relevance store and predictions (keyed by
    ensemble name, ``None`` for a single unnamed ensemble; a bare Dataset or table is that one), participants and
    tables."""

    images: xr.Dataset
    participants: pd.DataFrame  # index: the store's row labels; columns participant_id (, session_id), age, …
    relevance: Mapping[str | None, xr.Dataset] | xr.Dataset | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # feature tables by name, keyed by participant_id
    predictions: Mapping[str | None, pd.DataFrame] | pd.DataFrame | None = None  # ensemble rows, keyed alike

    def __post_init__(self):
        for name in ("relevance", "predictions"):
            value = getattr(self, name)
            if value is None or isinstance(value, (xr.Dataset, pd.DataFrame)):  # (a Dataset is a Mapping too)
                setattr(self, name, {} if value is None else {None: value})
        people = self.participants
        if "session_id" in people and "age" in people and BASELINE_AGE not in people:  # within / between terms
            baseline = people.groupby("participant_id", sort=False)["age"].transform("first")
            self.participants = people.assign(**{BASELINE_AGE: baseline, YEARS: people["age"] - baseline})

    def restricted(self, subjects: Sequence[str]) -> Sources:
        """These sources with only ``subjects``: the images, relevance maps, predictions and tables."""
        kept = set(subjects)

        def rows(table: pd.DataFrame) -> pd.DataFrame:
            return table[pd.Index(scan_ids(table)).isin(kept)] if "participant_id" in table.columns else table

        return Sources(
            self.images.sel(subject=[s for s in self.images.subject.values if s in kept]),
            self.participants[self.participants.index.isin(kept)],
            {name: data.sel(subject=[s for s in data.subject.values if s in kept])
             for name, data in self.relevance.items()},
            {name: rows(table) for name, table in self.tables.items()},
            {name: rows(table) for name, table in self.predictions.items()})

    def averaged(self) -> Sources:
        """These sources with one row per participant, labelled by participant_id: each participant's scans averaged
        — maps voxel by voxel, numeric columns of the participants, feature and prediction tables (per region
        where they have regions) —, other columns the first scan's."""
        people = self.participants["participant_id"]

        def maps(data: xr.Dataset) -> xr.Dataset:
            labels = xr.DataArray(people.reindex(data["subject"].values).to_numpy(), dims="subject", name="subject")
            per_subject = [name for name in data.coords if data[name].dims == ("subject",) and name != "subject"]
            averaged = data.drop_vars(per_subject).groupby(labels).mean(keep_attrs=True)
            columns = participants.reindex(averaged["subject"].values)
            return averaged.assign_coords({name: ("subject", columns[name].to_numpy()) for name in columns})

        def rows(table: pd.DataFrame) -> pd.DataFrame:
            if "participant_id" not in table.columns:
                return table
            keys = ["participant_id", *(["region"] if "region" in table.columns else [])]
            return _first_or_mean(table.drop(columns="session_id", errors="ignore"), keys).reset_index()

        participants = _first_or_mean(self.participants.drop(columns="session_id"), ["participant_id"])
        participants.index = participants.index.rename("subject")
        participants.insert(0, "participant_id", participants.index)
        return Sources(maps(self.images), participants,
                       {name: maps(data) for name, data in self.relevance.items()},
                       {name: rows(table) for name, table in self.tables.items()},
                       {name: rows(table) for name, table in self.predictions.items()})

    def ensemble_relevance(self, term: Term) -> xr.Dataset:
        """The relevance store of ``term``'s ensemble."""
        return _of_ensemble(term, self.relevance, "relevance maps (run the explain stage)")

    def ensemble_predictions(self, term: Term) -> pd.DataFrame:
        """The ensemble rows of the predictions of ``term``'s ensemble."""
        return _of_ensemble(term, self.predictions, "predictions (run the train stage)")

    def map(self, term: Term, subjects: list[str] | None = None) -> xr.DataArray:
        """A (``subject`` × ``voxel``) map term, restricted to ``subjects`` in that order."""
        source, name = term.source, term.name
        if source == "relevance":
            relevance = self.ensemble_relevance(term)
            methods = list(relevance["attribution"].values)
            if name not in methods:
                raise ValueError(f"{term}: no relevance maps of method {name!r} (explained: {methods})")
            values = relevance["relevance_mean"].sel(attribution=name)
            if term.normalisation == "normalised":  # Σ R itself crosses zero: about prediction − output bias
                total = abs(values).sum("voxel")
                values = values / total.where(total != 0)
            elif term.normalisation == "absolute":
                values = abs(values)
        elif source == "images":
            if name not in self.images.data_vars:
                raise ValueError(f"{term}: no modality {name!r} in the images store ({list(self.images.data_vars)})")
            values = self.images[name]
        else:
            raise ValueError(f"{term}: not a map; maps are relevance.<method> or images.<modality>")
        values = values.drop_vars([c for c in values.coords if c not in ("subject", "voxel", "i", "j", "k")])
        if subjects is not None:
            values = values.sel(subject=subjects)
        return values.rename(term.text)

    def subjects_of(self, term: Term) -> list[str]:
        return [str(subject) for subject in self.map(term)["subject"].values]

    def subject_values(self, term: Term, subjects: list[str]) -> pd.Series:
        """One value per subject (NaN where missing) for a participant, prediction or feature column."""
        if term.source == "predictions":
            table, column = by_scan(self.ensemble_predictions(term)), term.name
        elif term.source == "features":
            table, column = self.feature(term), term.text
            if "region" in table.columns:
                raise ValueError(f"{term}: table {term.name!r} has one value per region: use it in an roi analysis")
            table = by_scan(table)
        elif term.source == "participants":
            table, column = self.participants, term.text
        else:
            raise ValueError(f"{term}: a map, not one value per subject")
        if column not in table.columns:
            raise ValueError(f"{term}: no column {column!r} (columns: {sorted(map(str, table.columns))})")
        return table[column].reindex(subjects).rename(term.text)

    def region_values(self, term: Term, subjects: list[str], regions: Atlas | ParticipantLabels | NativeLabels,
                      statistic: str, min_region_mm3: float | None = None) -> pd.DataFrame:
        """(subject, region, value) of a region-level term: a map reduced per region (of one atlas, or of
        each participant's own labels), or a feature with regions (a table's ``region`` column, FreeSurfer's
        structures).

        A participant's region of a map term smaller than ``min_region_mm3`` (default: one voxel of the cohort
        grid; a parcel the participant does not have is always smaller) has no value (NaN), and regions no
        participant has are left out."""
        if term.is_map:
            reduced = region_reduce(self.map(term, subjects), regions).compute()
            kept = reduced["count"] > 0  # on the cohort grid: at least one voxel, one voxel's volume
            if min_region_mm3 is not None or "volume_mm3" in reduced:
                voxel_volume = Masker.of(self.images).grid.voxel_volume
                volume = reduced["volume_mm3"] if "volume_mm3" in reduced else reduced["count"] * voxel_volume
                kept = kept & (volume >= (voxel_volume if min_region_mm3 is None else min_region_mm3) * (1 - 1e-9))
            values = reduced[statistic].where(kept)
            present = reduced["region"].values[kept.any([d for d in kept.dims if d != "region"]).values]
            table = values.sel(region=present).to_dataframe(name=term.text).reset_index()
            return table[["subject", "region", term.text]]
        if term.source != "features":
            raise ValueError(f"{term}: not a region-level term (a map, or features.<table>.<column> with regions)")
        table = self.feature(term)
        if "region" not in table.columns:
            raise ValueError(f"{term}: table {term.name!r} has no 'region' column: one value per participant")
        table = by_scan(table).rename_axis("subject").reset_index()
        return table.loc[table["subject"].isin(subjects), ["subject", "region", term.text]]

    def feature(self, term: Term) -> pd.DataFrame:
        """``participant_id``, (``region``,) and the term's values (column named by the term) of a feature term.
        The FreeSurfer table's columns are measures (:func:`~engine.analysis.features.freesurfer_measure`)."""
        name, column = term.name, term.column
        if name not in self.tables:
            raise ValueError(f"{term}: no feature table {name!r} (tables: {sorted(self.tables)})")
        table = self.tables[name]
        if name == FREESURFER_TABLE:
            try:
                return freesurfer_measure(table, column).rename(columns={"value": term.text})
            except ValueError as error:
                raise ValueError(f"{term}: {error}") from None
        if column not in table.columns:
            raise ValueError(f"{term}: no column {column!r} in table {name!r} (columns: {list(table.columns)})")
        keys = [*key_columns(table), *(["region"] if "region" in table.columns else [])]
        return table[[*keys, column]].rename(columns={column: term.text})


def chosen_scans(sources: Sources, scans: str | None) -> Sources:
    """The sources with the scans an analysis takes (``scans``: baseline, last, mean or all, see
    :class:`AnalysisSettings`); a cohort without sessions as it is."""
    if "session_id" not in sources.participants.columns:
        return sources
    people = sources.participants["participant_id"]
    if scans is None:
        raise ValueError(f"the cohort has several scans per participant ({len(people)} scans of {people.nunique()} "
                         "participants): choose scans: baseline, last or mean (one per participant), or all (with a "
                         "model that respects repeated scans)")
    if scans == "all":
        return sources
    if scans == "mean":
        return sources.averaged()
    return sources.restricted(list(people.index[one_scan_each(people, scans)]))


def _first_or_mean(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: the mean of the numeric columns, the first value of the others."""
    groups = table.groupby(keys, sort=False)
    numeric = [column for column in table.columns
               if column not in keys and pd.api.types.is_numeric_dtype(table[column])]
    others = [column for column in table.columns if column not in keys and column not in numeric]
    return pd.concat([groups[numeric].mean(), groups[others].first()], axis=1)[
        [column for column in table.columns if column not in keys]]


def _of_ensemble(term: Term, by_ensemble: Mapping, what: str):
    if not by_ensemble:
        raise ValueError(f"{term}: the workspace has no {what}")
    names = [name for name in by_ensemble if name is not None]
    if term.ensemble is None:
        if len(by_ensemble) > 1:
            raise ValueError(f"{term}: the workspace has several ensembles ({', '.join(names)}): name one, "
                             f"e.g. {term.source}.{names[0]}.{term.name}")
        return next(iter(by_ensemble.values()))
    if term.ensemble not in by_ensemble:
        raise ValueError(f"{term}: no ensemble {term.ensemble!r} (ensembles: {', '.join(names) or 'one, unnamed'})")
    return by_ensemble[term.ensemble]


def analysis_subjects(sources: Sources, terms: Sequence[Term | str]) -> list[str]:
    """Subjects of the analysis: those of its first map term (relevance maps exist for some only)."""
    maps = [term for term in map(Term.of, terms) if term.is_map]
    if not maps:
        return [str(subject) for subject in sources.images["subject"].values]
    relevance = [term for term in maps if term.source == "relevance"]
    return sources.subjects_of((relevance or maps)[0])


def _term(value) -> Term:
    if not isinstance(value, (str, Term)):
        raise ValueError(f"a term is text such as 'relevance.lrp' or 'age', got {value!r}")
    return Term.of(value)


#: An analysis term (``engine.analysis.association.Term``), parsed once when the catalog is read; written as its text.
TermText = Annotated[Term, PlainValidator(_term), PlainSerializer(str, return_type=str)]


class RegionFamily(BaseModel):
    """Which regions an roi analysis tests, and so the family its corrections run over. An entry is a region name,
    a glob pattern (``ctx-lh-*``) or one of FreeSurfer's groups: """ + ", ".join(FREESURFER_GROUPS) + """."""

    model_config = ConfigDict(extra="forbid")

    include: list[str] = Field([], description="regions to test (empty: every region present)")
    exclude: list[str] = Field([], description="regions left out")

    def select(self, names: list[str]) -> list[str]:
        """The family among ``names``; an entry that matches none of them is an error naming it."""
        included, unmatched = matching_regions(names, self.include) if self.include else (names, [])
        excluded, unmatched_excluded = matching_regions(names, self.exclude)
        if unmatched or unmatched_excluded:
            raise ValueError(f"regions: {unmatched + unmatched_excluded} match no region of the analysis "
                             f"({', '.join(names[:6])}{', …' if len(names) > 6 else ''}; groups: "
                             f"{', '.join(FREESURFER_GROUPS)})")
        family = [name for name in included if name not in set(excluded)]
        if not family:
            raise ValueError(f"regions: include {self.include} and exclude {self.exclude} leave no region to test")
        return family

    def describe(self, family: list[str]) -> dict:
        return {"include": self.include or ["every region present"], "exclude": self.exclude, "size": len(family),
                "regions": family}


class Range(BaseModel):
    """A numeric column's range, ends included (either may be left open)."""

    model_config = ConfigDict(extra="forbid")

    min: float | None = Field(None, description="the smallest value taken (none: no lower end)")
    max: float | None = Field(None, description="the largest value taken (none: no upper end)")


class SubjectFilter(BaseModel):
    """Which participants an analysis takes (by default every one its terms have values for): a split and the
    outcomes of an ensemble's predictions, and values of participant columns; every condition given must hold."""

    model_config = ConfigDict(extra="forbid")

    ensemble: str | None = Field(None, description="whose split and outcomes (default: the ensemble of the "
                                 "analysis's relevance or predictions term)")
    split: list[Literal["train", "validation", "test"]] = Field([], description="only these splits")
    outcome: list[Literal[OUTCOMES]] = Field([], description="only these outcomes of a binary classification "
                                             "(the last of the sorted classes positive, as in the report)")
    where: dict[str, str | float | list[str | float] | Range] = Field(
        {}, description="participant columns: a value, a list of values, or a range {min, max}")

    def predictions_term(self, terms: Sequence[Term]) -> Term:
        """The term whose ensemble's predictions give the split and outcomes: ``ensemble``'s, or the first relevance
        or predictions term's."""
        if self.ensemble is not None:
            return Term.parse(f"predictions.{self.ensemble}.split")
        named = [term for term in terms if term.source in ("relevance", "predictions")]
        if not named:
            raise ValueError("subjects.split and subjects.outcome need an ensemble: name it (subjects.ensemble) "
                             "or use a relevance or predictions term")
        return named[0]

    def subjects(self, sources: Sources, terms: Sequence[Term]) -> list[str]:
        """The subjects of the images store that meet every condition."""
        subjects = pd.Index([str(subject) for subject in sources.images["subject"].values])
        keep = np.ones(len(subjects), bool)
        if self.split or self.outcome:
            predictions = sources.ensemble_predictions(self.predictions_term(terms))
            if self.split:
                split = by_scan(predictions)["split"]
                keep &= split.reindex(subjects).isin(self.split).to_numpy()
            if self.outcome:
                outcome = classification_outcomes(predictions)
                if outcome is None:
                    raise ValueError("subjects.outcome needs a binary classification's predictions (TP/FP/TN/FN)")
                keep &= outcome.reindex(subjects).isin(self.outcome).to_numpy()
        for column, condition in self.where.items():
            if column not in sources.participants.columns:
                raise ValueError(f"subjects.where: {column!r} is not a participant column "
                                 f"({sorted(map(str, sources.participants.columns))})")
            values = sources.participants[column].reindex(subjects)
            if isinstance(condition, Range):
                numbers = pd.to_numeric(values, errors="coerce")
                keep &= ((numbers >= (-np.inf if condition.min is None else condition.min))
                         & (numbers <= (np.inf if condition.max is None else condition.max))).to_numpy()
            else:
                accepted = condition if isinstance(condition, list) else [condition]
                keep &= values.isin(accepted).to_numpy() | values.astype(str).isin(map(str, accepted)).to_numpy()
        if not keep.any():
            raise ValueError(f"no participant meets subjects {self.model_dump(exclude_defaults=True)}")
        return list(subjects[keep])


class AnalysisSettings(BaseModel):
    """One association model: outcome ~ predictor + covariates, voxel- or ROI-wise (:func:`analyse`); the catalog's
    ``associate:`` entries are this model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="folder name under <workspace>/associations/")
    outcome: TermText = Field(..., description="a term: relevance.<method>, images.<modality>, predictions.<column>, "
                         "features.<table>.<column> or a participant column")
    predictor: TermText = Field(..., description="a term, as for outcome")
    covariates: list[TermText] = Field([], description="terms; non-numeric ones (sex, site) are dummy-coded")
    scope: Literal["voxel", "roi", "similarity", "subject", "gain"] = Field(
        "voxel", description="voxel-wise model, one model per atlas region, per-subject similarity of two maps, "
        "one model of per-participant values (e.g. lesion load ~ brain-age gap), or the relevance region table of "
        "Böhle et al. 2019 (sum, density and gain of each group of the predictor against its reference)")
    reference: str | float | None = Field(None, description="gain: the predictor's value of the reference group "
                                          "(e.g. CN: the controls)")
    correction: list[Literal["bonferroni", "fdr_bh", "fwe"]] = Field(
        ["fdr_bh"], min_length=1, description="p-value corrections across voxels, or across the regions of the "
        "family (roi); fwe needs permutations; a voxel analysis's first correction thresholds the cluster table")
    permutations: int = Field(0, ge=0, le=100_000, description="Freedman–Lane permutations: voxel, max-T over "
                              "voxels for fwe; roi, a permutation p per region (p_permutation) and the max-|t| over "
                              "the regions for fwe (p_fwe)")
    seed: int = Field(0, ge=0, description="seed of the permutations")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of maps and cluster tables")
    min_coverage: float = Field(0.1, ge=0, le=1, description="voxel: test only voxels where at least this share of "
                                "the participants has a nonzero value in every map term at once (1: SPM's implicit "
                                "mask); elsewhere the few participants with a value would decide the fit")
    region_statistic: Literal["mean", "sum", "abs_sum", "pos_sum"] = Field(
        "mean", description="roi: how a map becomes one value per region (mean = relevance density)")
    statistic: Literal["regression", "pearson", "spearman", "partial"] = Field(
        "regression", description="roi: a regression model per region, or the study's correlation per region "
        "(partial: controlling for the covariates), with Bonferroni and FDR across regions")
    robust: bool = Field(False, description="roi and subject: HC3 standard errors")
    random_intercept: str | list[str] | None = Field(
        None, description="roi and subject: a linear mixed model (statsmodels MixedLM) with a random intercept per "
        "this participant column (participant_id for several scans per participant, site), or per each of a list, "
        "outermost first ([site, participant_id]: participants nested in sites)")
    scans: Literal["baseline", "last", "mean", "all"] | None = Field(
        None, description="with several scans per participant (needed then): which enter — each participant's "
        "baseline or last scan, the mean of their scans (maps voxel by voxel, numeric values), or all scans, with "
        "a model that respects their dependence (roi and subject: random_intercept with participant_id; voxel and "
        "roi permutations: permute); the subjects filter applies after. Age then parts into the participant columns "
        "baseline_age (between participants) and years_since_baseline (within)")
    permute: Literal["participants", "within_participants"] | None = Field(
        None, description="scans: all: permutations exchange whole participants, their scans together (a "
        "between-participant effect: diagnosis, sex, age at baseline), or scans within each participant (a "
        "within-participant effect: time since baseline), as FSL randomise's exchangeability blocks")
    atlas: AtlasSettings | None = Field(None, description="roi: regions (default: the catalog's atlas)")
    within: AtlasSettings | None = Field(None, description="voxel: test only the voxels inside this atlas's regions "
                                         "(those regions names), e.g. the white-matter tracts (the study's FA "
                                         "analysis)")
    regions: RegionFamily = Field(default_factory=RegionFamily, description="roi: the regions tested, and so the "
                                  "family the corrections run over; voxel with within: the regions whose voxels are "
                                  "tested (default: every region present)")
    min_region_mm3: float | None = Field(None, ge=0, description="roi: a participant's region smaller than this "
                                         "(mm³) has no value for them, left out of that region's test (default: one "
                                         "voxel of the cohort grid); a parcel the participant does not have never "
                                         "counts as 0")
    labels: str | None = Field(None, description="roi: a label-volume modality (with labels: in modalities, e.g. "
                               "every participant's aparc+aseg): each participant's own parcels instead of an atlas")
    subjects: SubjectFilter | None = Field(None, description="only these participants: a split, a classifier's "
                                           "outcomes, values of participant columns (an age band, a diagnosis)")
    native: bool = Field(False, description="roi with labels: take each participant's map back onto their native "
                         "label volume (the registration's inverse transform) and reduce there, as the seed study "
                         "did; needs a register section")

    @model_validator(mode="after")
    def _consistent(self):
        if "fwe" in self.correction and self.permutations == 0:
            raise ValueError("correction fwe needs permutations (e.g. 1000)")
        if self.scope == "roi" and self.permutations and (self.robust or self.random_intercept):
            raise ValueError("the roi permutation test permutes OLS fits: not with robust or random_intercept")
        if self.permute and (self.scans != "all" or not self.permutations):
            raise ValueError("permute chooses how permutations treat several scans per participant: it needs "
                             "scans: all and permutations")
        if self.scans == "all":
            self._respects_repeated_scans()
        if (self.scope == "gain") != (self.reference is not None):
            raise ValueError("a gain analysis needs reference (the predictor's value of the reference group), and "
                             "reference applies to gain analyses only")
        if self.scope == "gain" and (not self.outcome.is_map or self.predictor.is_map or self.covariates):
            raise ValueError("a gain analysis reduces a map (outcome) per region in the groups of a participant "
                             "column (predictor), without covariates")
        if self.within is not None and self.scope != "voxel":
            raise ValueError("within applies to voxel analyses only")
        if self.random_intercept and self.scope not in ("roi", "subject"):
            raise ValueError("random_intercept applies to roi and subject analyses only")
        roi_only = [name for name in ("atlas", "labels", "regions", "min_region_mm3")
                    if name in self.model_fields_set and getattr(self, name)
                    and not (name == "regions" and self.within is not None)]
        if self.scope not in ("roi", "gain") and roi_only:
            raise ValueError(f"{', '.join(roi_only)} apply to roi analyses only")
        if self.atlas and self.labels:
            raise ValueError("choose atlas (one atlas for everyone) or labels (each participant's own), not both")
        if self.scans == "mean" and self.labels:
            raise ValueError("scans: mean averages maps across a participant's scans, but labels takes each scan's "
                             "own parcels: take baseline, last or all scans")
        if self.native and not self.labels:
            raise ValueError("native reduces in each participant's native label volume: it needs labels")
        if self.min_coverage and self.scope != "voxel" and "min_coverage" in self.model_fields_set:
            raise ValueError("min_coverage applies to voxel analyses only")
        if self.robust and self.scope not in ("roi", "subject"):
            raise ValueError("robust applies to roi and subject analyses only")
        if self.scope == "subject" and any(term.is_map for term in (self.outcome, self.predictor, *self.covariates)):
            raise ValueError("a subject analysis takes one value per participant (no relevance. or images. maps)")
        maps = [term.is_map for term in (self.outcome, self.predictor)]
        if self.scope == "similarity" and not all(maps):
            raise ValueError("a similarity analysis compares two maps (relevance.<method> or images.<modality>)")
        if self.scope == "voxel" and not any(maps):
            raise ValueError("a voxel analysis needs a map (relevance.<method> or images.<modality>) as outcome "
                             "or predictor")
        if self.statistic != "regression":
            if self.scope != "roi":
                raise ValueError(f"statistic {self.statistic} applies to roi analyses only")
            if self.statistic != "partial" and self.covariates:
                raise ValueError(f"a {self.statistic} correlation takes no covariates; use statistic: partial")
            if self.robust or self.random_intercept:
                raise ValueError("robust and random_intercept apply to statistic: regression")
        if self.robust and self.random_intercept:
            raise ValueError("choose robust (OLS with HC3 errors) or random_intercept (mixed model), not both")
        return self

    @property
    def random_intercepts(self) -> list[str]:
        """The grouping columns of the mixed model, outermost first (none: OLS)."""
        value = self.random_intercept
        return [] if value is None else [value] if isinstance(value, str) else list(value)

    def _respects_repeated_scans(self) -> None:
        """With every scan of a participant in the analysis, refuse inference that takes scans as independent."""
        mixed = "participant_id" in self.random_intercepts
        permuted = bool(self.permute)
        parametric = sorted(set(self.correction) - {"fwe"})
        if self.scope == "voxel" and not permuted:
            raise ValueError("scans: all in a voxel analysis: its scans are not independent, so its p-values come "
                             "from permutations that respect them: set permute (participants or "
                             "within_participants), permutations and correction: [fwe]")
        if self.scope == "subject" and not mixed:
            raise ValueError("scans: all in a subject analysis: add random_intercept: participant_id (a mixed model "
                             "with a random intercept per participant), or take one scan each (scans: baseline, "
                             "last or mean)")
        if self.scope == "roi" and not (mixed or permuted):
            raise ValueError("scans: all in an roi analysis: a mixed model (random_intercept: participant_id) or "
                             "permutations that respect the scans (permute, permutations, correction: [fwe])")
        if permuted and parametric:
            raise ValueError(f"scans: all with permutations: corrections {parametric} would adjust p-values that "
                             "take the scans as independent; use correction: [fwe]")


def covariate_frame(sources: Sources, covariates: list[Term], subjects: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Per-subject covariates (columns named by the terms' text) and which of them are categorical."""
    frame = pd.DataFrame({term.text: sources.subject_values(term, subjects).to_numpy() for term in covariates},
                         index=pd.RangeIndex(len(subjects)))
    categorical = [name for name in frame.columns if not pd.api.types.is_numeric_dtype(frame[name])]
    return frame, categorical


def voxel_analysis(sources: Sources, outcome: Term | str, predictor: Term | str, covariates: Sequence[Term | str],
                   corrections: list[str], permutations: int = 0, seed: int = 0,
                   min_coverage: float = 0.0, within: np.ndarray | None = None,
                   permute: str | None = None) -> xr.Dataset:
    """One voxel-wise model with the requested corrections (``p_bonferroni``, ``p_fdr``, ``p_fwe``), at the voxels
    where at least the share ``min_coverage`` of the participants has a value (see
    :func:`~engine.analysis.stats.voxelwise_ols`), and only those ``within`` marks (a boolean per voxel) if given;
    :func:`region_voxels` marks an atlas's regions. ``permute`` (``participants`` or ``within_participants``):
    the permutations keep each participant's scans together (:func:`participant_blocks`)."""
    outcome, predictor, covariates = Term.of(outcome), Term.of(predictor), [Term.of(term) for term in covariates]
    if not (outcome.is_map or predictor.is_map):
        raise ValueError(f"a voxel analysis needs a map as outcome or predictor, got {outcome.text!r} and "
                         f"{predictor.text!r}")
    subjects = analysis_subjects(sources, [outcome, predictor])
    terms = [sources.map(term, subjects) if term.is_map else sources.subject_values(term, subjects)
             for term in (outcome, predictor)]
    frame, categorical = covariate_frame(sources, covariates, subjects)
    result = voxelwise_ols(*terms, frame, categorical, permutations=permutations if "fwe" in corrections else 0,
                           seed=seed, min_coverage=min_coverage, within=within,
                           blocks=participant_blocks(sources, subjects, permute))
    if "bonferroni" in corrections:
        result["p_bonferroni"] = adjust_p(result["p"], "bonferroni")
    if "fdr_bh" in corrections:
        result["p_fdr"] = adjust_p(result["p"], "fdr_bh")
    return result


def region_voxels(atlas: Atlas, family: RegionFamily | None = None) -> tuple[np.ndarray, list[str]]:
    """The voxels inside the ``family``'s regions of ``atlas`` (every region present by default), and the family."""
    present = atlas.regions[atlas.regions.index.isin(np.unique(atlas.voxel_labels))]
    tested = (family or RegionFamily()).select(list(present["name"]))
    return np.isin(atlas.voxel_labels, present.index[present["name"].isin(tested)]), tested


def corrected_p(result: xr.Dataset, correction: str) -> xr.DataArray:
    """The p-values of ``result`` under one correction name."""
    return result[CORRECTED_P[correction]]


def cluster_table(statistic: xr.DataArray, significant: np.ndarray, masker: Masker, atlas: Atlas | None = None,
                  regions_listed: int = 5) -> pd.DataFrame:
    """Connected clusters (26-neighbourhood) of significant voxels, positive and negative apart.

    Per cluster: voxels, volume in mm³, the peak statistic and its world coordinates (mm), the
    atlas region at the peak and the regions the cluster covers (most voxels first). ``masker``
    places the statistic's voxels on the cohort grid.
    """
    grid = masker.grid
    volume = masker.inverse_transform(np.where(significant, np.asarray(statistic.values, np.float64), 0))
    labels_volume = masker.inverse_transform(atlas.voxel_labels.astype(np.int64) if atlas is not None
                                             else np.zeros(len(masker), np.int64))
    names = {} if atlas is None else dict(zip(atlas.regions.index, atlas.regions["name"], strict=True))
    rows = []
    for sign in (1, -1):
        components, count = ndimage.label(sign * volume > 0, structure=np.ones((3, 3, 3)))
        for index in range(1, count + 1):
            inside = components == index
            peak = np.unravel_index(np.argmax(np.where(inside, np.abs(volume), -np.inf)), grid.shape)
            x, y, z = (grid.affine @ np.array([*peak, 1.0]))[:3]
            covered = pd.Series(labels_volume[inside]).map(names).dropna().value_counts()
            rows.append({"sign": "positive" if sign > 0 else "negative", "voxels": int(inside.sum()),
                         "volume_mm3": float(inside.sum() * grid.voxel_volume), "peak_t": float(volume[peak]),
                         "peak_x": float(x), "peak_y": float(y), "peak_z": float(z),
                         "peak_region": names.get(int(labels_volume[peak]), ""),
                         "regions": "; ".join(f"{name} ({n})" for name, n in covered.head(regions_listed).items())})
    table = pd.DataFrame(rows, columns=["sign", "voxels", "volume_mm3", "peak_t", "peak_x", "peak_y", "peak_z",
                                        "peak_region", "regions"])
    table = table.sort_values("voxels", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "cluster", np.arange(1, len(table) + 1))
    return table


def roi_analysis(sources: Sources, outcome: Term | str, predictor: Term | str, covariates: Sequence[Term | str],
                 regions: Atlas | ParticipantLabels | NativeLabels, statistic: str = "mean", robust: bool = False,
                 groups: Sequence[Term | str] | Term | str | None = None, correlation: str | None = None,
                 permutations: int = 0, seed: int = 0, family: RegionFamily | None = None,
                 min_region_mm3: float | None = None, permute: str | None = None) -> pd.DataFrame:
    """Per region of the ``family`` (of an atlas, or each participant's own labels): outcome ~ predictor +
    covariates (statsmodels), or, with ``correlation`` (pearson, spearman, partial),
    :func:`~engine.analysis.stats.region_correlations`; corrections across the family's regions, and with
    ``permutations`` Freedman–Lane p-values per region and family-wise over it. A participant's region smaller
    than ``min_region_mm3`` is missing (see :meth:`Sources.region_values`). ``groups``: a mixed model's random
    intercepts (:func:`~engine.analysis.stats.mixed_model`); ``permute``: permutations keep each participant's
    scans together (:func:`participant_blocks`). ``attrs["family"]`` lists the regions tested."""
    outcome, predictor, covariates = Term.of(outcome), Term.of(predictor), [Term.of(term) for term in covariates]
    subjects = analysis_subjects(sources, [outcome, predictor])
    names = {term.text: f"term{index}" for index, term in enumerate([outcome, predictor, *covariates])}
    per_region = [sources.region_values(term, subjects, regions, statistic, min_region_mm3)
                  for term in (outcome, predictor) if term.is_map or _has_regions(sources, term)]
    if not per_region:
        raise ValueError(f"an roi analysis needs a region-level outcome or predictor, got {outcome.text!r}, "
                         f"{predictor.text!r}")
    table = per_region[0]
    for other in per_region[1:]:
        table = table.merge(other, on=["subject", "region"], how="inner")
    if table.empty:
        raise ValueError(f"{outcome} and {predictor} share no (participant, region) rows: are their regions named "
                         "alike (the same atlas, or labels named as the FreeSurfer table names them)?")
    tested = (family or RegionFamily()).select(list(pd.unique(table["region"])))
    table = table[table["region"].isin(tested)]
    subject_terms = [term for term in (outcome, predictor, *covariates) if term.text not in table.columns]
    for term in subject_terms:
        table[term.text] = table["subject"].map(sources.subject_values(term, subjects))
    table = table.rename(columns=names)
    columns = [names[term.text] for term in (outcome, predictor, *covariates)]
    blocks = {}
    if permute is not None:
        table[BLOCK] = table["subject"].map(sources.participants["participant_id"])
        blocks = {"blocks": BLOCK, "whole_blocks": permute == "participants"}
    if correlation is not None:
        result = region_correlations(table, *columns[:2], columns[2:], correlation, permutations, seed, **blocks)
    else:
        result = _region_regressions(table, columns, robust, groups, sources, subjects, names, permutations, seed,
                                     blocks)
    result.attrs["family"] = tested
    return result


def _region_regressions(table: pd.DataFrame, columns: list[str], robust: bool,
                        groups: Sequence[Term | str] | Term | str | None, sources: Sources, subjects: list[str],
                        names: dict[str, str], permutations: int, seed: int, blocks: dict) -> pd.DataFrame:
    """:func:`~engine.analysis.stats.region_models` of ``columns`` (outcome, predictor, covariates) with readable
    term names; with ``permutations``, the predictor's Freedman–Lane p (its OLS t is the partial correlation's)."""
    group_columns = _group_columns(table, groups, sources, subjects, names)
    outcome, predictor, covariates = columns[0], columns[1], columns[2:]
    result = region_models(table, _formula(table, outcome, [predictor, *covariates]), robust=robust,
                           groups=group_columns or None)
    if permutations:
        if not pd.api.types.is_numeric_dtype(table[predictor]):
            raise ValueError("the roi permutation test needs a numeric predictor (code two groups as 0 and 1)")
        permuted = region_correlations(table, outcome, predictor, covariates, "partial", permutations, seed,
                                       **blocks)
        tests = permuted.set_index("region")[["p_permutation", "p_fwe"]]
        rows = result["term"] == predictor
        for column in tests:
            result.loc[rows, column] = result.loc[rows, "region"].map(tests[column])
        result.attrs["max_t_null"] = permuted.attrs["max_t_null"]
    readable = {value: key for key, value in names.items()}
    result["term"] = result["term"].replace(
        {term: _readable_term(term, readable) for term in result["term"].unique()})
    return result


def subject_analysis(sources: Sources, outcome: Term | str, predictor: Term | str,
                     covariates: Sequence[Term | str] = (), robust: bool = False,
                     groups: Sequence[Term | str] | Term | str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One value per participant (or scan) on both sides: outcome ~ predictor + covariates (statsmodels OLS, HC3
    with ``robust``; with ``groups``, a mixed model with those random intercepts,
    :func:`~engine.analysis.stats.mixed_model`). Rows with a missing value are dropped; with a ``predictions``
    term only the test split enters (the others' predictions were fitted). Returns the model table (term,
    estimate, se, t, p, partial_r — OLS only —, n) and the data it was fitted on (the key columns and one column
    per term)."""
    import statsmodels.formula.api as smf

    outcome, predictor, covariates = Term.of(outcome), Term.of(predictor), [Term.of(term) for term in covariates]
    terms = [outcome, predictor, *covariates]
    maps = [term.text for term in terms if term.is_map]
    if maps:
        raise ValueError(f"a subject analysis takes one value per participant; {maps} are maps")
    subjects = [str(subject) for subject in sources.images["subject"].values]
    predicted = [term for term in terms if term.source == "predictions"]
    if predicted:
        split = by_scan(sources.ensemble_predictions(predicted[0]))["split"]
        subjects = [subject for subject in subjects if split.get(subject) == "test"]
    data = pd.DataFrame({term.text: sources.subject_values(term, subjects).to_numpy() for term in terms},
                        index=pd.Index(subjects, name="subject")).dropna()
    names = {term.text: f"term{index}" for index, term in enumerate(terms)}
    frame = data.rename(columns=names)
    formula = _formula(frame, names[outcome.text], [names[term.text] for term in (predictor, *covariates)])
    if len(frame) <= len(terms) + 1:
        raise ValueError(f"{len(frame)} participant(s) with every value of {[term.text for term in terms]}: too few")
    grouped = frame.reset_index()
    group_columns = _group_columns(grouped, groups, sources, list(frame.index), names)
    if group_columns:
        fit = mixed_model(formula, grouped, group_columns)
        parameters, df = fit.fe_params.index, None
    else:
        fit = smf.ols(formula, frame).fit(cov_type="HC3" if robust else "nonrobust")
        parameters, df = fit.params.index, fit.df_resid
    readable = {value: key for key, value in names.items()}
    rows = [{"term": _readable_term(name, readable), "estimate": fit.params[name], "se": fit.bse[name],
             "t": fit.tvalues[name], "p": fit.pvalues[name],
             "partial_r": np.nan if df is None else fit.tvalues[name] / np.sqrt(fit.tvalues[name] ** 2 + df),
             "n": int(fit.nobs)}
            for name in parameters if name != "Intercept"]
    return pd.DataFrame(rows), keyed(data.reset_index(), sources.images)


def _group_columns(table: pd.DataFrame, groups: Sequence[Term | str] | Term | str | None, sources: Sources,
                   subjects: list[str], names: dict[str, str]) -> list[str]:
    """The random intercepts' grouping columns added to ``table`` (rows named by its ``subject`` column)."""
    groups = [] if groups is None else [groups] if isinstance(groups, (str, Term)) else list(groups)
    columns = []
    for index, term in enumerate(map(Term.of, groups)):
        column = names.setdefault(term.text, f"group{index}")
        table[column] = table["subject"].map(sources.subject_values(term, subjects))
        columns.append(column)
    return columns


def participant_blocks(sources: Sources, subjects: Sequence[str], permute: str | None) -> ExchangeabilityBlocks | None:
    """The exchangeability blocks of ``subjects`` (the store's rows) by participant: whole participants exchanged
    (``permute="participants"``) or scans within each participant (``"within_participants"``); None: rows
    exchange freely."""
    if permute is None:
        return None
    people = sources.participants["participant_id"].reindex(list(subjects)).to_numpy()
    return ExchangeabilityBlocks(people, whole=permute == "participants")


# ---------------------------------------------------------------------------------------
# One analysis of the catalog, written to its folder


def analyse(sources: Sources, settings: AnalysisSettings, out: str | Path,
            regions: Atlas | ParticipantLabels | NativeLabels | None = None, atlas: Atlas | None = None) -> dict:
    """Run one analysis and write its results into the folder ``out`` (``engine.layout.AssociationLayout``: maps,
    tables and ``summary.json``); return the summary.

    ``regions``: what an roi analysis reduces maps over (an atlas, or each participant's own parcels);
    ``atlas``: the regions a voxel analysis's clusters are named by. A problem of the analysis (a term without
    values, too few participants) is an :class:`AnalysisError` naming it.
    """
    files = AssociationLayout(Path(out))
    files.root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = {"voxel": _voxel_analysis, "roi": _roi_analysis, "similarity": _similarity_analysis,
           "subject": _subject_analysis, "gain": _gain_analysis}[settings.scope]
    try:
        sources = chosen_scans(sources, settings.scans)
        if settings.subjects is not None:
            terms = [settings.outcome, settings.predictor, *settings.covariates]
            sources = sources.restricted(settings.subjects.subjects(sources, terms))
        details = run(sources, settings, files, regions if settings.scope in ("roi", "gain") else atlas)
    except ValueError as error:
        raise AnalysisError(f"associate analysis {settings.name!r}: {error}") from error
    summary = {**settings.model_dump(mode="json", include={"name", "scope", "outcome", "predictor", "covariates",
                                                            "alpha", "labels", "native", "subjects", "scans",
                                                            "permute", "random_intercept"},
                                     exclude_none=True),
               **details, "seconds": round(time.perf_counter() - started, 2)}
    files.summary.write_text(json.dumps(summary, indent=2))
    return summary


def _voxel_analysis(sources: Sources, settings: AnalysisSettings, out: AssociationLayout, atlas: Atlas | None) -> dict:
    within, tested = None, None
    if settings.within is not None:
        within, tested = region_voxels(settings.within.load(sources.images), settings.regions)
    result = voxel_analysis(sources, settings.outcome, settings.predictor, settings.covariates, settings.correction,
                            settings.permutations, settings.seed, settings.min_coverage, within, settings.permute)
    masker = Masker.of(sources.images)
    for name in result.data_vars:
        if result[name].dims == ("voxel",):
            masker.to_nifti(result[name].astype(np.float32), fill=np.nan).to_filename(out.map(name))
    if "max_t_null" in result:
        pd.DataFrame({"max_abs_t": result["max_t_null"].values}).to_parquet(out.max_t_null, index=False)
    significant = {correction: int((corrected_p(result, correction) < settings.alpha).sum())
                   for correction in settings.correction}
    threshold = settings.correction[0]
    mask = (corrected_p(result, threshold) < settings.alpha).values
    cluster_table(result["t"], mask, masker, atlas).to_parquet(out.clusters, index=False)
    return {"n": result.attrs["n"], "df": result.attrs["df"], "min_coverage": settings.min_coverage,
            "within": None if within is None else {"atlas": settings.within.name, "voxels": int(within.sum()),
                                                   **settings.regions.describe(tested)},
            "voxels_tested": int(np.isfinite(result["t"].values).sum()), "correction": settings.correction,
            "clusters_thresholded_by": threshold, "permutations": result.attrs.get("permutations", 0),
            "seed": settings.seed, "significant": significant,
            "t_threshold": float(np.abs(result["t"].values[mask]).min()) if mask.any() else None}


def _roi_analysis(sources: Sources, settings: AnalysisSettings, out: AssociationLayout,
                  regions: Atlas | ParticipantLabels | NativeLabels) -> dict:
    correlation = None if settings.statistic == "regression" else settings.statistic
    table = roi_analysis(sources, settings.outcome, settings.predictor, settings.covariates, regions,
                         settings.region_statistic, settings.robust, settings.random_intercepts, correlation,
                         settings.permutations, settings.seed, settings.regions, settings.min_region_mm3,
                         settings.permute)
    attrs = dict(table.attrs)  # the family, the max-|t| null, skipped regions: into summary.json, not the tables
    table.attrs.clear()
    if correlation:
        table.to_parquet(out.correlations, index=False)
        table.to_csv(out.correlations_csv, index=False)
        tested, model = table, correlation
    else:
        table.to_parquet(out.regions, index=False)
        table.to_csv(out.regions_csv, index=False)
        tested = table[table["term"] == settings.predictor.text]
        model = "mixed" if settings.random_intercept else ("ols_hc3" if settings.robust else "ols")
    if "max_t_null" in attrs:
        pd.DataFrame({"max_abs_t": attrs["max_t_null"]}).to_parquet(out.max_t_null, index=False)
    return {"n": int(tested["n"].max()) if len(tested) else 0, "regions": int(tested["region"].nunique()),
            "family": settings.regions.describe(attrs["family"]), "min_region_mm3": settings.min_region_mm3,
            "correction": settings.correction, "model": model, "permutations": settings.permutations,
            "seed": settings.seed, "participants_per_region": {"min": int(tested["n"].min()) if len(tested) else 0,
                                                                "max": int(tested["n"].max()) if len(tested) else 0},
            "significant": {correction: int((tested[CORRECTED_P[correction]] < settings.alpha).sum())
                            for correction in settings.correction},
            **({"skipped_regions": attrs["skipped"]} if "skipped" in attrs else {})}


def _subject_analysis(sources: Sources, settings: AnalysisSettings, out: AssociationLayout, _) -> dict:
    model, data = subject_analysis(sources, settings.outcome, settings.predictor, settings.covariates,
                                   settings.robust, settings.random_intercepts)
    model.to_parquet(out.model, index=False)
    data.to_parquet(out.data, index=False)
    tested = model[model["term"] == settings.predictor.text].iloc[0]
    kind = "mixed" if settings.random_intercept else "ols_hc3" if settings.robust else "ols"
    return {"n": int(tested["n"]), "model": kind, "participants": int(data["participant_id"].nunique()),
            "significant": {"p": float(f"{tested['p']:.3g}"), **(
                {"estimate": float(f"{tested['estimate']:.4g}")} if settings.random_intercept
                else {"partial_r": round(float(tested["partial_r"]), 4)})}}


def gain_analysis(sources: Sources, outcome: Term | str, groups: Term | str, reference, regions: Atlas
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Böhle et al.'s (2019) region table of a map: per region and group of ``groups`` (a participant column), the
    participants' mean region ``sum``, mean ``density`` (sum ÷ the region's voxels) and the ``gain``, the group's
    mean sum ÷ the ``reference`` group's (e.g. patients ÷ controls; NaN where the reference's is 0); and each
    participant's fingerprint, their region sum ÷ the reference group's mean. Regions without voxels are left
    out."""
    outcome, groups = Term.of(outcome), Term.of(groups)
    subjects = analysis_subjects(sources, [outcome])
    labels = sources.subject_values(groups, subjects).dropna().astype(str)
    if str(reference) not in set(labels):
        raise ValueError(f"reference {reference!r} is not a value of {groups} among the analysis's participants "
                         f"({sorted(set(labels))})")
    reduced = region_reduce(sources.map(outcome, list(labels.index)), regions).compute()
    counted = reduced["count"] > 0  # (region,) for an atlas, (subject, region) for each one's own parcels
    present = reduced["region"].values[counted.any([dim for dim in counted.dims if dim != "region"]).values]
    sums = reduced["sum"].sel(region=present).to_pandas()
    density = reduced["mean"].sel(region=present).to_pandas()
    reference_sum = sums[(labels == str(reference)).to_numpy()].mean()
    baseline = reference_sum.where(reference_sum != 0)
    rows = []
    for group in [str(reference), *sorted(set(labels) - {str(reference)})]:
        members = (labels == group).to_numpy()
        rows.append(pd.DataFrame({"group": group, "region": present, "n": int(members.sum()),
                                  "sum": sums[members].mean().to_numpy(), "density": density[members].mean().to_numpy(),
                                  "gain": (sums[members].mean() / baseline).to_numpy()}))
    table = pd.concat(rows, ignore_index=True)
    others = labels[labels != str(reference)]
    fingerprints = (sums.loc[others.index] / baseline).rename_axis(index="subject", columns=None).reset_index().melt(
        id_vars="subject", var_name="region", value_name="gain")
    fingerprints.insert(1, "group", fingerprints["subject"].map(labels))
    return table, keyed(fingerprints, sources.images)


def _gain_analysis(sources: Sources, settings: AnalysisSettings, out: AssociationLayout, regions: Atlas) -> dict:
    table, fingerprints = gain_analysis(sources, settings.outcome, settings.predictor, settings.reference, regions)
    table.to_parquet(out.regions, index=False)
    table.to_csv(out.regions_csv, index=False)
    fingerprints.to_parquet(out.fingerprints, index=False)
    groups = table[table["group"] != str(settings.reference)]
    top = groups.sort_values("gain", ascending=False).groupby("group").head(5)
    return {"n": int(table.drop_duplicates("group")["n"].sum()), "reference": settings.reference,
            "regions": int(table["region"].nunique()),
            "significant": {group: list(rows["region"]) for group, rows in top.groupby("group")}}


def _similarity_analysis(sources: Sources, settings: AnalysisSettings, out: AssociationLayout, _) -> dict:
    subjects = analysis_subjects(sources, [settings.outcome, settings.predictor])
    table = map_similarity(sources.map(settings.outcome, subjects), sources.map(settings.predictor, subjects))
    table.to_parquet(out.similarity, index=False)
    return {"n": int(table["pearson_r"].notna().sum()),
            "significant": {"mean_pearson_r": round(float(table["pearson_r"].mean()), 4),
                            "mean_cosine": round(float(table["cosine"].mean()), 4)}}


def _formula(table: pd.DataFrame, outcome: str, columns: Sequence[str]) -> str:
    """``outcome ~ a + C(b) + …``: the table's non-numeric columns as categorical (dummy-coded)."""
    return f"{outcome} ~ " + " + ".join(
        column if pd.api.types.is_numeric_dtype(table[column]) else f"C({column})" for column in columns)


def _has_regions(sources: Sources, term: Term) -> bool:
    return term.source == "features" and "region" in sources.feature(term).columns


def _readable_term(term: str, readable: dict[str, str]) -> str:
    """``C(term3)[T.site-B]`` → ``site[T.site-B]``; ``term1`` → its catalog name."""
    if term.startswith("C(") and ")" in term:
        inner, level = term[2:].split(")", 1)
        return readable.get(inner, inner) + level
    return readable.get(term, term)
