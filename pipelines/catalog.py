"""The catalog: one YAML file that describes a whole run, validated by pydantic.

Relative paths are resolved against the catalog file's folder. See README "Catalog format".
"""

from __future__ import annotations

import hashlib
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster import ClusterProfile, LocalProfile
from engine.analysis.association import (
    FREESURFER_TABLE,
    RELEVANCE_NORMALISATIONS,
    AnalysisSettings,
    Term,
    TermText,
)
from engine.analysis.atlas import BUNDLED_ATLASES, SYSTEM_ATLASES, AtlasSettings, tract_atlas
from engine.data import inputs
from engine.data.inputs import Modality
from engine.data.lesion_filling import MNI152, LesionFilling
from engine.data.registration import BUNDLED_TEMPLATE, RegistrationSettings
from engine.layout import Layout
from engine.models.attribution import KNOWN_METHODS, AttributionOptions, is_method
from engine.models.metrics import BIAS_CORRECTIONS
from engine.models.splits import SplitSettings
from engine.models.training import TrainingConfig

MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
ENSEMBLE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RESERVED_NAMES = {"subject", "voxel", "i", "j", "k", "ingest", "participant_id"}
STORED_DTYPES = ("float32", "float64", "int16", "int32", "uint8", "uint16")


def valid_ensemble_name(name: str) -> bool:
    """An identifier that is neither a method nor a normalisation: the middle of relevance.<ensemble>.<method>."""
    return bool(ENSEMBLE_NAME.match(name)) and not is_method(name) and name not in RELEVANCE_NORMALISATIONS


def _modality_name(name: str) -> str:
    if not MODALITY_NAME.match(name) or name in RESERVED_NAMES:
        raise ValueError(f"modality name {name!r} must be an identifier and not one of {sorted(RESERVED_NAMES)}")
    return name


ModalityName = Annotated[str, AfterValidator(_modality_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoCohort(_Strict):
    """Generate the synthetic demo cohort (``engine.data.synth``) into the workspace."""

    subjects: int = Field(..., ge=1, description="number of participants")
    voxel_size: float = Field(4.0, gt=0, le=12, description="isotropic voxel size in mm")
    seed: int = Field(0, ge=0, description="random seed; participant k is the same for a given seed")
    native_voxel_size: float | None = Field(None, gt=0, le=12, description="write native scans (each head in its "
                                            "own pose and grid; needs a register section) at this voxel size")
    sessions: int | None = Field(None, ge=2, le=9, description="several scans per participant: 1 to this many BIDS "
                                 "sessions each, the same head aged over 1–4-year follow-ups")
    patients: float | None = Field(None, gt=0, lt=1, description="a cohort with this share of patients (diagnosis AD "
                            "or MS, the others CN): see disease")
    disease: Literal["alzheimer", "ms"] | None = Field(
        None, description="the patients' disease: alzheimer (the default; atrophy planted in hippocampus, amygdala "
        "and temporal cortex, growing over their sessions; ages 55–90) or ms (lesions in periventricular white "
        "matter and the corpus callosum, in FLAIR, T1 and the WMH mask, and enlarged ventricles; ages 20–60)")

    @model_validator(mode="after")
    def _disease_needs_patients(self):
        if self.disease is not None and self.patients is None:
            raise ValueError("cohort.demo.disease needs patients (their share of the participants)")
        return self


class CohortSource(_Strict):
    """Where the images come from: ``demo`` settings, or a ``directory`` of files."""

    demo: DemoCohort | None = None
    directory: Path | None = Field(None, description="root of the cohort's files")
    participants: Path = Field(Path("participants.tsv"), description="participants table, relative to the root")
    mask: Path = Field(Path("mask.nii.gz"), description="cohort brain mask NIfTI, relative to the root")
    space: str | None = Field(None, description="name of the template space, e.g. MNI152NLin2009cAsym")
    per_session: list[str] = Field([], description="participants-table columns that BIDS sessions tables "
                                   "(sub-X/sub-X_sessions.tsv) may give per scan, e.g. age at the scan; any other "
                                   "column in both tables is an error")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.demo is None) == (self.directory is None):
            raise ValueError("give exactly one of 'demo' (generate the demo cohort) or 'directory' (your files)")
        return self


class BidsEntities(_Strict):
    """The BIDS entities that name one modality's files (pybids' names), e.g. ``{suffix: T1w}`` or
    ``{suffix: T1w, acquisition: mprage, run: 1}``."""

    suffix: str = Field(..., description="e.g. T1w, FLAIR, T2w")
    datatype: str | None = Field("anat", description="the files' folder (anat, dwi, …)")
    acquisition: str | None = Field(None, description="acq-<label>: the acquisition (e.g. mprage)")
    ceagent: str | None = Field(None, description="ce-<label>: the contrast agent")
    reconstruction: str | None = Field(None, description="rec-<label>: the reconstruction (e.g. norm)")
    run: int | None = Field(None, description="run-<index>: which of several runs of one session")
    space: str | None = Field(None, description="space-<label>: the template space of a resampled image")
    desc: str | None = Field(None, description="desc-<label>: the description (e.g. preproc)")
    label: str | None = Field(None, description="label-<label>: the tissue of a probability map (e.g. GM)")
    res: str | None = Field(None, description="res-<label>: the resolution of a resampled image")

    def query(self) -> dict:
        return self.model_dump(exclude_none=True)


class ModalitySpec(_Strict):
    """One image modality of the cohort (``T1: "path template"`` is short for ``T1: {path: "path template"}``):
    where each participant's file is, how it is stored and, for native scans, how it is registered."""

    path: str | None = Field(None, description="path template relative to the cohort root, with {participant_id} "
                             "(and {session_id} with sessions)")
    bids: BidsEntities | None = Field(None, description="instead of a path: the BIDS entities of the files, found "
                                      "by pybids in the cohort folder (a BIDS dataset)")
    dtype: Literal[STORED_DTYPES] = Field("float32", description="how the values are stored (integers for labels "
                                          "and masks)")
    space: Literal["reference", "own", "template"] = Field(
        "reference", description="register: the reference scan's space (FreeSurfer volumes), its own (co-registered "
        "rigidly first: FLAIR, FA) or the template grid already")
    kind: Literal["intensity", "probability", "label", "mask"] = Field(
        "intensity", description="register: how it is resampled (linear; generic label; nearest neighbour)")
    modulate: bool = Field(False, description="register: a probability map × the Jacobian determinant (volumes)")
    labels: str | None = Field(None, description="a label volume's region table: freesurfer (aseg, aparc+aseg, "
                               "aparc.DKTatlas+aseg) or a TSV/CSV path (label, name); each participant's own parcels")

    @model_validator(mode="after")
    def _path_or_bids(self):
        if (self.path is None) == (self.bids is None):
            raise ValueError("give exactly one of path (a template) or bids (the files' BIDS entities)")
        return self

    @model_validator(mode="after")
    def _modulate_probabilities(self):
        if self.modulate and self.kind != "probability":
            raise ValueError(f"modulate applies to kind 'probability', not {self.kind!r}")
        if self.labels is not None and (not self.dtype.startswith(("int", "uint")) or self.kind != "label"):
            raise ValueError("a label volume (labels:) needs an integer dtype (e.g. int16) and kind: label")
        return self

    @field_validator("path")
    @classmethod
    def _valid_template(cls, path: str) -> str:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(path) if field is not None]
        except ValueError as error:
            raise ValueError(f"malformed path template {path!r}: {error}") from None
        bad = [field for field in fields if not re.fullmatch(r"[A-Za-z_]\w*", field)]
        if bad:
            raise ValueError(f"path template {path!r}: {{{bad[0]}}} must name a participants-table column")
        if "participant_id" not in fields:
            raise ValueError(f"path template {path!r} must contain {{participant_id}}")
        return path


