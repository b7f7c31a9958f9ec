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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from isal import igzip

from engine.data.grid import Grid
from engine.data.labels import label_table


class InputError(ValueError):
    """A participant's input is unusable; the message names the participant (and session), file and problem."""

    def __init__(self, problem: str, participant: str | None = None, file: str | Path | None = None,
                 session: str | None = None):
        self.problem, self.participant, self.session = problem, participant, session
        self.file = None if file is None else str(file)
        where = ", ".join(part for part in (
            f"participant {participant}" if participant else "",
            f"session {session}" if session else "",
            f"file {file}" if file else "",
        ) if part)
        super().__init__(f"{where}: {problem}" if where else problem)

    @property
    def scan(self) -> str | None:
        """The store row the problem concerns (:func:`scan_id`), if it concerns one."""
        return None if self.participant is None else scan_id(self.participant, self.session)

    def as_dict(self) -> dict:
        session = {} if self.session is None else {"session_id": self.session}
        return {"participant_id": self.participant, **session, "file": self.file, "problem": self.problem}


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
    #: found by pybids instead of a template (:class:`BidsIndex`): each scan's file, by scan ID, and the files of
    #: scans that are not listed
    found: BidsFiles | None = None


@dataclass(frozen=True)
class BidsFiles:
    """A modality's files in a BIDS dataset (:meth:`BidsIndex.files`): by scan ID, and the problems found."""

    by_scan: dict[str, Path]
    problems: tuple[InputError, ...] = ()


class BidsIndex:
    """One pybids index of a BIDS dataset, made once (without the JSON sidecars' metadata, the slow part of
    indexing) and asked per modality: which file each scan has."""

    def __init__(self, root: str | Path):
        from bids import BIDSLayout, BIDSLayoutIndexer

        self.root = Path(root)
        try:
            self.layout = BIDSLayout(self.root, indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
        except Exception as error:  # pybids raises many kinds for a tree it cannot read
            raise InputError(f"pybids cannot read the BIDS dataset: {type(error).__name__}: {error}",
                             file=self.root) from None

    def files(self, modality: str, entities: dict[str, str], scans: pd.DataFrame) -> BidsFiles:
        """The files of ``entities`` (``suffix`` and any other entity pybids names) for the scans of ``scans`` (the
        participants or scans table). Two files for one scan (e.g. two runs) are a problem naming the entity to
        add; a file of a participant or session not in the table is a problem too."""
        query = {"extension": [".nii.gz", ".nii"], **entities}
        found = self.layout.get(return_type="object", **query)
        listed = set(scan_ids(scans))
        by_scan, problems = {}, []
        for item in found:
            named = item.get_entities()
            pid, session = f"sub-{named['subject']}", named.get("session")
            scan = scan_id(pid, None if session is None else f"ses-{session}")
            if scan not in listed:
                problems.append(InputError(f"{modality} file of a participant or session not in the participants "
                                           "(or sessions) tables", file=item.path))
            elif scan in by_scan:
                others = sorted(set(named) - {"subject", "session", "suffix", "extension", "datatype"})
                problems.append(InputError(
                    f"{modality}: two files match {entities} ({Path(by_scan[scan]).name}, {Path(item.path).name}); "
                    f"name the one to use with more entities in modalities.{modality}.bids (the files differ in "
                    f"{', '.join(others) or 'their extension'})", pid, item.path,
                    None if session is None else f"ses-{session}"))
            else:
                by_scan[scan] = Path(item.path)
        return BidsFiles(by_scan, tuple(problems))


# ---------------------------------------------------------------------------------------
# Participants table and files


def read_participants(path: str | Path) -> pd.DataFrame:
    """Read a BIDS ``participants.tsv`` (or .csv); check IDs are present and unique, age numeric. A byte-order mark
    (as spreadsheets write UTF-8) and Windows line endings are read as any other table."""
    return _typed(_read_table(path, "participant_id", "participants table"), path)


def _read_table(path: str | Path, key: str, kind: str) -> pd.DataFrame:
    """A TSV (or .csv) as text, its ``key`` column present, filled and unique."""
    path = Path(path)
    separator = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream, delimiter=separator))
    except FileNotFoundError:
        raise InputError(f"{kind} not found", file=path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"malformed {kind}: {error}", file=path) from None
    if not rows or not any(rows[0]):
        raise InputError(f"malformed {kind}: it is empty (no header line)", file=path)
    for number, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(rows[0]):
            raise InputError(f"malformed {kind}: line {number} has {len(row)} fields, "
                             f"the header has {len(rows[0])}", file=path)
    table = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, na_values=["", "n/a", "NA"],
                        index_col=False, encoding="utf-8-sig")
    if key not in table.columns:
        raise InputError(
            f"malformed {kind}: no {key!r} column (columns: {list(table.columns)}; "
            f"expected {'comma' if separator == ',' else 'tab'}-separated values)", file=path)
    missing = table.index[table[key].isna()]
    if len(missing):
        raise InputError(f"malformed {kind}: empty {key} on line(s) {list(missing + 2)}", file=path)
    duplicated = table[key][table[key].duplicated(keep=False)]
    if len(duplicated):
        lines = {value: list(duplicated.index[duplicated == value] + 2) for value in duplicated.unique()}
        what = "participant IDs" if key == "participant_id" else "sessions (one scan listed twice)"
        raise InputError(f"duplicate {what} (with their lines): {lines}", file=path)
    return table


