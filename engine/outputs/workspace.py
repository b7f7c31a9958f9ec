"""A run's workspace as labelled Python objects: the notebook API, and what the report reads.

``open_workspace(path)`` returns a :class:`Workspace` whose properties load on first use::

    ws = open_workspace("workspace/demo")   # several named ensembles: open_workspace(path, "flair"), ws.ensembles
    ws.images                    # xarray.Dataset (subject × voxel), images.zarr
    ws.relevance                 # xarray.Dataset (attribution × member × subject × voxel), relevance.zarr
    ws.features["tract_fa"]      # pandas tables of features/*.parquet
    ws.predictions, ws.metrics   # models/ (ws.training: how the members were trained)
    ws.scores, ws.robustness, ws.sanity   # validation/ (and ws.lesion_relevance, ws.mask_indices("pvs"), …)
    ws.associations["lrp_age"]   # associations/<name>/: summary, voxel maps, cluster or region tables
    ws.provenance, ws.catalog    # provenance.json (typed: engine.layout.Provenance) and the last run's catalog
    ws.to_nifti(ws.relevance.relevance_mean.sel(attribution="lrp").mean("subject"))
    ws.plot(ws.associations["lrp_age"].map("t"), kind="glass")
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr

from engine.analysis.association import CORRECTED_P, Sources
from engine.analysis.atlas import Atlas, AtlasSettings
from engine.data.masker import Masker
from engine.data.store import open_cohort, row_columns
from engine.layout import AssociationLayout, ExperimentLayout, Layout, Provenance
from engine.models.ensembles import ENSEMBLE
from engine.models.relevance import open_relevance
from engine.models.training import TrainingConfig


@lru_cache(maxsize=1)
def mni_template() -> nib.Nifti1Image:
    """nilearn's bundled MNI152 template (2 mm), the background of every brain figure; read offline."""
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=2)


def _read_table(path: Path, stage: str) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the {stage} stage has not written it")
    return pd.read_parquet(path)


class Association:
    """One analysis in ``associations/<name>/``: ``summary`` (summary.json) and its voxel maps
    (``t.nii.gz``, ``p_fdr.nii.gz``...), cluster table, region table, correlation table or similarity table."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = AssociationLayout(self.path)
        summary_file = self.files.summary
        if not summary_file.is_file():
            raise FileNotFoundError(f"{summary_file} not found: not an association result")
        self.summary = json.loads(summary_file.read_text())
        if "scope" not in self.summary:
            raise ValueError(f"{summary_file}: field 'scope' (voxel, roi or similarity) is missing")

    def __repr__(self) -> str:
        return f"Association({self.name!r}, scope={self.scope!r}, maps={self.maps})"

    @property
    def name(self) -> str:
        return self.summary.get("name", self.path.name)

    @property
    def scope(self) -> str:
        return self.summary["scope"]

    @property
    def alpha(self) -> float:
        return float(self.summary.get("alpha", 0.05))

    @property
    def maps(self) -> list[str]:
        """Names of the voxel maps present, e.g. ``beta``, ``t``, ``p``, ``p_fdr``, ``p_fwe``."""
        return self.files.maps()

    def map(self, statistic: str) -> nib.Nifti1Image:
        """One voxel map, e.g. ``"t"`` or ``"p_fdr"``."""
        path = self.files.map(statistic)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; this analysis has maps {self.maps}")
        return nib.load(path)

    @property
    def corrected_p(self) -> str | None:
        """The map that decides significance: the one the clusters were thresholded by
        (``clusters_thresholded_by``), else ``p_fwe``, else ``p_fdr``; ``None`` without any."""
        chosen = CORRECTED_P.get(self.summary.get("clusters_thresholded_by"))
        return next((name for name in (chosen, "p_fwe", "p_fdr") if name in self.maps), None)

    def thresholded(self, statistic: str = "t") -> nib.Nifti1Image:
        """``statistic`` where the corrected p-value is below ``alpha``, 0 elsewhere (and outside the mask)."""
        if self.corrected_p is None:
            raise FileNotFoundError(f"{self.path}: no p_fwe or p_fdr map to threshold with")
        image = self.map(statistic)
        keep = np.asanyarray(self.map(self.corrected_p).dataobj) < self.alpha
        values = np.nan_to_num(image.get_fdata())
        return nib.Nifti1Image(np.where(keep, values, 0).astype(np.float32), image.affine, image.header)

    @cached_property
    def clusters(self) -> pd.DataFrame | None:
        return _optional_table(self.files.clusters)

    @cached_property
    def regions(self) -> pd.DataFrame | None:
        return _optional_table(self.files.regions)

    @cached_property
    def fingerprints(self) -> pd.DataFrame | None:
        """A gain analysis's per-participant region gains (their region sum ÷ the reference group's mean)."""
        return _optional_table(self.files.fingerprints)

    @cached_property
    def correlations(self) -> pd.DataFrame | None:
        """An roi analysis with a correlation statistic: region, r, p, p_bonferroni, p_fdr, n."""
        return _optional_table(self.files.correlations)

    @cached_property
    def similarity(self) -> pd.DataFrame | None:
        return _optional_table(self.files.similarity)

    @cached_property
    def model(self) -> pd.DataFrame | None:
        """A subject analysis's model: term, estimate, se, t, p, partial_r, n."""
        return _optional_table(self.files.model)

    @cached_property
    def data(self) -> pd.DataFrame | None:
        """A subject analysis's per-participant values."""
        return _optional_table(self.files.data)


