"""The cohort store: subject × voxel arrays inside a brain mask, in Zarr v3, read through xarray.

Layout of ``images.zarr`` (one Zarr group)::

    <modality>          (subject, voxel)  one array per modality, chunked (subjects, voxels)
    subject             (subject,)        the scan: participant_id, or <participant_id>_<session_id> with sessions
    <column>            (subject,)        participant (and session) columns: age, sex, site, ...; with
                                          sessions also participant_id and session_id
    i, j, k             (voxel,)          grid indices of each voxel inside the mask
    ingest/<modality>   (subject,)        sha256 of the ingested file; '' = row not written

Root attributes hold the grid (shape, affine, space), the mask's hash, the committed number of
subjects and the ingest record (state, skipped participants and why). A subject's row of a
modality counts only once its hash is written, which happens after its data: a store whose
ingest was interrupted never shows a row that is not whole.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from engine.data.grid import Grid
from engine.data.inputs import (
    InputError,
    MaskIndex,
    Modality,
    known_labels,
    read_masked,
    resolve_files,
    scan_id,
    scan_ids,
    scan_keys,
    spatial_shape,
)
from engine.data.masker import VOXEL_COORDS
from engine.layout import atomic_output, file_sha256
from engine.tasks import INLINE, Execution

LAYOUT = "relcohort.images/1"
#: Images are written and read far more often than disk is short: fast LZ4 with byte shuffling.
IMAGE_CODEC = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")
INGEST_GROUP = "ingest"


class IngestError(RuntimeError):
    """Ingest stopped (``on_error='fail'``); ``problems`` lists every :class:`InputError` found."""

    def __init__(self, problems: list[InputError]):
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{len(problems)} input problem(s); the rows they concern are not in the store:\n{lines}")


# ---------------------------------------------------------------------------------------
# Creating and growing the store


def _string_array(values) -> np.ndarray:
    return np.asarray([str(value) for value in values], dtype=object)


def _create_store(path: Path, mask_path: Path, space: str | None, voxels_per_chunk: int) -> zarr.Group:
    image = nib.load(mask_path)
    mask = np.asanyarray(image.dataobj)
    mask = mask.reshape(spatial_shape(mask.shape))
    if mask.ndim != 3:
        raise InputError(f"the brain mask must be 3D, got shape {mask.shape}", file=mask_path)
    indices = np.argwhere(mask > 0)
    if not len(indices):
        raise InputError("the brain mask is empty", file=mask_path)
    if space is None:
        space = "MNI152" if int(image.header["sform_code"]) == 4 else "unknown"
    grid = Grid(mask.shape, image.affine, space)

    with atomic_output(path) as partial:  # a store exists only once it is whole
        _write_empty_store(partial, indices, grid, mask_path, voxels_per_chunk)
    return writable_group(path)


def _write_empty_store(path: Path, indices: np.ndarray, grid: Grid, mask_path: Path, voxels_per_chunk: int) -> None:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    chunk = min(len(indices), voxels_per_chunk)
    for axis, name in enumerate(VOXEL_COORDS):
        array = group.create_array(name, shape=(len(indices),), chunks=(chunk,), dtype="int16",
                                   dimension_names=("voxel",))
        array[:] = indices[:, axis]
    group.create_array("subject", shape=(0,), chunks=(1024,), dtype=str, fill_value="", dimension_names=("subject",))
    group.create_group(INGEST_GROUP)
    group.attrs.update({
        "grid": grid.to_attrs(),
        "mask_sha256": file_sha256(mask_path),
        "mask_file": str(mask_path),
        "n_subjects": 0,
        "modalities": {},
        "ingest": {"state": "empty"},
        "layout": LAYOUT,
    })


def _open_for_ingest(path: Path, mask_path: Path, space: str | None, voxels_per_chunk: int) -> zarr.Group:
    if not (path / "zarr.json").exists():
        if path.exists() and any(path.iterdir()):
            raise InputError("exists but is not a relcohort images store; move it away or pick another", file=path)
        if path.exists():
            path.rmdir()
        return _create_store(path, mask_path, space, voxels_per_chunk)
    group = writable_group(path)
    if group.attrs.get("layout") != LAYOUT:
        raise InputError(f"not a relcohort images store (layout {group.attrs.get('layout')!r})", file=path)
    if file_sha256(mask_path) != group.attrs["mask_sha256"]:
        raise InputError(f"the brain mask differs from the one the store {path} was built with "
                         f"({group.attrs['mask_file']}): delete {path} (and what was computed from it) to rebuild it "
                         "with this mask, or choose a new workspace", file=mask_path)
    if space is not None and space != group.attrs["grid"]["space"]:  # declared since: the grid's name, not its voxels
        group.attrs["grid"] = {**group.attrs["grid"], "space": space}
        for name in group.attrs["modalities"]:
            group[name].attrs["space"] = space
    _truncate_to_committed(group)
    return group


def _subject_arrays(group: zarr.Group):
    """Every array with a subject dimension, the ingest hashes included."""
    for _, array in group.arrays():
        if array.metadata.dimension_names and array.metadata.dimension_names[0] == "subject":
            yield array
    yield from (array for _, array in group[INGEST_GROUP].arrays())


def _truncate_to_committed(group: zarr.Group) -> None:
    """Undo a growth that was interrupted before its subject count was committed."""
    n = group.attrs["n_subjects"]
    for array in _subject_arrays(group):
        if array.shape[0] != n:
            array.resize((n, *array.shape[1:]))


def _grow(group: zarr.Group, new_ids: list[str]) -> None:
    n_old = group.attrs["n_subjects"]
    n_new = n_old + len(new_ids)
    for array in _subject_arrays(group):
        array.resize((n_new, *array.shape[1:]))
    group["subject"][n_old:n_new] = _string_array(new_ids)
    group.attrs["n_subjects"] = n_new


def _row_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table's columns stored per row, indexed by scan: all but ``participant_id`` where it is the row's label
    (a cohort without sessions)."""
    columns = table if "session_id" in table else table.drop(columns="participant_id")
    return columns.set_axis(scan_ids(table))