def _typed(table: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Columns whose every value is a number as numbers; an age that is not a number is an error."""
    for column in table.columns.drop(["participant_id", "session_id"], errors="ignore"):
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = table[column].notna() & numbers.isna()
        if column == "age" and bad.any():
            row = bad.idxmax()
            raise InputError(f"age {table[column][row]!r} on line {row + 2} is not a number",
                             participant=table["participant_id"][row], file=path,
                             session=table["session_id"][row] if "session_id" in table else None)
        if not bad.any() and table[column].notna().any():
            table[column] = numbers
    return table


# ---------------------------------------------------------------------------------------
# Sessions: several scans per participant

#: Columns that describe the person, not the scan: a person's sessions may not disagree on them.
PARTICIPANT_LEVEL = ("sex",)
#: BIDS: each participant's sessions and their per-scan columns (age at the scan, diagnosis at the scan, scanner).
SESSIONS_TABLE = "{participant_id}/{participant_id}_sessions.tsv"


def scan_id(participant_id: str, session_id: str | None) -> str:
    """A store row's label: the participant, or ``<participant>_<session>`` (``sub-01_ses-02``, as BIDS names a
    session's files and FreeSurfer a session's cross-sectional subject) in a cohort with sessions."""
    return participant_id if session_id is None else f"{participant_id}_{session_id}"


def scan_keys(table: pd.DataFrame) -> list[tuple[str, str | None]]:
    """Each row's (participant_id, session_id); the session is None in a cohort without sessions."""
    sessions = table["session_id"] if "session_id" in table else [None] * len(table)
    return list(zip(table["participant_id"], sessions, strict=True))


def scan_ids(table: pd.DataFrame) -> list[str]:
    """Each row's :func:`scan_id`."""
    return [scan_id(*key) for key in scan_keys(table)]


def one_scan_each(participant_ids: Sequence[str], which: str) -> np.ndarray:
    """Whether each row (scans in session order) is its participant's ``baseline`` (first) or ``last`` scan."""
    people = pd.Series(np.asarray(participant_ids, dtype=object))
    if which not in ("baseline", "last"):
        raise ValueError(f"one scan each is the baseline or the last, not {which!r}")
    return (people.groupby(people, sort=False).cumcount(ascending=which == "baseline") == 0).to_numpy()


def key_columns(table: pd.DataFrame | Sequence[str]) -> list[str]:
    """The columns that name a table's scan: ``participant_id``, and ``session_id`` in a cohort with sessions."""
    return ["participant_id", "session_id"] if "session_id" in table else ["participant_id"]


