"""The pipeline's stages. Each is idempotent: a finished stage does no work when run again.

A stage has a ``name``, ``applies(catalog)``, ``run(catalog, client, progress) -> summary``
and ``report(workspace) -> str | None`` (what it has produced, for ``relcohort status``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from engine import association, attribution, features, stats, store, synth, training, validation
from engine.atlas import Atlas, cohort_atlas, region_table
from engine.grid import MNI_SPACE
from engine.report import build_report, screenshot_sections
from engine.workspace import ASSOCIATIONS, IMAGES, MODELS, RELEVANCE, REPORT  # the workspace layout
from pipelines.catalog import Catalog

Progress = Callable[[str, int, int], None]

DEMO_COHORT = "demo_cohort"
SYNTH_RECORD = ".relcohort-synth.json"


class SynthStage:
    """Generate the demo cohort's files (skipped when the catalog names a directory)."""

    name = "synth"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.cohort.demo is not None

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        settings = catalog.cohort.demo.model_dump()
        out = catalog.cohort_root
        record = out / SYNTH_RECORD
        if record.is_file() and json.loads(record.read_text()) == settings:
            return {"cohort": str(out), "subjects": settings["subjects"], "generated": 0}
        synth.generate_cohort(out, settings["subjects"], settings["voxel_size"], settings["seed"],
                              client=client, progress=progress, overwrite=True)
        record.write_text(json.dumps(settings))  # written last: marks the cohort whole
        return {"cohort": str(out), "subjects": settings["subjects"], "generated": settings["subjects"]}

    def report(self, workspace: Path) -> str | None:
        record = workspace / DEMO_COHORT / SYNTH_RECORD
        if not record.is_file():
            return None
        settings = json.loads(record.read_text())
        return (f"{workspace / DEMO_COHORT}: {settings['subjects']} synthetic participants at "
                f"{settings['voxel_size']} mm, seed {settings['seed']}")


class IngestStage:
    """Ingest the cohort's images into ``images.zarr`` (incremental; see ``engine.store.ingest``)."""

    name = "ingest"

    def applies(self, catalog: Catalog) -> bool:
        return True

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        participants = store.read_participants(catalog.participants_file)
        space = catalog.cohort.space or (MNI_SPACE if catalog.cohort.demo else None)
        report = store.ingest(
            catalog.workspace / IMAGES, participants, catalog.cohort_root, catalog.modality_list(),
            catalog.mask_file, space=space, on_error=catalog.ingest.on_error,
            subjects_per_chunk=catalog.ingest.subjects_per_chunk, voxels_per_chunk=catalog.ingest.voxels_per_chunk,
            client=client, progress=progress,
        )
        return {"store": str(report.store), "subjects": report.n_subjects, "appended": report.appended,
                "unchanged": report.unchanged, "written": report.written,
                "skipped": [problem.record() for problem in report.problems]}

    def report(self, workspace: Path) -> str | None:
        path = workspace / IMAGES
        if not (path / "zarr.json").exists():
            return None
        attrs = store.ingest_record(path)
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


