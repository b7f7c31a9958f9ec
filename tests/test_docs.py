"""The documentation: the site builds in strict mode, its references come from the code, its examples run.

A page's ```python blocks run, in order and in one namespace per page, against the demo workspace of the tests
(``workspace/demo`` stands for it); ```py blocks are shown, not run. In ```bash blocks, ``relcohort status``
and ``relcohort validate`` lines run too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from pipelines.catalog import Catalog, load_catalog
from pipelines.reference import catalog_fields, catalog_reference
from tests.helpers import REPO, Study, cli

PAGES = sorted((REPO / "docs/pages").rglob("*.md"))
DOCUMENTS = [REPO / "README.md", *PAGES]
#: Banners of MkDocs' plugins about MkDocs' future, which a reader of the build cannot act on.
QUIET = {"DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}[^\n]*\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_the_site_builds_offline_in_strict_mode_with_its_generated_pages(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "docs/mkdocs.yml"),
                             "--site-dir", str(site)], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, **QUIET})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr
    catalog = (site / "reference/catalog/index.html").read_text()
    assert "subjects_per_chunk" in catalog and "finetune_from" in catalog
    api = (site / "reference/api/models/index.html").read_text()
    assert "open_relevance" in api and "PresetA" in api  # from the docstrings
    benchmarks = (site / "benchmarks/index.html").read_text()
    assert "attribution_cost" in benchmarks and "machine" in benchmarks
    assert "relcohort validate" in (site / "reference/cli/index.html").read_text()


def _models_in(node: dict) -> list[tuple[str, str]]:
    """(path suffix, name in ``$defs``) of the settings models one JSON-schema property holds."""
    found = []
    for choice in node.get("anyOf", node.get("oneOf", [node])):
        for key, suffix in (("$ref", ""), ("items", "[]"), ("additionalProperties", ".<name>")):
            value = choice.get(key)
            if key == "$ref" and value:
                found.append((suffix, value.rsplit("/", 1)[-1]))
            elif isinstance(value, dict):  # a list's or a mapping's values: a model, or a union holding models
                found += [(suffix + inner, model) for inner, model in _models_in(value)]
    return found


def _schema_paths(schema: dict, node: dict, prefix: str, paths: set[str]) -> None:
    """Every field path of pydantic's own JSON schema of the catalog (``$ref``s followed)."""
    for name, field in node.get("properties", {}).items():
        paths.add(prefix + name)
        for suffix, model in _models_in(field):
            _schema_paths(schema, schema["$defs"][model], f"{prefix}{name}{suffix}.", paths)


def test_the_catalog_reference_holds_every_field_of_the_schema():
    """The generated page against pydantic's own JSON schema of the catalog: the same fields, each with a
    description, and each in the page."""
    schema = Catalog.model_json_schema(by_alias=True)
    expected: set[str] = set()
    _schema_paths(schema, schema, "", expected)
    fields = catalog_fields()
    assert {field.path for field in fields} == expected
    assert all(field.description for field in fields)
    page = catalog_reference()
    for field in fields:
        section = f"## `{field.section}`" if field.section else "## Top level"
        name = field.path.rsplit(".", 1)[-1] if field.section else field.path
        assert f"| `{name}` |" in page.split(section, 1)[1].split("\n## ", 1)[0], field.path


@pytest.mark.slow
@pytest.mark.parametrize("path", [path for path in DOCUMENTS if blocks(path, "python")],
                         ids=lambda path: str(path.relative_to(REPO)))
def test_every_python_example_runs_on_the_demo_workspace(path, demo_workspace, tmp_path, monkeypatch):
    code = blocks(path, "python")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in code:
        exec(compile(block.replace("workspace/demo", str(demo_workspace / "ws")), str(path), "exec"), namespace)


def test_the_commands_shown_run():
    """``relcohort validate`` of the catalogs the pages name, and ``relcohort status`` of a workspace."""
    validated = set()
    for path in DOCUMENTS:
        for block in blocks(path, "bash"):
            for line in block.splitlines():
                words = line.split("#")[0].split()
                if len(words) >= 3 and words[0].endswith("relcohort") and words[1] == "validate" and \
                        (REPO / words[2]).is_file():
                    validated.add(words[2])
    assert validated  # the pages show it
    for catalog in sorted(validated):
        result = cli("validate", REPO / catalog)
        assert result.exit_code == 0, (catalog, result.stderr)


@pytest.mark.parametrize("path", sorted((REPO / "docs").glob("catalog-*.yaml")), ids=lambda path: path.stem)
def test_every_catalog_in_docs_is_a_valid_catalog(path):
    """The variants' catalogs parse and pass the schema's checks (the MS catalog's fine-tuning source is another
    workspace's models, which validate checks once that catalog has run)."""
    catalog, _ = load_catalog(path)
    assert catalog.workspace.parent == REPO / "workspace"


