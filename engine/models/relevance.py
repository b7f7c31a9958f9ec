"""``relevance.zarr``: every member's relevance maps of a cohort, computed as Dask tasks or imported.

:func:`explain` runs ``method × member × subject`` as Dask tasks — one per (member, block of
subjects), asking for a GPU where workers have one — into ``relevance.zarr``::

    relevance       (method, member, subject, voxel)  float32
    relevance_mean  (method, subject, voxel)          the ensemble mean
    explained       (member, subject)                 true once a task's rows are written

with the images store's voxels (``i, j, k``), grid and participant columns (plus each
subject's training ``split``), so every atlas and statistic applies to relevance unchanged.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr
from safetensors.torch import load_file, save_file
from torch import nn

from engine.data.masker import VOXEL_COORDS
from engine.data.store import IMAGE_CODEC, content_fingerprint, load_coordinates, open_cohort, open_layout_group
from engine.layout import ModelsLayout, atomic_output, file_sha256, is_current, mark_current, output_key
from engine.models import noise
from engine.models.attribution import METHODS, AttributionOptions, attribute
from engine.models.heap import heap_kept
from engine.models.networks import place
from engine.models.splits import read_split
from engine.models.training import TrainingConfig, load_member, targets_of
from engine.models.volumes import CohortVolumes
from engine.tasks import gpu_resources, run_tasks, torch_device

LAYOUT = "relcohort.relevance/1"


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
                       dimension_names=("method", "member", "subject", "voxel"), fill_value=np.nan,
                       attributes=grid_attrs)
    group.create_array("relevance_mean", shape=(n_methods, n_subjects, n_voxels), dtype="float32",
                       chunks=(1, subjects_per_chunk, voxels_per_chunk), compressors=IMAGE_CODEC,
                       dimension_names=("method", "subject", "voxel"), fill_value=np.nan, attributes=grid_attrs)
    group.create_array("explained", shape=(n_members, n_subjects), dtype="bool", chunks=(1, subjects_per_chunk),
                       dimension_names=("member", "subject"), fill_value=False)
    coordinates = {"method": np.array(methods, dtype=object), "member": np.array(members),
                   "subject": np.array(subjects, dtype=object),
                   **{axis: dataset[axis].values for axis in VOXEL_COORDS}}
    for name, values in {**coordinates, **subject_columns}.items():
        dim = name if name in ("method", "member", "subject") else ("voxel" if name in VOXEL_COORDS else "subject")
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


def _member_inputs(store: str, models_dir: str, member: int, device) -> tuple[nn.Module, dict, CohortVolumes]:
    model, card = load_member(ModelsLayout(Path(models_dir)).member(member), device)
    return model, card, CohortVolumes(store, card["config"]["modalities"], card["config"]["input_scaling"])


def _train_noise_task(item):
    """Train and write the noise network of one member over its training participants (Bintsi et al. 2021)."""
    store, models_dir, member, options, key = item
    files = ModelsLayout(Path(models_dir))
    model, card, volumes = _member_inputs(store, models_dir, member, torch_device())
    train = np.flatnonzero(read_split(files.split).reindex(volumes.subjects).to_numpy() == "train")
    classes = card["classes"]
    targets = targets_of(volumes.dataset, TrainingConfig(**card["config"]), classes)[train]
    with heap_kept():
        noise_net = noise.train_noise_model(
            model, volumes.read, train, targets, sparsity=options.noise_model_sparsity,
            epochs=options.noise_model_epochs, learning_rate=options.noise_model_learning_rate,
            classification=classes is not None, seed=1000 * options.seed + member)
    path = files.noise_model(member)
    with atomic_output(path) as partial:
        save_file({name: value.contiguous() for name, value in noise_net.state_dict().items()}, partial)
    mark_current(path, key)
    return member


def _train_noise_models(store: Path, models_dir: Path, members: Sequence[int], options: AttributionOptions,
                        client, progress, gpu_on_demand: bool, in_flight: int | None) -> None:
    """The noise network of every member that lacks a current one (same member, images, split and settings)."""
    files = ModelsLayout(models_dir)
    settings = {name: value for name, value in options.as_dict().items()
                if name.startswith("noise_model_") or name == "seed"} | {"network": _noise_network_layout()}
    items = []
    for member in members:
        key = output_key(settings, {"member": models_fingerprint(models_dir, [member]),
                                    "split": file_sha256(files.split), "images": content_fingerprint(store)})
        if not is_current(files.noise_model(member), key):
            items.append((str(store), str(models_dir), member, options, key))
    done = len(members) - len(items)
    if progress:
        progress("noise models", done, len(members))
    for _ in run_tasks(_train_noise_task, items, client=client, resources=gpu_resources(client, gpu_on_demand),
                       in_flight=in_flight):
        done += 1
        if progress:
            progress("noise models", done, len(members))


def _noise_network_layout() -> dict:
    """The noise network's parameters (names and shapes, for one input channel): in the keys of the networks and of
    the maps made with them, so that networks of an earlier design are trained again and their maps redone."""
    return {name: list(value.shape) for name, value in noise.NoiseNet(1).state_dict().items()}


def _load_noise_model(models_dir: str, member: int, in_channels: int, device) -> nn.Module:
    noise_net = noise.NoiseNet(in_channels)
    noise_net.load_state_dict(load_file(ModelsLayout(Path(models_dir)).noise_model(member)))
    return place(noise_net, device).eval()


def _explain_block(item):
    out, store, models_dir, member_index, member, methods, rows, positions, options, region_labels = item
    device = torch_device()
    model, card, volumes = _member_inputs(store, models_dir, member, device)
    inputs = torch.from_numpy(volumes.read(positions)).to(device)
    noise_net = _load_noise_model(models_dir, member, inputs.shape[1], device) if "noise_model" in methods else None
    group = zarr.open_group(out, mode="r+")
    with heap_kept():
        for method_index, method in enumerate(methods):
            maps = attribute(model, inputs, method, options, region_labels, noise_net).cpu().numpy()
            group["relevance"][method_index, member_index, rows[0]:rows[-1] + 1] = volumes.box.transform(maps)
    group["explained"][member_index, rows[0]:rows[-1] + 1] = True  # after the data: marks the block whole
    return len(rows)


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
    missing or incomplete. What later outputs record as their relevance input."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        return None
    attributes = zarr.open_group(path, mode="r").attrs
    return attributes["plan"]["key"] if attributes.get("state") == "complete" and "plan" in attributes else None


def explain(out: str | Path, *, images: str | Path, models: str | Path, methods: Sequence[str],
            members: Sequence[int], subjects: Sequence[str], options: AttributionOptions | None = None,
            region_labels: np.ndarray | None = None, subjects_per_chunk: int = 8, voxels_per_chunk: int = 65536,
            client=None, progress: Callable[[str, int, int], None] | None = None,
            gpu_on_demand: bool = False, in_flight: int | None = None) -> xr.Dataset:
    """Relevance maps of ``methods`` for ``members`` × ``subjects`` into ``out`` (``relevance.zarr``).

    ``images`` is the cohort store and ``models`` the trained members' folder. One Dask task per
    (member, block of ``subjects_per_chunk`` subjects) writes whole chunks (of ``voxels_per_chunk``
    voxels, as the images store's for aligned reductions) of every method; blocks
    already explained for the same plan (settings, weights and images by content) are not redone.
    The ensemble mean over members is written last. ``region_labels`` is the atlas volume for
    region occlusion. Tasks ask for a GPU where workers have one or the cluster starts GPU workers on
    demand (``gpu_on_demand``); ``in_flight`` caps the tasks submitted at once (:func:`engine.tasks.run_tasks`).
    """
    out, store, models_dir = Path(out), Path(images), Path(models)
    options = options or AttributionOptions()
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method(s) {unknown}; known: {', '.join(METHODS)}")
    dataset = open_cohort(store)
    positions_of = {subject: position for position, subject in enumerate(dataset.subject.values)}
    missing = [subject for subject in subjects if subject not in positions_of]
    if missing:
        raise ValueError(f"participants {missing[:5]} are not complete in {store}")
    plan = output_key({"methods": list(methods), "members": list(members), "subjects": list(subjects),
                       "options": options.as_dict(),
                       **({"noise_network": _noise_network_layout()} if "noise_model" in methods else {})},
                      {"models": models_fingerprint(models_dir, members), "images": content_fingerprint(store)})
    existing = zarr.open_group(out, mode="r") if (out / "zarr.json").exists() else None
    if existing is None or (existing.attrs.get("plan") or {}).get("key") != plan["key"]:
        columns = _subject_columns(dataset, subjects)
        split_file = ModelsLayout(models_dir).split
        if split_file.is_file():
            columns["split"] = read_split(split_file).reindex(list(subjects)).fillna("").to_numpy(dtype=object)
        _create_store(out, plan, dataset, subjects_per_chunk, min(voxels_per_chunk, dataset.sizes["voxel"]), columns)
    if "noise_model" in methods:
        _train_noise_models(store, models_dir, members, options, client, progress, gpu_on_demand, in_flight)
    group = zarr.open_group(out, mode="r+")
    chunk = group["relevance"].chunks[2]
    explained = group["explained"][:]
    items = []
    for member_index, member in enumerate(members):
        for start in range(0, len(subjects), chunk):
            rows = list(range(start, min(start + chunk, len(subjects))))
            if not explained[member_index, rows].all():
                items.append((str(out), str(store), str(models_dir), member_index, member, tuple(methods), rows,
                              [positions_of[subjects[row]] for row in rows], options, region_labels))
    total = len(members) * len(subjects)
    done = int(explained.sum())
    if progress:
        progress("explain", done, total)
    for _, count in run_tasks(_explain_block, items, client=client, resources=gpu_resources(client, gpu_on_demand),
                              in_flight=in_flight):
        done += count
        if progress:
            progress("explain", done, total)
    _write_ensemble_mean(group)
    group.attrs["state"] = "complete"
    return open_relevance(out)


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
    plan = output_key({"methods": list(maps), "members": [0], "subjects": subjects, "imported": dict(maps)},
                      {"images": content_fingerprint(store)})
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
    _write_ensemble_mean(group)
    group.attrs["state"] = "complete"
    return open_relevance(out)


def _subject_columns(dataset: xr.Dataset, subjects: Sequence[str]) -> dict:
    """The images store's participant columns (age, sex, …) of ``subjects``: the relevance store's coordinates."""
    return {name: dataset[name].sel(subject=list(subjects)).values for name in dataset.coords
            if dataset[name].dims == ("subject",) and name != "subject"}


def _write_ensemble_mean(group: zarr.Group) -> None:
    relevance = da.from_zarr(group["relevance"])
    da.store(relevance.mean(axis=1), group["relevance_mean"], lock=False)


def open_relevance(path: str | Path) -> xr.Dataset:
    """``relevance.zarr`` as a lazy Dataset: ``relevance`` (method, member, subject, voxel), ``relevance_mean``.

    Select a method with a mapping, ``ds.sel({"method": "lrp"})``: ``sel(method=...)`` is
    xarray's own keyword for inexact matching.
    """
    path = Path(path)
    group = open_layout_group(path, LAYOUT, "relevance")
    if group.attrs.get("state") != "complete":
        raise ValueError(f"{path} is incomplete (an explain run was interrupted); run the explain stage again")
    return load_coordinates(xr.open_zarr(path, consolidated=False, zarr_format=3))