def _check_participant_columns(group: zarr.Group, table: pd.DataFrame, modalities: list[Modality], path: Path):
    """Refuse columns that clash with store names or changed between text and numbers."""
    reserved = {"subject", *VOXEL_COORDS, *group.attrs["modalities"], *(m.name for m in modalities), INGEST_GROUP}
    for column in _row_columns(table).columns:
        if column in reserved:
            raise InputError(f"participants-table column {column!r} clashes with a modality or store name", file=path)
        numeric = pd.api.types.is_numeric_dtype(table[column])
        if column in group and (group[column].dtype.kind == "f") != numeric:
            raise InputError(f"participants-table column {column!r} was {'text' if numeric else 'numeric'} "
                             f"when the store was built and is now {'numeric' if numeric else 'text'}", file=path)


def _write_participant_columns(group: zarr.Group, table: pd.DataFrame) -> None:
    """Write the table's columns as subject coordinates aligned to the store's rows.

    Subjects in the store but not in the table keep what is stored for them.
    """
    ids = list(group["subject"][:])
    aligned = _row_columns(table)
    listed = pd.Series(ids, index=ids).isin(aligned.index)
    for column in aligned.columns:
        numeric = pd.api.types.is_numeric_dtype(aligned[column])
        if column not in group:
            group.create_array(column, shape=(len(ids),), chunks=(1024,), dtype="float64" if numeric else str,
                               fill_value=np.nan if numeric else "", dimension_names=("subject",))
        values = aligned[column].reindex(ids).where(listed, pd.Series(group[column][:], index=ids))
        group[column][:] = values.to_numpy(float) if numeric else _string_array(values.fillna(""))
    columns = sorted(set(group.attrs.get("participant_columns", [])) | set(aligned.columns))
    group.attrs["participant_columns"] = columns
    for name in group.attrs["modalities"]:
        group[name].attrs["coordinates"] = " ".join([*columns, *VOXEL_COORDS])