@pytest.mark.slow
def test_status_as_the_pages_show_it(demo_workspace):
    shown = [line for path in DOCUMENTS for block in blocks(path, "bash") for line in block.splitlines()
             if re.search(r"relcohort status workspace/demo\b", line)]
    assert shown
    result = cli("status", demo_workspace / "ws")
    assert result.exit_code == 0 and "ensembles/t1/relevance.zarr" in result.stdout


def test_the_readme_is_short_and_its_catalog_is_a_valid_catalog(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    (catalog,) = blocks(REPO / "README.md", "yaml")
    path = tmp_path / "my_study.yaml"
    path.write_text(catalog)
    parsed, _ = load_catalog(path)
    assert parsed.train.target == "age" and list(parsed.modalities) == ["T1", "GM"]
    assert yaml.safe_load(catalog)["cohort"]["space"] == "MNI152NLin2009cAsym"


def test_the_readmes_family_wise_error_rates_are_the_benchmarks():
    """The README's statistics paragraph states what benchmarks/roi_family_wise_error.py recorded."""
    readme = " ".join((REPO / "README.md").read_text().split())
    record = json.loads((REPO / "benchmarks/results/roi_family_wise_error.json").read_text())
    rows = {row["p-value"]: row for row in record["results"]}
    fwe, uncorrected = rows["p_fwe"], rows["p_permutation"]
    assert (f"In {fwe['cohorts']} simulated cohorts without any effect ({fwe['participants']} participants, "
            f"{fwe['regions']} correlated regions)") in readme
    assert (f"{100 * fwe['family_wise_error_rate']:.1f} % of the cohorts (95 % CI {100 * fwe['ci_low']:.1f}–"
            f"{100 * fwe['ci_high']:.1f} %)") in readme
    assert f"did in {100 * uncorrected['family_wise_error_rate']:.0f} %" in readme


def test_the_readmes_repeated_scans_numbers_are_the_benchmarks():
    """The README's sentences on several scans per participant state what benchmarks/block_permutation.py and
    benchmarks/split_leakage.py recorded."""
    readme = " ".join((REPO / "README.md").read_text().split())
    blocks = json.loads((REPO / "benchmarks/results/block_permutation.json").read_text())["results"]
    whole = next(row for row in blocks if row["permuted"] == "whole participants")
    rows = next(row for row in blocks if row["predictor"] == "between-participant" and row["permuted"] != "whole "
                "participants")
    assert (f"In {whole['cohorts']} null cohorts of {whole['participants']} participants with 2–4 strongly "
            "correlated scans each") in readme
    assert (f"in {100 * whole['family_wise_error_rate']:.1f} % (95 % CI {100 * whole['ci_low']:.1f}–"
            f"{100 * whole['ci_high']:.1f} %) with whole participants permuted and in "
            f"{100 * rows['family_wise_error_rate']:.0f} % with scans permuted as if they were participants") in readme
    leakage = {row["split_by"]: row for row in
               json.loads((REPO / "benchmarks/results/split_leakage.json").read_text())["results"]}
    assert (f"from {leakage['participant']['test_mae_mean']:.1f} years (split by participant) to "
            f"{leakage['scan']['test_mae_mean']:.1f} years (split by scan)") in readme


def test_the_readmes_validate_example_is_what_validate_prints(tiny_cohort, tmp_path):
    """A study broken as the README says (a misspelt target, one scan on another grid, a mask naming no space)."""
    study = Study(tiny_cohort, tmp_path)
    study.catalog["train"]["target"] = "groupp"
    study.regrid(study.root / "sub-0001/anat/sub-0001_T1w.nii.gz", 16.0)
    mask = nib.load(study.root / "mask.nii.gz")
    unnamed = nib.Nifti1Image(np.asanyarray(mask.dataobj), mask.affine)
    unnamed.set_sform(mask.affine, code=1)
    unnamed.set_qform(mask.affine, code=1)
    nib.save(unnamed, study.root / "mask.nii.gz")
    del study.catalog["cohort"]["space"]
    printed = cli("validate", study.write()).stderr
    printed = printed.replace(str(study.root), "/data/my_study").replace(str(tmp_path / "catalog.yaml"),
                              "/data/my_study.yaml")
    (shown,) = [block for block in blocks(REPO / "README.md", "text") if block.startswith("error:")]
    assert printed == shown


#: What narrating the project's development looks like: dates, machines, what was tried.
NARRATION = [r"\b20\d\d-\d\d-\d\d\b", r"\b(AMD|EPYC|Xeon|Intel)\b", r"this session", r"\bwas tried\b",
             r"\btried and\b", r"\bno longer\b", r"\bpreviously\b"]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_no_page_narrates_the_projects_development(path):
    text = path.read_text()
    found = [pattern for pattern in NARRATION if re.search(pattern, text)]
    assert found == []
