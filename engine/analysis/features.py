"""Structural features: FreeSurfer stats files, features from voxel maps, and per-subject tables.

Every table comes out tidy (one row per participant × structure × measure) or wide
(subject × region DataArrays) so it joins the cohort on ``participant_id``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from engine.analysis.atlas import Atlas, region_reduce
from engine.data.inputs import key_columns, scan_ids
from engine.data.masker import grid_of
from engine.tasks import INLINE, Execution

TIDY_COLUMNS = ["participant_id", "structure", "hemisphere", "measure", "value", "unit"]
# Columns of ?h.aparc*.stats tables and the measure each holds.
APARC_MEASURES = {"NumVert": ("vertices", "unitless"), "SurfArea": ("surface_area", "mm^2"),
                  "GrayVol": ("gray_matter_volume", "mm^3"), "ThickAvg": ("thickness_mean", "mm"),
                  "ThickStd": ("thickness_sd", "mm"), "MeanCurv": ("mean_curvature", "mm^-1"),
                  "GausCurv": ("gaussian_curvature", "mm^-2"), "FoldInd": ("folding_index", "unitless"),
                  "CurvInd": ("curvature_index", "unitless")}


def read_stats(path: str | Path) -> tuple[dict[str, tuple[float, str]], pd.DataFrame, dict[str, str]]:
    """Parse a FreeSurfer ``.stats`` file (mri_segstats or mris_anatomical_stats).

    Returns ``(measures, table, header)``: header measures as ``{short name: (value, unit)}``
    (e.g. ``eTIV``, ``BrainSegVol``, ``MeanThickness``), the structure table with its own
    column headers, and the other ``# key value`` header lines (``hemi``, ``subjectname``, ...).
    """
    path = Path(path)
    measures, header, rows, columns = {}, {}, [], None
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"{path}: cannot read FreeSurfer stats file: {error.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if line.startswith("# Measure "):
            parts = [part.strip() for part in line[len("# Measure "):].split(",")]
            if len(parts) != 5:
                raise ValueError(f"{path}, line {number}: malformed Measure line {line!r}")
            measures[parts[1]] = (float(parts[3]), parts[4])
        elif line.startswith("# ColHeaders"):
            columns = line.split()[2:]
        elif line.startswith("#"):
            match = re.match(r"#\s+(\w+)\s+(.*\S)", line)
            if match and match.group(1) not in ("TableCol", "Measure"):
                header.setdefault(match.group(1), match.group(2))
        elif line.strip():
            if columns is None:
                raise ValueError(f"{path}, line {number}: table row before the '# ColHeaders' line")
            fields = line.split()
            if len(fields) != len(columns):
                raise ValueError(f"{path}, line {number}: {len(fields)} fields, the ColHeaders line has {len(columns)}")
            rows.append(fields)
    if columns is None:
        raise ValueError(f"{path}: no '# ColHeaders' line; not a FreeSurfer stats table")
    table = pd.DataFrame(rows, columns=columns)
    for column in table.columns:
        converted = pd.to_numeric(table[column], errors="coerce")
        if converted.notna().all():
            table[column] = converted
    return measures, table, header


def _hemisphere(path: Path, header: dict) -> str:
    if header.get("hemi") in ("lh", "rh"):
        return header["hemi"]
    match = re.match(r"^(lh|rh)\.", path.name)
    if not match:
        raise ValueError(f"{path}: cannot tell the hemisphere (no '# hemi' line, name does not start lh./rh.)")
    return match.group(1)


def aseg_table(participant_id: str, path: str | Path) -> pd.DataFrame:
    """Tidy rows of an ``aseg.stats``: volume per structure plus the header measures (eTIV, ...)."""
    measures, table, _ = read_stats(path)
    if not {"StructName", "Volume_mm3"} <= set(table.columns):
        raise ValueError(f"{path}: an aseg.stats table needs StructName and Volume_mm3 columns")
    rows = pd.DataFrame({
        "participant_id": participant_id, "structure": table["StructName"],
        "hemisphere": table["StructName"].map(_structure_hemisphere), "measure": "volume",
        "value": table["Volume_mm3"].astype(float), "unit": "mm^3"})
    header = pd.DataFrame([{"participant_id": participant_id, "structure": name, "hemisphere": "both",
                            "measure": "global", "value": value, "unit": unit}
                           for name, (value, unit) in measures.items()])
    return pd.concat([rows, header], ignore_index=True)[TIDY_COLUMNS]


def _structure_hemisphere(name: str) -> str:
    lowered = name.lower()
    return "lh" if lowered.startswith("left") else "rh" if lowered.startswith("right") else "both"


def aparc_table(participant_id: str, path: str | Path) -> pd.DataFrame:
    """Tidy rows of an ``lh/rh.aparc(.DKTatlas|.a2009s).stats``: volume, thickness, area, vertices."""
    path = Path(path)
    measures, table, header = read_stats(path)
    hemisphere = _hemisphere(path, header)
    if "StructName" not in table.columns:
        raise ValueError(f"{path}: an aparc stats table needs a StructName column")
    long = table.melt(id_vars="StructName", value_vars=[c for c in table.columns if c in APARC_MEASURES],
                      var_name="column", value_name="value")
    rows = pd.DataFrame({
        "participant_id": participant_id, "structure": long["StructName"], "hemisphere": hemisphere,
        "measure": long["column"].map(lambda column: APARC_MEASURES[column][0]),
        "value": long["value"].astype(float), "unit": long["column"].map(lambda column: APARC_MEASURES[column][1])})
    header_rows = pd.DataFrame([{"participant_id": participant_id, "structure": name, "hemisphere": hemisphere,
                                 "measure": "global", "value": value, "unit": unit}
                                for name, (value, unit) in measures.items()])
    return pd.concat([rows, header_rows], ignore_index=True)[TIDY_COLUMNS]


#: Participants whose FreeSurfer stats one task reads (5 small files each): with one each, scheduling the tasks
#: and gathering their small results outweighs the reading.
STATS_PARTICIPANTS_PER_TASK = 16


@dataclass(frozen=True)
class _StatsFiles:
    """Some participants' FreeSurfer stats files to read (a task of :func:`freesurfer_table`)."""

    subjects_dir: Path
    participant_ids: tuple[str, ...]
    parcellations: tuple[str, ...]


