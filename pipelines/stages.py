"""The pipeline's stages: one contract (:class:`Stage`) and nine stages that say only what is theirs.

A stage has a ``name``, ``applies(catalog)``, ``run(catalog, execution) -> summary`` and
``status(layout)`` (what it has produced, for ``relcohort status``). A stage writes outputs of the
workspace (:mod:`engine.layout`) in one of two ways: a whole output through :meth:`Stage.produce`,
which keeps it when it is current by the layout's one rule (its settings and its inputs by content,
as a key beside it) and otherwise writes it into a ``.part`` sibling that replaces it whole before
the key is stored; or by calling the engine where it keeps finer pieces current itself (registration
per participant, ingest per file, training per member, attribution per block of subjects).
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import dask
import pandas as pd

from engine.analysis import association, features, mask_relevance
from engine.analysis.atlas import Atlas, AtlasSettings, NativeLabels, ParticipantLabels, region_table
from engine.data import inputs, registration, store, synth
from engine.data.grid import MNI_SPACE
from engine.data.labels import label_table
from engine.data.lesion_filling import derive_filled
from engine.data.masker import Masker
from engine.layout import (
    Layout,
    atomic_output,
    file_sha256,
    files_sha256,
    forget,
    is_current,
    mark_current,
    output_key,
    stored_key,
)
from engine.models import validation
from engine.models.ensembles import (
    BASELINES,
    ENSEMBLE,
    EnsembleJob,
    combine_folds,
    train_ensembles,
)
from engine.models.experiments import DEFAULT_METRIC, Recipe, compare_conditions, experiment_runs, run_experiment
from engine.models.relevance import explain, import_relevance, open_relevance, relevance_key
from engine.models.splits import cross_fitting_splits, read_split, stratified_split
from engine.outputs.report import build_report
from engine.outputs.workspace import Workspace
from engine.tasks import Execution
from pipelines.catalog import Catalog, ReportSettings


class Stage(ABC):
    """One step of a catalog run: what it reads, the outputs it writes and how it tells they are current."""

    name: ClassVar[str]

    def applies(self, catalog: Catalog) -> bool:
        """Whether the catalog asks for this stage."""
        return True

    @abstractmethod
    def run(self, catalog: Catalog, execution: Execution) -> dict:
        """Bring the stage's outputs up to date (tasks and progress through ``execution``); return what it did."""

    @abstractmethod
    def status(self, layout: Layout) -> str | None:
        """What the stage has produced in a workspace (``None``: nothing)."""

    @staticmethod
    def produce(output: Path, settings: Any, inputs: dict, write: Callable[[Path], object]) -> bool:
        """Write ``output`` (a file or a folder) unless it is current for ``settings`` and ``inputs`` (name →
        content hash). ``write(partial)`` fills a ``.part`` sibling that then replaces the output whole; the key
        is stored beside it last, so a run killed midway leaves nothing that looks current. Returns whether it
        wrote."""
        key = output_key(settings, inputs)
        if is_current(output, key):
            return False
        forget(output)
        with atomic_output(output) as partial:
            write(partial)
        mark_current(output, key)
        return True


class SynthStage(Stage):
    """Generate the demo cohort's files (skipped when the catalog names a directory)."""

    name = "synth"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.cohort.demo is not None

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        settings = catalog.cohort.demo
        out = catalog.layout.demo_cohort
        generated = self.produce(out, settings.model_dump(exclude_none=True), {}, lambda partial: synth.generate_cohort(
            partial, settings.subjects, settings.voxel_size, settings.seed, execution=execution,
            native_voxel_size=settings.native_voxel_size, max_sessions=settings.sessions or 1,
            patients=settings.patients or 0.0, disease=settings.disease or "alzheimer"))
        return {"cohort": str(out), "subjects": settings.subjects, "generated": settings.subjects if generated else 0}

    def status(self, layout: Layout) -> str | None:
        key = stored_key(layout.demo_cohort)
        if key is None:
            return None
        settings = key["settings"]
        native = settings.get("native_voxel_size")
        return (f"{layout.demo_cohort}: {settings['subjects']} synthetic participants at "
                f"{settings['voxel_size']} mm, seed {settings['seed']}"
                + (f"; native scans at {native} mm" if native else ""))