class IngestSettings(_Strict):
    """How the images come into ``images.zarr``: what a bad input does, and the chunks of the store."""

    on_error: Literal["fail", "skip"] = Field("fail", description="stop on a bad input, or skip and record it")
    subjects_per_chunk: int = Field(16, ge=1, le=4096, description="participants per chunk (a task writes whole "
                                    "chunks)")
    voxels_per_chunk: int = Field(65536, ge=1024, description="voxels per chunk (relevance maps share it, so "
                                  "reductions over both read aligned chunks)")
    fill_lesions: dict[str, LesionFilling] = Field(
        {}, description="modalities derived in the store: name → an image with its lesions filled from the "
        "participant's own normal-appearing white matter (e.g. FLAIR_FILLED: {image: FLAIR, lesions: WMH})")


class TractSettings(_Strict):
    modality: str = Field("FA", description="modality holding FA maps")
    atlas: AtlasSettings = Field(default_factory=tract_atlas, description="tracts: JHU's white-matter labels when "
                                 "Debian's mricron-data is installed (as the study), Juelich's otherwise")
    threshold: float = Field(0.2, ge=0, le=1, description="only voxels with FA above this count")


class FreeSurferSettings(_Strict):
    """Every participant's FreeSurfer stats files (``stats/aseg.stats``, ``stats/?h.<parcellation>.stats``) as one
    tidy table."""

    subjects_dir: Path = Field(..., description="FreeSurfer SUBJECTS_DIR, relative to the cohort root")
    parcellations: list[Literal["aparc", "aparc.DKTatlas", "aparc.a2009s"]] = Field(
        ["aparc"], description="cortical parcellations whose ?h.<parcellation>.stats are read")
    subject: str | None = Field(None, description="each scan's FreeSurfer subject (folder in subjects_dir), from "
                                "{participant_id} and {session_id}; default {participant_id}, with sessions the "
                                "cross-sectional {participant_id}_{session_id} (the longitudinal stream's: "
                                "'{participant_id}_{session_id}.long.{participant_id}')")

    @field_validator("subject")
    @classmethod
    def _known_fields(cls, template: str | None) -> str | None:
        fields = {field for _, field, _, _ in string.Formatter().parse(template or "") if field is not None}
        unknown = sorted(fields - {"participant_id", "session_id"})
        if unknown:
            raise ValueError(f"the FreeSurfer subject template may use {{participant_id}} and {{session_id}}, "
                             f"not {unknown}")
        return template

    def subject_folders(self, keys: pd.DataFrame) -> list[str]:
        """Each scan's FreeSurfer subject, for a table of key columns (participant_id [, session_id])."""
        template = self.subject or ("{participant_id}_{session_id}" if "session_id" in keys else "{participant_id}")
        return [template.format(**row) for row in keys.to_dict("records")]