def _add_modality(group: zarr.Group, modality: Modality, subjects_per_chunk: int, voxels_per_chunk: int) -> None:
    n_voxels = group["i"].shape[0]
    grid = group.attrs["grid"]
    group.create_array(
        modality.name, shape=(group.attrs["n_subjects"], n_voxels),
        chunks=(subjects_per_chunk, min(n_voxels, voxels_per_chunk)), dtype=modality.dtype, compressors=IMAGE_CODEC,
        fill_value=np.nan if np.dtype(modality.dtype).kind == "f" else 0, dimension_names=("subject", "voxel"),
        attributes={"coordinates": " ".join(VOXEL_COORDS), "grid_shape": grid["shape"],
                    "grid_affine": grid["affine"], "space": grid["space"], "source_template": modality.template},
    )
    group[INGEST_GROUP].create_array(modality.name, shape=(group.attrs["n_subjects"],),
                                     chunks=(subjects_per_chunk,), dtype=str, fill_value="")
    group.attrs["modalities"] = {**group.attrs["modalities"], modality.name: {"template": modality.template,
                                                                            "dtype": modality.dtype}}


# ---------------------------------------------------------------------------------------
# The ingest


@dataclass
class IngestResult:
    """What an ingest did: rows written, skipped as unchanged, and the problems found."""

    store: Path
    written: dict[str, int] = field(default_factory=dict)
    unchanged: int = 0
    appended: int = 0
    problems: list[InputError] = field(default_factory=list)
    n_subjects: int = 0


@dataclass(frozen=True)
class _RowFiles:
    """One row of the store and its scan's files (modality → path)."""

    row: int
    participant_id: str
    session_id: str | None
    files: dict[str, str]

    @property
    def scan(self) -> str:
        return scan_id(self.participant_id, self.session_id)


@dataclass(frozen=True)
class _IngestBlock:
    """The rows of one subject chunk to read, check and write (a task of :func:`ingest`); ``checks`` holds each
    modality's stored dtype and, for label volumes, the labels it may hold."""

    store: str
    mask_sha256: str
    checks: dict[str, tuple[str, np.ndarray | None]]
    rows: list[_RowFiles]


def _hash_files(item: _RowFiles) -> dict[str, str]:
    """sha256 of every file of one participant already in the store (a task of :func:`ingest`)."""
    return {modality: file_sha256(path) for modality, path in item.files.items() if Path(path).is_file()}


@lru_cache(maxsize=8)
def _mask_index(store: str, mask_sha256: str) -> MaskIndex:
    group = zarr.open_group(store, mode="r")
    return MaskIndex.from_indices([group[name][:] for name in VOXEL_COORDS], tuple(group.attrs["grid"]["shape"]))


def _write_block(item: _IngestBlock) -> tuple[dict[str, int], list[InputError]]:
    """Read, check and write some rows of one subject chunk, then commit their hashes (a task of :func:`ingest`).

    Rows are written only once their file passed every check, so a bad replacement file never
    overwrites what is stored; a row being rewritten stops counting until its new hash lands.
    One modality's block is written (compressed by Zarr, off the GIL) while the next one's
    files are read.
    """
    block = item.rows
    mask = _mask_index(item.store, item.mask_sha256)
    group = writable_group(item.store)
    grid = Grid.from_attrs(group.attrs["grid"])
    start, stop = min(work.row for work in block), max(work.row for work in block) + 1
    problems, written, pending = [], {}, []
    with ThreadPoolExecutor(max_workers=1) as writer:
        for modality, (dtype, known_labels) in item.checks.items():
            rows, values, hashes = [], [], []
            for work in block:
                if modality in work.files:
                    try:
                        row_values, sha256 = read_masked(Path(work.files[modality]), grid, mask, dtype,
                                                         work.participant_id, known_labels, work.session_id)
                    except InputError as problem:
                        problems.append(problem)
                        continue
                    rows.append(work.row - start)
                    values.append(row_values)
                    hashes.append(sha256)
            if rows:
                pending.append(writer.submit(_write_rows, group, modality, (start, stop), rows, values, hashes))
                written[modality] = len(rows)
        for write in pending:
            write.result()
    return written, problems