def _optional_table(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


class Workspace:
    """The outputs of one catalog's runs in ``path``, loaded lazily with labelled dimensions; with ``ensemble``,
    the models, relevance maps and validation of that named ensemble (see :attr:`ensembles`)."""

    def __init__(self, path: str | Path, ensemble: str | None = None):
        self.path = Path(path).resolve()
        self.ensemble = ensemble
        self.layout = Layout(self.path, ensemble)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no workspace at {self.path}")

    def __repr__(self) -> str:
        ensemble = f", ensemble={self.ensemble!r}" if self.ensemble else ""
        return f"Workspace({str(self.path)!r}{ensemble}, has={[part for part in self.PARTS if self.has(part)]})"

    @property
    def ensembles(self) -> list[str | None]:
        """The names of the ensembles with models or relevance maps (``[None]``: one unnamed ensemble;
        ``["flair", "t1"]``: named ones, trained or imported)."""
        return self.layout.ensemble_names()

    def for_ensemble(self, name: str | None) -> Workspace:
        """This workspace with ensemble ``name``'s models, relevance maps and validation."""
        if name is not None and name not in self.ensembles:
            raise ValueError(f"no ensemble {name!r} in {self.path} (ensembles: {self.ensembles})")
        return Workspace(self.path, name)

    PARTS = ("images", "relevance", "features", "models", "validation", "associations", "experiments", "provenance",
             "report")

    def has(self, part: str) -> bool:
        """Whether the workspace holds ``part`` (one of ``Workspace.PARTS``)."""
        layout = self.layout
        present = {"images": lambda: (layout.images / "zarr.json").exists(),
                   "relevance": lambda: (layout.relevance / "zarr.json").exists(),
                   "features": lambda: bool(layout.feature_tables()),
                   "models": lambda: layout.models.metrics.exists(),
                   "validation": lambda: any(layout.validation.glob("*.parquet")),
                   "associations": lambda: bool(layout.association_names()),
                   "experiments": lambda: bool(layout.experiment_names()),
                   "provenance": lambda: layout.provenance.exists(),
                   "report": lambda: layout.report.exists()}
        if part not in present:
            raise ValueError(f"unknown workspace part {part!r}; known: {', '.join(self.PARTS)}")
        return present[part]()

    # -- stores and tables

    @cached_property
    def images(self) -> xr.Dataset:
        """``images.zarr``: lazy (subject × voxel) arrays with participant columns as coordinates."""
        return open_cohort(self.layout.images)

    @cached_property
    def relevance(self) -> xr.Dataset:
        """``relevance.zarr``: ``relevance`` (attribution, member, subject, voxel) and ``relevance_mean``."""
        return open_relevance(self.layout.relevance)

    @cached_property
    def features(self) -> dict[str, pd.DataFrame]:
        """Every ``features/*.parquet`` table by name (e.g. ``regional_gm_volume``)."""
        return {name: pd.read_parquet(path) for name, path in self.layout.feature_tables().items()}

    @cached_property
    def predictions(self) -> pd.DataFrame:
        """Per participant, member (``"0"``, ``"1"``, … and ``"ensemble"``) and split: predicted, observed,
        brain-age gaps."""
        return _read_table(self.layout.models.predictions, "train")

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return _read_table(self.layout.models.metrics, "train")

    @cached_property
    def bias_correction(self) -> dict | None:
        """Per member (and ``"ensemble"``): how the brain-age gap's age bias was fitted (``bias_correction.json``);
        ``None`` for models that are not brain-age models."""
        path = self.layout.models.bias_correction
        return json.loads(path.read_text()) if path.is_file() else None

    @cached_property
    def registration_qc(self) -> pd.DataFrame | None:
        """QC per registered participant (``registered/qc.parquet``); ``None`` without a register stage."""
        path = self.layout.registered.qc
        return pd.read_parquet(path) if path.is_file() else None

    def to_native(self, data, participant_id: str, kind: str = "intensity") -> nib.Nifti1Image:
        """``data`` (anything :meth:`to_nifti` takes) on the participant's native reference scan, through
        the inverse of its registration (``kind``: ``intensity``, ``label`` or ``mask`` interpolation)."""
        from engine.data.registration import to_native

        return to_native(self.to_nifti(data), self.layout.registered, participant_id, kind)

    @cached_property
    def training(self) -> TrainingConfig | None:
        """How the members were trained (their cards' config); ``None`` before the train stage."""
        models = self.layout.models.trained()[0]
        members = models.members()
        if not members:
            return None
        return TrainingConfig.model_validate(json.loads(models.card(members[0]).read_text())["config"])

    @cached_property
    def scores(self) -> pd.DataFrame:
        """Ground-truth scores per method and member (``validation/scores.parquet``)."""
        return _read_table(self.layout.scores, "validate")

    @cached_property
    def robustness(self) -> pd.DataFrame:
        """Robustness across members per method (``validation/robustness.parquet``)."""
        return _read_table(self.layout.robustness, "validate")

    @cached_property
    def sanity(self) -> pd.DataFrame:
        """The parameter randomisation test per method (``validation/sanity.parquet``)."""
        return _read_table(self.layout.sanity, "validate")

    @cached_property
    def lesion_relevance(self) -> pd.DataFrame:
        """Eitel et al.'s share of positive relevance in lesions per method and participant
        (``validation/lesion_relevance.parquet``)."""
        return _read_table(self.layout.lesion_relevance, "validate")

    def mask_indices(self, mask: str) -> pd.DataFrame:
        """The seed study's relevance indices inside ``lesion`` or ``pvs`` masks per method and participant."""
        return _read_table(self.layout.mask_indices(mask), "validate")

    def mask_comparison(self, mask: str) -> pd.DataFrame:
        """Relevance per ``lesion`` / ``pvs`` voxel against the participant's average per method (Wilcoxon)."""
        return _read_table(self.layout.mask_comparison(mask), "validate")

    @cached_property
    def associations(self) -> dict[str, Association]:
        """Every ``associations/<name>/`` analysis by folder name."""
        return {name: Association(self.layout.association(name).root) for name in self.layout.association_names()}

    @cached_property
    def experiments(self) -> dict[str, Experiment]:
        """Every ``experiments/<name>/`` with results, by folder name."""
        return {name: Experiment(self.layout.experiment(name)) for name in self.layout.experiment_names()}

    def sources(self) -> Sources:
        """What association terms resolve against (:func:`engine.analysis.association.analyse` and the analyses it
        runs): the images with their participant columns, the feature tables, and every ensemble's relevance maps
        and ensemble-mean predictions."""
        images = self.images
        participants = row_columns(images)
        relevance, predictions = {}, {}
        for name in self.ensembles:
            ensemble = self.layout.for_ensemble(name)
            if (ensemble.relevance / "zarr.json").is_file():
                relevance[name] = open_relevance(ensemble.relevance)
            if ensemble.models.predictions.is_file():
                table = pd.read_parquet(ensemble.models.predictions)
                predictions[name] = table[table["member"] == ENSEMBLE]
        return Sources(images, participants, relevance, self.features, predictions)

    @cached_property
    def provenance(self) -> Provenance:
        """``provenance.json``: every run (catalog, packages, seeds, stage times), typed."""
        if not self.layout.provenance.is_file():
            raise FileNotFoundError(f"{self.layout.provenance} not found: the workspace was not made by "
                                    "`relcohort run`")
        return Provenance.read(self.layout)

    @property
    def catalog(self) -> dict:
        """The catalog (paths resolved) of the last recorded run."""
        if self.provenance.last is None:
            raise ValueError(f"{self.layout.provenance}: no runs recorded")
        return self.provenance.last.catalog

    def atlas(self, settings: AtlasSettings | str | None = None) -> Atlas:
        """An atlas on the workspace's voxels: :class:`~engine.analysis.atlas.AtlasSettings` or a bundled atlas's
        name; by default the catalog's ``atlas:``."""
        if settings is None:
            recorded = self.catalog.get("atlas") if self.has("provenance") else None
            settings = AtlasSettings.model_validate(recorded or {})
        elif isinstance(settings, str):
            settings = AtlasSettings(name=settings)
        return settings.load(self.relevance if self.has("relevance") else self.images)

    # -- back to images and figures

    def to_nifti(self, data, atlas: Atlas | None = None) -> nib.Nifti1Image:
        """A NIfTI image of ``data`` on the cohort grid.

        ``data`` is a DataArray with one ``voxel`` dimension (a row, or any reduction such as
        ``.mean("subject")``; other dimensions must have size 1), a ``pandas.Series`` of values
        by region name (painted into ``atlas``, default the catalog's), or a NIfTI image (returned).
        """
        if isinstance(data, nib.spatialimages.SpatialImage):
            return data
        if isinstance(data, pd.Series):
            return self._paint_regions(data, atlas or self.atlas())
        if not isinstance(data, xr.DataArray):
            raise TypeError("to_nifti takes a DataArray, a Series by region or a NIfTI image, "
                            f"got {type(data).__name__}")
        return self.masker.to_nifti(data)

    @cached_property
    def masker(self) -> Masker:
        """The cohort's voxels on their grid: rows ⇄ volumes ⇄ NIfTI (:class:`~engine.data.masker.Masker`)."""
        return Masker.of(self.relevance if self.has("relevance") else self.images)

    def _paint_regions(self, values: pd.Series, atlas: Atlas) -> nib.Nifti1Image:
        unknown = sorted(set(values.index) - set(atlas.region_names))
        if unknown:
            raise ValueError(f"regions {unknown[:5]} are not in atlas {atlas.name}")
        by_label = pd.Series(atlas.regions.index, index=atlas.regions["name"])
        lookup = np.zeros(int(max(atlas.regions.index.max(), atlas.voxel_labels.max(initial=0))) + 1, np.float32)
        lookup[by_label.reindex(values.index).to_numpy()] = values.to_numpy(dtype=np.float32)
        return self.masker.to_nifti(lookup[atlas.voxel_labels])

    def plot(self, data, kind: str = "stat", **options):
        """Plot ``data`` (anything :meth:`to_nifti` takes) over the MNI template with nilearn.

        ``kind``: ``stat`` (orthogonal slices), ``glass`` (glass brain, signed) or ``anat``.
        ``options`` go to nilearn's ``plot_stat_map`` / ``plot_glass_brain`` / ``plot_anat``
        (``title``, ``threshold``, ``axes``, ``display_mode``, ``cmap``...); returns its display.
        """
        from nilearn import plotting

        image = self.to_nifti(data)
        if kind == "stat":
            return plotting.plot_stat_map(image, bg_img=mni_template(), **options)
        if kind == "glass":
            return plotting.plot_glass_brain(image, **{"plot_abs": False, "colorbar": True, **options})
        if kind == "anat":
            return plotting.plot_anat(image, **options)
        raise ValueError(f"kind must be 'stat', 'glass' or 'anat', got {kind!r}")


def open_workspace(path: str | Path, ensemble: str | None = None) -> Workspace:
    """The workspace of a catalog run (``workspace:`` in the catalog) for notebooks: see :class:`Workspace`;
    ``ensemble`` picks one of several named ensembles."""
    return Workspace(path).for_ensemble(ensemble)


class Experiment:
    """One repeated experiment's outputs in ``experiments/<name>/`` (``engine.models.experiments``)."""

    def __init__(self, layout: ExperimentLayout):
        self.layout = layout
        self.name = layout.root.name

    @cached_property
    def summary(self) -> dict:
        """Metric, repeats, conditions, each condition's mean and SD, the tests."""
        return json.loads(self.layout.summary.read_text())

    @cached_property
    def results(self) -> pd.DataFrame:
        """Tidy test metrics: condition, repeat, member, metric, value."""
        return pd.read_parquet(self.layout.results)

    @cached_property
    def comparisons(self) -> pd.DataFrame:
        """Per pair of conditions the paired Wilcoxon test over the repeats (and Holm's p over the pairs)."""
        return pd.read_parquet(self.layout.comparisons)
