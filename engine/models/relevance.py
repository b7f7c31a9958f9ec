"""``relevance.zarr``: every member's relevance maps of a cohort, computed as Dask tasks or imported.

:func:`explain` runs ``attribution method × member × subject`` as tasks — one per (member, block
of subjects), on a GPU where the cluster has one — into ``relevance.zarr``::

    relevance       (attribution, member, subject, voxel)  float32
    relevance_mean  (attribution, subject, voxel)          the ensemble mean
    explained       (member, subject)                      true once a task's rows are written

with the images store's voxels (``i, j, k``), grid and participant columns (plus each
subject's training ``split``), so every atlas and statistic applies to relevance unchanged.
The first dimension is ``attribution`` (its labels are method names such as ``lrp``), so
``rel.relevance_mean.sel(attribution="lrp")`` selects one method's maps.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr
from safetensors.torch import load_file, save_file
from torch import nn

from engine.data.masker import VOXEL_COORDS
from engine.data.store import (
    IMAGE_CODEC,
    consolidate,
    content_fingerprint,
    load_coordinates,
    open_cohort,
    open_layout_group,
    writable_group,
)
from engine.layout import ModelsLayout, atomic_output, file_sha256, is_current, mark_current, output_key
from engine.models import noise
from engine.models.attribution import AttributionOptions, ExplainedModel, attribute, method_function
from engine.models.heap import heap_kept
from engine.models.networks import place
from engine.models.splits import read_split
from engine.models.training import TrainingConfig, load_member, targets_of
from engine.models.volumes import CohortVolumes
from engine.tasks import INLINE, Execution, torch_device

#: Version 2 names the first dimension ``attribution`` (version 1 called it ``method``, which
#: ``DataArray.sel`` takes as its own keyword).
LAYOUT = "relcohort.relevance/2"
#: The dimension of attribution methods.
ATTRIBUTION = "attribution"


def _create_store(path: Path, plan: dict, dataset: xr.Dataset, subjects_per_chunk: int,
                  voxels_per_chunk: int, subject_columns: dict) -> zarr.Group:
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(path, mode="w", zarr_format=3)
    settings = plan["settings"]
    methods, members, subjects = settings["methods"], settings["members"], settings["subjects"]
    n_methods, n_members, n_subjects, n_voxels = len(methods), len(members), len(subjects), dataset.sizes["voxel"]
    grid_attrs = {"grid": dataset.attrs["grid"]}
    group.create_array("relevance", shape=(n_methods, n_members, n_subjects, n_voxels), dtype="float32",
                       chunks=(1, 1, subjects_per_chunk, voxels_per_chunk), compressors=IMAGE_CODEC,
                       dimension_names=(ATTRIBUTION, "member", "subject", "voxel"), fill_value=np.nan,
                       attributes=grid_attrs)
    group.create_array("relevance_mean", shape=(n_methods, n_subjects, n_voxels), dtype="float32",
                       chunks=(1, subjects_per_chunk, voxels_per_chunk), compressors=IMAGE_CODEC,
                       dimension_names=(ATTRIBUTION, "subject", "voxel"), fill_value=np.nan, attributes=grid_attrs)
    group.create_array("explained", shape=(n_members, n_subjects), dtype="bool", chunks=(1, subjects_per_chunk),
                       dimension_names=("member", "subject"), fill_value=False)
    coordinates = {ATTRIBUTION: np.array(methods, dtype=object), "member": np.array(members),
                   "subject": np.array(subjects, dtype=object),
                   **{axis: dataset[axis].values for axis in VOXEL_COORDS}}
    for name, values in {**coordinates, **subject_columns}.items():
        dim = name if name in (ATTRIBUTION, "member", "subject") else ("voxel" if name in VOXEL_COORDS else "subject")
        values = np.asarray(values)
        if values.dtype.kind in "OUS":
            array = group.create_array(name, shape=values.shape, dtype=str, dimension_names=(dim,))
            array[:] = values.astype(str)
        else:
            array = group.create_array(name, shape=values.shape, dtype=values.dtype, dimension_names=(dim,))
            array[:] = values
    for name in ("relevance", "relevance_mean", "explained"):
        group[name].attrs["coordinates"] = " ".join([*coordinates, *subject_columns])
    group.attrs.update({"layout": LAYOUT, "plan": plan, **grid_attrs, "state": "running"})
    return group


@dataclass(frozen=True)
class _NoiseTraining:
    """The noise network of one member to train and write (a task of :func:`explain`)."""

    store: str
    models_dir: str
    member: int
    options: AttributionOptions
    key: dict


@dataclass(frozen=True)
class _ExplainBlock:
    """Every method's maps of one member for some subjects (a task of :func:`explain`): store ``rows``, from
    ``positions`` of the images store, each by the member in its ``models_dirs`` entry (a cross-fitted ensemble's
    fold); ``member_keys`` identify the members' weights and cards by folder."""

    out: str
    store: str
    models_dirs: tuple[str, ...]
    member_index: int
    member: int
    member_keys: dict[str, str]
    methods: tuple[str, ...]
    rows: list[int]
    positions: list[int]
    options: AttributionOptions
    region_labels: np.ndarray | None


