"""The workspace layout: where every output of a catalog run lives, when it is current, how it is written.

One folder per catalog run holds everything the run produces. Each output has exactly one
writing stage::

    demo_cohort/              synth      the generated demo cohort (only for ``cohort: demo``)
    images.zarr               ingest     the cohort store (``engine.data.store``)
    features/<table>.parquet  features   structural feature tables
    models/                   train      split.tsv, member_<k>.{safetensors,json,predictions.parquet},
                                         predictions.parquet, metrics.parquet
    relevance.zarr            explain    relevance maps (``engine.models.attribution``)
    validation/               validate   scores.parquet, robustness.parquet, sanity.parquet, lesion_relevance.parquet,
                                         {lesion,pvs}_indices.parquet, {lesion,pvs}_comparison.parquet
    ensembles/<name>/         train, explain, validate: models/, relevance.zarr and validation/ of each named
                                         ensemble (``train: ensembles:``); a single unnamed one uses the above
    associations/<name>/      associate  one folder per analysis (summary.json, maps, tables)
    experiments/<name>/       experiment <condition>/repeat_<r>/ models folders, results.parquet, comparisons.parquet
    report.html               report     the HTML report (and report_screenshots/)
    provenance.json           the runner: catalog, versions, seeds, stage times of every run

**Freshness**: an output is current when the key stored beside it equals the key of its
settings and its inputs by content (:func:`output_key`, :func:`is_current`, :func:`mark_current`).
The key of a folder is ``<folder>/.relcohort-key.json``; of a file, ``.<name>.relcohort-key.json``
next to it. A stage forgets the key before it rewrites an output and marks it last, so a run
killed midway leaves an output that is not current.

**Atomic writes**: :func:`atomic_output` writes into a ``.part`` sibling and renames it into place
(files and folders), so an output is the old one whole, the new one whole, or (a folder, killed
between removing the old and renaming the new) absent — never half-written.

This module is the only place these names are spelled; it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

KEY_FILE = ".relcohort-key.json"
PART_SUFFIX = ".part"


ENSEMBLES = "ensembles"


@dataclass(frozen=True)
class Layout:
    """The path of every output in the workspace folder ``root``; with ``ensemble``, the models, relevance maps
    and validation of that named ensemble (``ensembles/<name>/``), the rest shared."""

    root: Path
    ensemble: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def for_ensemble(self, name: str | None) -> Layout:
        """This workspace with the outputs of ensemble ``name`` (``None``: the single unnamed ensemble)."""
        return Layout(self.root, name)

    @property
    def ensemble_root(self) -> Path:
        """Where this ensemble's models/, relevance.zarr and validation/ live."""
        return self.root if self.ensemble is None else self.root / ENSEMBLES / self.ensemble

    def ensemble_names(self) -> list[str | None]:
        """The ensembles with trained models or relevance maps: ``None`` for the unnamed one, then the named ones."""
        def present(root: Path) -> bool:
            return (root / "models" / "metrics.parquet").is_file() or (root / "relevance.zarr" / "zarr.json").is_file()

        named = sorted(path.name for path in (self.root / ENSEMBLES).glob("*") if present(path))
        return ([None] if present(self.root) else []) + named

    # -- the stages' outputs

    @property
    def demo_cohort(self) -> Path:
        return self.root / "demo_cohort"

    @property
    def registered(self) -> RegisteredLayout:
        return RegisteredLayout(self.root / "registered")

    @property
    def images(self) -> Path:
        return self.root / "images.zarr"

    @property
    def features(self) -> Path:
        return self.root / "features"

    def feature_table(self, name: str) -> Path:
        return self.features / f"{name}.parquet"

    def feature_tables(self) -> dict[str, Path]:
        """Every feature table written, by name."""
        return {path.stem: path for path in sorted(self.features.glob("*.parquet"))}

    @property
    def models(self) -> ModelsLayout:
        return ModelsLayout(self.ensemble_root / "models")

    @property
    def relevance(self) -> Path:
        return self.ensemble_root / "relevance.zarr"

    @property
    def validation(self) -> Path:
        return self.ensemble_root / "validation"

    @property
    def scores(self) -> Path:
        return self.validation / "scores.parquet"

    @property
    def robustness(self) -> Path:
        return self.validation / "robustness.parquet"

    @property
    def sanity(self) -> Path:
        return self.validation / "sanity.parquet"

    @property
    def lesion_relevance(self) -> Path:
        return self.validation / "lesion_relevance.parquet"

    def mask_indices(self, mask: str) -> Path:
        """The study's relevance indices inside ``lesion`` or ``pvs`` masks, per method and participant."""
        return self.validation / f"{mask}_indices.parquet"

    def mask_comparison(self, mask: str) -> Path:
        """Relevance per ``lesion`` / ``pvs`` voxel against each participant's average (Wilcoxon), per method."""
        return self.validation / f"{mask}_comparison.parquet"

    @property
    def associations(self) -> Path:
        return self.root / "associations"

    def association(self, name: str) -> AssociationLayout:
        return AssociationLayout(self.associations / name)

    def association_names(self) -> list[str]:
        """Analyses with a finished summary, by folder name."""
        return [path.parent.name for path in sorted(self.associations.glob(f"*/{AssociationLayout.SUMMARY}"))]

    @property
    def experiments(self) -> Path:
        return self.root / "experiments"

    def experiment(self, name: str) -> ExperimentLayout:
        return ExperimentLayout(self.experiments / name)

    def experiment_names(self) -> list[str]:
        """Experiments with finished results, by folder name."""
        return [path.parent.name for path in sorted(self.experiments.glob(f"*/{ExperimentLayout.RESULTS}"))]

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def report_screenshots(self) -> Path:
        return self.root / "report_screenshots"

    # -- the runner's

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def lock(self) -> Path:
        return self.root / ".relcohort.lock"


