"""The HTML report and the notebook API on a whole tiny run; the report opened in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from engine import open_workspace
from engine.data.masker import Masker
from engine.layout import Layout
from engine.outputs.browser import browser_check, screenshot_sections
from engine.outputs.report import (
    OPTIONAL_SECTIONS,
    SECTIONS,
    _individual_figure,
    _mean_map_figure,
    _robust_limit,
    build_report,
    individual_patients,
)
from engine.outputs.workspace import Association
from engine.tasks import INLINE
from pipelines.catalog import load_catalog
from pipelines.stages import ReportStage

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing and possible; required in CI."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                        ["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            subprocess.run(command, capture_output=True, env=environment, timeout=900)
            found = shutil.which("chromium")
            if found:
                break
    if found is None:
        message = "Chromium is not installed and apt-get could not install it (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def embedded_images(html: str) -> list[np.ndarray]:
    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def spread(pixels: np.ndarray) -> float:
    """Standard deviation of the grey levels (0–1): 0 for a blank image."""
    grey = pixels[..., :3].mean(axis=-1) if pixels.ndim == 3 else pixels
    return float(grey.std())


def coloured_pixels(pixels: np.ndarray) -> int:
    """Clearly coloured pixels (figures' colour maps and markers; text, notes and tables are grey),
    leaving out the section's coloured rule (rows coloured across the page)."""
    rgb = pixels[..., :3].astype(float)
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    return int(coloured[coloured.mean(axis=1) < 0.5].sum())


def test_run_writes_a_report_with_every_section(tiny_workspace):
    report = tiny_workspace / "report.html"
    html = report.read_text()
    for section in set(SECTIONS) - set(OPTIONAL_SECTIONS):
        assert f'<section id="{section}">' in html
    assert "No association analyses" in html  # the tiny run has none: the section says so
    for expected in ("Metrics per member and split", "Ground-truth scores", "Robustness across ensemble members",
                     "lrp: mean relevance", "gradient: top regions", "Package versions", "24</b> participants",
                     "Training per member"):
        assert expected in html
    for member in (0, 1):  # each member's seed and kept epoch, as its card has them
        card = json.loads((tiny_workspace / "models" / f"member_{member}.json").read_text())
        assert f"<td>{card['seed']}</td>" in html and f"<td>{card['best_epoch']}</td>" in html
    figures = embedded_images(html)
    # cohort 1, models 2, relevance 2 mean maps + 1 group figure + 2 top-region charts, validation 1
    assert len(figures) == 9
    assert all(spread(figure) > 0.05 for figure in figures)
    run = json.loads((tiny_workspace / "provenance.json").read_text())["runs"][-1]
    assert run["stages"]["report"]["built"] == 1 and run["stages"]["report"]["report"] == str(report)

    catalog, _ = load_catalog(tiny_workspace.parent / "catalog.yaml")
    written = report.stat().st_mtime_ns
    unchanged = ReportStage().run(catalog, INLINE)
    assert unchanged["built"] == 0  # inputs unchanged: nothing to do
    assert report.stat().st_mtime_ns == written
    assert "report.html" in ReportStage().status(Layout(tiny_workspace))


def test_workspace_api_gives_labelled_objects_and_images(tiny_workspace, tmp_path):
    ws = open_workspace(tiny_workspace)
    assert ws.images.T1.dims == ("subject", "voxel") and "age" in ws.images.coords
    assert ws.relevance.relevance.dims == ("attribution", "member", "subject", "voxel")
    assert {"regional_gm_volume", "lesion_load"} <= set(ws.features) and len(ws.lesion_relevance)
    assert {"ensemble", "0", "1"} == set(ws.predictions.member) and "ensemble" in set(ws.metrics.member)
    assert set(ws.scores.attribution) == {"lrp", "gradient"} and len(ws.robustness) == 2 * 3  # methods × age bands
    assert ws.associations == {} and ws.catalog["train"]["members"] == 2

    mean_map = ws.relevance.relevance_mean.sel(attribution="lrp").mean("subject")
    volume = ws.to_nifti(mean_map).get_fdata()
    np.testing.assert_allclose(volume[mean_map.i, mean_map.j, mean_map.k], mean_map.values, rtol=1e-6)
    with pytest.raises(ValueError, match="select or reduce"):
        ws.to_nifti(ws.relevance.relevance_mean.sel(attribution="lrp"))

    atlas = ws.atlas()
    painted = ws.to_nifti(pd.Series({"Left_Hippocampus": 2.5})).get_fdata()
    inside = atlas.voxel_labels == atlas.regions.index[atlas.regions["name"] == "Left_Hippocampus"][0]
    assert inside.any() and (painted[mean_map.i, mean_map.j, mean_map.k] == np.where(inside, 2.5, 0)).all()

    empty = open_workspace(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"models/metrics.parquet not found: the train stage"):
        _ = empty.metrics
    assert "No images.zarr" in build_report(empty).read_text()


def test_the_workspace_api_names_what_is_missing_or_misspelt(tiny_workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no workspace at .*nowhere"):
        open_workspace(tmp_path / "nowhere")
    ws = open_workspace(tiny_workspace)
    with pytest.raises(ValueError, match=r"no ensemble 't2' in .* \(ensembles: \[None\]\)"):
        ws.for_ensemble("t2")
    with pytest.raises(ValueError, match="unknown workspace part 'relevnce'; known: images, relevance"):
        ws.has("relevnce")
    with pytest.raises(TypeError, match="to_nifti takes a DataArray, a Series by region or a NIfTI image, got list"):
        ws.to_nifti([1.0, 2.0])
    with pytest.raises(ValueError, match=r"regions \['Left_Hipocampus'\] are not in atlas"):
        ws.to_nifti(pd.Series({"Left_Hipocampus": 1.0}))
    with pytest.raises(FileNotFoundError, match=r"provenance.json not found: the workspace was not made by"):
        _ = open_workspace(tmp_path).provenance

    analysis = tmp_path / "associations/age"
    analysis.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"summary.json not found: not an association result"):
        Association(analysis)
    (analysis / "summary.json").write_text(json.dumps({"name": "age"}))
    with pytest.raises(ValueError, match=r"summary.json: field 'scope' .* is missing"):
        Association(analysis)
    (analysis / "summary.json").write_text(json.dumps({"name": "age", "scope": "voxel"}))
    voxel = Association(analysis)
    assert repr(voxel) == "Association('age', scope='voxel', maps=[])"
    with pytest.raises(FileNotFoundError, match=r"t.nii.gz not found; this analysis has maps \[\]"):
        voxel.map("t")
    with pytest.raises(FileNotFoundError, match="no p_fwe or p_fdr map to threshold with"):
        voxel.thresholded()


def write_associations(workspace: Path) -> None:
    """Fixture files in the association stage's layout: a voxel-wise and an ROI-wise model, a gain table, a
    similarity table, a per-participant model, and two ensembles' region correlations (cortical and subcortical)
    with the same predictor."""
    images = open_workspace(workspace).images
    row = xr.zeros_like(images.T1.isel(subject=0), dtype=np.float32).compute()
    blob = np.flatnonzero((np.abs(row.i - row.i.mean()) < 2) & (np.abs(row.j - row.j.mean()) < 2)
                          & (np.abs(row.k - row.k.mean()) < 2))
    t = row.copy(data=np.where(np.isin(np.arange(row.size), blob), 5.0, 0.3).astype(np.float32))
    p = t.copy(data=np.where(t.values > 1, 1e-4, 0.6).astype(np.float32))
    voxel = workspace / "associations/lrp_age"
    voxel.mkdir(parents=True)
    for name, values in {"beta": t * 0.01, "t": t, "p": p, "p_fdr": p * 3}.items():
        Masker.of(images).to_nifti(values).to_filename(voxel / f"{name}.nii.gz")
    pd.DataFrame({"cluster": [1], "voxels": [blob.size], "volume_mm3": [blob.size * 512.0], "peak_t": [5.0],
                  "peak_x": [2.0], "peak_y": [-18.0], "peak_z": [10.0], "peak_region": ["Left_Thalamus_Proper"],
                  "regions": ["Left_Thalamus_Proper (60%), Right_Thalamus_Proper (40%)"]}).to_parquet(
        voxel / "clusters.parquet")
    (voxel / "summary.json").write_text(json.dumps({
        "name": "lrp_age", "scope": "voxel", "outcome": "relevance:lrp", "predictor": "age",
        "covariates": ["sex", "site"], "correction": "fdr", "alpha": 0.05, "n": 5, "df": 1,
        "n_significant": int(blob.size)}))
    roi = workspace / "associations/gm_age"
    roi.mkdir(parents=True)
    pd.DataFrame({"region": ["Left_Hippocampus", "Right_Amygdala", "Left_Caudate"], "term": ["age"] * 3,
                  "estimate": [-3.1, -1.2, 0.2], "se": [0.5, 0.6, 0.4], "statistic": [-6.2, -2.0, 0.5],
                  "p": [1e-6, 0.05, 0.6], "p_fdr": [3e-6, 0.075, 0.6], "n": [24] * 3}).to_parquet(
        roi / "regions.parquet")
    (roi / "summary.json").write_text(json.dumps({
        "name": "gm_age", "scope": "roi", "outcome": "regional_gm_volume", "predictor": "age",
        "covariates": ["sex"], "correction": "fdr", "alpha": 0.05, "n": 24, "df": 21, "n_significant": 1}))
    analyses = {
        "lrp_gain": ({"scope": "gain", "outcome": "relevance.lrp", "reference": "CN"},
                     {"regions": pd.DataFrame({"group": ["CN", "CN", "AD", "AD"],
                                               "region": ["Left_Hippocampus", "Left_Caudate"] * 2,
                                               "gain": [1.0, 1.0, 1.8, 0.9], "mean_sum": [2.0, 3.0, 3.6, 2.7]})}),
        "lrp_gm_similarity": ({"scope": "similarity", "outcome": "relevance.lrp", "predictor": "images.GM"},
                              {"similarity": pd.DataFrame({"participant_id": ["sub-01", "sub-02"],
                                                           "spearman": [0.25, 0.35]})}),
        "lesions_age": ({"scope": "subject", "outcome": "lesion_volume_mm3", "predictor": "age"},
                        {"model": pd.DataFrame({"term": ["age"], "estimate": [2.0], "se": [0.5], "t": [4.0],
                                                "p": [0.001], "partial_r": [0.6], "n": [4]}),
                         "data": pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
                                               "age": [30.0, 45.0, 60.0, 75.0],
                                               "lesion_volume_mm3": [60.0, 95.0, 118.0, 151.0]})}),
    }
    cortical = ["ctx-lh-precuneus", "ctx-rh-precuneus", "ctx-lh-superiorfrontal", "Left-Hippocampus"]
    for ensemble, r in (("t1", [0.6, 0.5, -0.2, 0.4]), ("flair", [0.3, 0.2, -0.4, 0.1])):
        analyses[f"{ensemble}_thickness"] = (
            {"scope": "roi", "outcome": f"relevance.{ensemble}.lrp", "predictor": "features.freesurfer.thickness",
             "labels": "APARC_ASEG", "model": "pearson"},
            {"correlations": pd.DataFrame({"region": cortical, "r": r, "p": [0.001, 0.01, 0.3, 0.05],
                                           "p_bonferroni": [0.004, 0.04, 1.0, 0.2], "p_fdr": [0.004, 0.02, 0.3, 0.07],
                                           "n": [24] * 4})})
    for name, (summary, tables) in analyses.items():
        folder = workspace / "associations" / name
        folder.mkdir(parents=True)
        for table, frame in tables.items():
            frame.to_parquet(folder / f"{table}.parquet")
        (folder / "summary.json").write_text(json.dumps({"name": name, "alpha": 0.05, "n": 24, **summary}))


