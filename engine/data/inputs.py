"""The input side: participants table, path templates and the images they name, read and checked.

A cohort is a folder, a participants table (``participant_id`` and columns such as age, sex and
site) and, per modality, a path template relative to the folder that names participants-table
columns (``"{participant_id}/anat/{participant_id}_T1w.nii.gz"``). :func:`resolve_files` turns the
table and the templates into each participant's files and the problems found (missing files,
files of unlisted participants); :func:`read_masked` reads one image and checks it against the
cohort's grid, mask and dtype. Every problem is an :class:`InputError` naming participant, file
and what is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from isal import igzip

from engine.data.grid import Grid
from engine.data.labels import label_table


class InputError(ValueError):
    """A participant's input is unusable; the message names the participant, file and problem."""

    def __init__(self, problem: str, participant: str | None = None, file: str | Path | None = None):
        self.problem, self.participant, self.file = problem, participant, None if file is None else str(file)
        where = ", ".join(part for part in (
            f"participant {participant}" if participant else "",
            f"file {file}" if file else "",
        ) if part)
        super().__init__(f"{where}: {problem}" if where else problem)

    def as_dict(self) -> dict:
        return {"participant_id": self.participant, "file": self.file, "problem": self.problem}


@dataclass(frozen=True)
class Modality:
    """One image modality: a path template relative to the cohort root and its stored dtype.

    The template may name any participants-table column, e.g.
    ``"{participant_id}/anat/{participant_id}_T1w.nii.gz"``.
    """

    name: str
    template: str
    dtype: str = "float32"
    #: for registration: ``reference`` (the reference scan's world space), ``own`` (co-registered
    #: rigidly to the reference scan first) or ``template`` (already on the template grid)
    space: str = "reference"
    #: ``intensity`` / ``probability`` (linear), ``label`` (generic label), ``mask`` (nearest neighbour)
    kind: str = "intensity"
    modulate: bool = False  # probability maps × Jacobian determinant: sums are native volumes
    #: for label volumes: their region table (``freesurfer`` or a TSV/CSV path); ingest checks every label is in it
    labels: str | None = None


# ---------------------------------------------------------------------------------------
# Participants table and files


def read_participants(path: str | Path) -> pd.DataFrame:
    """Read a BIDS ``participants.tsv`` (or .csv); check IDs are present and unique, age numeric. A byte-order mark
    (as spreadsheets write UTF-8) and Windows line endings are read as any other table."""
    path = Path(path)
    separator = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream, delimiter=separator))
    except FileNotFoundError:
        raise InputError("participants table not found", file=path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"malformed participants table: {error}", file=path) from None
    if not rows or not any(rows[0]):
        raise InputError("malformed participants table: it is empty (no header line)", file=path)
    for number, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(rows[0]):
            raise InputError(f"malformed participants table: line {number} has {len(row)} fields, "
                             f"the header has {len(rows[0])}", file=path)
    table = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, na_values=["", "n/a", "NA"],
                        index_col=False, encoding="utf-8-sig")
    if "participant_id" not in table.columns:
        raise InputError(
            f"malformed participants table: no 'participant_id' column (columns: {list(table.columns)}; "
            f"expected {'comma' if separator == ',' else 'tab'}-separated values)", file=path)
    missing = table.index[table["participant_id"].isna()]
    if len(missing):
        raise InputError(f"malformed participants table: empty participant_id on line(s) {list(missing + 2)}",
                         file=path)
    duplicated = table["participant_id"][table["participant_id"].duplicated(keep=False)]
    if len(duplicated):
        lines = {pid: list(duplicated.index[duplicated == pid] + 2) for pid in duplicated.unique()}
        raise InputError(f"duplicate participant IDs (with their lines): {lines}", file=path)
    for column in table.columns.drop("participant_id"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = table[column].notna() & numbers.isna()
        if column == "age" and bad.any():
            row = bad.idxmax()
            raise InputError(f"age {table[column][row]!r} on line {row + 2} is not a number",
                             participant=table["participant_id"][row], file=path)
        if not bad.any() and table[column].notna().any():
            table[column] = numbers
    return table


def _template_regex(template: str) -> re.Pattern:
    pattern, position = "", 0
    for match in re.finditer(r"\{(\w+)\}", template):
        pattern += re.escape(template[position:match.start()])
        name = match.group(1)
        pattern += f"(?P={name})" if f"(?P<{name}>" in pattern else f"(?P<{name}>[^/]+)"
        position = match.end()
    return re.compile(pattern + re.escape(template[position:]) + "$")


def resolve_files(root: str | Path, table: pd.DataFrame, modalities: list[Modality]):
    """Each participant's file per modality, plus the problems: missing files and unlisted files.

    Returns ``(files, problems)``: ``files[participant_id][modality]`` is a path; problems are
    :class:`InputError` for listed participants without a file and files matching a template
    whose participant is not in the table.
    """
    root = Path(root)
    records = table.astype(object).where(table.notna(), "").to_dict("records")
    files, problems = {}, []
    listed = set(table["participant_id"])
    for modality in modalities:
        if "{participant_id}" not in modality.template:
            raise InputError(f"modality {modality.name}: path template {modality.template!r} must contain "
                             "{participant_id}")
        for record in records:
            pid = record["participant_id"]
            try:
                path = root / modality.template.format_map(record)
            except KeyError as error:
                raise InputError(f"modality {modality.name}: template {modality.template!r} names "
                                 f"{error} which is not a participants-table column") from None
            if path.is_file():
                files.setdefault(pid, {})[modality.name] = path
            else:
                problems.append(InputError(f"no {modality.name} file", pid, path))
        regex = _template_regex(modality.template)
        glob = re.sub(r"\{\w+\}", "*", modality.template)
        for path in sorted(root.glob(glob)):
            match = regex.match(path.relative_to(root).as_posix())
            if match and match["participant_id"] not in listed:
                problems.append(InputError(
                    f"{modality.name} file belongs to participant {match['participant_id']!r}, "
                    f"who is not in the participants table", file=path))
    return files, problems


def spatial_shape(shape: tuple) -> tuple:
    """A shape without a trailing singleton 4th axis (a 3D image saved as one volume)."""
    return tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)