def freesurfer_table(subjects_dir: str | Path, participant_ids, parcellations=("aparc",),
                     execution: Execution = INLINE) -> pd.DataFrame:
    """Tidy table of every participant's ``stats/aseg.stats`` and ``stats/?h.<parcellation>.stats``.

    ``parcellations`` may name ``aparc``, ``aparc.DKTatlas``, ``aparc.a2009s``. A listed
    participant without its files is an error naming the file. The files are read by tasks of
    ``execution``, ``STATS_PARTICIPANTS_PER_TASK`` participants each.
    """
    participant_ids, size = list(participant_ids), STATS_PARTICIPANTS_PER_TASK
    items = [_StatsFiles(Path(subjects_dir), tuple(participant_ids[start:start + size]), tuple(parcellations))
             for start in range(0, len(participant_ids), size)]
    parts = dict(execution.map(_read_freesurfer_stats, items))
    return pd.concat([parts[item] for item in items], ignore_index=True)


def _read_freesurfer_stats(item: _StatsFiles) -> pd.DataFrame:
    """The rows of :func:`freesurfer_table` of some participants."""
    parts = []
    for pid in item.participant_ids:
        stats = item.subjects_dir / pid / "stats"
        files = [(aseg_table, stats / "aseg.stats")] + [(aparc_table, stats / f"{hemi}.{parcellation}.stats")
                                                        for parcellation in item.parcellations
                                                        for hemi in ("lh", "rh")]
        for reader, path in files:
            if not path.is_file():
                raise FileNotFoundError(f"participant {pid}: FreeSurfer stats file {path} not found")
            table = reader(pid, path)
            if reader is aparc_table:
                table = table.assign(structure=table["structure"].map(lambda s, p=path: f"{_parcellation(p)}:{s}"))
            parts.append(table)
    return pd.concat(parts, ignore_index=True)


def _parcellation(path: Path) -> str:
    return path.name.split(".", 1)[1].removesuffix(".stats")