def _write_rows(group: zarr.Group, modality: str, span: tuple[int, int], rows: list[int], values, hashes) -> None:
    """Write ``values`` into rows ``span[0] + rows`` of one subject chunk, then commit their hashes."""
    start, stop = span
    committed = group[INGEST_GROUP][modality]
    block_hashes = committed[start:stop]
    if block_hashes[rows].any():
        block_hashes[rows] = ""
        committed[start:stop] = block_hashes
    data = group[modality]
    block_values = data[start:stop] if len(rows) < stop - start else np.empty((stop - start, data.shape[1]), data.dtype)
    block_values[rows] = values
    data[start:stop] = block_values
    block_hashes[rows] = hashes
    committed[start:stop] = block_hashes


def ingest(
    store: str | Path,
    participants: pd.DataFrame,
    root: str | Path,
    modalities: list[Modality],
    mask: str | Path,
    *,
    space: str | None = None,
    on_error: str = "fail",
    subjects_per_chunk: int = 16,
    voxels_per_chunk: int = 65536,
    unlisted_files: str = "problem",
    execution: Execution = INLINE,
) -> IngestResult:
    """Ingest the participants' images into ``store`` (created on first use), incrementally.

    Participants whose files are unchanged (sha256) are skipped, new ones appended, changed
    ones rewritten in place; each file is read once. ``on_error='fail'`` stops before changing
    the store when a file is missing or unlisted; unreadable or invalid images leave their rows
    unwritten and raise :class:`IngestError` at the end, listing every problem. ``'skip'``
    leaves those participants out and records them in the store's ``ingest`` attribute.
    ``unlisted_files='ignore'``: files of participants not in the table are no problem (the
    registered images of participants that registration left out). Every subject chunk is one task of
    ``execution`` (progress phases ``check`` and ``write``).
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    store, root, mask = Path(store), Path(root), Path(mask)
    if not mask.is_file():
        raise InputError("brain mask not found", file=mask)
    names = [modality.name for modality in modalities]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"modality names must be unique and at least one, got {names}")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    files, problems = resolve_files(root, participants, modalities)
    if unlisted_files == "ignore":
        problems = [problem for problem in problems if problem.participant is not None]
    _fail_fast(problems, on_error)
    group = _open_for_ingest(store, mask, space, voxels_per_chunk)
    result = IngestResult(store)
    bad = {problem.scan for problem in problems}
    scans = {scan_id(*key): key for key in scan_keys(participants)}
    listed = [scan for scan in scans if scan not in bad]

    # 1. which stored rows changed: hash the files of participants already in the store
    rows = {pid: row for row, pid in enumerate(group["subject"][:])}
    stored = [scan for scan in listed if scan in rows]
    stored_hashes = {name: group[INGEST_GROUP][name][:] if name in group[INGEST_GROUP] else None for name in names}
    changed = {}
    items = [_RowFiles(rows[scan], *scans[scan], files[scan]) for scan in stored]
    for done, (item, hashes) in enumerate(execution.map(_hash_files, items), start=1):
        changed[item.scan] = [name for name in names if stored_hashes[name] is None
                              or stored_hashes[name][item.row] != hashes.get(name)]
        execution.report("check", done, len(stored))

    # 2. check everything that could refuse the run, then grow the store
    stored_modalities = group.attrs["modalities"]
    for modality in modalities:
        if modality.name in stored_modalities and stored_modalities[modality.name]["dtype"] != modality.dtype:
            raise InputError(f"modality {modality.name} is stored as {stored_modalities[modality.name]['dtype']}, "
                             f"the catalog asks for {modality.dtype}: delete {store} to rebuild it, or choose a new "
                             "workspace", file=store)
    _check_participant_columns(group, participants, modalities, store)
    for modality in modalities:
        if modality.name not in stored_modalities:
            _add_modality(group, modality, subjects_per_chunk, voxels_per_chunk)
    new_ids = [scan for scan in listed if scan not in rows]
    _grow(group, new_ids)
    result.appended = len(new_ids)
    rows.update({scan: len(rows) + n for n, scan in enumerate(new_ids)})
    _write_participant_columns(group, participants)

    # 3. write whole subject chunks (one task per chunk), each committing its rows' hashes
    work = {}
    for scan in listed:
        modalities_to_write = changed.get(scan, names)
        if modalities_to_write:
            row = rows[scan]
            paths = {name: str(files[scan][name]) for name in modalities_to_write}
            work.setdefault(row // subjects_per_chunk, []).append(_RowFiles(row, *scans[scan], paths))
        else:
            result.unchanged += 1
    checks = {modality.name: (modality.dtype, known_labels(modality)) for modality in modalities}
    blocks = [_IngestBlock(str(store), group.attrs["mask_sha256"], checks, block) for block in work.values()]
    group.attrs["ingest"] = {**group.attrs["ingest"], "state": "in progress", "started": started}
    total, done = sum(len(block) for block in work.values()), 0
    for block, (written, found) in execution.map(_write_block, blocks):
        for name, count in written.items():
            result.written[name] = result.written.get(name, 0) + count
        problems += found
        done += len(block.rows)
        execution.report("write", done, total)

    result.problems = problems
    result.n_subjects = group.attrs["n_subjects"]
    group.attrs["ingest"] = {
        "state": "incomplete" if problems and on_error == "fail" else "complete",
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "on_error": on_error,
        "skipped": [problem.as_dict() for problem in problems],
        "written": result.written,
        "unchanged": result.unchanged,
        "appended": result.appended,
    }
    consolidate(store)
    _fail_fast(problems, on_error)
    return result


@dataclass(frozen=True)
class _DerivedBlock:
    """Rows of one subject chunk of a derived modality to compute and write (a task of :func:`derive_modality`)."""

    store: str
    name: str
    sources: tuple[str, ...]
    compute: Callable[[dict[str, np.ndarray], list[str]], np.ndarray]
    rows: list[int]
    hashes: list[str]


def _derive_block(item: _DerivedBlock) -> int:
    group = writable_group(item.store)
    start, stop = min(item.rows), max(item.rows) + 1
    local = [row - start for row in item.rows]
    values = {source: group[source][start:stop][local] for source in item.sources}
    subjects = [str(subject) for subject in group["subject"][start:stop][local]]
    _write_rows(group, item.name, (start, stop), local, list(item.compute(values, subjects)), item.hashes)
    return len(item.rows)


def derive_modality(store: str | Path, name: str, sources: Sequence[str], compute, settings: dict,
                    dtype: str = "float32", execution: Execution = INLINE) -> int:
    """A modality of the store computed from others (``compute(values by source, subjects) → rows``, a picklable
    callable), kept current row by row: a row is recomputed when its sources' ingest hashes or ``settings``
    change, and counts once written, as an ingested one does. Returns the number of rows computed."""
    group = writable_group(store)
    missing = [source for source in sources if source not in group.attrs["modalities"]]
    if missing:
        raise ValueError(f"modality {name}: its sources {missing} are not in {store}")
    if name not in group.attrs["modalities"]:
        chunks = group[sources[0]].chunks
        _add_modality(group, Modality(name, f"derived from {', '.join(sources)}", dtype), chunks[0], chunks[1])
    elif group.attrs["modalities"][name].get("dtype") != dtype:
        raise ValueError(f"modality {name} is stored as {group.attrs['modalities'][name]['dtype']}, not {dtype}")
    source_hashes = [group[INGEST_GROUP][source][:] for source in sources]
    stored = group[INGEST_GROUP][name][:]
    setting = json.dumps(settings, sort_keys=True)
    blocks: dict[int, tuple[list[int], list[str]]] = {}
    chunk = group[name].chunks[0]
    for row in range(group.attrs["n_subjects"]):
        inputs_of_row = [hashes[row] for hashes in source_hashes]
        if not all(inputs_of_row):
            continue  # a source row not (yet) written
        wanted = hashlib.sha256("\0".join([setting, *inputs_of_row]).encode()).hexdigest()
        if stored[row] != wanted:
            rows, hashes = blocks.setdefault(row // chunk, ([], []))
            rows.append(row)
            hashes.append(wanted)
    items = [_DerivedBlock(str(store), name, tuple(sources), compute, rows, hashes)
             for rows, hashes in blocks.values()]
    total, done = sum(len(item.rows) for item in items), 0
    execution.report(name, done, total)
    for _, count in execution.map(_derive_block, items):
        done += count
        execution.report(name, done, total)
    consolidate(store)
    return total


def _fail_fast(problems: list[InputError], on_error: str) -> None:
    if problems and on_error == "fail":
        raise IngestError(problems)


# ---------------------------------------------------------------------------------------
# Reading


def open_layout_group(path: str | Path, layout: str, kind: str) -> zarr.Group:
    """The Zarr group at ``path`` for reading, checked to be a relcohort store of ``layout`` (``<name>/<version>``);
    a store of another version of the layout is an error that says how to rewrite it."""
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"no {kind} store at {path}")
    group = zarr.open_group(path, mode="r", use_consolidated=False)
    found = str(group.attrs.get("layout"))
    if found != layout:
        if found.split("/")[0] == layout.split("/")[0]:
            raise ValueError(f"{path} was written by another relcohort version (layout {found}; this one reads "
                             f"{layout}); run the catalog again (relcohort run) to rewrite it")
        raise ValueError(f"{path} is not a relcohort {kind} store")
    return group


def writable_group(path: str | Path) -> zarr.Group:
    """A store's root group for writing. It is read without its consolidated metadata, which would not show the
    writer's own changes, and that metadata is dropped until :func:`consolidate` records the store whole again."""
    path = Path(path)
    group = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
    if json.loads((path / "zarr.json").read_text()).get("consolidated_metadata") is not None:
        group.attrs.put(dict(group.attrs))  # rewrites the root metadata without the consolidated copy
    return group