class RegisterStage(Stage):
    """Native scans onto the template grid with ANTs, one task per participant (``engine.data.registration``)."""

    name = "register"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.registration is not None

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        settings, registered = catalog.registration, catalog.layout.registered
        participants = catalog.read_scans()
        files, problems = inputs.resolve_files(catalog.cohort_root, participants, catalog.modality_list())
        missing = {problem.scan for problem in problems}
        if settings.on_error == "fail" and problems:
            raise registration.RegistrationError(problems)
        sessions = (dict(zip(inputs.scan_ids(participants), inputs.scan_keys(participants), strict=True))
                    if "session_id" in participants else None)
        result = registration.register_cohort(
            registered, {scan: by_modality for scan, by_modality in files.items() if scan not in missing},
            catalog.modality_list(), settings, problems, execution, sessions)
        return {"folder": str(registered.root), "registered": result.registered, "unchanged": result.unchanged,
                "flagged": result.flagged, "skipped": [problem.as_dict() for problem in result.problems]}

    def status(self, layout: Layout) -> str | None:
        registered = layout.registered
        if not registered.qc.is_file():
            return None
        qc = pd.read_parquet(registered.qc)
        unit = "scan(s)" if "session_id" in qc else "participant(s)"
        lines = [f"{registered.root}: {len(qc)} {unit} on the template grid "
                 f"({', '.join(sorted(qc['transform'].unique()))}), {int(qc['diverged'].sum())} diverged and left "
                 f"out; QC in {registered.qc.name}"]
        for scan, (_, row) in zip(inputs.scan_ids(qc), qc.iterrows(), strict=True):
            if not (row["flagged"] or row["diverged"]):
                continue
            state = "diverged" if row["diverged"] else "flagged"
            lines.append(f"  {state} {scan}: correlation {row['correlation']:.3f} "
                         f"(z {row['z_correlation']:.1f}), NMI {row['nmi']:.3f} (z {row['z_nmi']:.1f}), "
                         f"Dice {row['dice']:.3f} (z {row['z_dice']:.1f})")
        if registered.problems.is_file():  # diverged ones are listed above
            problems = json.loads(registered.problems.read_text())
            registered_scans = set(inputs.scan_ids(qc))
            lines += [f"  skipped {describe_problem(problem)}" for problem in problems
                      if inputs.scan_id(problem["participant_id"], problem.get("session_id")) not in registered_scans]
        return "\n".join(lines)


class IngestStage(Stage):
    """Ingest the cohort's images into ``images.zarr``, incremental by file content (``engine.data.store.ingest``)."""

    name = "ingest"

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        participants = catalog.read_scans()
        space = catalog.cohort.space or (MNI_SPACE if catalog.cohort.demo else None)
        root, modalities, mask, unlisted = catalog.cohort_root, catalog.modality_list(), catalog.mask_file, "problem"
        if catalog.registration is not None:  # the registered images of the participants registered
            registered = catalog.layout.registered
            root, mask, space = registered.root / "participants", registered.mask, catalog.registration.space_name
            qc = pd.read_parquet(registered.qc)
            usable = set(inputs.scan_ids(qc[~qc["diverged"]]))
            participants = participants[pd.Index(inputs.scan_ids(participants)).isin(usable)].reset_index(drop=True)
            folder = "{participant_id}_{session_id}" if "session_id" in participants else "{participant_id}"
            names = [*(m.name for m in modalities), *catalog.registration.compared_modalities()]
            dtypes = {m.name: m.dtype for m in modalities}
            modalities = [inputs.Modality(name, f"{folder}/{name}.nii.gz", dtypes.get(name, "float32"))
                          for name in names]
            unlisted = "ignore"  # folders of participants left out this run
        result = store.ingest(
            catalog.layout.images, participants, root, modalities,
            mask, space=space, on_error=catalog.ingest.on_error,
            subjects_per_chunk=catalog.ingest.subjects_per_chunk, voxels_per_chunk=catalog.ingest.voxels_per_chunk,
            unlisted_files=unlisted, execution=execution,
        )
        derived = {name: derive_filled(str(catalog.layout.images), name, filling, execution)
                   for name, filling in catalog.ingest.fill_lesions.items()}
        return {"store": str(result.store), "subjects": result.n_subjects, "appended": result.appended,
                "unchanged": result.unchanged, "written": {**result.written, **derived},
                "skipped": [problem.as_dict() for problem in result.problems]}

    def status(self, layout: Layout) -> str | None:
        path = layout.images
        if not (path / "zarr.json").exists():
            return None
        attrs = store.store_attributes(path)
        dataset = store.open_cohort(path)
        ingest = attrs["ingest"]
        lines = [f"{path}: {dataset.sizes['subject']} complete subjects × {dataset.sizes['voxel']} voxels; "
                 f"modalities {', '.join(attrs['modalities'])}; grid {attrs['grid']['shape']} "
                 f"({attrs['grid']['space']}); last ingest {ingest['state']} at {ingest.get('finished', '?')}"]
        incomplete = attrs["n_subjects"] - dataset.sizes["subject"]
        if incomplete:
            lines.append(f"  {incomplete} row(s) not wholly ingested (hidden until their files are usable)")
        lines += [f"  skipped {describe_problem(skipped)}" for skipped in ingest.get("skipped", [])]
        return "\n".join(lines)


