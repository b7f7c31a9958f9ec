"""A catalog against its data, before any work: every problem a run would meet, each with its field and the fix.

:func:`preflight` is what ``relcohort validate`` reports and what ``relcohort run`` checks before it
starts a cluster. It reads the participants table and the images' headers (a sample of each
modality's files is opened, every file's existence is checked), never the images' voxels, so it
stays cheap on a large cohort. Each problem is a ``(field, message)`` pair: the catalog field,
file, participant or column, what is wrong and, where one is known, the fix.
"""

from __future__ import annotations

import difflib
import string
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from engine.analysis.association import BASELINE_AGE, YEARS
from engine.analysis.atlas import BUNDLED_ATLASES, SYSTEM_ATLASES, system_atlas_installed
from engine.data.grid import Grid
from engine.data.inputs import InputError, resolve_files, spatial_shape
from engine.data.registration import BUNDLED_TEMPLATE
from engine.data.store import LAYOUT, store_attributes
from engine.layout import file_sha256
from engine.models.splits import SPLITS, cross_fitting_splits, stratified_split
from pipelines.catalog import Catalog

Problem = tuple[str, str]
#: Participants whose images are opened per modality, spread over the table.
SAMPLE = 5
#: The demo cohort's participant columns (``engine.data.synth`` writes them).
DEMO_COLUMNS = ("participant_id", "age", "sex", "site")
#: Problems of one kind listed before the rest are counted instead.
LISTED = 5


def preflight(catalog: Catalog) -> list[Problem]:
    """Every problem of ``catalog`` with its files and its participants table that can be seen before a run."""
    problems = _file_problems(catalog) + _workspace_problems(catalog)
    if catalog.cohort.demo is not None:
        demo = catalog.cohort.demo
        extra = [*(["session_id"] if demo.sessions else []), *(["diagnosis"] if demo.patients else [])]
        table = pd.DataFrame(columns=[*DEMO_COLUMNS, *extra])
        sessions = _session_problems(catalog, "the demo cohort has sessions") if demo.sessions else []
        return problems + _column_problems(catalog, table, "the demo's participants table") + sessions
    if any(field in ("cohort.directory", "cohort.participants") for field, _ in problems):
        return problems
    try:
        table = catalog.read_scans()
    except InputError as error:
        return [*problems, ("cohort.participants", str(error))]
    if table.empty:
        return [*problems, ("cohort.participants", f"{catalog.participants_file} lists no participants (only a "
                                                   "header line)")]
    problems += _column_problems(catalog, table, str(catalog.participants_file))
    if "session_id" in table:
        problems += _session_problems(catalog, f"the cohort has sessions ({len(table)} scans of "
                                               f"{table['participant_id'].nunique()} participants)")
    problems += _target_problems(catalog, table)
    problems += _image_problems(catalog, table)
    return problems + _store_problems(catalog)


# ---------------------------------------------------------------------------------------
# Files the catalog names, and the workspace