def freesurfer_measure(table: pd.DataFrame, measure: str) -> pd.DataFrame:
    """One measure of :func:`freesurfer_table` per participant (and region), regions named as in FreeSurfer's
    label table, so they join relevance reduced in each participant's own aparc+aseg parcels.

    ``measure`` is ``volume`` (aseg structures: ``Left-Hippocampus``; FreeSurfer 6's ``-Thalamus-Proper``
    is read as FreeSurfer 7's ``-Thalamus``), ``<parcellation>.<measure>`` of the cortical tables
    (``aparc.thickness_mean``, ``aparc.DKTatlas.gray_matter_volume``: regions ``ctx-lh-superiorfrontal``;
    ``aparc.a2009s``: ``ctx_lh_G_front_sup``), or a header measure (``eTIV``, ``MeanThickness``: no region
    column, one value per participant; per hemisphere ones come from the aseg table).
    A structure a participant does not have (no voxel in aseg.stats, no vertex in a cortical table) is
    missing (NaN), not 0. Returns the key columns (``participant_id``, and ``session_id`` with sessions),
    (``region``,) ``value``.
    """
    ids = key_columns(table)
    parcellation, _, name = measure.rpartition(".")
    cortical = table["structure"].str.contains(":", regex=False)  # "<parcellation>:<region>" rows
    if not parcellation:
        aseg = table[~cortical]
        if name == "volume":
            rows = aseg[aseg["measure"] == "volume"]
            region = rows["structure"].str.replace("-Thalamus-Proper", "-Thalamus", regex=False)
            value = rows["value"].where(rows["value"] > 0)  # aseg.stats lists structures it found no voxel of
            return rows[ids].assign(region=region, value=value)
        rows = aseg[(aseg["measure"] == "global") & (aseg["structure"] == name)]
    else:
        parcels = table[table["structure"].str.startswith(f"{parcellation}:")]
        rows = parcels[parcels["measure"] == name]
        if not rows.empty:
            separator = "_" if parcellation == "aparc.a2009s" else "-"
            region = ("ctx" + separator + rows["hemisphere"] + separator
                      + rows["structure"].str.slice(len(parcellation) + 1))
            keys = [*ids, "hemisphere", "structure"]
            vertices = parcels[parcels["measure"] == "vertices"].set_index(keys)["value"]
            found = pd.MultiIndex.from_frame(rows[keys]).map(vertices.to_dict()).to_numpy() != 0  # no vertex: absent
            return rows[ids].assign(region=region, value=rows["value"].where(found))
    if rows.empty:
        header = table.loc[~cortical & (table["measure"] == "global"), "structure"]
        regional = table[cortical & (table["measure"] != "global")]
        available = sorted({"volume", *header, *(regional["structure"].str.split(":").str[0] + "."
                                                  + regional["measure"])})
        raise ValueError(f"the FreeSurfer table has no measure {measure!r} (available: {', '.join(available)})")
    return rows[[*ids, "value"]]


# ---------------------------------------------------------------------------------------
# Features from voxel maps in the store (lazy)


def regional_volume(probability: xr.DataArray, atlas: Atlas) -> xr.DataArray:
    """Regional tissue volume in mm³ from a probability map (e.g. GM): Σ probability × voxel volume."""
    volume = region_reduce(probability, atlas)["sum"] * grid_of(probability).voxel_volume
    return volume.rename("volume_mm3").assign_attrs(units="mm^3", source=str(probability.name), atlas=atlas.name)


def tract_mean(fa: xr.DataArray, atlas: Atlas, threshold: float = 0.2) -> xr.DataArray:
    """Mean FA per tract over the voxels whose FA exceeds ``threshold`` (0.2, as in the study)."""
    above = fa.where(fa > threshold)
    reduced = region_reduce(above.fillna(0), atlas)["sum"]
    counts = region_reduce((fa > threshold).astype(np.float32), atlas)["sum"]
    return (reduced / counts.where(counts > 0)).rename("fa_mean").assign_attrs(threshold=threshold, atlas=atlas.name)


def lesion_mask(lesions: xr.DataArray, threshold: float | None = None) -> xr.DataArray:
    """A binary (uint8) lesion mask: where a lesion-probability map is at least ``threshold``, or where a mask is
    nonzero (``None``). Lazy; the store's coordinates and grid stay."""
    inside = lesions > 0 if threshold is None else lesions >= threshold
    return inside.astype(np.uint8).assign_attrs(lesions.attrs).rename(lesions.name)