class FeaturesStage:
    """Structural feature tables from the store and the cohort's files, in ``features/``."""

    name = "features"
    folder = "features"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.features is not None

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        settings = catalog.features
        dataset = store.open_cohort(catalog.workspace / IMAGES)
        out = catalog.workspace / self.folder
        record_file = out / RECORD
        record = {"features": settings.model_dump(mode="json"), "atlas": catalog.atlas.model_dump(mode="json"),
                  "store": store.content_fingerprint(catalog.workspace / IMAGES),
                  "subjects": list(dataset.subject.values)}
        if record_file.is_file() and json.loads(record_file.read_text()) == record:
            return {"folder": str(out), "tables": sorted(p.name for p in out.glob("*.parquet")), "computed": 0}
        out.mkdir(parents=True, exist_ok=True)
        record_file.unlink(missing_ok=True)

        jobs = {}
        if settings.gray_matter:
            jobs["regional_gm_volume"] = lambda: region_table(features.regional_volume(
                dataset[settings.gray_matter], _atlas(dataset, catalog.atlas)))
        if settings.fa:
            jobs["tract_fa"] = lambda: region_table(features.tract_mean(
                dataset[settings.fa.modality], _atlas(dataset, settings.fa.atlas), settings.fa.threshold))
        if settings.lesions:
            jobs["lesion_load"] = lambda: features.lesion_load(dataset[settings.lesions]).compute().to_dataframe()[
                ["lesion_voxels", "lesion_volume_mm3"]].rename_axis("participant_id").reset_index()
        if settings.freesurfer:
            jobs["freesurfer"] = lambda: features.freesurfer_table(
                catalog.freesurfer_dir, dataset.subject.values, settings.freesurfer.parcellations)
        if settings.tables:
            jobs["subject_features"] = lambda: _joined_tables(settings.tables, dataset)
        for done, (name, job) in enumerate(jobs.items(), start=1):
            _write_table(job(), out / f"{name}.parquet")
            progress("features", done, len(jobs))
        record_file.write_text(json.dumps(record))  # written last: marks the tables current
        return {"folder": str(out), "tables": [f"{name}.parquet" for name in jobs], "computed": len(jobs)}

    def report(self, workspace: Path) -> str | None:
        out = workspace / self.folder
        if not (out / RECORD).is_file():
            return None
        tables = sorted(out.glob("*.parquet"))
        return f"{out}: " + ", ".join(f"{path.name} ({len(pd.read_parquet(path))} rows)" for path in tables)


RECORD = ".relcohort-record.json"


class TrainStage:
    """Train the ensemble on the store into ``models/`` (members already trained are kept)."""

    name = "train"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.train is not None

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        settings = catalog.train
        images = catalog.workspace / IMAGES
        dataset = store.open_cohort(images)
        participants = pd.DataFrame({name: dataset[name].values for name in dataset.coords
                                     if dataset[name].dims == ("subject",)})
        participants = participants.rename(columns={"subject": "participant_id"})
        strata = list(dict.fromkeys([*settings.split.stratify] +
                                    ([settings.target] if settings.task == "classification" else [])))
        split = training.stratified_split(participants, settings.split.fractions, strata, seed=settings.split.seed)
        config = training.TrainingConfig(
            target=settings.target, task=settings.task, modalities=tuple(settings.modalities), model=settings.model,
            model_options=settings.model_options, epochs=settings.epochs, batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, patience=settings.patience, seed=settings.seed,
            cache_bytes=int(settings.cache_gib * 2**30),
            finetune_from=str(settings.finetune_from) if settings.finetune_from else None,
            freeze=tuple(settings.freeze))
        out = catalog.workspace / MODELS
        out.mkdir(parents=True, exist_ok=True)
        record = {"store": store.content_fingerprint(images)}
        if not _current(out, record):  # other images (or none recorded): every member is stale
            for stale in out.glob("member_*.json"):
                stale.unlink()
            (out / RECORD).write_text(json.dumps(record))  # before training: members finished survive a kill
        result = training.train_ensemble(images, config, settings.members, out, split, client=client,
                                         progress=progress)
        return {"folder": str(out), "members": settings.members, "trained": result["trained"],
                "test": _test_metrics(result["metrics"])}

    def report(self, workspace: Path) -> str | None:
        path = workspace / MODELS / "metrics.parquet"
        if not path.is_file():
            return None
        metrics = pd.read_parquet(path)
        members = sorted(set(metrics["member"]) - {"ensemble", "predict_train_mean"})
        return f"{workspace / MODELS}: {len(members)} member(s); test: {_test_metrics(metrics)}"


def _test_metrics(metrics: pd.DataFrame) -> dict:
    test = metrics[(metrics["split"] == "test") & metrics["member"].isin(["ensemble", "predict_train_mean"])]
    columns = [column for column in ("mae", "r", "r2", "balanced_accuracy", "roc_auc") if column in test]
    return {row["member"]: {column: round(float(row[column]), 3) for column in columns} for _, row in test.iterrows()}