def consolidate(path: str | Path) -> None:
    """Consolidate a whole store's metadata into its root, so that ``xarray.open_zarr(path)`` opens it in one read."""
    with warnings.catch_warnings():  # zarr notes that consolidated metadata is not part of the v3 specification
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
        zarr.consolidate_metadata(Path(path), zarr_format=3)


def open_cohort(path: str | Path, include_incomplete: bool = False) -> xr.Dataset:
    """Open ``images.zarr`` as a lazy ``xarray.Dataset`` of (subject, voxel) arrays.

    Subject metadata (age, sex, site, ...) are coordinates, so ``ds.where(ds.age > 60,
    drop=True)`` works. Rows not wholly ingested (an interrupted or failed ingest) are left
    out unless ``include_incomplete``.
    """
    path = Path(path)
    group = open_layout_group(path, LAYOUT, "images")
    n = group.attrs["n_subjects"]
    lengths = {array.path: array.shape[0] for array in _subject_arrays(group)}
    if any(length != n for length in lengths.values()):
        raise ValueError(f"{path} was interrupted while growing; run the ingest again to repair it")
    dataset = load_coordinates(xr.open_zarr(path, consolidated=False, zarr_format=3),
                               ["subject", *group.attrs.get("participant_columns", []), *VOXEL_COORDS])
    complete = np.ones(n, bool)
    for name in group.attrs["modalities"]:
        complete &= group[INGEST_GROUP][name][:] != ""
    return dataset if include_incomplete else dataset.isel(subject=complete)