def _train_noise_task(item: _NoiseTraining) -> int:
    """Train and write the noise network of one member over its training participants (Bintsi et al. 2021)."""
    files = ModelsLayout(Path(item.models_dir))
    model, card = load_member(files.member(item.member), torch_device())
    volumes = CohortVolumes(item.store, card["config"]["modalities"], card["config"]["input_scaling"])
    train = np.flatnonzero(read_split(files.split).reindex(volumes.subjects).to_numpy() == "train")
    classes, options = card["classes"], item.options
    targets = targets_of(volumes.dataset, TrainingConfig(**card["config"]), classes)[train]
    with heap_kept():
        noise_net = noise.train_noise_model(
            model, volumes.read, train, targets, sparsity=options.noise_model_sparsity,
            epochs=options.noise_model_epochs, learning_rate=options.noise_model_learning_rate,
            classification=classes is not None, seed=1000 * options.seed + item.member)
    path = files.noise_model(item.member)
    with atomic_output(path) as partial:
        save_file({name: value.contiguous() for name, value in noise_net.state_dict().items()}, partial)
    mark_current(path, item.key)
    return item.member


def _train_noise_models(store: Path, models_dir: Path, members: Sequence[int], options: AttributionOptions,
                        execution: Execution) -> None:
    """The noise network of every member that lacks a current one (same member, images, split and settings)."""
    files = ModelsLayout(models_dir)
    settings = {name: value for name, value in options.as_dict().items()
                if name.startswith("noise_model_") or name == "seed"} | {"network": _noise_network_layout()}
    items = []
    for member in members:
        key = output_key(settings, {"member": models_fingerprint(models_dir, [member]),
                                    "split": file_sha256(files.split), "images": content_fingerprint(store)})
        if not is_current(files.noise_model(member), key):
            items.append(_NoiseTraining(str(store), str(models_dir), member, options, key))
    done = len(members) - len(items)
    execution.report("noise models", done, len(members))
    for _ in execution.map(_train_noise_task, items, long=True):
        done += 1
        execution.report("noise models", done, len(members))


def _noise_network_layout() -> dict:
    """The noise network's parameters (names and shapes, for one input channel): in the keys of the networks and of
    the maps made with them, so that networks of an earlier design are trained again and their maps redone."""
    return {name: list(value.shape) for name, value in noise.NoiseNet(1).state_dict().items()}


def _load_noise_model(models_dir: str, member: int, in_channels: int, device) -> nn.Module:
    noise_net = noise.NoiseNet(in_channels)
    noise_net.load_state_dict(load_file(ModelsLayout(Path(models_dir)).noise_model(member)))
    return place(noise_net, device).eval()


#: The member a worker thread explained last, kept for its next block: loaded, and its LRP form made, once per
#: member (one per thread: methods put hooks on the model while they run).
_LAST_MEMBER = threading.local()


def _explained_member(models_dir: str, member: int, key: str, device) -> tuple[ExplainedModel, dict]:
    """Member ``member`` (weights and card identified by ``key``) ready for every method, and its card."""
    wanted = (models_dir, member, key, str(device))
    if getattr(_LAST_MEMBER, "key", None) != wanted:
        model, card = load_member(ModelsLayout(Path(models_dir)).member(member), device)
        _LAST_MEMBER.key, _LAST_MEMBER.member = wanted, (ExplainedModel(model), card)
    return _LAST_MEMBER.member


