"""The catalog: one YAML file that describes a whole run, validated by pydantic.

Relative paths are resolved against the catalog file's folder. See README "Catalog format".
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster import ClusterProfile, LocalProfile
from engine.store import Modality

MODALITY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RESERVED_NAMES = {"subject", "voxel", "i", "j", "k", "ingest", "participant_id"}
STORED_DTYPES = ("float32", "float64", "int16", "int32", "uint8", "uint16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoCohort(_Strict):
    """Generate the synthetic demo cohort (``engine.synth``) into the workspace."""

    subjects: int = Field(..., ge=1, description="number of participants")
    voxel_size: float = Field(4.0, gt=0, le=12, description="isotropic voxel size in mm")
    seed: int = Field(0, ge=0, description="random seed; participant k is the same for a given seed")


class CohortSource(_Strict):
    """Where the images come from: ``demo`` settings, or a ``directory`` of files."""

    demo: DemoCohort | None = None
    directory: Path | None = Field(None, description="root of the cohort's files")
    participants: Path = Field(Path("participants.tsv"), description="participants table, relative to the root")
    mask: Path = Field(Path("mask.nii.gz"), description="cohort brain mask NIfTI, relative to the root")
    space: str | None = Field(None, description="name of the template space, e.g. MNI152NLin2009cAsym")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.demo is None) == (self.directory is None):
            raise ValueError("give exactly one of 'demo' (generate the demo cohort) or 'directory' (your files)")
        return self


class ModalitySpec(_Strict):
    path: str = Field(..., description="path template relative to the cohort root, with {participant_id}")
    dtype: Literal[STORED_DTYPES] = "float32"

    @field_validator("path")
    @classmethod
    def _names_participant(cls, path: str) -> str:
        if "{participant_id}" not in path:
            raise ValueError("the path template must contain {participant_id}")
        return path


class IngestSettings(_Strict):
    on_error: Literal["fail", "skip"] = Field("fail", description="stop on a bad input, or skip and record it")
    subjects_per_chunk: int = Field(16, ge=1, le=4096)
    voxels_per_chunk: int = Field(65536, ge=1024)


class Catalog(_Strict):
    """A whole run: workspace, cohort, modalities, ingest settings and cluster profile."""

    workspace: Path = Field(..., description="folder for everything the run produces")
    cohort: CohortSource
    modalities: dict[str, ModalitySpec | str] = Field(..., min_length=1)
    ingest: IngestSettings = IngestSettings()
    cluster: ClusterProfile = LocalProfile()

    @field_validator("modalities")
    @classmethod
    def _modality_names(cls, modalities: dict) -> dict:
        for name in modalities:
            if not MODALITY_NAME.match(name) or name in RESERVED_NAMES:
                raise ValueError(f"modality name {name!r} must be an identifier and not one of "
                                 f"{sorted(RESERVED_NAMES)}")
        return {name: ModalitySpec(path=spec) if isinstance(spec, str) else spec for name, spec in modalities.items()}

    # -- derived, resolved against the catalog's folder by ``load_catalog``

    @property
    def cohort_root(self) -> Path:
        return self.cohort.directory if self.cohort.directory is not None else self.workspace / "demo_cohort"

    @property
    def participants_file(self) -> Path:
        return self.cohort_root / self.cohort.participants

    @property
    def mask_file(self) -> Path:
        return self.cohort_root / self.cohort.mask

    def modality_list(self) -> list[Modality]:
        return [Modality(name, spec.path, spec.dtype) for name, spec in self.modalities.items()]


class CatalogError(ValueError):
    """The catalog cannot be used; ``errors`` lists (field, message) pairs."""

    def __init__(self, path: Path, errors: list[tuple[str, str]]):
        self.path, self.errors = path, errors
        lines = "\n".join(f"  {field}: {message}" for field, message in errors)
        super().__init__(f"{path}: {len(errors)} error(s)\n{lines}")


def load_catalog(path: str | Path) -> tuple[Catalog, str]:
    """Parse and validate a catalog; return it with paths resolved, and the sha256 of its text.

    The YAML is read with ``yaml.safe_load`` (no tags that build objects). Every schema error is
    reported with its field in one :class:`CatalogError`.
    """
    path = Path(path).resolve()
    try:
        text = path.read_text()
    except OSError as error:
        raise CatalogError(path, [("(file)", f"cannot read: {error.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        raise CatalogError(path, [(where, f"invalid YAML: {getattr(error, 'problem', error)}")]) from None
    if not isinstance(data, dict):
        raise CatalogError(path, [("(top level)", "the catalog must be a mapping of sections")])
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as error:
        raise CatalogError(path, [(".".join(str(part) for part in item["loc"]) or "(top level)", item["msg"])
                                  for item in error.errors()]) from None
    catalog = _resolve_paths(catalog, path.parent)
    return catalog, hashlib.sha256(text.encode()).hexdigest()


def _resolve_paths(catalog: Catalog, base: Path) -> Catalog:
    def resolve(value: Path) -> Path:
        return (base / value.expanduser()).resolve()

    cohort = catalog.cohort.model_copy(update={"directory": resolve(catalog.cohort.directory)}
                                       if catalog.cohort.directory is not None else {})
    return catalog.model_copy(update={"workspace": resolve(catalog.workspace), "cohort": cohort})


def check_inputs(catalog: Catalog) -> list[tuple[str, str]]:
    """Problems with the files a catalog names that can be seen before running (demo: none)."""
    if catalog.cohort.demo is not None:
        return []
    problems = []
    if not catalog.cohort_root.is_dir():
        problems.append(("cohort.directory", f"{catalog.cohort_root} is not a folder"))
        return problems
    if not catalog.participants_file.is_file():
        problems.append(("cohort.participants", f"{catalog.participants_file} does not exist"))
    if not catalog.mask_file.is_file():
        problems.append(("cohort.mask", f"{catalog.mask_file} does not exist"))
    return problems