class ExplainStage:
    """Relevance maps of every member into ``relevance.zarr``; scores against ground truth in ``validation/``."""

    name = "explain"
    folder = "validation"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.explain is not None

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        settings = catalog.explain
        images, models = catalog.workspace / IMAGES, catalog.workspace / MODELS
        dataset = store.open_cohort(images)
        split = pd.read_csv(models / "split.tsv", sep="\t", dtype={"participant_id": str}).set_index(
            "participant_id")["split"]
        chosen = set(split.index if settings.subjects == "all" else split.index[split == settings.subjects])
        subjects = [subject for subject in dataset.subject.values if subject in chosen]
        atlas = _atlas(dataset, catalog.atlas)
        region_labels = None
        if "region_occlusion" in settings.methods:
            volumes = training.CohortVolumes(images, catalog.train.modalities)
            region_labels = volumes.to_volumes(atlas.voxel_labels[None, None].astype(np.float32))[0, 0].astype(np.int64)
        relevance = attribution.explain(
            catalog.workspace / RELEVANCE, images, models, settings.methods, list(range(catalog.train.members)),
            subjects, attribution.AttributionOptions(**settings.options), region_labels,
            settings.subjects_per_chunk, client=client, progress=progress)
        summary = {"store": str(catalog.workspace / RELEVANCE), "methods": settings.methods,
                   "subjects": len(subjects), "members": catalog.train.members}
        lesions = catalog.features.lesions if catalog.features is not None else None
        truth = settings.truth or (catalog.cohort_root / synth.TRUTH_REGIONS if catalog.cohort.demo else None)
        out = catalog.workspace / self.folder
        # what the scores derive from: the maps (by their plan), the truth, the atlas and the lesion modality
        record = {"relevance": [relevance.attrs.get("plan"), relevance.attrs.get("state")], "truth": str(truth),
                  "truth_labels": settings.truth_labels, "atlas": catalog.atlas.model_dump(mode="json"),
                  "lesions": lesions}
        current = _current(out, record)
        if not current:
            (out / RECORD).unlink(missing_ok=True)
        if lesions:
            path = catalog.workspace / FeaturesStage.folder / "lesion_relevance.parquet"
            summary["lesion_relevance"] = str(path if current else self._lesion_relevance(catalog, relevance, dataset))
        if truth is not None:
            summary["validation"] = (_method_scores(pd.read_parquet(out / "scores.parquet")) if current
                                     else self._validate(catalog, relevance, dataset, atlas, truth))
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORD).write_text(json.dumps(record))  # written last: marks the scores current
        return summary

    def _lesion_relevance(self, catalog: Catalog, relevance, dataset) -> Path:
        """The study's lesion indices of the ensemble-mean maps: ``features/lesion_relevance.parquet``."""
        indices = features.lesion_relevance(dataset[catalog.features.lesions], relevance.relevance_mean).compute()
        table = indices.to_dataframe().reset_index().rename(columns={"subject": "participant_id"})
        path = catalog.workspace / FeaturesStage.folder / "lesion_relevance.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_table(table[["method", "participant_id", *indices.data_vars]], path)
        return path

    def _validate(self, catalog: Catalog, relevance, dataset, atlas, truth: Path) -> dict:
        out = catalog.workspace / self.folder
        out.mkdir(parents=True, exist_ok=True)
        labels = catalog.explain.truth_labels or (synth.FOCAL_TRUTH_LABELS if catalog.cohort.demo else None)
        mask = validation.truth_mask(truth, dataset, labels)
        tables = []
        for absolute in (False, True):  # signed relevance, and its magnitude (for maps whose sign flips)
            ensemble = validation.score_methods(relevance.relevance_mean, mask, atlas, absolute=absolute).reset_index()
            members = validation.score_methods(relevance.relevance, mask, atlas, absolute=absolute).reset_index()
            tables += [ensemble.assign(member="ensemble", scored="|R|" if absolute else "R"),
                       members.assign(member=members["member"].astype(str), scored="|R|" if absolute else "R")]
        scores = pd.concat(tables, ignore_index=True)
        _write_table(scores, out / "scores.parquet")
        if relevance.sizes["member"] > 1:
            age = relevance["age"].values
            robustness = validation.member_robustness(relevance.relevance, atlas, age >= np.median(age))
            _write_table(robustness.reset_index(), out / "robustness.parquet")
        return _method_scores(scores)

    def report(self, workspace: Path) -> str | None:
        try:
            relevance = attribution.open_relevance(workspace / RELEVANCE)
        except (FileNotFoundError, ValueError):
            return None
        sizes = relevance.relevance.sizes
        return (f"{workspace / RELEVANCE}: {sizes['method']} method(s) ({', '.join(relevance.method.values)}) × "
                f"{sizes['member']} member(s) × {sizes['subject']} subject(s)")