def load_coordinates(dataset: xr.Dataset, names=None) -> xr.Dataset:
    """``dataset`` with the named coordinates (default: all) in memory and strings as Python objects,
    so ``ds.where(ds.age > 60, drop=True)`` and ``ds.sel(subject="sub-01")`` work. They are read in this process
    (small arrays: a cluster's round trips would cost more than the reads)."""
    names = list(dataset.coords) if names is None else [name for name in names if name in dataset.coords]
    values = dask.compute(*(dataset[name].data for name in names), scheduler="synchronous")
    return dataset.assign_coords({name: (dataset[name].dims, _plain(np.asarray(value)))
                                  for name, value in zip(names, values, strict=True)})


def _plain(values: np.ndarray) -> np.ndarray:
    return values.astype(object) if values.dtype.kind in "TUS" else values


def row_keys(rows: xr.Dataset | xr.DataArray) -> pd.DataFrame:
    """Each store row's key columns (:func:`~engine.data.inputs.key_columns`), indexed by the row's label."""
    labels = pd.Index(rows["subject"].values, name="subject")
    if "session_id" in rows.coords:
        return pd.DataFrame({"participant_id": rows["participant_id"].values, "session_id": rows["session_id"].values},
                            index=labels)
    return pd.DataFrame({"participant_id": labels}, index=labels)