def _file_problems(catalog: Catalog) -> list[Problem]:
    problems = []
    if catalog.cohort.demo is None:
        if not catalog.cohort_root.is_dir():
            return [("cohort.directory", f"{catalog.cohort_root} is not a folder")]
        if not catalog.participants_file.is_file():
            problems.append(("cohort.participants", f"{catalog.participants_file} does not exist"))
        if catalog.registration is None and not catalog.mask_file.is_file():
            problems.append(("cohort.mask", f"{catalog.mask_file} does not exist (with native scans, add a register "
                             "section: the mask then comes from the template)"))
        if catalog.freesurfer_dir is not None and not catalog.freesurfer_dir.is_dir():
            problems.append(("features.freesurfer.subjects_dir", f"{catalog.freesurfer_dir} is not a folder"))
    atlases = {"atlas": catalog.atlas}
    if catalog.features is not None and catalog.features.fa is not None:
        atlases["features.fa.atlas"] = catalog.features.fa.atlas
    for field, atlas in atlases.items():
        if atlas.name in SYSTEM_ATLASES and not system_atlas_installed(atlas.name):
            package = SYSTEM_ATLASES[atlas.name][2]
            problems.append((f"{field}.name", f"atlas {atlas.name} comes with Debian's {package} package, not "
                             f"installed here (apt-get install {package})"))
        elif atlas.name not in BUNDLED_ATLASES and atlas.name not in SYSTEM_ATLASES:
            for key, path in (("name", Path(atlas.name)), ("labels", atlas.labels)):
                if not path.is_file():
                    problems.append((f"{field}.{key}", f"{path} does not exist"))
    if catalog.features is not None:
        problems += [("features.tables", f"{table} does not exist")
                     for table in catalog.features.tables if not table.is_file()]
    problems += [(f"modalities.{name}.labels", f"{spec.labels} does not exist")
                 for name, spec in catalog.modalities.items()
                 if spec.labels not in (None, "freesurfer") and not Path(spec.labels).is_file()]
    register = catalog.registration
    if register is not None and register.template != BUNDLED_TEMPLATE:
        for key, path in (("template", Path(register.template)), ("template_mask", register.template_mask)):
            if path is not None and not path.is_file():
                problems.append((f"register.{key}", f"{path} does not exist"))
    sources = {}
    if catalog.train is not None:
        sources["train.finetune_from"] = catalog.train.finetune_from
        sources.update({f"train.ensembles.{name}.finetune_from": changes.get("finetune_from")
                        for name, changes in (catalog.train.ensembles or {}).items()})
    sources.update({f"experiments.{experiment.name}.conditions.{name}.finetune_from": changes.get("finetune_from")
                    for experiment in catalog.experiments or [] for name, changes in experiment.conditions.items()})
    problems += [(field, f"{source} does not exist (the models folder of the workspace it was trained in; run "
                         "that catalog first)")
                 for field, source in sources.items() if source is not None and not Path(source).exists()]
    if catalog.explain is not None and catalog.explain.truth is not None and not catalog.explain.truth.is_file():
        problems.append(("explain.truth", f"{catalog.explain.truth} does not exist"))
    return problems


def _workspace_problems(catalog: Catalog) -> list[Problem]:
    workspace = catalog.workspace
    if catalog.cohort.directory is not None and workspace.is_relative_to(catalog.cohort.directory):
        return [("workspace", f"{workspace} is inside the cohort folder {catalog.cohort.directory}; choose a folder "
                              "outside it, so that the run's outputs do not mix with the data")]
    existing = next(folder for folder in (workspace, *workspace.parents) if folder.exists())
    if not existing.is_dir():
        return [("workspace", f"{existing} is a file, not a folder: the workspace {workspace} cannot be made")]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return [("workspace", f"cannot write in {existing} ({error.strerror}): choose a workspace you can write to")]
    return []


# ---------------------------------------------------------------------------------------
# The participants table


def _columns_named(catalog: Catalog, table: pd.DataFrame) -> list[tuple[str, str]]:
    """(field, column) of every participants-table (or scans-table) column the catalog names."""
    named = []
    for name, spec in catalog.modalities.items():
        named += [(f"modalities.{name}.path", field) for _, field, _, _ in string.Formatter().parse(spec.path or "")
                  if field and field not in ("participant_id", "session_id" if "session_id" in table else "")]
    for ensemble, settings in catalog.ensembles().items():
        where = "train" if ensemble is None else f"train.ensembles.{ensemble}"
        named.append((f"{where}.target", settings.target))
        named += [(f"{where}.split.stratify[{index}]", column) for index, column in enumerate(settings.split.stratify)]
    for index, analysis in enumerate(catalog.associate or []):
        for field in ("outcome", "predictor", "covariates"):
            terms = getattr(analysis, field)
            for term in terms if isinstance(terms, list) else [terms]:
                if term.source == "participants":
                    named.append((f"associate[{index}].{field}", term.name))
        named += [(f"associate[{index}].random_intercept", column) for column in analysis.random_intercepts]
        if analysis.subjects is not None:
            named += [(f"associate[{index}].subjects.where", column) for column in analysis.subjects.where]
    return named


def _column_problems(catalog: Catalog, table: pd.DataFrame, source: str) -> list[Problem]:
    columns = list(table.columns)
    if "session_id" in table and "age" in table:  # age parted into between and within participants
        columns += [BASELINE_AGE, YEARS]
    problems = []
    for field, column in _columns_named(catalog, table):
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((field, f"{column!r} is not a column of {source} (columns: {', '.join(columns)}){hint}"))
    return problems