def _method_scores(scores: pd.DataFrame) -> dict:
    """ROC-AUC and mass accuracy of each method's ensemble-mean signed maps (for the run summary)."""
    ensemble = scores[(scores.member == "ensemble") & (scores.scored == "R")]
    return {row["method"]: {"roc_auc": round(float(row["roc_auc"]), 3),
                            "mass_accuracy": round(float(row["mass_accuracy"]), 3)} for _, row in ensemble.iterrows()}


def _current(folder: Path, record: dict) -> bool:
    path = folder / RECORD
    return path.is_file() and json.loads(path.read_text()) == record


def describe_problem(record: dict) -> str:
    """One line for a skipped input: who, which file, what is wrong."""
    who = f"participant {record['participant_id']}" if record["participant_id"] else "unlisted file"
    return f"{who}: {record['file'] or ''}: {record['problem']}"


def _atlas(dataset, settings) -> Atlas:
    return cohort_atlas(dataset, settings.name, settings.labels, merge_hemispheres=settings.merge_hemispheres,
                        atlas_space=settings.space)


def _joined_tables(paths, dataset) -> pd.DataFrame:
    participants = pd.DataFrame({"participant_id": list(dataset.subject.values)})
    joined = participants
    for path in paths:
        table = features.read_feature_table(path)
        joined = joined.merge(features.join_on_participant(table, participants, source=str(path)),
                              on="participant_id", how="left")
    return joined


def _write_table(table: pd.DataFrame, path: Path) -> None:
    partial = path.with_name("." + path.name)
    table.to_parquet(partial, index=False)
    partial.replace(path)