def _check_header(image, grid: Grid, participant: str, path: Path) -> None:
    shape = spatial_shape(image.shape)
    if len(shape) != 3:
        raise InputError(f"expected a 3D image, got shape {image.shape} ({len(image.shape)}D)", participant, path)
    if not grid.matches(shape, image.affine, atol=1e-3):
        raise InputError(
            f"grid differs from the cohort's: shape {tuple(shape)} vs {grid.shape}, affine\n"
            f"{np.round(image.affine, 4)}\nvs\n{np.round(grid.affine, 4)}", participant, path)


_NIFTI_BY_HEADER_SIZE = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def load_image(path: Path):
    """Load a NIfTI (.nii, .nii.gz) or FreeSurfer (.mgh, .mgz) image from one read of the file.

    Returns ``(image, sha256 of the file)``. Compressed files are inflated in one call by
    ISA-L (python-isal) rather than streamed through Python's gzip module (faster than
    ``nib.load`` for whole volumes: ``benchmarks/ingest_throughput.py``); other formats go through ``nib.load``.
    """
    raw = path.read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    name = path.name.lower()
    content = igzip.decompress(raw) if name.endswith((".gz", ".mgz")) else raw
    if name.endswith((".nii", ".nii.gz")):
        size = int.from_bytes(content[:4], "little")
        size = size if size in _NIFTI_BY_HEADER_SIZE else int.from_bytes(content[:4], "big")
        if size not in _NIFTI_BY_HEADER_SIZE:
            raise ValueError(f"not a NIfTI-1 or NIfTI-2 header (sizeof_hdr {size})")
        return _NIFTI_BY_HEADER_SIZE[size].from_bytes(content), sha256
    if name.endswith((".mgz", ".mgh")):
        return nib.MGHImage.from_bytes(content), sha256
    return nib.load(path), sha256


@dataclass(frozen=True)
class MaskIndex:
    """The mask's voxels as (i, j, k) index arrays and as flat indices in C and Fortran order."""

    indices: tuple[np.ndarray, np.ndarray, np.ndarray]
    c_order: np.ndarray
    fortran: np.ndarray

    @classmethod
    def from_indices(cls, indices, shape) -> MaskIndex:
        indices = tuple(np.asarray(axis, dtype=np.intp) for axis in indices)
        return cls(indices, np.ravel_multi_index(indices, shape), np.ravel_multi_index(indices, shape, order="F"))

    def __len__(self) -> int:
        return len(self.c_order)


def read_masked(path: Path, grid: Grid, mask: MaskIndex, dtype: str, participant: str,
                known_labels: np.ndarray | None = None):
    """Read one image; check it (readable, 3D, on ``grid``, finite, fits ``dtype``, labels in ``known_labels``).

    Returns ``(values inside the mask as dtype, sha256 of the file)``.
    """
    try:
        image, sha256 = load_image(path)
    except Exception as error:  # gzip, zlib and nibabel raise many types for unreadable files
        raise InputError(f"unreadable or truncated image: {error}", participant, path) from None
    _check_header(image, grid, participant, path)
    try:
        volume = np.asanyarray(image.dataobj)
    except Exception as error:
        raise InputError(f"unreadable or truncated image: {error}", participant, path) from None
    volume = volume.reshape(spatial_shape(volume.shape))
    # NIfTI data are usually Fortran-ordered: index the flat view in its own memory order
    flat = mask.fortran if volume.flags.f_contiguous else mask.c_order
    values = volume.ravel(order="K")[flat] if volume.flags.forc else volume[mask.indices]
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))
        first = tuple(int(axis[bad[0]]) for axis in mask.indices)
        raise InputError(f"{bad.size} NaN/Inf voxel(s) inside the brain mask (first at grid index {first})",
                         participant, path)
    stored = values.astype(dtype, copy=False)
    if np.issubdtype(np.dtype(dtype), np.integer) and not np.array_equal(stored, values):
        raise InputError(f"values do not fit the modality's dtype {dtype} (e.g. {values[stored != values][0]})",
                         participant, path)
    if known_labels is not None:
        unknown = np.setdiff1d(np.unique(stored), known_labels)
        if unknown.size:
            raise InputError(f"label(s) {unknown[:10].tolist()}{' …' if unknown.size > 10 else ''} are not in the "
                             "modality's label table", participant, path)
    return stored, sha256


def known_labels(modality: Modality) -> np.ndarray | None:
    """The labels a label volume may hold: 0 (no region) and its table's."""
    if modality.labels is None:
        return None
    return np.union1d([0], label_table(modality.labels).index.to_numpy())