class FeaturesStage(Stage):
    """Structural feature tables from the store and the cohort's files, in ``features/``."""

    name = "features"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.features is not None

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        settings, layout = catalog.features, catalog.layout
        dataset = store.open_cohort(layout.images)
        jobs = {}
        if settings.gray_matter:
            jobs["regional_gm_volume"] = lambda: region_table(features.regional_volume(
                dataset[settings.gray_matter], catalog.atlas.load(dataset)))
        if settings.fa:
            jobs["tract_fa"] = lambda: region_table(features.tract_mean(
                dataset[settings.fa.modality], settings.fa.atlas.load(dataset), settings.fa.threshold))
        if settings.lesions:
            jobs["lesion_load"] = lambda: features.lesion_load(features.lesion_mask(
                dataset[settings.lesions.modality], settings.lesions.threshold)).compute().to_dataframe()[
                ["lesion_voxels", "lesion_volume_mm3"]].pipe(_keyed_rows, dataset)
        if settings.pvs:
            jobs["pvs_load"] = lambda: mask_relevance.cluster_count(
                dataset[settings.pvs.modality], Masker.of(dataset), settings.pvs.threshold, settings.pvs.min_cluster
            ).compute().to_dataframe()[["pvs_count", "pvs_voxels"]].pipe(_keyed_rows, dataset)
        if settings.freesurfer:
            jobs["freesurfer"] = lambda: _freesurfer_table(catalog, dataset, execution)
        if settings.tables:
            jobs["subject_features"] = lambda: _joined_tables(settings.tables, dataset)

        def write(partial: Path) -> None:
            partial.mkdir()
            for done, (name, job) in enumerate(jobs.items(), start=1):
                job().to_parquet(partial / layout.feature_table(name).name, index=False)
                execution.report("features", done, len(jobs))

        # FreeSurfer stats are not hashed: a smaller demo run removes participants' folders the store keeps
        computed = self.produce(
            layout.features, {"features": settings.model_dump(mode="json"),
                              "atlas": catalog.atlas.model_dump(mode="json")},
            {"images": store.content_fingerprint(layout.images), **files_sha256(settings.tables)}, write)
        return {"folder": str(layout.features), "tables": list(jobs) if computed else sorted(layout.feature_tables()),
                "computed": len(jobs) if computed else 0}

    def status(self, layout: Layout) -> str | None:
        if stored_key(layout.features) is None:
            return None
        return f"{layout.features}: " + ", ".join(f"{path.name} ({len(pd.read_parquet(path))} rows)"
                                                  for path in layout.feature_tables().values())


def _keyed_rows(table: pd.DataFrame, dataset) -> pd.DataFrame:
    """A per-row table indexed by store row label, keyed as the cohort is (participant_id [, session_id])."""
    return store.keyed(table.rename_axis("subject").reset_index(), dataset)


def _freesurfer_table(catalog: Catalog, dataset, execution: Execution) -> pd.DataFrame:
    """Every scan's FreeSurfer stats, read from its FreeSurfer subject's folder, keyed by the scan."""
    keys = store.row_keys(dataset)
    folders = catalog.features.freesurfer.subject_folders(keys)
    table = features.freesurfer_table(catalog.freesurfer_dir, folders, catalog.features.freesurfer.parcellations,
                                      execution)
    rows = dict(zip(folders, keys.index, strict=True))
    return store.keyed(table.rename(columns={"participant_id": "subject"}).assign(
        subject=lambda frame: frame["subject"].map(rows)), dataset)


def _joined_tables(paths, dataset) -> pd.DataFrame:
    joined = store.row_keys(dataset).reset_index(drop=True)
    for path in paths:
        table = features.read_feature_table(path)
        joined = features.join_on_participant(table, joined, source=str(path))
    return joined