def report_with_associations(tiny_workspace: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of the tiny workspace with a voxel-wise and an ROI-wise analysis, and its report of LRP."""
    workspace = Path(shutil.copytree(tiny_workspace, folder / "ws"))
    write_associations(workspace)
    return workspace, build_report(workspace, methods=["lrp"], top_k=5)


def test_report_draws_the_association_sections(tiny_workspace, tmp_path):
    _, report = report_with_associations(tiny_workspace, tmp_path)
    html = report.read_text()
    assert "lrp_age (voxel)" in html and "gm_age (roi)" in html and "No association analyses" not in html
    text = html.replace("<wbr>", "")  # table cells may break after "_"
    assert "t where p_fdr &lt; 0.05" in text and "Right_Thalamus_Proper (40%)" in text and "Left_Hippocampus" in text
    assert "gradient: mean relevance" not in html  # only the methods asked for
    gain = re.sub(r"\s+", "", text[text.index("lrp_gain (gain)"):])
    gain = gain[:gain.index("</table>")]
    assert "regionsbygainagainstCN" in gain and "<td>CN</td>" not in gain  # the reference is not a row of its own
    assert gain.index("Left_Hippocampus</td><td>1.800") < gain.index("Left_Caudate</td><td>0.900")  # by gain
    assert "lrp_gm_similarity: per-participant similarity of the two maps" in text
    assert "lesions_age: lesion_volume_mm3 against age (n = 4)" in text
    assert "<figcaption>flair, t1 side by side: pearson r per region of relevance.&lt;ensemble&gt;.lrp and " \
           "features.freesurfer.thickness (flair_thickness, t1_thickness)" in text
    for ensemble in ("t1", "flair"):
        assert f"<figcaption>{ensemble}_thickness: r of the cortical (Desikan–Killiany) regions on fsaverage5" in text
    figures = embedded_images(html)
    # 9 before the association section's further analyses: the model's scatter, the side-by-side bars, and
    # per ensemble the ranked bars and the cortical surfaces
    assert len(figures) == 9 + 6 and all(spread(figure) > 0.05 for figure in figures)


@pytest.mark.slow
def test_report_with_associations_renders_in_chromium(tiny_workspace, tmp_path, chromium):
    workspace, report = report_with_associations(tiny_workspace, tmp_path)
    figures = embedded_images(report.read_text())
    loaded, total = browser_check(report, chromium)
    assert total == len(figures) and loaded == total  # every embedded image decoded in the browser

    shots = screenshot_sections(report, workspace / "report_screenshots", chromium)
    assert set(shots) == set(SECTIONS) - set(OPTIONAL_SECTIONS)
    for section, path in shots.items():
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 150 and spread(pixels) > 0.05, section
        if section in ("provenance", "registration"):  # text only (this workspace has no register stage)
            assert coloured_pixels(pixels) == 0
        else:  # figures: their colour maps show in the screenshot
            assert coloured_pixels(pixels) > 300, (section, coloured_pixels(pixels))


def test_example_notebook_runs(tiny_workspace, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "docs/explore_workspace.ipynb", as_version=4)
    monkeypatch.setenv("RELCOHORT_WORKSPACE", str(tiny_workspace))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "docs")}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 4  # the brain plots and scatter
    assert any("'report'" in output.get("data", {}).get("text/plain", "") for output in outputs)  # stage times


def test_classification_report_groups_maps_by_outcome(tiny_cohort, tmp_path):
    """A sex classifier: the relevance groups are TP/FP/TN/FN of the test participants."""
    import yaml
    from rich.console import Console

    from pipelines.runner import run_catalog

    modalities = yaml.safe_load((REPO / "catalog.yaml").read_text())["modalities"]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({
        "workspace": "ws", "cohort": {"directory": str(tiny_cohort)}, "modalities": {"T1": modalities["T1"]},
        "train": {"target": "sex", "task": "classification", "modalities": ["T1"], "members": 1, "epochs": 2,
                  "batch_size": 4},
        "explain": {"methods": ["lrp"], "subjects": "all"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1}, "report": {"top_k": 3}}))
    workspace = run_catalog(catalog, Console(quiet=True))
    predictions = pd.read_parquet(workspace / "models/predictions.parquet").query("member == 'ensemble'")
    positive = predictions["observed"].astype(str) == "M"
    called = predictions["p_M"] >= 0.5
    expected = {"TP": positive & called, "FP": ~positive & called, "TN": ~positive & ~called,
                "FN": positive & ~called}
    html = (workspace / "report.html").read_text()
    assert "outcome (positive class M)" in html
    for name, rows in expected.items():  # a group map for each outcome that occurs, none for the others
        assert (f"{name} (n={rows.sum()})" in html) == bool(rows.any()), name
    assert all(spread(image) > 0.01 for image in embedded_images(html))
    true_positives = predictions[positive & called].sort_values("p_M", ascending=False).head(4)
    ws = open_workspace(workspace)
    chosen = individual_patients(ws, ws.relevance)
    assert list(chosen) == list(true_positives["participant_id"])
    assert all(f"(p_M {p:.2f})" in chosen[pid] for pid, p in zip(true_positives["participant_id"],
                                                                   true_positives["p_M"], strict=True))
    assert (f"Individual patients: the {len(true_positives)} true positives" in html) == bool(len(true_positives))


def test_individual_patients_are_drawn_one_map_per_method_and_patient(tiny_workspace):
    """The individual-patient figure: a glass brain per method (rows) and patient (columns), titled with both,
    each map in colour (a tiny regression run stands in for a classifier's true positives)."""
    ws = open_workspace(tiny_workspace)
    methods = ["lrp", "gradient"]
    maps = ws.relevance.relevance_mean.sel(attribution=methods)
    patients = {subject: f"{subject} (p_AD 0.9)" for subject in maps.subject.values[:3]}
    figure = _individual_figure(ws, maps, patients, methods)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == [f"{method}\n{caption}" for method in methods for caption in patients.values()]
    image = io.BytesIO()
    figure.savefig(image, format="png")
    pixels = matplotlib.image.imread(io.BytesIO(image.getvalue()), format="png")
    rgb = pixels[..., :3]
    assert ((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25).sum() > 200  # the maps' colours, not only outlines


@pytest.mark.slow
def test_a_blocky_mean_map_is_drawn_without_a_warning(demo_workspace):
    """Region occlusion's mean map repeats its top value over more than 5 % of the voxels: the display threshold
    falls below that value, so the figure shows those voxels and nilearn has no empty map to warn about."""
    ws = open_workspace(demo_workspace / "ws").for_ensemble("t1")
    mean = ws.relevance.relevance_mean.sel(attribution="region_occlusion").mean("subject").compute()
    magnitude = np.abs(mean.values)
    assert np.percentile(magnitude, 95) == magnitude.max()  # the case: the 95th percentile is the top value
    threshold, _ = _robust_limit(mean.values)
    assert (magnitude > threshold).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _mean_map_figure(ws, mean, "region_occlusion")