def _explain_block(item: _ExplainBlock) -> int:
    device = torch_device()
    group = writable_group(item.out)
    maps = np.empty((len(item.methods), len(item.rows), group["relevance"].shape[-1]), np.float32)
    for models_dir in dict.fromkeys(item.models_dirs):
        mine = [index for index, folder in enumerate(item.models_dirs) if folder == models_dir]
        explained, card = _explained_member(models_dir, item.member, item.member_keys[models_dir], device)
        volumes = CohortVolumes(item.store, card["config"]["modalities"], card["config"]["input_scaling"])
        inputs = torch.from_numpy(volumes.read([item.positions[index] for index in mine])).to(device)
        noise_net = (_load_noise_model(models_dir, item.member, inputs.shape[1], device)
                     if "noise_model" in item.methods else None)
        with heap_kept():
            for method_index, method in enumerate(item.methods):
                attributed = attribute(explained, inputs, method, item.options, item.region_labels, noise_net)
                maps[method_index, mine] = volumes.box.transform(attributed.cpu().numpy())
    rows = slice(item.rows[0], item.rows[-1] + 1)
    for method_index in range(len(item.methods)):
        group["relevance"][method_index, item.member_index, rows] = maps[method_index]
    group["explained"][item.member_index, rows] = True  # after the data: marks the block whole
    return len(item.rows)