class TrainStage(Stage):
    """Train the ensembles on the store into ``models/`` (members already trained are kept)."""

    name = "train"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.train is not None

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        dataset = store.open_cohort(catalog.layout.images)
        participants = store.row_columns(dataset).reset_index(drop=True)
        ensembles = catalog.ensembles()
        jobs = {name: self._jobs(catalog.layout.for_ensemble(name), settings, participants)
                for name, settings in ensembles.items()}
        results = iter(train_ensembles([job for ensemble in jobs.values() for job in ensemble], execution))
        summaries = {}
        for name, settings in ensembles.items():
            models = catalog.layout.for_ensemble(name).models
            fitted = [next(results) for _ in jobs[name]]
            result = (combine_folds(models.root, settings.split.folds, settings.task) if settings.split.folds
                      else fitted[0])
            summaries[name] = {"folder": str(models.root), "members": settings.members,
                               "trained": sum(part["trained"] for part in fitted),
                               **({"folds": settings.split.folds} if settings.split.folds else {}),
                               "test": _test_metrics(result["metrics"])}
        return _by_ensemble(summaries)

    def _jobs(self, layout: Layout, settings, participants: pd.DataFrame) -> list[EnsembleJob]:
        """The ensemble's training jobs, one per fold with cross-fitting; members trained on other images, and
        those of a layout with other folds, are made stale first."""
        stratify = [settings.target] if settings.task == "classification" else []
        folds = settings.split.folds
        models = layout.models
        models.root.mkdir(parents=True, exist_ok=True)
        for fold in models.folds():  # folds the split no longer has
            if not folds or fold >= folds:
                shutil.rmtree(models.fold(fold).root)
        folders = [models.fold(fold) for fold in range(folds)] if folds else [models]
        if folds:  # an earlier ensemble without folds
            for path in [*models.root.glob("member_*"), *models.root.glob("noise_*"), models.bias_correction]:
                path.unlink(missing_ok=True)
        splits = (cross_fitting_splits(participants, settings.split, stratify) if folds
                  else [stratified_split(participants, settings.split, also_stratify=stratify)])
        # each folder's key holds the images; each member's card holds its config and split
        key = output_key({}, {"images": store.content_fingerprint(layout.images)})
        for folder in folders:
            folder.root.mkdir(parents=True, exist_ok=True)
            if not is_current(folder.root, key):  # other images: every member is stale
                for member in folder.members():
                    folder.card(member).unlink()
                mark_current(folder.root, key)  # before training: members finished survive a kill
        features = _baseline_features(layout, settings.baseline_features)
        return [EnsembleJob(layout.images, settings.member_config(), settings.members, folder.root, split,
                            settings.bias_correction, features) for folder, split in zip(folders, splits, strict=True)]

    def status(self, layout: Layout) -> str | None:
        lines = []
        for name in layout.ensemble_names():
            models = layout.for_ensemble(name).models
            metrics = pd.read_parquet(models.metrics)
            members = sorted(set(metrics["member"]) - {ENSEMBLE, *BASELINES})
            lines.append(f"{models.root}: {len(members)} member(s); test: {_test_metrics(metrics)}")
        return "\n".join(lines) or None


def _baseline_features(layout: Layout, terms: list[association.Term]) -> pd.DataFrame | None:
    """The feature columns a classification's feature baselines take, one row per scan (by store row label)."""
    if not terms:
        return None
    columns = {}
    for term in terms:
        path = layout.feature_table(term.name)
        if not path.is_file():
            raise ValueError(f"train.baseline_features: {term}: no feature table {term.name!r} in {layout.features} "
                             "(a features section that writes it)")
        table = pd.read_parquet(path)
        if term.column not in table.columns or "region" in table.columns:
            raise ValueError(f"train.baseline_features: {term}: not a per-scan column of {path.name} (columns: "
                             f"{list(table.columns)})")
        columns[term.text] = inputs.by_scan(table)[term.column]
    return pd.DataFrame(columns)


def _by_ensemble(summaries: dict) -> dict:
    """A stage's summary: the single unnamed ensemble's, or one per named ensemble."""
    return summaries[None] if list(summaries) == [None] else {"ensembles": summaries}


def _test_metrics(metrics: pd.DataFrame) -> dict:
    """Test metrics of the ensemble and the baselines (a cross-fitted ensemble's pooled over its folds, the
    baselines' averaged over them)."""
    test = metrics[(metrics["split"] == "test") & metrics["member"].isin([ENSEMBLE, *BASELINES])]
    if "fold" in test:
        pooled = test[test["fold"].isna()]
        test = pd.concat([pooled, test[~test["member"].isin(pooled["member"])].groupby(
            "member", as_index=False).mean(numeric_only=True)], ignore_index=True)
    columns = [column for column in ("mae", "r", "r2", "balanced_accuracy", "roc_auc", "sensitivity", "specificity")
               if column in test]
    return {row["member"]: {column: round(float(row[column]), 4) for column in columns} for _, row in test.iterrows()}