class LesionSettings(_Strict):
    """A lesion modality, a binary mask or a lesion probability map with its threshold: lesion load per participant,
    and the study's relevance indices inside it (``lesions: WMH`` is short for ``lesions: {modality: WMH}``)."""

    modality: str = Field(..., description="lesion-mask or lesion-probability modality")
    threshold: float | None = Field(None, gt=0, le=1, description="a probability modality: lesion where the "
                                    "probability is at least this (the study's WML analysis: 0.8); none: a binary "
                                    "mask, lesion where nonzero")
    min_voxels: int = Field(30, ge=0, description="relevance per lesion voxel against the participant's average: "
                            "participants with more mask voxels than this (the study's 30, at 1 mm)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return {"modality": data} if isinstance(data, str) else data


class PVSSettings(LesionSettings):
    """Perivascular spaces from a PVS probability modality: masks (threshold, clusters, optional dilation) → PVS
    count per participant and the study's relevance indices inside them."""

    threshold: float = Field(0.5, gt=0, le=1, description="PVS where the probability is at least this")
    min_cluster: int = Field(5, ge=1, description="keep 3D clusters (26-neighbourhood) of at least this many voxels")
    dilate: int | dict[str, int] = Field(0, description="grow the masks by this many voxels (0–3) for the relevance "
                                         "indices, or per ensemble ({t1: 1, flair: 0}; ensembles not named: 0), as "
                                         "the study dilated them for its T1-based maps (whose LRP relevance is near "
                                         "zero on dark PVS voxels) and not for its FLAIR-based ones")

    @field_validator("dilate")
    @classmethod
    def _dilations(cls, dilate):
        for value in dilate.values() if isinstance(dilate, dict) else [dilate]:
            if not 0 <= value <= 3:
                raise ValueError(f"a dilation is 0 to 3 voxels, got {value}")
        return dilate

    def dilation(self, ensemble: str | None) -> int:
        """The dilation of ensemble ``ensemble``'s masks."""
        return self.dilate.get(ensemble, 0) if isinstance(self.dilate, dict) else self.dilate


class FeatureSettings(_Strict):
    """Structural features written as tables to <workspace>/features/."""

    gray_matter: str | None = Field(None, description="GM-probability modality → regional GM volume (mm³)")
    fa: TractSettings | None = Field(None, description="mean FA per white-matter tract")
    lesions: LesionSettings | None = Field(None, description="lesion-mask modality → lesion load per subject")
    pvs: PVSSettings | None = Field(None, description="PVS probability modality → PVS count per subject")
    freesurfer: FreeSurferSettings | None = Field(None, description="FreeSurfer's stats files of every participant "
                                                  "(features.freesurfer.<measure> in analyses)")
    tables: list[Path] = Field([], description="other per-subject tables (CSV/TSV/Parquet with participant_id)")

    def modalities_used(self) -> dict[str, str]:
        used = {"features.gray_matter": self.gray_matter,
                "features.lesions.modality": self.lesions.modality if self.lesions else None,
                "features.pvs.modality": self.pvs.modality if self.pvs else None,
                "features.fa.modality": self.fa.modality if self.fa else None}
        return {field: name for field, name in used.items() if name is not None}


def _with_changes(settings: BaseModel, name: str | None, fixed: tuple[str, ...] = ()):
    """``settings`` with ensemble ``name``'s changes from its ``ensembles`` field (``None``: without named ensembles);
    ``fixed`` fields hold for every ensemble."""
    changes = (settings.ensembles or {}).get(name, {}) if name is not None else {}
    kept = [field for field in ("ensembles", *fixed) if field in changes]
    if kept:
        raise ValueError(f"ensembles.{name}: {', '.join(kept)} cannot change per ensemble")
    try:
        return type(settings).model_validate({**settings.model_dump(exclude={"ensembles"}), **changes})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
        raise ValueError(f"ensembles.{name}: {problems}") from None


class TrainSettings(TrainingConfig):
    """An ensemble of CNNs trained on the store, written to <workspace>/models/: the engine's
    :class:`~engine.models.training.TrainingConfig` (every member's settings) plus ``members`` and ``split``."""

    members: int = Field(3, ge=1, le=100, description="ensemble members (differ by seed and batch order)")
    split: SplitSettings = SplitSettings()
    bias_correction: Literal[BIAS_CORRECTIONS] = Field(
        "validation", description="brain age: where the gap's age bias (cubic in age) is fitted: validation (the "
        "validation split, applied to the others), cross_fit (each test fold by the other test folds), test (the "
        "evaluated participants themselves: in-sample, the report warns), none")
    baseline_features: list[TermText] = Field(
        [], description="a two-class classification: also a linear SVM and a logistic regression on these "
        "per-scan feature columns (features.<table>.<column>, e.g. features.lesion_load.lesion_volume_mm3), as the "
        "studies' lesion-load baseline")
    ensembles: dict[str, dict[str, Any]] | None = Field(
        None, description="several named ensembles in one workspace, each these settings with its own changes, "
        "e.g. {t1: {modalities: [T1]}, flair: {modalities: [FLAIR]}}; their relevance is relevance.<name>.<method>")

    @model_validator(mode="after")
    def _valid_ensembles(self):
        not_features = [term.text for term in self.baseline_features if term.source != "features"]
        if not_features:
            raise ValueError(f"baseline_features: {not_features} are not features.<table>.<column> terms")
        for name in self.ensembles or {}:
            if not valid_ensemble_name(name):
                raise ValueError(f"ensemble name {name!r} must be an identifier and not a method or normalisation "
                                 "name (it is the middle of relevance.<ensemble>.<method>)")
            self.ensemble(name)
        return self

    def ensemble(self, name: str | None) -> TrainSettings:
        """The settings of ensemble ``name`` (``None``: these settings, without named ensembles)."""
        return _with_changes(self, name)

    def ensemble_settings(self) -> dict[str | None, TrainSettings]:
        """Every ensemble the section trains, by name (one unnamed ensemble without ``ensembles``)."""
        return {name: self.ensemble(name) for name in (self.ensembles or [None])}

    def member_config(self) -> TrainingConfig:
        """The settings each member trains with (without the ensemble's size and split)."""
        return TrainingConfig(**{name: getattr(self, name) for name in TrainingConfig.model_fields})


class ExperimentSettings(_Strict):
    """A training recipe repeated under several conditions (``experiments/<name>/``): each condition's ensemble on
    R participant-grouped, stratified splits (or R retrainings on one split), a paired Wilcoxon test per pair of
    conditions over the repeats."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="folder name under <workspace>/experiments/")
    ensemble: str | None = Field(None, description="the train section's ensemble whose recipe the conditions "
                                 "change (default: the single or first one)")
    conditions: dict[str, dict[str, Any]] = Field(..., min_length=2, description="name → changes to the recipe, "
                                                  "e.g. {scratch: {}, pretrained: {finetune_from: ../ad/models}}")
    repeats: int = Field(6, ge=2, le=100, description="splits (seeds split.seed + r), or retrainings with "
                         "same_split; with 5 the smallest two-sided Wilcoxon p is 0.0625, with 6 it is 0.031")
    members: int | None = Field(None, ge=1, le=64, description="each run's ensemble size (default: the recipe's "
                                "members)")
    same_split: bool = Field(False, description="robustness over retrainings: one split, each repeat new seeds "
                             "(initialisation and batch order)")
    metric: str | None = Field(None, description="the test metric compared (default: mae for regression, roc_auc "
                               "for classification)")
    comparisons: list[tuple[str, str]] | None = Field(
        None, description="the pairs of conditions tested, the declared family Holm's correction runs over, e.g. "
        "[[scratch, pretrained]] (default: every pair)")

    @field_validator("conditions")
    @classmethod
    def _condition_names(cls, conditions: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [name for name in conditions if not re.fullmatch(r"[A-Za-z0-9_.-]+", name)]
        if bad:
            raise ValueError(f"condition names {bad} must be folder names (letters, digits, _ . -)")
        return conditions

    @model_validator(mode="after")
    def _pairs_of_conditions(self):
        for first, second in self.comparisons or []:
            unknown = [name for name in (first, second) if name not in self.conditions]
            if unknown or first == second:
                raise ValueError(f"comparisons: {[first, second]} must be two different conditions of "
                                 f"{list(self.conditions)}")
        return self

    def recipes(self, train: TrainSettings) -> dict[str, TrainSettings]:
        """Each condition's settings: the recipe with the condition's changes."""
        names = list(train.ensemble_settings())
        if self.ensemble is not None and self.ensemble not in names:
            raise ValueError(f"experiments.{self.name}.ensemble: {self.ensemble!r} is not an ensemble of the train "
                             f"section ({[name for name in names if name is not None]})")
        recipe = train.ensemble(self.ensemble if self.ensemble is not None else names[0])
        recipes = {}
        for condition, changes in self.conditions.items():
            fixed = sorted(set(changes) & {"ensembles", "members", "split"})
            if fixed:
                raise ValueError(f"experiments.{self.name}.conditions.{condition}: {fixed} are the experiment's, "
                                 "not a condition's")
            try:
                recipes[condition] = TrainSettings.model_validate({**recipe.model_dump(exclude={"ensembles"}),
                                                                   **changes})
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
                raise ValueError(f"experiments.{self.name}.conditions.{condition}: {problems}") from None
        return recipes


class ExplainSettings(_Strict):
    """Relevance maps of the trained members into <workspace>/relevance.zarr, scored in <workspace>/validation/."""

    methods: list[str] = Field(["lrp"], min_length=1, description="attribution methods: " + KNOWN_METHODS)
    subjects: Literal["test", "validation", "train", "all"] = Field("test", description="whose maps to compute")
    subjects_per_chunk: int = Field(8, ge=1, le=1024, description="participants per task and per chunk of "
                                    "relevance.zarr")
    options: AttributionOptions = Field(AttributionOptions(), description="method settings")
    truth: Path | None = Field(None, description="ground-truth label image for scoring (demo: planted regions)")
    truth_labels: list[int] | None = Field(None, description="labels of the truth image to score against")
    ensembles: dict[str, dict[str, Any]] | None = Field(
        None, description="changes for named ensembles of the train section, e.g. {flair: {methods: [lrp]}} "
        "(methods, subjects, options; the others explain with these settings)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        unknown = [method for method in methods if not is_method(method)]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {KNOWN_METHODS}")
        return methods

    @model_validator(mode="after")
    def _valid_ensembles(self):
        for name in self.ensembles or {}:
            self.ensemble(name)
        return self

    def ensemble(self, name: str | None) -> ExplainSettings:
        """The settings ensemble ``name`` is explained with (``None``: these, for a single unnamed ensemble)."""
        return _with_changes(self, name, fixed=("truth", "truth_labels"))



class ReportSettings(_Strict):
    """The HTML report, <workspace>/report.html (see ``engine.outputs.report``)."""

    enabled: bool = Field(True, description="false: no report")
    methods: list[str] | None = Field(None, description="attribution methods to show (default: all explained)")
    age_bands: list[float] = Field([40, 60], description="age cut points of the group maps: < 40, 40-60, >= 60")
    top_k: int = Field(10, ge=1, le=100, description="regions in the top-region bar charts")
    screenshot: bool = Field(False, description="also save section screenshots (needs Chromium)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str] | None) -> list[str] | None:
        return ExplainSettings._known_methods(methods) if methods is not None else None

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, bands: list[float]) -> list[float]:
        if bands != sorted(set(bands)):
            raise ValueError(f"age_bands {bands} must be strictly increasing")
        return bands


class Catalog(_Strict):
    """A whole run: workspace, cohort, modalities, ingest, atlas, features and cluster profile."""

    _bids_index: inputs.BidsIndex | None = PrivateAttr(None)

    workspace: Path = Field(..., description="folder for everything the run produces")
    cohort: CohortSource
    modalities: dict[ModalityName, ModalitySpec] = Field(..., min_length=1)
    # ``register:`` in the YAML (the name would shadow pydantic's ABC ``register`` method)
    registration: RegistrationSettings | None = Field(None, alias="register",
                                                      description="native scans → the template grid (ANTs)")
    ingest: IngestSettings = IngestSettings()
    atlas: AtlasSettings = AtlasSettings()
    features: FeatureSettings | None = None
    train: TrainSettings | None = None
    explain: ExplainSettings | None = None
    relevance: dict[str, dict[str, str]] | None = Field(
        None, description="relevance maps made elsewhere (e.g. iNNvestigate's NIfTIs, declared as modalities), as "
        "named ensembles: {name: {method: modality}}; analyses address them as relevance.<name>.<method>")
    cluster: ClusterProfile = Field(LocalProfile(), description="where the tasks run: worker processes on this "
                                    "machine (profile: local) or SLURM jobs (profile: slurm)")
    associate: list[AnalysisSettings] | None = Field(None, description="association analyses")
    experiments: list[ExperimentSettings] | None = Field(None, description="repeated experiments over conditions")
    report: ReportSettings | None = None

    @model_validator(mode="after")
    def _sections_name_modalities(self):
        used = self.features.modalities_used() if self.features is not None else {}
        for ensemble, settings in (self.ensembles() or {}).items():
            where = "train" if ensemble is None else f"train.ensembles.{ensemble}"
            used.update({f"{where}.modalities[{index}]": name for index, name in enumerate(settings.modalities)})
        for name, filling in self.ingest.fill_lesions.items():
            if name in self.modalities or not valid_ensemble_name(name):
                raise ValueError(f"ingest.fill_lesions.{name}: a derived modality's name must be an identifier and "
                                 "not one of the modalities")
            used.update({f"ingest.fill_lesions.{name}.{field}": getattr(filling, field)
                         for field in ("image", "lesions", "white_matter") if getattr(filling, field) != MNI152})
        for field, name in used.items():
            if name not in self.store_modalities():
                raise ValueError(f"{field}: {name!r} is not one of the modalities {self.store_modalities()}")
        self._check_registration()
        if self.explain is not None and self.train is None:
            raise ValueError("explain: needs a train section (the models it explains)")
        unknown = sorted(set(self.explain.ensembles or {}) - set(self.ensembles())) if self.explain else []
        if unknown:
            raise ValueError(f"explain.ensembles: {unknown} are not ensembles of the train section "
                             f"({[name for name in self.ensembles() if name is not None]})")
        self._check_imported_relevance()
        cross_fitted = [name for name, settings in self.ensembles().items() if settings.split.folds]
        for name in cross_fitted if self.explain is not None else []:
            if self.explain.ensemble(name).subjects in ("train", "validation"):
                which = "the ensemble" if name is None else f"ensemble {name}"
                raise ValueError(f"explain.subjects: {which} is cross-fitted (split.folds), so every scan is a test "
                                 "scan of its fold: explain test (or all)")
        pvs = self.features.pvs if self.features is not None else None
        if pvs is not None and isinstance(pvs.dilate, dict) and (self.train is not None or self.relevance):
            unknown = sorted(set(pvs.dilate) - set(self.ensemble_names()))
            if unknown:
                raise ValueError(f"features.pvs.dilate: {unknown} are not ensembles "
                                 f"({[name for name in self.ensemble_names() if name is not None]})")
        for index, analysis in enumerate(self.associate or []):
            self._check_terms(f"associate[{index}]", analysis)
        names = [analysis.name for analysis in self.associate or []]
        if len(names) != len(set(names)):
            raise ValueError(f"associate: analysis names must be unique, got {names}")
        self._check_experiments()
        return self

    def _check_experiments(self) -> None:
        if not self.experiments:
            return
        if self.train is None:
            raise ValueError("experiments: need a train section (the recipe they change)")
        names = [experiment.name for experiment in self.experiments]
        if len(names) != len(set(names)):
            raise ValueError(f"experiments: names must be unique, got {names}")
        for experiment in self.experiments:
            for condition, settings in experiment.recipes(self.train).items():
                unknown = [name for name in settings.modalities if name not in self.store_modalities()]
                if unknown:
                    raise ValueError(f"experiments.{experiment.name}.conditions.{condition}.modalities: {unknown} "
                                     f"are not modalities of {self.store_modalities()}")

    def _check_registration(self) -> None:
        register = self.registration
        if register is None:
            if self.cohort.demo is not None and self.cohort.demo.native_voxel_size is not None:
                raise ValueError("cohort.demo.native_voxel_size writes native scans: add a register section")
            modulated = [name for name, spec in self.modalities.items() if spec.modulate]
            if modulated:
                raise ValueError(f"modalities {modulated}: modulate needs a register section (the Jacobians)")
            return
        for field, name in (("reference", register.reference), ("brain_mask", register.brain_mask)):
            if name is not None and name not in self.modalities:
                raise ValueError(f"register.{field}: {name!r} is not one of the modalities {list(self.modalities)}")
        if self.modalities[register.reference].space != "reference":
            raise ValueError(f"modalities.{register.reference}: the reference scan's space is 'reference'")
        if register.brain_mask is not None and self.modalities[register.brain_mask].kind != "mask":
            raise ValueError(f"modalities.{register.brain_mask}: register.brain_mask needs kind 'mask'")
        clashing = sorted(set(register.compared_modalities()) & set(self.modalities))
        if clashing:
            raise ValueError(f"register.compare: {clashing} would be the reference registered another way, but are "
                             "modalities of their own; rename them")

    def _check_imported_relevance(self) -> None:
        trained = set(self.ensembles())
        for name, maps in (self.relevance or {}).items():
            if not valid_ensemble_name(name) or name in trained:
                raise ValueError(f"relevance.{name}: an imported ensemble's name must be an identifier, not a method "
                                 "or normalisation name, nor a trained ensemble's")
            if not maps:
                raise ValueError(f"relevance.{name}: name at least one method and its modality, e.g. {{lrp: LRP}}")
            for method, modality in maps.items():
                if modality not in self.modalities:
                    raise ValueError(f"relevance.{name}.{method}: {modality!r} is not one of the modalities "
                                     f"{list(self.modalities)}")

    def store_modalities(self) -> list[str]:
        """The modalities of ``images.zarr``: those read from files (with the reference registered by each of
        ``register.compare``) and those derived in the store."""
        compared = self.registration.compared_modalities() if self.registration is not None else {}
        return [*self.modalities, *compared, *self.ingest.fill_lesions]

    def ensemble_names(self) -> list[str | None]:
        """Every ensemble with relevance maps: the trained ones (``None``: a single unnamed one) and the imported."""
        return [*self.ensembles(), *(self.relevance or {})]

    def _check_ensemble(self, where: str, term: Term) -> None:
        """A relevance or predictions term names one of the ensembles (it must, when there are several)."""
        imported = self.relevance or {}
        if term.source == "relevance" and term.ensemble in imported:
            if term.name not in imported[term.ensemble]:
                raise ValueError(f"{where}: {term.text!r}: the imported ensemble {term.ensemble!r} has methods "
                                 f"{list(imported[term.ensemble])}")
            return
        candidates = self.ensemble_names() if term.source == "relevance" else list(self.ensembles())
        named = [name for name in candidates if name is not None]
        if term.ensemble is None and named:
            raise ValueError(f"{where}: {term.text!r}: there are several ensembles ({', '.join(named)}); name one, "
                             f"e.g. '{term.source}.{named[0]}.{term.name}'")
        if term.ensemble is not None and term.ensemble not in named:
            ensembles = ", ".join(named) if named else f"one, unnamed: write '{term.source}.{term.name}'"
            raise ValueError(f"{where}: {term.text!r} names ensemble {term.ensemble!r}; the ensembles "
                             f"{'with relevance maps' if term.source == 'relevance' else 'trained'}: {ensembles}")

    def _check_terms(self, where: str, analysis: AnalysisSettings) -> None:
        """Map and model terms, and label volumes, must name what the catalog produces."""
        if analysis.labels is not None and (analysis.labels not in self.modalities
                                            or self.modalities[analysis.labels].labels is None):
            volumes = [name for name, spec in self.modalities.items() if spec.labels is not None]
            raise ValueError(f"{where}.labels: {analysis.labels!r} is not a label volume of the modalities (those "
                             f"with labels: {volumes})")
        if analysis.native and (self.registration is None or self.modalities[analysis.labels].space == "template"):
            raise ValueError(f"{where}.native: the maps go back to native label volumes through the registration: it "
                             "needs a register section and a label volume in native space (space: reference)")
        for field in ("outcome", "predictor", "covariates"):
            terms = getattr(analysis, field)
            for term in terms if isinstance(terms, list) else [terms]:
                source, name, text = term.source, term.name, term.text
                if source == "images" and name not in self.store_modalities():
                    raise ValueError(f"{where}.{field}: {text!r} names no modality of {self.store_modalities()}")
                if source == "relevance" and term.ensemble not in (self.relevance or {}):
                    methods = self.explain.ensemble(term.ensemble).methods if self.explain else []
                    if name not in methods:
                        raise ValueError(f"{where}.{field}: {text!r} needs the explain section to compute method "
                                         f"{name!r} (explained: {methods})")
                if source == "predictions" and self.train is None:
                    raise ValueError(f"{where}.{field}: {text!r} needs a train section")
                if source in ("relevance", "predictions"):
                    self._check_ensemble(f"{where}.{field}", term)
                if source == "features" and name == FREESURFER_TABLE and (
                        self.features is None or self.features.freesurfer is None):
                    raise ValueError(f"{where}.{field}: {text!r} needs features.freesurfer (the stats files)")
                if field == "covariates" and term.is_map:
                    raise ValueError(f"{where}.covariates: {text!r} is a map; covariates are per-subject values")
        chosen = analysis.subjects
        if chosen is not None and (chosen.split or chosen.outcome or chosen.ensemble):
            if self.train is None:
                raise ValueError(f"{where}.subjects: a split or outcome filter needs a train section")
            if chosen.ensemble is not None:
                self._check_ensemble(f"{where}.subjects.ensemble", chosen.predictions_term([]))

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data):
        """``T1: "path"`` means ``T1: {path: "path"}``; a ``cluster:`` without ``profile`` is local."""
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("modalities"), dict):
                data["modalities"] = {name: {"path": spec} if isinstance(spec, str) else spec
                                      for name, spec in data["modalities"].items()}
            if isinstance(data.get("cluster"), dict) and "profile" not in data["cluster"]:
                data["cluster"] = {"profile": "local", **data["cluster"]}
        return data


    # -- derived, resolved against the catalog's folder by ``load_catalog``

    @property
    def layout(self) -> Layout:
        """Where every output of this catalog's runs lives."""
        return Layout(self.workspace)

    @property
    def cohort_root(self) -> Path:
        return self.cohort.directory if self.cohort.directory is not None else self.layout.demo_cohort

    @property
    def participants_file(self) -> Path:
        return self.cohort_root / self.cohort.participants

    @property
    def mask_file(self) -> Path:
        return self.cohort_root / self.cohort.mask

    def read_scans(self) -> pd.DataFrame:
        """The participants table, or with BIDS sessions one row per scan (:func:`engine.data.inputs.read_scans`)."""
        return inputs.read_scans(self.cohort_root, self.cohort.participants, self.cohort.per_session)

    @property
    def freesurfer_dir(self) -> Path | None:
        if self.features is None or self.features.freesurfer is None:
            return None
        return self.cohort_root / self.features.freesurfer.subjects_dir

    def ensembles(self) -> dict[str | None, TrainSettings]:
        """The ensembles the train section trains, by name (``None``: a single unnamed one); empty without it."""
        return self.train.ensemble_settings() if self.train is not None else {}

    def modality_list(self) -> list[Modality]:
        """The modalities; those given by BIDS entities with the files pybids found (one index per catalog)."""
        modalities, scans = [], None
        for name, spec in self.modalities.items():
            found, template = None, spec.path
            if spec.bids is not None:
                if self._bids_index is None:
                    self._bids_index = inputs.BidsIndex(self.cohort_root)
                scans = self.read_scans() if scans is None else scans
                query = spec.bids.query()
                found = self._bids_index.files(name, query, scans)
                template = "BIDS " + ", ".join(f"{key}-{value}" for key, value in query.items())
            modalities.append(Modality(name, template, spec.dtype, spec.space, spec.kind, spec.modulate, spec.labels,
                                       found))
        return modalities


class CatalogError(ValueError):
    """The catalog cannot be used; ``errors`` lists (field, message) pairs."""

    def __init__(self, path: Path, errors: list[tuple[str, str]]):
        self.path, self.errors = path, errors
        lines = "\n".join(f"  {field}: {message}" for field, message in errors)
        super().__init__(f"{path}: {len(errors)} error(s)\n{lines}")


def load_catalog(path: str | Path) -> tuple[Catalog, str]:
    """Parse and validate a catalog; return it with paths resolved, and the sha256 of its text.

    The YAML is read with ``yaml.safe_load`` (no tags that build objects). Every schema error is
    reported with its field in one :class:`CatalogError`.
    """
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as error:
        raise CatalogError(path, [("(file)", f"cannot read: {error.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        raise CatalogError(path, [(where, f"invalid YAML: {getattr(error, 'problem', error)}")]) from None
    if not isinstance(data, dict):
        raise CatalogError(path, [("(top level)", "the catalog must be a mapping of sections")])
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as error:
        raise CatalogError(path, [_problem(item) for item in error.errors()]) from None
    catalog = _resolve_paths(catalog, path.parent)
    return catalog, hashlib.sha256(text.encode()).hexdigest()


def _problem(item: dict) -> tuple[str, str]:
    """A schema error as (field, message); a check across sections names its field first (``train.target: …``)."""
    field = ".".join(str(part) for part in item["loc"] if str(part) not in ("", "[key]"))
    message = item["msg"].removeprefix("Value error, ")
    named = re.match(r"^([A-Za-z_][\w.\[\]]*): (.+)$", message, flags=re.S)
    if named and ("." in named.group(1) or not field):
        inner, message = named.groups()
        field = f"{field}.{inner}" if field and not inner.startswith(field) else inner
    return field or "(top level)", message


def _resolve_paths(catalog: Catalog, base: Path) -> Catalog:
    def resolve(value: Path) -> Path:
        return (base / value.expanduser()).resolve()

    def resolve_atlas(atlas: AtlasSettings) -> AtlasSettings:
        if atlas.name in BUNDLED_ATLASES or atlas.name in SYSTEM_ATLASES:
            return atlas
        return atlas.model_copy(update={"name": str(resolve(Path(atlas.name))), "labels": resolve(atlas.labels)})

    cohort = catalog.cohort.model_copy(update={"directory": resolve(catalog.cohort.directory)}
                                       if catalog.cohort.directory is not None else {})
    modalities = {name: spec.model_copy(update={"labels": str(resolve(Path(spec.labels)))})
                  if spec.labels not in (None, "freesurfer") else spec for name, spec in catalog.modalities.items()}
    update = {"workspace": resolve(catalog.workspace), "cohort": cohort, "atlas": resolve_atlas(catalog.atlas),
              "modalities": modalities}
    def resolve_changes(changes: dict[str, Any]) -> dict[str, Any]:
        """A named ensemble's or an experiment condition's changes, their fine-tuning source resolved."""
        if changes.get("finetune_from") is None:
            return changes
        return {**changes, "finetune_from": str(resolve(Path(changes["finetune_from"])))}

    if catalog.train is not None:
        train = {"ensembles": {name: resolve_changes(changes) for name, changes in catalog.train.ensembles.items()}
                 } if catalog.train.ensembles else {}
        if catalog.train.finetune_from is not None:
            train["finetune_from"] = resolve(catalog.train.finetune_from)
        update["train"] = catalog.train.model_copy(update=train)
    if catalog.experiments:
        update["experiments"] = [experiment.model_copy(update={"conditions": {
            name: resolve_changes(changes) for name, changes in experiment.conditions.items()}})
            for experiment in catalog.experiments]
    if catalog.registration is not None and catalog.registration.template != BUNDLED_TEMPLATE:
        register = catalog.registration
        update["registration"] = register.model_copy(update={
            "template": str(resolve(Path(register.template))),
            "template_mask": resolve(register.template_mask) if register.template_mask is not None else None})
    if catalog.explain is not None and catalog.explain.truth is not None:
        update["explain"] = catalog.explain.model_copy(update={"truth": resolve(catalog.explain.truth)})
    if catalog.features is not None:
        features = catalog.features
        fa = features.fa.model_copy(update={"atlas": resolve_atlas(features.fa.atlas)}) if features.fa else None
        update["features"] = features.model_copy(update={"fa": fa, "tables": [resolve(t) for t in features.tables]})
    return catalog.model_copy(update=update)