def row_columns(rows: xr.Dataset) -> pd.DataFrame:
    """The store rows' key columns, then their other columns (age, sex, …), indexed by the row label."""
    keys = row_keys(rows)
    columns = {name: rows[name].values for name in rows.coords
               if rows[name].dims == ("subject",) and name not in ("subject", *keys.columns)}
    return keys.assign(**columns)


def keyed(table: pd.DataFrame, rows: xr.Dataset | xr.DataArray, column: str = "subject") -> pd.DataFrame:
    """``table`` with its ``column`` of store row labels replaced by the rows' key columns, which come first."""
    keys = row_keys(rows).reindex(table[column].to_numpy())
    if keys.isna().any().any():
        raise KeyError(f"rows not in the store: {sorted(set(table[column]) - set(rows['subject'].values))[:5]}")
    rest = table.drop(columns=[column, *keys.columns], errors="ignore").reset_index(drop=True)
    return pd.concat([keys.reset_index(drop=True), rest], axis=1)


def row_table(frame: xr.Dataset, columns: Sequence[str]) -> pd.DataFrame:
    """A Dataset over the store's rows (a reduction over voxels) as a table: the rows' key columns, then
    ``columns`` (its other dimensions and variables)."""
    table = frame.reset_coords([name for name in frame.coords if name not in frame.dims], drop=True)
    return keyed(table.to_dataframe().reset_index()[["subject", *columns]], frame)


def content_fingerprint(path: str | Path) -> str:
    """sha256 over the store's subjects and the hashes of every ingested file: changes iff the data do."""
    group = zarr.open_group(Path(path), mode="r")
    digest = hashlib.sha256()
    for value in group["subject"][:]:
        digest.update(str(value).encode() + b"\0")
    for name in sorted(group.attrs["modalities"]):
        for value in group[INGEST_GROUP][name][:]:
            digest.update(f"{name}:{value}\0".encode())
    return digest.hexdigest()


def store_attributes(path: str | Path) -> Mapping:
    """The store's root attributes: grid, modalities, subject count and the last ingest record."""
    return dict(zarr.open_group(Path(path), mode="r").attrs)