class ExplainStage(Stage):
    """Relevance maps of every member into ``relevance.zarr`` (blocks already explained for the same plan are kept)."""

    name = "explain"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.explain is not None or bool(catalog.relevance)

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        summaries = {}
        for name, maps in (catalog.relevance or {}).items():  # maps made elsewhere, from the images store
            layout = catalog.layout.for_ensemble(name)
            imported = import_relevance(layout.relevance, images=layout.images, maps=maps,
                                        voxels_per_chunk=catalog.ingest.voxels_per_chunk)
            summaries[name] = {"store": str(layout.relevance), "methods": list(maps), "members": 1,
                               "subjects": imported.sizes["subject"], "imported": maps}
        if catalog.explain is None:
            return _by_ensemble(summaries)
        dataset = store.open_cohort(catalog.layout.images)
        explained = {name: catalog.explain.ensemble(name) for name in catalog.ensembles()}
        region_labels = _region_labels(catalog, dataset) if any(  # the atlas on the box, once for every ensemble
            "region_occlusion" in settings.methods for settings in explained.values()) else None
        for name, ensemble in catalog.ensembles().items():
            settings = explained[name]
            layout = catalog.layout.for_ensemble(name)
            split = read_split(layout.models.split)
            chosen = set(split.index if settings.subjects == "all" else split.index[split == settings.subjects])
            subjects = [subject for subject in dataset.subject.values if subject in chosen]
            explain(layout.relevance, images=layout.images, models=layout.models.root, methods=settings.methods,
                    members=list(range(ensemble.members)), subjects=subjects, options=settings.options,
                    region_labels=region_labels if "region_occlusion" in settings.methods else None,
                    subjects_per_chunk=settings.subjects_per_chunk, voxels_per_chunk=catalog.ingest.voxels_per_chunk,
                    execution=execution)
            summaries[name] = {"store": str(layout.relevance), "methods": settings.methods,
                               "subjects": len(subjects), "members": ensemble.members}
        return _by_ensemble(summaries)

    def status(self, layout: Layout) -> str | None:
        lines = []
        for name in layout.ensemble_names():
            path = layout.for_ensemble(name).relevance
            try:
                relevance = open_relevance(path)
            except (FileNotFoundError, ValueError):
                continue
            sizes = relevance.relevance.sizes
            lines.append(f"{path}: {sizes['attribution']} method(s) ({', '.join(relevance.attribution.values)}) × "
                         f"{sizes['member']} member(s) × {sizes['subject']} subject(s)")
        return "\n".join(lines) or None


#: Participants the parameter randomisation test explains (member 0, the first explained ones).
SANITY_SUBJECTS = 8


class ValidateStage(Stage):
    """Scores of the relevance maps in ``validation/``: against a ground truth, across members, inside lesions."""

    name = "validate"

    def applies(self, catalog: Catalog) -> bool:
        ensembles = _explained_ensembles(catalog)
        return bool(ensembles) and (_truth(catalog) is not None or bool(_masks(catalog)) or any(
            settings is not None and settings.members > 1 for settings in ensembles.values()))

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        # many small reductions: cheaper in this process than on workers, where each one's chunks and results
        # would travel between processes
        with dask.config.set(scheduler="threads"):
            summaries = {name: self._validate(catalog, name, settings, execution)
                         for name, settings in _explained_ensembles(catalog).items()}
        execution.report("validate", 1, 1)
        return _by_ensemble(summaries)

    def _validate(self, catalog: Catalog, ensemble: str | None, settings, execution: Execution) -> dict:
        """Every score of one ensemble's maps into its validation/ folder (the parameter randomisation test runs
        as a task meanwhile)."""
        layout = catalog.layout.for_ensemble(ensemble)
        truth, labels, age_bands = _truth(catalog), _truth_labels(catalog), _age_bands(catalog)
        masks = _masks(catalog, ensemble)
        task = settings.task if settings is not None else None

        def write(partial: Path) -> None:
            relevance = open_relevance(layout.relevance)
            dataset = store.open_cohort(layout.images)
            sanity = self._start_sanity(catalog, ensemble, settings, relevance, dataset, execution)
            partial.mkdir()
            predictions = pd.read_parquet(layout.models.predictions) if layout.models.predictions.is_file() else None
            if "lesion" in masks:  # Eitel et al.'s share of positive relevance in lesions
                lesions = features.lesion_mask(dataset[masks["lesion"].modality], masks["lesion"].threshold)
                indices = features.lesion_relevance(lesions, relevance.relevance_mean)
                store.row_table(indices.compute(), ["attribution", *indices.data_vars]).to_parquet(
                    partial / layout.lesion_relevance.name, index=False)
            for name, mask_settings in masks.items():  # Hofmann & Goltermann et al.'s indices and comparison
                mask = dataset[mask_settings.modality]
                if name == "pvs":
                    mask = mask_relevance.pvs_mask(mask, Masker.of(dataset), mask_settings.threshold,
                                                   mask_settings.min_cluster, mask_settings.dilate)
                else:
                    mask = features.lesion_mask(mask, mask_settings.threshold)
                predicted = None
                if predictions is not None and task == "regression":
                    ensemble_rows = predictions[predictions.member == ENSEMBLE]
                    predicted = inputs.by_scan(ensemble_rows)["predicted"]
                indices, comparison = mask_relevance.index_tables(mask, relevance.relevance_mean,
                                                                  mask_settings.min_voxels, predicted)
                indices.to_parquet(partial / layout.mask_indices(name).name, index=False)
                comparison.to_parquet(partial / layout.mask_comparison(name).name, index=False)
            atlas = catalog.atlas.load(dataset)
            if truth is not None:
                truth_mask = validation.truth_mask(truth, dataset, labels)
                validation.score_table(relevance, truth_mask, atlas).to_parquet(partial / layout.scores.name,
                                                                                index=False)
            if relevance.sizes["member"] > 1:
                classified = predictions if task == "classification" else None
                validation.robustness_table(relevance, atlas, classified, age_bands).to_parquet(
                    partial / layout.robustness.name, index=False)
            table = sanity()
            if table is not None:
                table.to_parquet(partial / layout.sanity.name, index=False)

        computed = self.produce(
            layout.validation,
            {"truth_labels": labels, "atlas": catalog.atlas.model_dump(mode="json"),
             "masks": {name: mask.model_dump() for name, mask in masks.items()}, "age_bands": age_bands,
             "sanity_subjects": SANITY_SUBJECTS},
            {"relevance": relevance_key(layout.relevance), "images": store.content_fingerprint(layout.images),
             "predictions": file_sha256(layout.models.predictions) if layout.models.predictions.is_file() else None,
             "truth": file_sha256(truth) if truth is not None else None}, write)
        summary = {"folder": str(layout.validation), "computed": int(computed)}
        if truth is not None:
            summary["scores"] = _method_scores(pd.read_parquet(layout.scores))
        return summary

    def _start_sanity(self, catalog: Catalog, ensemble: str | None, settings, relevance, dataset,
                      execution: Execution) -> Callable[[], pd.DataFrame | None]:
        """Adebayo et al.'s parameter randomisation test of every method (but noise_model, whose noise network
        belongs to the trained member) on member 0 and up to SANITY_SUBJECTS explained participants, started as a
        task; call the result for its table (``None`` for imported maps, which have no model, or without such
        methods)."""
        methods = tuple(method for method in relevance.attribution.values if method != "noise_model")
        if settings is None or not methods:
            return lambda: None
        layout = catalog.layout.for_ensemble(ensemble)
        region_labels = _region_labels(catalog, dataset) if "region_occlusion" in methods else None
        models, subjects = layout.models, relevance.subject.values
        if "fold" in relevance.coords:  # cross-fitted: the first fold's member 0 on subjects it tested
            fold = relevance.fold.values[0]
            models, subjects = models.fold(int(fold)), subjects[relevance.fold.values == fold]
        subjects = tuple(subjects[:SANITY_SUBJECTS])
        test = validation.RandomisationTest(str(models.member(0)), str(layout.images), methods, subjects,
                                            catalog.explain.ensemble(ensemble).options, region_labels)
        return execution.start(validation.randomisation_test, test)

    def status(self, layout: Layout) -> str | None:
        lines = [f"{validated}: " + ", ".join(path.name for path in sorted(validated.glob("*.parquet")))
                 for validated in (layout.for_ensemble(name).validation for name in layout.ensemble_names())
                 if stored_key(validated) is not None]
        return "\n".join(lines) or None