class AssociateStage:
    """The catalog's association analyses, one folder each in ``associations/`` (see ``engine.association``)."""

    name = "associate"
    folder = ASSOCIATIONS

    def applies(self, catalog: Catalog) -> bool:
        return bool(catalog.associate)

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        workspace = catalog.workspace
        sources = _association_sources(workspace)
        inputs = _association_inputs(workspace)
        done, summary = 0, {"folder": str(workspace / self.folder), "analyses": {}}
        atlases = {}  # each atlas resampled once per run, on first use

        def atlas_of(settings) -> Atlas:
            key = settings.model_dump_json()
            if key not in atlases:
                atlases[key] = _atlas(sources.images, settings)
            return atlases[key]

        for analysis in catalog.associate:
            out = workspace / self.folder / analysis.name
            record = {"analysis": analysis.model_dump(mode="json"), "inputs": inputs,
                      "atlas": catalog.atlas.model_dump(mode="json")}
            if not _current(out, record):
                self._run_one(catalog, sources, atlas_of, analysis, out, record)
                done += 1
            summary["analyses"][analysis.name] = json.loads((out / "summary.json").read_text())["significant"]
            progress("associate", len(summary["analyses"]), len(catalog.associate))
        summary["computed"] = done
        return summary

    def _run_one(self, catalog: Catalog, sources, atlas_of, analysis, out: Path, record: dict) -> None:
        """Write one analysis into a fresh folder, then swap it in: a failure leaves the old results whole."""
        partial = out.with_name(f".{out.name}.part")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        started = time.perf_counter()
        try:
            details = {"voxel": self._voxel, "roi": self._roi, "similarity": self._similarity}[analysis.scope](
                catalog, sources, atlas_of, analysis, partial)
        except ValueError as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise association.AnalysisError(f"associate analysis {analysis.name!r}: {error}") from error
        summary = {"name": analysis.name, "scope": analysis.scope, "outcome": analysis.outcome,
                   "predictor": analysis.predictor, "covariates": analysis.covariates, "alpha": analysis.alpha,
                   **details, "seconds": round(time.perf_counter() - started, 2)}
        (partial / "summary.json").write_text(json.dumps(summary, indent=2))
        (partial / RECORD).write_text(json.dumps(record))
        shutil.rmtree(out, ignore_errors=True)
        partial.replace(out)

    def _voxel(self, catalog, sources, atlas_of, analysis, out: Path) -> dict:
        result = association.voxel_analysis(sources, analysis.outcome, analysis.predictor, analysis.covariates,
                                            analysis.correction, analysis.permutations, analysis.seed)
        for name in result.data_vars:
            if result[name].dims == ("voxel",):
                store.to_volume(result[name].astype(np.float32), fill=np.nan).to_filename(out / f"{name}.nii.gz")
        if "max_t_null" in result:
            _write_table(pd.DataFrame({"max_abs_t": result["max_t_null"].values}), out / "max_t_null.parquet")
        significant = {correction: int((association.corrected_p(result, correction) < analysis.alpha).sum())
                       for correction in analysis.correction}
        threshold = analysis.correction[0]
        mask = (association.corrected_p(result, threshold) < analysis.alpha).values
        _write_table(association.cluster_table(result["t"], mask, atlas_of(catalog.atlas)), out / "clusters.parquet")
        return {"n": result.attrs["n"], "df": result.attrs["df"], "correction": analysis.correction,
                "clusters_thresholded_by": threshold, "permutations": result.attrs.get("permutations", 0),
                "seed": analysis.seed, "significant": significant,
                "t_threshold": float(np.abs(result["t"].values[mask]).min()) if mask.any() else None}

    def _roi(self, catalog, sources, atlas_of, analysis, out: Path) -> dict:
        atlas = atlas_of(analysis.atlas or catalog.atlas)
        table = association.roi_analysis(sources, analysis.outcome, analysis.predictor, analysis.covariates, atlas,
                                         analysis.region_statistic, analysis.robust, analysis.random_intercept)
        skipped = table.attrs.get("skipped", {})
        _write_table(table, out / "regions.parquet")
        table.to_csv(out / "regions.csv", index=False)
        tested = table[table["term"] == analysis.predictor]
        significant = {correction: int((stats.adjust_p(tested["p"].to_numpy(), correction) < analysis.alpha).sum())
                       for correction in analysis.correction}
        return {"n": int(tested["n"].max()) if len(tested) else 0, "regions": int(tested["region"].nunique()),
                "correction": analysis.correction, "significant": significant,
                "model": "mixed" if analysis.random_intercept else ("ols_hc3" if analysis.robust else "ols"),
                "skipped_regions": skipped}

    def _similarity(self, catalog, sources, atlas_of, analysis, out: Path) -> dict:
        subjects = association.analysis_subjects(sources, [analysis.outcome, analysis.predictor])
        table = stats.map_similarity(sources.map(analysis.outcome, subjects), sources.map(analysis.predictor, subjects))
        _write_table(table, out / "similarity.parquet")
        return {"n": int(table["pearson_r"].notna().sum()),
                "significant": {"mean_pearson_r": round(float(table["pearson_r"].mean()), 4),
                                "mean_cosine": round(float(table["cosine"].mean()), 4)}}

    def report(self, workspace: Path) -> str | None:
        summaries = sorted((workspace / self.folder).glob("*/summary.json"))
        if not summaries:
            return None
        parts = []
        for path in summaries:
            summary = json.loads(path.read_text())
            parts.append(f"{summary['name']} ({summary['scope']}, n={summary['n']}: {summary['significant']})")
        return f"{workspace / self.folder}: " + "; ".join(parts)