@dataclass(frozen=True)
class RegisteredLayout:
    """``registered/``: the template and cohort mask on the output grid, one folder per participant
    (:class:`ParticipantRegistration`) and the cohort's QC table."""

    root: Path

    @property
    def template(self) -> Path:
        return self.root / "template.nii.gz"

    @property
    def mask(self) -> Path:
        return self.root / "mask.nii.gz"

    @property
    def qc(self) -> Path:
        return self.root / "qc.parquet"

    @property
    def problems(self) -> Path:
        """The last run's participants left out, and why (``participant_id``, ``file``, ``problem``)."""
        return self.root / "problems.json"

    def participant(self, participant_id: str) -> ParticipantRegistration:
        return ParticipantRegistration(self.root / "participants" / participant_id)

    def participant_ids(self) -> list[str]:
        """Participants whose registration finished (their folder was renamed into place)."""
        return sorted(path.name for path in (self.root / "participants").glob("*") if path.is_dir()
                      and not path.name.startswith("."))


@dataclass(frozen=True)
class ParticipantRegistration:
    """``registered/participants/<id>/``: each modality on the template grid, the transforms both ways,
    the Jacobian determinant, the native reference scan's grid and QC."""

    root: Path

    def image(self, modality: str) -> Path:
        return self.root / f"{modality}.nii.gz"

    @property
    def affine(self) -> Path:
        """The linear part, template → native points (ANTs ``.mat``)."""
        return self.root / "template_to_native_affine.mat"

    @property
    def warp(self) -> Path:
        """The nonlinear part (SyN), template → native points."""
        return self.root / "template_to_native_warp.nii.gz"

    @property
    def inverse_warp(self) -> Path:
        return self.root / "native_to_template_warp.nii.gz"

    def coregistration(self, modality: str) -> Path:
        """A modality in its own space: the rigid map from reference-scan points to the modality's."""
        return self.root / f"reference_to_{modality}.mat"

    @property
    def jacobian(self) -> Path:
        """Native volume per template volume at each template voxel (affine × nonlinear)."""
        return self.root / "jacobian.nii.gz"

    @property
    def brain_mask(self) -> Path:
        return self.root / "brain_mask.nii.gz"

    @property
    def native_grid(self) -> Path:
        """Shape and affine of the native reference scan, the target of ``to_native``."""
        return self.root / "native_grid.json"

    @property
    def qc(self) -> Path:
        return self.root / "qc.json"