def _explained_ensembles(catalog: Catalog) -> dict:
    """The ensembles with relevance maps and their training settings: the trained ones when the catalog explains
    them, and the imported ones (settings ``None``: no model)."""
    trained = catalog.ensembles() if catalog.explain is not None else {}
    return {**trained, **dict.fromkeys(catalog.relevance or {})}


def _region_labels(catalog: Catalog, dataset):
    """The catalog's atlas in the model inputs' box (what region occlusion removes region by region)."""
    return Masker.of(dataset).box().inverse_transform(catalog.atlas.load(dataset).voxel_labels.astype("int64"))


def _age_bands(catalog: Catalog) -> list[float]:
    """The age cut points of group comparisons: the report's (its default without a report section)."""
    return list((catalog.report or ReportSettings()).age_bands)


def _truth(catalog: Catalog) -> Path | None:
    """The ground-truth label image the maps are scored against (the demo's planted regions by default)."""
    given = catalog.explain.truth if catalog.explain is not None else None
    return given or (catalog.cohort_root / synth.TRUTH_REGIONS if catalog.cohort.demo else None)


def _truth_labels(catalog: Catalog) -> list[int] | None:
    """The truth image's labels that count (the demo's focal planted regions by default)."""
    given = catalog.explain.truth_labels if catalog.explain is not None else None
    return given or (synth.FOCAL_TRUTH_LABELS if catalog.cohort.demo else None)


def _masks(catalog: Catalog, ensemble: str | None = None) -> dict:
    """The masks relevance is measured in (``lesion``, ``pvs``) and their settings, from the features section (the
    PVS masks' dilation that of ``ensemble``)."""
    settings = catalog.features
    if settings is None:
        return {}
    masks = {name: mask for name, mask in (("lesion", settings.lesions), ("pvs", settings.pvs)) if mask is not None}
    if "pvs" in masks:
        masks["pvs"] = masks["pvs"].model_copy(update={"dilate": masks["pvs"].dilation(ensemble)})
    return masks