def _target_problems(catalog: Catalog, table: pd.DataFrame) -> list[Problem]:
    if "session_id" in table:  # participants are dealt to the splits by their first scan
        table = table.drop_duplicates("participant_id").drop(columns="session_id")
    problems = []
    for ensemble, settings in catalog.ensembles().items():
        where = "train" if ensemble is None else f"train.ensembles.{ensemble}"
        if not {settings.target, *settings.split.stratify} <= set(table.columns):
            continue  # named as a missing column already
        values = table[settings.target]
        if settings.task == "regression":
            if not pd.api.types.is_numeric_dtype(values):
                example = values.dropna().iloc[0] if values.notna().any() else ""
                problems.append((f"{where}.target", f"{settings.target!r} holds text (e.g. {example!r}), a regression "
                                 "needs numbers; for classes set task: classification"))
            continue
        classes = sorted({str(value) for value in values.dropna()})
        if len(classes) < 2:
            problems.append((f"{where}.target", f"{settings.target!r} has {len(classes)} class(es) ({classes}); a "
                             "classification needs at least two"))
            continue
        if settings.positive_class is not None and settings.positive_class not in classes:
            problems.append((f"{where}.positive_class", f"{settings.positive_class!r} is not a value of "
                             f"{settings.target!r} (values: {', '.join(classes)})"))
        labelled = table[values.notna()].assign(**{settings.target: values.dropna().astype(str)})
        folds = settings.split.folds
        splits = (cross_fitting_splits(labelled, settings.split, [settings.target]) if folds
                  else [stratified_split(labelled, settings.split, also_stratify=[settings.target])])
        dealt = [name for name, fraction in zip(SPLITS, settings.split.fractions, strict=True) if fraction > 0]
        for fold, split in enumerate(splits):
            counts = pd.crosstab(split, labelled.set_index("participant_id")[settings.target]).reindex(
                index=[*dealt, "test"] if folds else dealt, columns=classes, fill_value=0)
            for split_name, row in counts.iterrows():
                for name, count in row.items():
                    if count < 2:
                        problems.append((f"{where}.split", f"class {name!r} of {settings.target!r} has {count} "
                                         f"participant(s) in the {split_name} split"
                                         + (f" of fold {fold}" if folds else "") + "; every class needs at least "
                                         "two in each split (more participants of the class, other split fractions "
                                         "or fewer folds)"))
    return problems


def _session_problems(catalog: Catalog, cohort: str) -> list[Problem]:
    """A cohort with sessions (``cohort`` says so): every analysis says which scans it takes."""
    return [(f"associate.{analysis.name}.scans", f"{cohort}: say which scans the analysis takes (baseline, last, "
                                                 "mean or all)")
            for analysis in catalog.associate or [] if analysis.scans is None]


# ---------------------------------------------------------------------------------------
# Images: every file there, a sample opened, one grid, the atlas's space


def _space_of(mask: nib.spatialimages.SpatialImage, declared: str | None) -> str:
    if declared is not None:
        return declared
    return "MNI152" if int(mask.header.get("sform_code", 0)) == 4 else "unknown"


def _uses_the_atlas(catalog: Catalog) -> bool:
    features = catalog.features
    return bool(catalog.associate or catalog.explain is not None or (features is not None and features.gray_matter))