def lesion_load(lesions: xr.DataArray) -> xr.Dataset:
    """Per subject: lesion voxel count and volume in mm³ from a binary lesion mask modality."""
    count = (lesions > 0).sum("voxel")
    return xr.Dataset({"lesion_voxels": count,
                       "lesion_volume_mm3": count * grid_of(lesions).voxel_volume})


def lesion_relevance(lesions: xr.DataArray, relevance: xr.DataArray) -> xr.Dataset:
    """Per subject (and any other dims of ``relevance``): relevance inside lesions, as the study computed it.

    ``lesions`` is a binary lesion (or PVS) mask modality and ``relevance`` maps of the same
    subjects and voxels. Returns ``lesion_voxels``, ``lesion_relevance`` (Σ R over lesion
    voxels), ``lesion_positive_share`` (share of the positive relevance that lies in lesions),
    ``uniform_share`` (the share expected if relevance were uniform: lesion voxels / voxels) and
    their ratio ``share_ratio`` (> 1: relevance concentrates in lesions). Subjects without
    lesions or positive relevance get NaN shares. Lazy.
    """
    if "subject" not in relevance.dims or "voxel" not in relevance.dims:
        raise ValueError(f"relevance needs 'subject' and 'voxel' dims, got {relevance.dims}")
    missing = sorted(set(relevance.subject.values) - set(lesions.subject.values))
    if missing:
        raise ValueError(f"relevance maps of {missing[:5]} have no lesion mask in the store")
    if lesions.sizes["voxel"] != relevance.sizes["voxel"]:
        raise ValueError(f"lesion masks have {lesions.sizes['voxel']} voxels, relevance maps "
                         f"{relevance.sizes['voxel']}: not the same cohort mask")
    inside = (lesions.sel(subject=relevance.subject.values) > 0)
    inside = inside.drop_vars([name for name in inside.coords if name not in inside.dims])
    positive = relevance.clip(min=0)
    count = inside.sum("voxel")
    positive_total = positive.sum("voxel")
    share = (positive.where(inside, 0).sum("voxel") / positive_total.where(positive_total > 0)).where(count > 0)
    uniform = (count / relevance.sizes["voxel"]).where(count > 0)
    return xr.Dataset({"lesion_voxels": count, "lesion_relevance": relevance.where(inside, 0).sum("voxel"),
                       "lesion_positive_share": share, "uniform_share": uniform, "share_ratio": share / uniform})


def join_on_participant(features: pd.DataFrame, participants: pd.DataFrame, source: str = "features") -> pd.DataFrame:
    """Left-join a per-participant or per-scan table onto the scans (``participants``' key columns): a table with
    ``session_id`` joins scan by scan, one without it gives each participant's value to all their scans. IDs that
    match nobody, and a scan (or participant) listed twice, are errors."""
    if "participant_id" not in features.columns:
        raise ValueError(f"{source}: no 'participant_id' column (columns: {list(features.columns)})")
    if "session_id" in features.columns and "session_id" not in participants.columns:
        raise ValueError(f"{source}: has a 'session_id' column, but the cohort has no sessions")
    keys = key_columns(features)
    listed = pd.Index(scan_ids(features))
    unknown = sorted(set(listed) - set(scan_ids(participants[keys].drop_duplicates())))
    if unknown:
        what = ("participant IDs", "participant") if keys == ["participant_id"] else ("scans", "scan")
        raise ValueError(f"{source}: {what[0]} {unknown[:10]}{' …' if len(unknown) > 10 else ''} match no "
                         f"{what[1]} in the cohort")
    if listed.duplicated().any():
        raise ValueError(f"{source}: {sorted(listed[listed.duplicated()].unique())[:10]} appear more than once")
    return participants.merge(features, on=keys, how="left", validate="many_to_one")


def read_feature_table(path: str | Path) -> pd.DataFrame:
    """A per-subject table from CSV, TSV or Parquet with a ``participant_id`` column."""
    path = Path(path)
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    else:
        table = pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ",")
    if "participant_id" not in table.columns:
        raise ValueError(f"{path}: no 'participant_id' column (columns: {list(table.columns)})")
    return table.astype({key: str for key in key_columns(table)})