def _method_scores(scores: pd.DataFrame) -> dict:
    """ROC-AUC and mass accuracy of each method's ensemble-mean signed maps (for the run summary)."""
    ensemble = scores[(scores.member == ENSEMBLE) & (scores.scored == "R")]
    return {row["attribution"]: {"roc_auc": round(float(row["roc_auc"]), 3),
                                 "mass_accuracy": round(float(row["mass_accuracy"]), 3)}
            for _, row in ensemble.iterrows()}


def describe_problem(problem: dict) -> str:
    """One line for a skipped input: who, which file, what is wrong."""
    who = f"participant {problem['participant_id']}" if problem["participant_id"] else "unlisted file"
    return f"{who}: {problem['file'] or ''}: {problem['problem']}"


class AssociateStage(Stage):
    """The catalog's association analyses, one folder each in ``associations/`` (``engine.analysis.association``)."""

    name = "associate"

    def applies(self, catalog: Catalog) -> bool:
        return bool(catalog.associate)

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        layout = catalog.layout
        sources = Workspace(layout.root).sources()
        read = _association_inputs(catalog)
        done, summary = 0, {"folder": str(layout.associations), "analyses": {}}
        atlases = {}  # each atlas on the cohort's voxels once per run, on first use

        def atlas_of(settings: AtlasSettings) -> Atlas:
            key = settings.model_dump_json()
            if key not in atlases:
                atlases[key] = settings.load(sources.images)
            return atlases[key]

        for analysis in catalog.associate:
            out = layout.association(analysis.name)
            table = catalog.modalities[analysis.labels].labels if analysis.labels else None

            def write(partial: Path, analysis=analysis) -> None:
                regions = (self._regions(catalog, sources, analysis, atlas_of) if analysis.scope in ("roi", "gain")
                           else None)
                atlas = atlas_of(catalog.atlas) if analysis.scope == "voxel" else None  # names the clusters
                association.analyse(sources, analysis, partial, regions=regions, atlas=atlas)

            done += self.produce(out.root, {"analysis": analysis.model_dump(mode="json"),
                                            "atlas": catalog.atlas.model_dump(mode="json"), "label_table": table},
                                 {**read, **files_sha256([table] if table else [])}, write)
            summary["analyses"][analysis.name] = json.loads(out.summary.read_text())["significant"]
            execution.report("associate", len(summary["analyses"]), len(catalog.associate))
        summary["computed"] = done
        return summary

    @staticmethod
    def _regions(catalog: Catalog, sources: association.Sources, analysis,
                 atlas_of: Callable[[AtlasSettings], Atlas]) -> Atlas | ParticipantLabels | NativeLabels:
        """What an roi analysis reduces over: each participant's own parcels (on the template grid, or on their
        native label volumes through the registration), or an atlas."""
        if analysis.native:
            modality = next(m for m in catalog.modality_list() if m.name == analysis.labels)
            participants = catalog.read_scans()
            files, _ = inputs.resolve_files(catalog.cohort_root, participants, [modality])
            return NativeLabels(analysis.labels, {pid: paths[modality.name] for pid, paths in files.items()},
                                label_table(modality.labels), catalog.layout.registered)
        if analysis.labels is not None:
            return ParticipantLabels(analysis.labels, sources.images[analysis.labels],
                                     label_table(catalog.modalities[analysis.labels].labels))
        return atlas_of(analysis.atlas or catalog.atlas)

    def status(self, layout: Layout) -> str | None:
        names = layout.association_names()
        if not names:
            return None
        parts = []
        for name in names:
            summary = json.loads(layout.association(name).summary.read_text())
            parts.append(f"{summary['name']} ({summary['scope']}, n={summary['n']}: {summary['significant']})")
        return f"{layout.associations}: " + "; ".join(parts)


def _association_inputs(catalog: Catalog) -> dict:
    """What the analyses read, by content: images, every ensemble's relevance maps and predictions, feature tables."""
    layout = catalog.layout
    inputs = {"images": store.content_fingerprint(layout.images)}
    tables = list(layout.feature_tables().values())
    for name in catalog.ensemble_names():
        ensemble = layout.for_ensemble(name)
        inputs[f"relevance {name}" if name else "relevance"] = relevance_key(ensemble.relevance)
        tables.append(ensemble.models.predictions)
    inputs.update({str(Path(path).relative_to(layout.root)): sha for path, sha in files_sha256(tables).items()})
    return inputs


