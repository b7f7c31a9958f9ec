"""Which participants train, validate and test: stratified splits, written as ``models/split.tsv``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.data.inputs import by_scan, one_scan_each, scan_ids

SPLITS = ("train", "validation", "test")
#: The label of a scan left out of training and evaluation by ``train_scans`` / ``test_scans`` (it is predicted,
#: not counted).
EXCLUDED = "excluded"
#: Which of a participant's scans a split takes.
SCAN_CHOICES = ("all", "baseline", "last")


class SplitSettings(BaseModel):
    """How participants are dealt to train / validation / test (:func:`stratified_split`); the catalog's
    ``train.split``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fractions: tuple[float, float, float] = Field((0.6, 0.2, 0.2), description="train, validation, test")
    stratify: tuple[str, ...] = Field(("age", "sex"), description="participant columns; numeric ones in "
                                      "5 quantile bands")
    seed: int = Field(0, ge=0, description="the split is the same for the same participants and seed")
    folds: int | None = Field(None, ge=2, le=20, description="cross-fitting: participants dealt to this many folds, "
                              "an ensemble trained per fold with the fold as its test set (the others dealt to "
                              "train and validation as fractions' first two say), so every scan gets an "
                              "out-of-sample prediction and relevance maps")
    train_scans: Literal[SCAN_CHOICES] = Field("all", description="with several scans per participant: which of a "
                                               "training (and validation) participant's scans the members learn "
                                               "from: all (follow-ups as augmentation) or one")
    test_scans: Literal[SCAN_CHOICES] = Field("all", description="with several scans per participant: which of a "
                                              "test participant's scans are evaluated (and explained)")

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, fractions):
        if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1) or 0 in fractions[:2]:
            raise ValueError(f"fractions {list(fractions)} must be non-negative and sum to 1, "
                             "with train and validation > 0")
        return fractions


def stratified_split(participants: pd.DataFrame, settings: SplitSettings | None = None,
                     also_stratify: Sequence[str] = (), age_bands: int = 5) -> pd.Series:
    """'train' / 'validation' / 'test' per participant, stratified first by ``also_stratify`` (the class of a
    classification, whose balance across the splits matters most), then by age bands and the other columns of
    ``settings.stratify`` (default age and sex).

    In a cohort with sessions (a scans table, :func:`engine.data.inputs.read_scans`, in session order) every
    scan of a participant goes where the participant goes, dealt by the values at their first scan; the split
    is then indexed by scan.

    Participants are ordered by stratum (random order inside each) and dealt to the split that
    lags its target fraction most, so each value of the first stratum column and the whole cohort
    match the fractions to within one participant, the later columns as nearly as the order allows.
    Deterministic given ``settings.seed``.
    With ``settings.train_scans`` or ``test_scans`` other than ``all``, the scans they leave out are labelled
    :data:`EXCLUDED`.
    """
    settings = settings or SplitSettings()
    dealt = _deal_participants(participants, settings, settings.fractions, also_stratify, age_bands)
    return _scans_taken(participants, pd.Series(np.asarray(SPLITS, object)[dealt.to_numpy()], index=dealt.index,
                                                name="split"), settings)


def cross_fitting_splits(participants: pd.DataFrame, settings: SplitSettings,
                         also_stratify: Sequence[str] = (), age_bands: int = 5) -> list[pd.Series]:
    """One split per fold of ``settings.folds`` (:func:`grouped_folds`): the fold's participants are its test set,
    the others are dealt to train and validation in the ratio of the first two ``fractions`` (stratified alike)."""
    folds = grouped_folds(participants, settings.folds, settings, also_stratify, age_bands)
    train, validation = settings.fractions[:2]
    splits = []
    for fold in range(settings.folds):
        rest = participants[(folds != fold).to_numpy()]
        dealt = _deal_participants(rest, settings, (train / (train + validation), validation / (train + validation)),
                                   also_stratify, age_bands)
        split = pd.Series("test", index=folds.index, name="split", dtype=object)
        split[dealt.index] = np.asarray(SPLITS[:2], object)[dealt.to_numpy()]
        splits.append(_scans_taken(participants, split, settings))
    return splits