def _image_problems(catalog: Catalog, table: pd.DataFrame) -> list[Problem]:
    try:
        modalities = [modality for modality in catalog.modality_list()  # (a template naming a missing column: named)
                      if {field for _, field, _, _ in string.Formatter().parse(modality.template) if field}
                      <= set(table)]
    except InputError as error:  # a BIDS dataset pybids cannot read
        return [("cohort.directory", str(error))]
    try:
        files, missing = resolve_files(catalog.cohort_root, table, modalities)
    except InputError as error:
        return [("modalities", str(error))]
    problems = []
    if catalog.ingest.on_error == "fail" and missing:
        shown = "; ".join(str(problem) for problem in missing[:LISTED])
        more = f" (and {len(missing) - LISTED} more)" if len(missing) > LISTED else ""
        problems.append(("modalities", f"{len(missing)} file problem(s): {shown}{more}; fix them, or set "
                         "ingest.on_error: skip to leave those participants out"))
    if catalog.registration is not None or not catalog.mask_file.is_file():
        return problems  # native scans: each on its own grid until registered; no mask: named already
    mask = nib.load(catalog.mask_file)
    shape = spatial_shape(mask.shape)
    if len(shape) != 3:
        return [*problems, ("cohort.mask", f"{catalog.mask_file}: the brain mask must be 3D, got shape {mask.shape}")]
    grid = Grid(shape, mask.affine, _space_of(mask, catalog.cohort.space))
    participants = list(files)
    sample = [participants[int(index)] for index in np.unique(np.linspace(0, len(participants) - 1, SAMPLE).round())] \
        if participants else []
    for modality in modalities:
        for pid in sample:
            path = files[pid].get(modality.name)
            if path is None:
                continue
            try:
                image = nib.load(path)
            except Exception as error:  # nibabel raises many kinds for a file it cannot read
                problems.append((f"modalities.{modality.name}", f"participant {pid}, file {path}: unreadable: {error}"))
                continue
            image_shape = spatial_shape(image.shape)
            if len(image_shape) != 3:
                problems.append((f"modalities.{modality.name}", f"participant {pid}, file {path}: expected a 3D image, "
                                 f"got shape {image.shape}"))
            elif not grid.matches(image_shape, image.affine, atol=1e-3):
                problems.append((f"modalities.{modality.name}", f"participant {pid}, file {path}: its grid (shape "
                                 f"{tuple(image_shape)}, voxel size {_voxel_size(image.affine)} mm) differs from the "
                                 f"brain mask's {catalog.mask_file} (shape {grid.shape}, voxel size "
                                 f"{_voxel_size(grid.affine)} mm): every image and the mask must share one grid "
                                 "(resample them, or register native scans with a register section)"))
    if _uses_the_atlas(catalog):
        problems += _space_problems(catalog, grid.space)
    return problems


def _voxel_size(affine: np.ndarray) -> str:
    return " × ".join(f"{size:g}" for size in np.round(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)), 3))


def _space_problems(catalog: Catalog, space: str) -> list[Problem]:
    def family(name: str) -> str:
        return "MNI152" if name.upper().startswith("MNI152") else name

    atlas = catalog.atlas
    atlas_space = "MNI152" if atlas.name in BUNDLED_ATLASES or atlas.name in SYSTEM_ATLASES else atlas.space or space
    if family(atlas_space) == family(space):
        return []
    if space == "unknown":
        return [("cohort.space", f"the brain mask {catalog.mask_file} names no template space (its sform code is not "
                                 f"MNI's) and the catalog declares none, but the atlas {atlas.name} is in "
                                 f"{atlas_space} space; if your images are on an MNI152 template, declare it: "
                                 "cohort.space: MNI152NLin2009cAsym (or the template they are on)")]
    return [("atlas", f"the atlas {atlas.name} is in {atlas_space} space, the cohort in {space}: choose an atlas in "
                      f"{space} (a label image with atlas.labels and atlas.space), or register the scans to "
                      f"{atlas_space} (a register section)")]


# ---------------------------------------------------------------------------------------
# What the workspace already holds


def _store_problems(catalog: Catalog) -> list[Problem]:
    """Settings the stored images depend on that the catalog has changed, and the runs would not apply."""
    store = catalog.layout.images
    if catalog.registration is not None or not (store / "zarr.json").is_file() or not catalog.mask_file.is_file():
        return []
    attributes = store_attributes(store)
    if attributes.get("layout") != LAYOUT:
        return [("workspace", f"{store} is not a relcohort images store; move it away or choose another workspace")]
    problems = []
    if attributes["mask_sha256"] != file_sha256(catalog.mask_file):
        problems.append(("cohort.mask", f"{store} was built with another brain mask ({attributes['mask_file']}); "
                         f"a store holds one mask's voxels: delete {store} (and what was computed from it) to "
                         "rebuild it with this mask, or choose a new workspace"))
    for name, spec in catalog.modalities.items():
        stored = attributes["modalities"].get(name)
        if stored is not None and stored["dtype"] != spec.dtype:
            problems.append((f"modalities.{name}.dtype", f"{name} is stored as {stored['dtype']} in {store}, the "
                             f"catalog asks for {spec.dtype}: delete {store} to rebuild it, or choose a new workspace"))
    return problems