def models_fingerprint(models_dir: str | Path, members: Sequence[int]) -> str:
    """sha256 over the members' weights and cards: changes iff any member does."""
    files = ModelsLayout(Path(models_dir))
    digest = hashlib.sha256()
    for member in members:
        for path in (files.weights(member), files.card(member)):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def relevance_key(path: str | Path) -> str | None:
    """The key of a whole ``relevance.zarr`` (its plan: settings and inputs by content); ``None`` when it is
    missing, incomplete or of an earlier layout. What later outputs record as their relevance input."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return None
    attributes = zarr.open_group(path, mode="r").attrs
    current = attributes.get("state") == "complete" and attributes.get("layout") == LAYOUT and "plan" in attributes
    return attributes["plan"]["key"] if current else None


def explain(out: str | Path, *, images: str | Path, models: str | Path, methods: Sequence[str],
            members: Sequence[int], subjects: Sequence[str], options: AttributionOptions | None = None,
            region_labels: np.ndarray | None = None, subjects_per_chunk: int = 8, voxels_per_chunk: int = 65536,
            execution: Execution = INLINE) -> xr.Dataset:
    """Relevance maps of ``methods`` for ``members`` × ``subjects`` into ``out`` (``relevance.zarr``).

    ``images`` is the cohort store and ``models`` the trained members' folder (a cross-fitted ensemble's: each
    subject explained by the members of the fold that tested it, as its ``split.tsv`` says). One long task of
    ``execution`` per (member, block of ``subjects_per_chunk`` subjects) writes whole chunks (of
    ``voxels_per_chunk`` voxels, as the images store's for aligned reductions) of every method;
    blocks already explained for the same plan (settings, weights and images by content) are not
    redone. The ensemble mean over members is written last. ``region_labels`` is the atlas volume
    for region occlusion.
    """
    out, store, models_dir = Path(out), Path(images), Path(models)
    options = options or AttributionOptions()
    for method in methods:
        method_function(method)  # an unknown name is an error before any work
    dataset = open_cohort(store)
    positions_of = {subject: position for position, subject in enumerate(dataset.subject.values)}
    missing = [subject for subject in subjects if subject not in positions_of]
    if missing:
        raise ValueError(f"participants {missing[:5]} are not complete in {store}")
    folders = _folders_of(models_dir, subjects)
    member_keys = {member: {folder: models_fingerprint(folder, [member]) for folder in set(folders)}
                   for member in members}
    plan = output_key({"layout": LAYOUT, "methods": list(methods), "members": list(members),
                       "subjects": list(subjects), "options": options.as_dict(),
                       **({"noise_network": _noise_network_layout()} if "noise_model" in methods else {})},
                      {"models": [models_fingerprint(folder.root, members)
                                  for folder in ModelsLayout(models_dir).trained()],
                       "images": content_fingerprint(store)})
    existing = zarr.open_group(out, mode="r") if (out / "zarr.json").exists() else None
    if existing is None or existing.attrs.get("layout") != LAYOUT or (
            existing.attrs.get("plan") or {}).get("key") != plan["key"]:
        columns = _subject_columns(dataset, subjects)
        split_file = ModelsLayout(models_dir).split
        if split_file.is_file():
            columns["split"] = read_split(split_file).reindex(list(subjects)).fillna("").to_numpy(dtype=object)
            folds = read_split(split_file, "fold")
            if folds is not None:
                columns["fold"] = folds.reindex(list(subjects)).to_numpy()
        _create_store(out, plan, dataset, subjects_per_chunk, min(voxels_per_chunk, dataset.sizes["voxel"]), columns)
    if "noise_model" in methods:
        for folder in ModelsLayout(models_dir).trained():
            _train_noise_models(store, folder.root, members, options, execution)
    group = writable_group(out)
    chunk = group["relevance"].chunks[2]
    explained = group["explained"][:]
    items = []
    for member_index, member in enumerate(members):
        for start in range(0, len(subjects), chunk):
            rows = list(range(start, min(start + chunk, len(subjects))))
            if not explained[member_index, rows].all():
                items.append(_ExplainBlock(str(out), str(store), tuple(folders[row] for row in rows), member_index,
                                           member, member_keys[member], tuple(methods), rows,
                                           [positions_of[subjects[row]] for row in rows], options, region_labels))
    total = len(members) * len(subjects)
    done = int(explained.sum())
    execution.report("explain", done, total)
    for _, count in execution.map(_explain_block, items, long=True):
        done += count
        execution.report("explain", done, total)
    _finish(group, out)
    return open_relevance(out)


def _folders_of(models_dir: Path, subjects: Sequence[str]) -> list[str]:
    """Each subject's members' folder: ``models_dir``, or with cross-fitting the fold that tested the subject."""
    models = ModelsLayout(models_dir)
    folds = read_split(models.split, "fold") if models.folds() else None
    if folds is None:
        return [str(models_dir)] * len(subjects)
    untested = [subject for subject in subjects if subject not in folds.index]
    if untested:
        raise ValueError(f"subjects {untested[:5]} are in no fold's test set of {models_dir}")
    return [str(models.fold(int(folds[subject])).root) for subject in subjects]


def import_relevance(out: str | Path, *, images: str | Path, maps: Mapping[str, str], subjects_per_chunk: int = 8,
                     voxels_per_chunk: int = 65536) -> xr.Dataset:
    """Relevance maps made elsewhere as a relevance store of one member (0), so validation and every analysis run
    on them unchanged.

    ``maps`` names, per method, the modality of the images store ``images`` that holds them (e.g.
    iNNvestigate's LRP NIfTIs of every participant, ingested like any image, after registration when
    they are in native space). Every participant of the store is imported; a store made for other maps
    or images is rebuilt, a current one kept.
    """
    out, store = Path(out), Path(images)
    dataset = open_cohort(store)
    missing = [modality for modality in maps.values() if modality not in dataset.data_vars]
    if missing:
        raise ValueError(f"imported relevance: no modality {missing} in {store} (modalities: "
                         f"{list(dataset.data_vars)})")
    subjects = [str(subject) for subject in dataset.subject.values]
    plan = output_key({"layout": LAYOUT, "methods": list(maps), "members": [0], "subjects": subjects,
                       "imported": dict(maps)}, {"images": content_fingerprint(store)})
    if relevance_key(out) == plan["key"]:
        return open_relevance(out)
    group = _create_store(out, plan, dataset, subjects_per_chunk, min(voxels_per_chunk, dataset.sizes["voxel"]),
                          _subject_columns(dataset, subjects))
    target = group["relevance"]
    for index, modality in enumerate(maps.values()):
        values = dataset[modality].data.astype(np.float32)[None, None].rechunk((1, 1, *target.chunks[2:]))
        da.store(values, target, regions=(slice(index, index + 1), slice(0, 1), slice(None), slice(None)),
                 lock=False)
    group["explained"][:] = True
    _finish(group, out)
    return open_relevance(out)


def _subject_columns(dataset: xr.Dataset, subjects: Sequence[str]) -> dict:
    """The images store's participant columns (age, sex, …) of ``subjects``: the relevance store's coordinates."""
    return {name: dataset[name].sel(subject=list(subjects)).values for name in dataset.coords
            if dataset[name].dims == ("subject",) and name != "subject"}


def _finish(group: zarr.Group, out: Path) -> None:
    """The ensemble mean written, the store marked complete and its metadata consolidated."""
    relevance = da.from_zarr(group["relevance"])
    da.store(relevance.mean(axis=1), group["relevance_mean"], lock=False)
    group.attrs["state"] = "complete"
    consolidate(out)


def open_relevance(path: str | Path) -> xr.Dataset:
    """``relevance.zarr`` as a lazy Dataset: ``relevance`` (attribution, member, subject, voxel) and
    ``relevance_mean`` (attribution, subject, voxel); ``ds.sel(attribution="lrp")`` selects one method."""
    path = Path(path)
    group = open_layout_group(path, LAYOUT, "relevance")
    if group.attrs.get("state") != "complete":
        raise ValueError(f"{path} is incomplete (an explain run was interrupted); run the explain stage again")
    return load_coordinates(xr.open_zarr(path, consolidated=False, zarr_format=3))