class ExperimentStage(Stage):
    """The catalog's repeated experiments, one folder each in ``experiments/`` (``engine.models.experiments``)."""

    name = "experiment"

    def applies(self, catalog: Catalog) -> bool:
        return bool(catalog.experiments)

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        dataset = store.open_cohort(catalog.layout.images)
        participants = store.row_columns(dataset).reset_index(drop=True)
        summary = {"folder": str(catalog.layout.experiments), "experiments": {}}
        for settings in catalog.experiments:
            files = catalog.layout.experiment(settings.name)
            recipes = settings.recipes(catalog.train)
            recipe = next(iter(recipes.values()))
            stratify = [recipe.target] if recipe.task == "classification" else []
            seeds = [recipe.split.seed] * settings.repeats if settings.same_split else [
                recipe.split.seed + repeat for repeat in range(settings.repeats)]
            splits = [stratified_split(participants, recipe.split.model_copy(update={"seed": seed}), stratify)
                      for seed in seeds]
            runs = experiment_runs(files, {name: Recipe(recipe.member_config(), settings.members or recipe.members,
                                                        recipe.bias_correction,
                                                        _baseline_features(catalog.layout, recipe.baseline_features))
                                           for name, recipe in recipes.items()}, splits, settings.same_split)
            results = run_experiment(catalog.layout.images, runs, execution)
            metric = settings.metric or DEFAULT_METRIC[recipe.task]
            comparisons = compare_conditions(results, metric, conditions=list(recipes), pairs=settings.comparisons)
            for table, path in ((results, files.results), (comparisons, files.comparisons)):
                with atomic_output(path) as partial:
                    table.to_parquet(partial, index=False)
            chosen = results[(results["metric"] == metric) & (results["member"] == ENSEMBLE)]
            described = {condition: {"mean": round(float(values.mean()), 4), "sd": round(float(values.std()), 4)}
                         for condition, values in chosen.groupby("condition", sort=False)["value"]}
            record = {"name": settings.name, "metric": metric, "repeats": settings.repeats,
                      "same_split": settings.same_split, "conditions": settings.conditions, "by_condition": described,
                      "comparisons": comparisons[["first", "second", "median_difference", "p", "p_holm",
                                                  "rank_biserial"]].round(4).to_dict("records")}
            with atomic_output(files.summary) as partial:
                partial.write_text(json.dumps(record, indent=2))
            summary["experiments"][settings.name] = {"metric": metric, **described}
        return summary

    def status(self, layout: Layout) -> str | None:
        lines = []
        for name in layout.experiment_names():
            record = json.loads(layout.experiment(name).summary.read_text())
            lines.append(f"{layout.experiment(name).root}: {record['metric']} over {record['repeats']} repeats: "
                         + ", ".join(f"{condition} {values['mean']:.3f} ± {values['sd']:.3f}"
                                     for condition, values in record["by_condition"].items()))
        return "\n".join(lines) or None


class ReportStage(Stage):
    """The HTML report of everything the workspace holds: ``report.html`` (see ``engine.outputs.report``)."""

    name = "report"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.report is not None and catalog.report.enabled

    def run(self, catalog: Catalog, execution: Execution) -> dict:
        settings, layout = catalog.report, catalog.layout
        built = self.produce(layout.report, settings.model_dump(mode="json"), _report_inputs(layout),
                             lambda partial: build_report(layout.root, methods=settings.methods,
                                                          age_bands=settings.age_bands, top_k=settings.top_k,
                                                          execution=execution, out=partial))
        summary = {"report": str(layout.report), "built": int(built)}
        if settings.screenshot:
            from engine.outputs.browser import screenshot_sections

            try:
                shots = screenshot_sections(layout.report, layout.report_screenshots)
                summary["screenshots"] = str(next(iter(shots.values())).parent)
            except FileNotFoundError as error:
                summary["screenshots"] = f"not taken: {error}"
        return summary

    def status(self, layout: Layout) -> str | None:
        if stored_key(layout.report) is None or not layout.report.is_file():
            return None
        return f"{layout.report}: {layout.report.stat().st_size / 2**20:.1f} MiB, open it in a browser"


def _report_inputs(layout: Layout) -> dict:
    """What the report reads, by content: the images' data, every ensemble's relevance maps and every table and
    map."""
    paths = [*layout.feature_tables().values(), *sorted(path for path in layout.associations.rglob("*")
                                                         if path.is_file()),
             *[path for name in layout.experiment_names() for path in (layout.experiment(name).summary,
                                                                        layout.experiment(name).results,
                                                                        layout.experiment(name).comparisons)]]
    inputs = {}
    for name in layout.ensemble_names():
        ensemble = layout.for_ensemble(name)
        paths += [*sorted(ensemble.models.root.glob("*.parquet")), *sorted(ensemble.validation.glob("*.parquet"))]
        inputs[f"relevance {name}" if name else "relevance"] = relevance_key(ensemble.relevance)
    inputs.update({str(Path(path).relative_to(layout.root)): sha for path, sha in files_sha256(paths).items()})
    if (layout.images / "zarr.json").is_file():
        inputs["images"] = store.content_fingerprint(layout.images)
    return inputs


STAGES: list[Stage] = [SynthStage(), RegisterStage(), IngestStage(), FeaturesStage(), TrainStage(), ExplainStage(),
                       ValidateStage(), AssociateStage(), ExperimentStage(), ReportStage()]