@dataclass(frozen=True)
class ModelsLayout:
    """``models/``: the split, each member's weights, card and predictions, the ensemble's tables."""

    root: Path

    @property
    def split(self) -> Path:
        return self.root / "split.tsv"

    def member(self, member: int) -> Path:
        """``member_<k>`` without a suffix: ``.safetensors`` (weights), ``.json`` (card: config, split, history),
        ``.predictions.parquet``."""
        return self.root / f"member_{member}"

    def weights(self, member: int) -> Path:
        return self.root / f"member_{member}.safetensors"

    def card(self, member: int) -> Path:
        return self.root / f"member_{member}.json"

    def member_predictions(self, member: int) -> Path:
        return self.root / f"member_{member}.predictions.parquet"

    def members(self) -> list[int]:
        """Numbers of the members whose card is written (the card is written last)."""
        return sorted(int(path.stem.removeprefix("member_")) for path in self.root.glob("member_*.json"))

    def fold(self, fold: int) -> ModelsLayout:
        """``fold_<k>/``: a cross-fitted ensemble's fold, a models folder of its own."""
        return ModelsLayout(self.root / f"fold_{fold}")

    def folds(self) -> list[int]:
        """Numbers of the folds of a cross-fitted ensemble (none: one ensemble in this folder)."""
        return sorted(int(path.name.removeprefix("fold_")) for path in self.root.glob("fold_*") if path.is_dir())

    def trained(self) -> list[ModelsLayout]:
        """The folders that hold members: this one, or each fold's of a cross-fitted ensemble."""
        return [self.fold(fold) for fold in self.folds()] or [self]

    def noise_model(self, member: int) -> Path:
        """The noise network explaining member ``member`` (method ``noise_model``), written by the explain stage."""
        return self.root / f"noise_{member}.safetensors"

    def member_files(self, member: int) -> list[Path]:
        return [self.weights(member), self.card(member), self.member_predictions(member), self.noise_model(member)]

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.parquet"

    @property
    def bias_correction(self) -> Path:
        """How each member's brain-age gap was corrected for its age bias (method, split fitted on, coefficients)."""
        return self.root / "bias_correction.json"


@dataclass(frozen=True)
class AssociationLayout:
    """``associations/<name>/``: ``summary.json``, voxel maps ``<statistic>.nii.gz`` and tables."""

    root: Path
    SUMMARY = "summary.json"

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    def map(self, statistic: str) -> Path:
        return self.root / f"{statistic}.nii.gz"

    def maps(self) -> list[str]:
        return sorted(path.name.removesuffix(".nii.gz") for path in self.root.glob("*.nii.gz"))

    @property
    def clusters(self) -> Path:
        return self.root / "clusters.parquet"

    @property
    def max_t_null(self) -> Path:
        return self.root / "max_t_null.parquet"

    @property
    def regions(self) -> Path:
        return self.root / "regions.parquet"

    @property
    def regions_csv(self) -> Path:
        return self.root / "regions.csv"

    @property
    def correlations(self) -> Path:
        """roi analyses with a correlation statistic: region, r, p, p_bonferroni, p_fdr, n."""
        return self.root / "correlations.parquet"

    @property
    def correlations_csv(self) -> Path:
        return self.root / "correlations.csv"

    @property
    def fingerprints(self) -> Path:
        """A gain analysis's per-participant region gains."""
        return self.root / "fingerprints.parquet"

    @property
    def similarity(self) -> Path:
        return self.root / "similarity.parquet"

    @property
    def model(self) -> Path:
        """subject analyses: term, estimate, se, t, p, partial_r, n."""
        return self.root / "model.parquet"

    @property
    def data(self) -> Path:
        """subject analyses: the per-participant values the model was fitted on."""
        return self.root / "data.parquet"


# ---------------------------------------------------------------------------------------
# Freshness: inputs by content + settings → a key stored beside the output