def by_scan(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` indexed by its rows' :func:`scan_id` (the store's row labels, index name ``subject``)."""
    return table.set_axis(pd.Index(scan_ids(table), name="subject"))


def _natural(label: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label))


def read_scans(root: str | Path, participants: str | Path, per_session: Sequence[str] = ()) -> pd.DataFrame:
    """The cohort's scans: the participants table where no participant has sessions; otherwise one row per BIDS
    session (``sub-X/ses-Y/`` folders, per-scan columns from ``sub-X/sub-X_sessions.tsv``) with ``participant_id``,
    ``session_id``, the participant's columns and the session's, in session order (``acq_time`` where given, else
    the labels' natural order).

    A column in both tables is an error unless ``per_session`` names it (the session's value then wins, the
    participant's fills sessions without one). Sessions tables without folders (a derivatives tree) list the
    sessions themselves. Problems (a session folder without a row or the reverse, a scan listed twice, a person's
    sessions disagreeing on :data:`PARTICIPANT_LEVEL` columns, ages going backwards) raise one
    :class:`InputError` listing them all, each naming participant, session and file.
    """
    root = Path(root)
    table = _read_table(root / participants, "participant_id", "participants table")
    found = {pid: _sessions_of(root, pid) for pid in table["participant_id"]}
    if not any(folders or sessions is not None for folders, sessions in found.values()):
        return _typed(table, root / participants)
    problems, rows = [], []
    per_participant = table.set_index("participant_id")
    for pid, (folders, sessions) in found.items():
        path = root / SESSIONS_TABLE.format(participant_id=pid)
        if not folders and sessions is None:
            problems.append(InputError("has no session folder (ses-*) and no sessions table, while other "
                                       "participants have sessions", pid, root / pid))
            continue
        if sessions is None:
            sessions = pd.DataFrame({"session_id": folders})
        listed = list(sessions["session_id"])
        problems += [InputError(f"session folder without a row in {path.name}", pid, root / pid / session, session)
                     for session in folders if session not in listed]
        if folders:
            problems += [InputError(f"listed in {path.name} but has no folder {root / pid / session}", pid, path,
                                    session) for session in listed if session not in folders]
        problems += [InputError(f"session label {session!r} does not start with 'ses-'", pid, path, session)
                     for session in listed if not str(session).startswith("ses-")]
        shared = [column for column in sessions.columns.drop(["session_id", "participant_id"], errors="ignore")
                  if column in per_participant.columns and column not in per_session]
        if shared:
            problems.append(InputError(
                f"column(s) {shared} are in both {path.name} and {Path(participants).name}: keep each in one table, "
                "or declare them per session (cohort.per_session) to let the session's value count", pid, path))
            continue
        for _, session in sessions.iterrows():
            row = per_participant.loc[pid].to_dict()
            row.update({name: value for name, value in session.items() if pd.notna(value)})
            rows.append({"participant_id": pid, **row})
    if problems:
        _raise_all(problems)
    scans = _typed(pd.DataFrame(rows), root / participants)
    scans = scans[["participant_id", "session_id", *scans.columns.drop(["participant_id", "session_id"])]]
    return _in_session_order(scans, root, problems)


def _sessions_of(root: Path, pid: str) -> tuple[list[str], pd.DataFrame | None]:
    """A participant's session folders and sessions table (None without one)."""
    folder = root / pid
    folders = sorted((entry.name for entry in folder.glob("ses-*") if entry.is_dir()), key=_natural) \
        if folder.is_dir() else []
    path = root / SESSIONS_TABLE.format(participant_id=pid)
    return folders, _read_table(path, "session_id", "sessions table") if path.is_file() else None


def _in_session_order(scans: pd.DataFrame, root: Path, problems: list[InputError]) -> pd.DataFrame:
    """Sessions in time order; a person's ages go forward and :data:`PARTICIPANT_LEVEL` columns stay the same."""
    order = pd.to_datetime(scans["acq_time"], errors="coerce") if "acq_time" in scans else None
    keys = [_natural(session) for session in scans["session_id"]]
    scans = scans.assign(_when=order if order is not None else 0, _label=keys)
    scans = scans.sort_values(["participant_id", "_when", "_label"], kind="stable", ignore_index=True)
    for pid, sessions in scans.groupby("participant_id", sort=False):
        path = root / SESSIONS_TABLE.format(participant_id=pid)
        if "age" in sessions:
            ages = sessions["age"].to_numpy(float)
            for earlier, later in zip(range(len(ages) - 1), range(1, len(ages)), strict=True):
                if ages[later] < ages[earlier]:
                    problems.append(InputError(
                        f"age goes backwards: {ages[earlier]:g} at {sessions['session_id'].iloc[earlier]}, "
                        f"{ages[later]:g} at the later session", pid, path, sessions["session_id"].iloc[later]))
        for column in PARTICIPANT_LEVEL:
            if column in sessions and sessions[column].nunique() > 1:
                values = dict(zip(sessions["session_id"], sessions[column], strict=True))
                problems.append(InputError(f"the sessions disagree on {column!r}, a participant-level column: "
                                           f"{values}", pid, path))
    if problems:
        _raise_all(problems)
    return scans.drop(columns=["_when", "_label"])


def _raise_all(problems: list[InputError]) -> None:
    if len(problems) == 1:
        raise problems[0]
    lines = "\n".join(f"  - {problem}" for problem in problems)
    raise InputError(f"{len(problems)} problems with the cohort's sessions:\n{lines}")


def _template_regex(template: str) -> re.Pattern:
    pattern, position = "", 0
    for match in re.finditer(r"\{(\w+)\}", template):
        pattern += re.escape(template[position:match.start()])
        name = match.group(1)
        pattern += f"(?P={name})" if f"(?P<{name}>" in pattern else f"(?P<{name}>[^/]+)"
        position = match.end()
    return re.compile(pattern + re.escape(template[position:]) + "$")


def resolve_files(root: str | Path, table: pd.DataFrame, modalities: list[Modality]):
    """Each scan's file per modality, plus the problems: missing files and unlisted files.

    ``table`` is the participants table or, in a cohort with sessions, the scans table (:func:`read_scans`).
    Returns ``(files, problems)``: ``files[scan_id][modality]`` is a path; problems are :class:`InputError` for
    listed scans without a file and files matching a template whose participant (or session) is not listed.
    """
    root = Path(root)
    records = table.astype(object).where(table.notna(), "").to_dict("records")
    has_sessions = "session_id" in table
    files, problems = {}, []
    listed = set(table["participant_id"])
    listed_scans = set(scan_ids(table))
    for modality in modalities:
        if modality.found is not None:
            for record in records:
                pid, session = record["participant_id"], record.get("session_id")
                path = modality.found.by_scan.get(scan_id(pid, session))
                if path is None:
                    problems.append(InputError(f"no {modality.name} file in the BIDS dataset ({modality.template})",
                                               pid, root / pid, session))
                else:
                    files.setdefault(scan_id(pid, session), {})[modality.name] = path
            problems += modality.found.problems
            continue
        if "{participant_id}" not in modality.template:
            raise InputError(f"modality {modality.name}: path template {modality.template!r} must contain "
                             "{participant_id}")
        if has_sessions and "{session_id}" not in modality.template:
            raise InputError(f"modality {modality.name}: path template {modality.template!r} must contain "
                             "{session_id}: the cohort has sessions, and each session's scan is a file of its own")
        for record in records:
            pid, session = record["participant_id"], record.get("session_id")
            try:
                path = root / modality.template.format_map(record)
            except KeyError as error:
                raise InputError(f"modality {modality.name}: template {modality.template!r} names "
                                 f"{error} which is not a participants-table column") from None
            if path.is_file():
                files.setdefault(scan_id(pid, session), {})[modality.name] = path
            else:
                problems.append(InputError(f"no {modality.name} file", pid, path, session))
        regex = _template_regex(modality.template)
        glob = re.sub(r"\{\w+\}", "*", modality.template)
        for path in sorted(root.glob(glob)):
            match = regex.match(path.relative_to(root).as_posix())
            if not match:
                continue
            if match["participant_id"] not in listed:
                problems.append(InputError(
                    f"{modality.name} file belongs to participant {match['participant_id']!r}, "
                    f"who is not in the participants table", file=path))
            elif has_sessions and scan_id(match["participant_id"], match["session_id"]) not in listed_scans:
                problems.append(InputError(
                    f"{modality.name} file belongs to session {match['session_id']!r}, which is not among the "
                    "participant's sessions", match["participant_id"], path, match["session_id"]))
    return files, problems


def spatial_shape(shape: tuple) -> tuple:
    """A shape without a trailing singleton 4th axis (a 3D image saved as one volume)."""
    return tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)


def _check_header(image, grid: Grid, participant: str, path: Path, session: str | None = None) -> None:
    shape = spatial_shape(image.shape)
    if len(shape) != 3:
        raise InputError(f"expected a 3D image, got shape {image.shape} ({len(image.shape)}D)", participant, path,
                         session)
    if not grid.matches(shape, image.affine, atol=1e-3):
        raise InputError(
            f"grid differs from the cohort's: shape {tuple(shape)} vs {grid.shape}, affine\n"
            f"{np.round(image.affine, 4)}\nvs\n{np.round(grid.affine, 4)}", participant, path, session)


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
                known_labels: np.ndarray | None = None, session: str | None = None):
    """Read one image; check it (readable, 3D, on ``grid``, finite, fits ``dtype``, labels in ``known_labels``).

    Returns ``(values inside the mask as dtype, sha256 of the file)``.
    """
    try:
        image, sha256 = load_image(path)
    except Exception as error:  # gzip, zlib and nibabel raise many types for unreadable files
        raise InputError(f"unreadable or truncated image: {error}", participant, path, session) from None
    _check_header(image, grid, participant, path, session)
    try:
        volume = np.asanyarray(image.dataobj)
    except Exception as error:
        raise InputError(f"unreadable or truncated image: {error}", participant, path, session) from None
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
                             "modality's label table", participant, path, session)
    return stored, sha256


def known_labels(modality: Modality) -> np.ndarray | None:
    """The labels a label volume may hold: 0 (no region) and its table's."""
    if modality.labels is None:
        return None
    return np.union1d([0], label_table(modality.labels).index.to_numpy())