def _scans_taken(participants: pd.DataFrame, split: pd.Series, settings: SplitSettings) -> pd.Series:
    """``split`` with the scans ``train_scans`` and ``test_scans`` leave out labelled :data:`EXCLUDED` (a
    participant's scans in the table's order: session order)."""
    if "session_id" not in participants or (settings.train_scans, settings.test_scans) == ("all", "all"):
        return split
    def kept(which: str) -> np.ndarray:
        return np.ones(len(split), bool) if which == "all" else one_scan_each(participants["participant_id"], which)

    taken = np.where(split.isin(SPLITS[:2]), kept(settings.train_scans), kept(settings.test_scans))
    return split.where(taken, EXCLUDED)


def grouped_folds(participants: pd.DataFrame, folds: int, settings: SplitSettings | None = None,
                  also_stratify: Sequence[str] = (), age_bands: int = 5) -> pd.Series:
    """Each participant's (or, with sessions, each scan's) cross-fitting fold, 0 to ``folds`` − 1: participants
    dealt to equal folds as :func:`stratified_split` deals them to splits (stratified by ``also_stratify`` and
    ``settings.stratify``, seed ``settings.seed``), every scan of a participant in the participant's fold."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    settings = settings or SplitSettings()
    return _deal_participants(participants, settings, (1 / folds,) * folds, also_stratify, age_bands).rename("fold")


def _deal_participants(participants: pd.DataFrame, settings: SplitSettings, fractions: Sequence[float],
                       also_stratify: Sequence[str], age_bands: int) -> pd.Series:
    """The index of the share of ``fractions`` each row is dealt to, stratified by ``also_stratify`` then
    ``settings.stratify``; a scans table's participants dealt by their first scan."""
    if "session_id" in participants:
        baseline = participants.drop_duplicates("participant_id").drop(columns="session_id")
        dealt = _deal_participants(baseline, settings, fractions, also_stratify, age_bands)
        return pd.Series(dealt.reindex(participants["participant_id"]).to_numpy(), index=scan_ids(participants))
    strata = list(dict.fromkeys([*also_stratify, *settings.stratify]))
    table = participants.set_index("participant_id") if "participant_id" in participants else participants
    missing = [column for column in strata if column not in table]
    if missing:
        raise ValueError(f"cannot stratify by {missing}: not a participant column ({list(table.columns)})")
    keys = []
    for column in strata:
        values = table[column]
        if column == "age" or (pd.api.types.is_numeric_dtype(values) and values.nunique() > 10):
            values = pd.qcut(values.rank(method="first"), min(age_bands, len(values)), labels=False)
        keys.append(values.astype(str).to_numpy())
    rng = np.random.default_rng(settings.seed)
    order = np.lexsort([rng.random(len(table)), *keys[::-1]])
    target = np.asarray(fractions, float)
    counts = np.zeros(len(target))
    dealt = np.empty(len(table), int)
    for number, index in enumerate(order, start=1):
        choice = int(np.argmax(target * number - counts))
        counts[choice] += 1
        dealt[index] = choice
    return pd.Series(dealt, index=table.index)


def read_split_table(path: str | Path) -> pd.DataFrame:
    """``models/split.tsv`` as :func:`train_ensemble` writes it: each scan's key columns, split (and ``fold``)."""
    return pd.read_csv(path, sep="\t", dtype={"participant_id": str, "session_id": str})


def read_split(path: str | Path, column: str = "split") -> pd.Series | None:
    """A column of ``models/split.tsv``: each scan's split, or with cross-fitting its ``fold``, by store row label;
    None for a column the file does not have."""
    return by_scan(read_split_table(path)).get(column)


def split_hash(split: pd.Series) -> str:
    """A fingerprint of the split (what a member's card records, to know it was trained on this split)."""
    return str(pd.util.hash_pandas_object(split.sort_index()).sum())