def output_key(settings, inputs: dict[str, str | None]) -> dict:
    """The key of an output made with ``settings`` (JSON-able) from ``inputs`` (name → content hash)."""
    described = json.loads(json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str))
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return {"key": digest, **described}


def key_file(output: Path) -> Path:
    """Where the key of ``output`` (a folder or a file) is stored."""
    output = Path(output)
    return output / KEY_FILE if output.is_dir() else output.with_name(f".{output.name}{KEY_FILE}")


def stored_key(output: Path) -> dict | None:
    path = key_file(output)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_current(output: Path, key: dict) -> bool:
    """Whether ``output`` exists and was last marked with ``key``."""
    stored = stored_key(output) if Path(output).exists() else None
    return stored is not None and stored.get("key") == key["key"]


def mark_current(output: Path, key: dict) -> None:
    """Store ``key`` beside ``output``: the last write of a stage, after the output is whole."""
    with atomic_output(key_file(output)) as partial:
        partial.write_text(json.dumps(key, indent=1))


def forget(output: Path) -> None:
    """Drop the key of ``output`` before rewriting it: until marked again it is not current."""
    if Path(output).exists():
        key_file(output).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths) -> dict[str, str]:
    """``{path: sha256}`` of the files among ``paths`` that exist."""
    return {str(path): file_sha256(path) for path in paths if Path(path).is_file()}


# ---------------------------------------------------------------------------------------
# Atomic writes


def part_path(path: Path) -> Path:
    """The ``.part`` sibling an output is written into before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{PART_SUFFIX}")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield the ``.part`` sibling of ``path`` to write into; on success it replaces ``path``.

    Works for a file or a folder (an old folder is removed just before the rename). On an
    error the partial output is removed and ``path`` is left as it was.
    """
    path = Path(path)
    partial = part_path(path)
    _remove(partial)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if partial.is_dir() and path.exists():
        _remove(path)
    os.replace(partial, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# provenance.json: the runner writes it, everyone reads it, both through these types


@dataclass
class Run:
    """One ``relcohort run``: its catalog (paths resolved), environment, and each stage's summary."""

    started: str
    catalog_file: str
    catalog_sha256: str
    catalog: dict
    seeds: dict = field(default_factory=dict)
    packages: dict = field(default_factory=dict)
    python: str | None = None
    platform: str | None = None
    cluster: str | None = None
    stages: dict = field(default_factory=dict)  # stage name → {"seconds": ..., the stage's summary}
    cluster_usage: dict = field(default_factory=dict)  # per pool: jobs, workers, tasks (SLURM)
    state: str | None = None  # complete or failed; None while running
    finished: str | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> Run:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**{"catalog_file": "?", "catalog_sha256": "", "catalog": {}, **known})


@dataclass
class Provenance:
    """``provenance.json``: every run of the workspace's catalog, and the stages the last one applies."""

    runs: list[Run] = field(default_factory=list)
    stages: list[str] | None = None

    @classmethod
    def read(cls, layout: Layout) -> Provenance:
        """The file's runs, or none when the workspace has no provenance yet."""
        path = layout.provenance
        data = json.loads(path.read_text()) if path.is_file() else {}
        return cls([Run.from_json(run) for run in data.get("runs", [])], data.get("stages"))

    def write(self, layout: Layout) -> None:
        with atomic_output(layout.provenance) as partial:
            partial.write_text(json.dumps({"runs": [asdict(run) for run in self.runs], "stages": self.stages},
                                          indent=2, default=str))

    @property
    def last(self) -> Run | None:
        return self.runs[-1] if self.runs else None


@dataclass(frozen=True)
class ExperimentLayout:
    """``experiments/<name>/``: each condition's ensemble per repeat, the tidy results and the paired tests."""

    RESULTS = "results.parquet"

    root: Path

    def run(self, condition: str, repeat: int) -> ModelsLayout:
        return ModelsLayout(self.root / condition / f"repeat_{repeat}")

    @property
    def results(self) -> Path:
        return self.root / self.RESULTS

    @property
    def comparisons(self) -> Path:
        return self.root / "comparisons.parquet"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"