def _association_sources(workspace: Path) -> association.Sources:
    images = store.load_coordinates(store.open_cohort(workspace / IMAGES))
    participants = pd.DataFrame({name: images[name].values for name in images.coords
                                 if images[name].dims == ("subject",) and name != "subject"},
                                index=pd.Index(images["subject"].values, name="participant_id"))
    relevance = attribution.open_relevance(workspace / RELEVANCE) if (workspace / RELEVANCE).exists() else None
    tables = {path.stem: pd.read_parquet(path) for path in sorted((workspace / FeaturesStage.folder).glob("*.parquet"))}
    predictions = None
    if (workspace / MODELS / "predictions.parquet").is_file():
        predictions = pd.read_parquet(workspace / MODELS / "predictions.parquet")
        predictions = predictions[predictions["member"] == training.ENSEMBLE_MEMBER]
    return association.Sources(images, participants, relevance, tables, predictions)


def _association_inputs(workspace: Path) -> dict:
    """What the analyses read, by content: images, the relevance store's plan, predictions, feature tables."""
    inputs = {"images": store.content_fingerprint(workspace / IMAGES)}
    relevance = workspace / RELEVANCE / "zarr.json"
    if relevance.is_file():
        attributes = json.loads(relevance.read_text()).get("attributes", {})
        inputs["relevance"] = [attributes.get("plan"), attributes.get("state")]
    tables = [workspace / MODELS / "predictions.parquet", *sorted((workspace / FeaturesStage.folder).glob("*.parquet"))]
    inputs.update({str(path.relative_to(workspace)): store.file_sha256(path) for path in tables if path.is_file()})
    return inputs


class ReportStage:
    """The HTML report of everything the workspace holds: ``report.html`` (see ``engine.report``)."""

    name = "report"
    record = ".relcohort-report.json"

    def applies(self, catalog: Catalog) -> bool:
        return catalog.report is not None and catalog.report.enabled

    def run(self, catalog: Catalog, client, progress: Progress) -> dict:
        settings = catalog.report
        out = catalog.workspace / REPORT
        record_file = catalog.workspace / self.record
        record = {"settings": settings.model_dump(mode="json"), "inputs": _input_stamps(catalog.workspace)}
        summary = {"report": str(out)}
        if not (out.is_file() and record_file.is_file() and json.loads(record_file.read_text()) == record):
            record_file.unlink(missing_ok=True)
            with dask.config.set(scheduler="threads"):  # small reductions: cheaper in this process than on workers
                build_report(catalog.workspace, methods=settings.methods, age_bands=settings.age_bands,
                             top_k=settings.top_k)
            record_file.write_text(json.dumps(record))  # written last: marks the report current
            progress("report", 1, 1)
            summary["built"] = 1
        else:
            summary["built"] = 0
        if settings.screenshot:
            try:
                shots = screenshot_sections(out, catalog.workspace / "report_screenshots")
                summary["screenshots"] = str(next(iter(shots.values())).parent)
            except FileNotFoundError as error:
                summary["screenshots"] = f"not taken: {error}"
        return summary

    def report(self, workspace: Path) -> str | None:
        path = workspace / REPORT
        if not (path.is_file() and (workspace / self.record).is_file()):
            return None
        return f"{path}: {path.stat().st_size / 2**20:.1f} MiB, open it in a browser"


def _input_stamps(workspace: Path) -> dict:
    """sha256 of every file the report reads (store metadata, tables, maps; all small): stages that rewrite
    unchanged tables on every run do not make the report stale."""
    paths = [workspace / RELEVANCE / "zarr.json",
             *sorted((workspace / MODELS).glob("*.parquet")), *sorted((workspace / FeaturesStage.folder).glob("*")),
             *sorted((workspace / ExplainStage.folder).glob("*.parquet")),
             *sorted(path for path in (workspace / "associations").rglob("*") if path.is_file())]
    stamps = {str(path.relative_to(workspace)): hashlib.sha256(path.read_bytes()).hexdigest()
              for path in paths if path.is_file()}
    if (workspace / IMAGES / "zarr.json").is_file():  # its attributes hold the last ingest's times: use the data's
        stamps[IMAGES] = store.content_fingerprint(workspace / IMAGES)
    return stamps


STAGES = [SynthStage(), IngestStage(), FeaturesStage(), TrainStage(), ExplainStage(), AssociateStage(), ReportStage()]
