"""The catalog schema and the ``relcohort`` command line, run as a user would."""

from __future__ import annotations

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError
from scipy import stats

from engine import open_workspace
from engine.analysis.association import AnalysisSettings
from engine.analysis.mask_relevance import pvs_mask
from engine.data.masker import Masker
from engine.data.store import open_cohort
from engine.data.synth.freesurfer import cortical_regions
from engine.models.relevance import open_relevance
from pipelines.catalog import CatalogError, load_catalog
from pipelines.runner import run_catalog, workspace_status
from tests.conftest import DEMO_ANALYSES, quiet
from tests.helpers import REPO, cli, relcohort, write_catalog


def test_default_catalog_is_valid():
    catalog, digest = load_catalog(REPO / "catalog.yaml")
    assert catalog.workspace == (REPO / "workspace/demo").resolve()
    assert catalog.cohort.demo.subjects >= 128
    assert list(catalog.modalities) == ["T1", "FLAIR", "GM", "FA", "WMH", "PVS", "APARC_ASEG"]
    assert catalog.modalities["WMH"].dtype == "uint8" and catalog.modalities["APARC_ASEG"].labels == "freesurfer"
    assert {name: list(settings.modalities) for name, settings in catalog.ensembles().items()} == {
        "t1": ["T1"], "flair": ["FLAIR"]}
    assert digest == hashlib.sha256((REPO / "catalog.yaml").read_bytes()).hexdigest()


def test_every_schema_error_is_reported_with_its_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "cohort": {"demo": {"subjects": 0}, "directory": "data"},
        "modalities": {"T1": "{participant_id}.nii.gz", "2bad": "x_{participant_id}.nii", "FA": "fa.nii.gz"},
        "ingest": {"on_error": "ignore"},
        "cluster": {"profile": "local", "n_workers": 0},
        "colour": "blue",
    }))
    with pytest.raises(CatalogError) as failure:
        load_catalog(path)
    fields = {field for field, _ in failure.value.errors}
    assert {"workspace", "cohort.demo.subjects", "modalities.2bad", "modalities.FA.path", "ingest.on_error",
            "cluster.local.n_workers", "colour"} <= fields
    result = relcohort("validate", path)
    assert result.returncode == 1
    for field in ("workspace", "cohort.demo.subjects", "ingest.on_error", "cluster.local.n_workers", "colour"):
        assert field in result.stderr


def test_feature_and_atlas_sections_are_checked(tmp_path):
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws",
                            features={"gray_matter": "NOPE", "fa": {"modality": "FA", "threshold": 2}},
                            atlas={"name": "brodmann"})
    with pytest.raises(CatalogError) as failure:
        load_catalog(catalog)
    text = str(failure.value)
    assert "features.fa.threshold" in text and "'brodmann' is not a bundled atlas" in text
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", features={"gray_matter": "NOPE"},
                            atlas={"name": "my_atlas.nii.gz", "labels": "my_atlas.tsv"})
    with pytest.raises(CatalogError, match=r"features.gray_matter: 'NOPE' is not one of the modalities"):
        load_catalog(catalog)
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws",
                            atlas={"name": "my_atlas.nii.gz", "labels": "my_atlas.tsv"})
    result = cli("validate", catalog)
    assert result.exit_code == 1
    assert "atlas.name" in result.stderr and "my_atlas.nii.gz does not exist" in result.stderr


def test_unsafe_or_broken_yaml_is_refused(tmp_path):
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("workspace: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(CatalogError, match="invalid YAML"):
        load_catalog(unsafe)
    assert not (tmp_path / "pwned").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("workspace: ws\ncohort:\n  demo: [unclosed\n")
    with pytest.raises(CatalogError, match="line 4"):
        load_catalog(broken)


def test_directory_cohort_needs_its_files(tmp_path):
    path = write_catalog(tmp_path / "catalog.yaml", workspace="ws", cohort={"directory": "missing"})
    result = cli("validate", path)
    assert result.exit_code == 1 and "cohort.directory" in result.stderr and "is not a folder" in result.stderr


@pytest.mark.slow
def test_demo_run_writes_every_stage_of_both_ensembles(demo_workspace):
    """The demo catalog, as ``relcohort run`` runs it: every stage's outputs, each named ensemble under
    ensembles/<name>/, analyses over both, the report; tables checked against recomputation."""
    workspace = demo_workspace / "ws"
    ds = open_cohort(workspace / "images.zarr")
    assert ds.sizes["subject"] == 16 and set(ds.data_vars) == {"T1", "FLAIR", "GM", "FA", "WMH", "PVS", "APARC_ASEG"}
    assert ds.T1.attrs["space"] == "MNI152NLin2009aSym"
    provenance = json.loads((workspace / "provenance.json").read_text())
    run = provenance["runs"][-1]
    assert run["state"] == "complete" and run["seeds"] == {"demo": 3}
    assert run["catalog_sha256"] == hashlib.sha256((demo_workspace / "catalog.yaml").read_bytes()).hexdigest()
    assert run["packages"]["zarr"] and run["packages"]["relcohort"] == "0.1.0"
    assert set(run["stages"]) == {"synth", "ingest", "features", "train", "explain", "validate", "associate", "report"}
    gmv = pd.read_parquet(workspace / "features/regional_gm_volume.parquet")
    assert set(gmv.columns) == {"participant_id", "region", "volume_mm3"} and gmv.participant_id.nunique() == 16
    assert "Left_Hippocampus" in set(gmv.region) and (gmv.volume_mm3 >= 0).all()
    fa = pd.read_parquet(workspace / "features/tract_fa.parquet")
    assert {"WM_Corticospinal_tract_L", "WM_Callosal_body"} <= set(fa.region)
    aseg = pd.read_parquet(workspace / "features/freesurfer.parquet")
    assert len(aseg[(aseg.structure == "eTIV") & (aseg.measure == "global")]) == 16
    assert len(pd.read_parquet(workspace / "features/lesion_load.parquet")) == 16
    pvs_load = pd.read_parquet(workspace / "features/pvs_load.parquet")
    assert list(pvs_load.columns) == ["participant_id", "pvs_count", "pvs_voxels"] and len(pvs_load) == 16
    assert (pvs_load.pvs_voxels >= 5 * pvs_load.pvs_count).all()  # clusters of at least 5 voxels

    assert not (workspace / "models").exists()  # named ensembles only
    for name, members, channels, methods in (("t1", 2, ["T1"], ["lrp", "gradient", "region_occlusion"]),
                                             ("flair", 1, ["FLAIR"], ["lrp"])):
        ensemble = workspace / "ensembles" / name
        assert json.loads((ensemble / "models/member_0.json").read_text())["config"]["modalities"] == channels
        metrics = pd.read_parquet(ensemble / "models/metrics.parquet")
        assert {*map(str, range(members)), "ensemble", "predict_train_mean", "ridge_voxels"} <= set(metrics.member)
        relevance = open_relevance(ensemble / "relevance.zarr")
        assert relevance.relevance.dims == ("attribution", "member", "subject", "voxel")
        assert list(relevance.attribution.values) == methods and relevance.sizes["member"] == members
        assert relevance.relevance.notnull().all()
        sanity = pd.read_parquet(ensemble / "validation/sanity.parquet")
        assert list(sanity.attribution) == methods and sanity.spearman.between(-1, 1).all()
        scores = pd.read_parquet(ensemble / "validation/scores.parquet")
        assert set(scores.attribution) == set(methods) and set(scores.scored) == {"R", "|R|"}
        assert set(scores.member) == {"ensemble", *map(str, range(members))} and scores.roc_auc.between(0, 1).all()
        assert len(scores) == 2 * len(methods) * (members + 1)
        assert (ensemble / "validation/robustness.parquet").is_file() == (members > 1)
        lesion_relevance = pd.read_parquet(ensemble / "validation/lesion_relevance.parquet")
        assert len(lesion_relevance) == len(methods) * relevance.sizes["subject"]
        assert {"lesion_voxels", "lesion_positive_share", "uniform_share", "share_ratio"} <= set(lesion_relevance)
        for mask in ("lesion", "pvs"):
            indices = pd.read_parquet(ensemble / f"validation/{mask}_indices.parquet")
            assert len(indices) == len(methods) * relevance.sizes["subject"]
            assert {"age", "predicted", "p_wml_voxel"} <= set(indices)
            comparison = pd.read_parquet(ensemble / f"validation/{mask}_comparison.parquet")
            assert list(comparison.attribution) == methods and (comparison.min_voxels == 30).all()

    # the PVS masks grown by a voxel for the T1 ensemble's maps (features.pvs.dilate: {t1: 1}), not for FLAIR's
    pvs = {name: pd.read_parquet(workspace / f"ensembles/{name}/validation/pvs_indices.parquet").query(
        "attribution == 'lrp'").set_index("participant_id")["n_wml_voxel"] for name in ("t1", "flair")}
    for name, dilate in (("t1", 1), ("flair", 0)):
        expected = pvs_mask(ds.PVS, Masker.of(ds), 0.5, 5, dilate).sum("voxel").to_series()
        np.testing.assert_array_equal(pvs[name], expected.loc[pvs[name].index])
    assert (pvs["t1"].loc[pvs["flair"].index] > pvs["flair"]).any()

    split = pd.read_csv(workspace / "ensembles/t1/models/split.tsv", sep="\t")
    relevance = open_relevance(workspace / "ensembles/t1/relevance.zarr")
    assert sorted(relevance.subject.values) == sorted(split.participant_id)  # subjects: all
    flair = open_relevance(workspace / "ensembles/flair/relevance.zarr")
    assert set(flair.subject.values) == set(split.participant_id[split.split == "test"])  # subjects: test
    robustness = pd.read_parquet(workspace / "ensembles/t1/validation/robustness.parquet")
    ages = relevance.age.values
    bands = {"age < 40": ages < 40, "age 40–60": (ages >= 40) & (ages < 60), "age ≥ 60": ages >= 60}
    present = [name for name, mask in bands.items() if mask.any()]
    assert len(robustness) == 3 * len(present) and set(robustness.group) == set(present)
    assert dict(zip(robustness.group, robustness.n, strict=True)) == {name: bands[name].sum() for name in present}

    associations = workspace / "associations"
    assert {path.name for path in associations.iterdir()} == {analysis["name"] for analysis in DEMO_ANALYSES}
    gm_age = json.loads((associations / "gm_age/summary.json").read_text())
    assert gm_age["n"] == 16 and gm_age["permutations"] == 1000 and set(gm_age["significant"]) == {"fwe", "fdr_bh"}
    t_map = nib.load(associations / "gm_age/t.nii.gz")
    inside = np.zeros(t_map.shape, bool)
    inside[ds.i.values, ds.j.values, ds.k.values] = True
    assert np.isnan(t_map.get_fdata()[~inside]).all()  # NaN outside the mask (and where GM is constant)
    assert np.isfinite(t_map.get_fdata()[inside]).mean() > 0.99
    clusters = pd.read_parquet(associations / "gm_age/clusters.parquet")
    assert list(clusters.columns[:4]) == ["cluster", "sign", "voxels", "volume_mm3"]
    assert clusters.voxels.sum() == gm_age["significant"]["fwe"]  # thresholded by the first correction
    regions = pd.read_parquet(associations / "relevance_gmv_regions/regions.parquet")
    assert regions.n.max() == relevance.sizes["subject"] and regions.p_fdr.between(0, 1).all()
    assert "features.regional_gm_volume.volume_mm3" in set(regions.term)
    correlations = pd.read_parquet(associations / "subcortical_volume/correlations.parquet").set_index("region")
    assert list(correlations.columns) == ["r", "p", "p_bonferroni", "p_fdr", "n", "family_size", "p_permutation",
                                          "p_fwe"]
    assert correlations.r.dropna().between(-1, 1).all() and correlations.n.max() <= relevance.sizes["subject"]
    family = {f"{side}-{name}" for side in ("Left", "Right") for name in (
        "Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala", "Accumbens-area", "Lateral-Ventricle")}
    assert "Left-Hippocampus" in correlations.index and set(correlations.index) <= family  # declared, VentralDC out
    summary = json.loads((associations / "subcortical_volume/summary.json").read_text())
    assert summary["family"]["regions"] == list(correlations.index) and summary["permutations"] == 200
    tested = correlations.dropna(subset=["p"])  # regions without data are listed, not counted
    np.testing.assert_allclose(tested.p_bonferroni, np.minimum(tested.p * len(tested), 1))
    assert (tested.family_size == len(tested)).all() and (tested.p_fwe >= tested.p_permutation).all()
    # FA: relevance in Juelich's white-matter tracts, per tract and voxel-wise inside them
    tracts = pd.read_parquet(associations / "tract_fa/correlations.parquet")
    assert len(tracts) > 5 and tracts.region.str.startswith("WM_").all()
    inside_tracts = json.loads((associations / "relevance_fa/summary.json").read_text())["within"]
    atlas = open_workspace(workspace).atlas("juelich")
    in_tracts = np.isin(atlas.voxel_labels, atlas.regions.index[atlas.regions.name.str.startswith("WM_")])
    assert inside_tracts["voxels"] == in_tracts.sum() and inside_tracts["atlas"] == "juelich"
    fa_t = nib.load(associations / "relevance_fa/t.nii.gz").get_fdata()[ds.i.values, ds.j.values, ds.k.values]
    assert np.isnan(fa_t[~in_tracts]).all() and np.isfinite(fa_t[in_tracts]).mean() > 0.5
    # the seed study's way, by hand: LRP summed in each participant's own hippocampus (its aparc+aseg in the
    # store) against that participant's aseg.stats volume, Pearson r across participants
    labels = ds.APARC_ASEG.sel(subject=relevance.subject.values).values
    lrp = relevance.relevance_mean.sel(attribution="lrp").values
    volumes = aseg.query("structure == 'Left-Hippocampus'").set_index("participant_id").loc[relevance.subject.values]
    expected = stats.pearsonr(np.where(labels == 17, lrp, 0).sum(axis=1), volumes["value"])
    assert abs(correlations.loc["Left-Hippocampus", "r"] - expected.statistic) < 1e-6
    # an atlas analysis of the other ensemble, by hand: FLAIR LRP in Neuromorphometrics' Left Hippocampus
    flair_age = pd.read_parquet(associations / "flair_lrp_age/correlations.parquet").set_index("region")
    hippocampus = flair.relevance_mean.sel(attribution="lrp").values[:, np.flatnonzero(
        open_workspace(workspace).atlas().voxel_labels == 48)].sum(axis=1)
    assert abs(flair_age.loc["Left_Hippocampus", "r"] - stats.pearsonr(hippocampus, flair.age.values).statistic) < 1e-6
    thickness = pd.read_parquet(associations / "cortical_thickness/correlations.parquet")
    desikan_killiany = {f"ctx-{hemi}-{region}" for hemi in ("lh", "rh") for region in cortical_regions().values()}
    assert set(thickness.region) <= desikan_killiany and len(thickness) > 0.9 * len(desikan_killiany)
    model = pd.read_parquet(associations / "lesions_gap/model.parquet").set_index("term")
    data = pd.read_parquet(associations / "lesions_gap/data.parquet").set_index("participant_id")
    assert set(data.index) == set(split.participant_id[split.split == "test"])
    assert model.loc["predictions.flair.brain_age_gap", "n"] == len(data)
    predictions = pd.read_parquet(workspace / "ensembles/flair/models/predictions.parquet")
    test = predictions[(predictions.member == "ensemble") & (predictions.split == "test")].set_index("participant_id")
    np.testing.assert_allclose(data["predictions.flair.brain_age_gap"], test.loc[data.index, "brain_age_gap"])
    similarity = pd.read_parquet(associations / "relevance_gm_similarity/similarity.parquet")
    assert len(similarity) == relevance.sizes["subject"] and similarity.pearson_r.between(-1, 1).all()
    report = (workspace / "report.html").read_text()  # the report shows the real association outputs
    assert all(f"<h3>{path.name} (" in report for path in associations.iterdir())
    assert "<h3>Ensemble t1</h3>" in report and "<h3>Ensemble flair</h3>" in report
    assert "Test metrics of every ensemble" in report
    assert "flair, t1 side by side: pearson r per region" in report  # the two ensembles' tables in one figure
    family = len(pd.read_parquet(associations / "subcortical_volume/correlations.parquet"))
    assert f"family {family} regions (include subcortical_gray_matter, *-Lateral-Ventricle; exclude *-VentralDC)" \
        in report
    # three validation participants cannot fit a cubic: the corrected gap is missing, and the report says why
    correction = json.loads((workspace / "ensembles/t1/models/bias_correction.json").read_text())["ensemble"]
    assert correction["method"] == "validation" and "needs more than 4 participants, got 3" in correction["not_fitted"]
    assert "No bias-corrected brain-age gap: bias correction of degree 3 needs more than 4 participants, got 3" in \
        report


@pytest.mark.slow
def test_a_rerun_does_nothing_status_tells_what_is_there_and_a_smaller_demo_keeps_the_store(demo_workspace,
                                                                                              tmp_path):
    folder = shutil.copytree(demo_workspace, tmp_path / "demo")
    workspace = folder / "ws"
    relevance_chunks = {path: path.stat().st_mtime_ns for path in (workspace / "ensembles").rglob("c/*/*/*/*")}
    association_files = {path: path.stat().st_mtime_ns for path in (workspace / "associations").rglob("*")
                         if path.is_file()}
    again = relcohort("run", folder / "catalog.yaml", cwd=folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "report.html" in again.stdout and "open_cohort" in again.stdout
    rerun = json.loads((workspace / "provenance.json").read_text())["runs"][-1]["stages"]
    assert rerun["synth"]["generated"] == 0 and rerun["ingest"]["unchanged"] == 16 and rerun["ingest"]["written"] == {}
    assert rerun["features"]["computed"] == 0
    assert rerun["train"]["ensembles"]["t1"]["trained"] == rerun["train"]["ensembles"]["flair"]["trained"] == 0
    assert all(summary["computed"] == 0 for summary in rerun["validate"]["ensembles"].values())
    assert rerun["associate"]["computed"] == 0 and rerun["report"]["built"] == 0
    assert {path: path.stat().st_mtime_ns for path in relevance_chunks} == relevance_chunks
    assert {path: path.stat().st_mtime_ns for path in association_files} == association_files

    status = cli("status", workspace)
    assert status.exit_code == 0
    assert "synth" in status.stdout and "16 synthetic participants" in status.stdout
    assert "ensembles/t1/models: 2 member(s)" in status.stdout and "ensembles/flair/models: 1 member(s)" in \
        status.stdout
    assert "3 method(s) (lrp, gradient, region_occlusion)" in status.stdout
    assert "16 complete subjects" in status.stdout and "regional_gm_volume.parquet (" in status.stdout

    # a smaller demo regenerates the cohort folder; what the store holds stays
    smaller = write_catalog(folder / "smaller.yaml", workspace="ws",
                            cohort={"demo": {"subjects": 4, "voxel_size": 8.0, "seed": 3}}, features=None, train=None,
                            explain=None, associate=None, report=None, cluster={"profile": "local", "n_workers": 1})
    run_catalog(smaller, quiet())
    assert not (workspace / "demo_cohort/sub-0005").exists() and (workspace / "demo_cohort/sub-0004").is_dir()
    assert open_cohort(workspace / "images.zarr").sizes["subject"] == 16


def test_directory_run_with_skip_records_the_bad_participant(cohort_copy, tmp_path):
    (cohort_copy / "sub-0004/anat/sub-0004_FLAIR.nii.gz").write_bytes(b"\x1f\x8b broken")
    modalities = yaml.safe_load((REPO / "catalog.yaml").read_text())["modalities"]
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", modalities=modalities,
                            cohort={"directory": str(cohort_copy)}, features=None,
                            ingest={"on_error": "skip", "subjects_per_chunk": 4}, train=None, explain=None,
                            associate=None, report=None, cluster={"profile": "local", "n_workers": 1})
    result = cli("run", catalog)
    assert result.exit_code == 0, result.stderr[-3000:]
    assert "skipped" in result.stdout and "sub-0004" in result.stdout
    ds = open_cohort(tmp_path / "ws/images.zarr")
    assert ds.sizes["subject"] == 23 and "sub-0004" not in ds.subject.values
    status = cli("status", tmp_path / "ws")
    assert "skipped participant sub-0004" in status.stdout and "unreadable or truncated image" in status.stdout
    assert "not part of this workspace's catalog" in status.stdout  # no synth for a directory cohort

    failing = write_catalog(tmp_path / "failing.yaml", workspace="ws2", modalities=modalities,
                            cohort={"directory": str(cohort_copy)}, features=None, train=None, explain=None,
                            associate=None, report=None, cluster={"profile": "local", "n_workers": 1})
    result = cli("run", failing)
    assert result.exit_code == 1
    assert "participant sub-0004" in result.stderr and "sub-0004_FLAIR.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr
    status = cli("status", tmp_path / "ws2")
    assert "failed" in status.stdout and "IngestError" in status.stdout and "sub-0004_FLAIR" in status.stdout


def test_synth_command_writes_a_cohort(tmp_path):
    result = cli("synth", tmp_path / "cohort", "--subjects", 3, "--voxel-size", 8, "--seed", 4, "--workers", 1)
    assert result.exit_code == 0, result.stderr[-3000:]
    assert (tmp_path / "cohort/participants.tsv").read_text().count("\n") == 4
    assert np.all([(tmp_path / f"cohort/sub-000{n}/anat/sub-000{n}_T1w.nii.gz").is_file() for n in (1, 2, 3)])
    again = cli("synth", tmp_path / "cohort", "--subjects", 2, "--voxel-size", 8, "--workers", 1)
    assert again.exit_code == 1 and "is not empty" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "cohort/sub-0003").is_dir()


def test_train_and_explain_sections_are_checked(tmp_path):
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws",
                            train={"model": "resnet", "modalities": ["T2"], "split": {"fractions": [0.5, 0.5, 0.5]}},
                            explain={"methods": ["lrp", "deeplift", "lrp_beta0_5", "lrp_beta0.5"],
                                     "options": {"ig_stepz": 3}})
    with pytest.raises(CatalogError) as failure:
        load_catalog(catalog)
    text = str(failure.value)
    for expected in ("train.model: unknown model 'resnet'", "train.split.fractions",
                     "explain.methods: unknown method(s) ['deeplift', 'lrp_beta0.5']",
                     "explain.options.ig_stepz: Extra inputs are not permitted"):
        assert expected in text
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", train={"modalities": ["T2"]})
    with pytest.raises(CatalogError, match=r"train.modalities\[0\]: 'T2' is not one of the modalities"):
        load_catalog(catalog)
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", train=None)
    with pytest.raises(CatalogError, match="explain: needs a train section"):
        load_catalog(catalog)
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", train={"finetune_from": "pretrained"},
                            features=None, associate=None)  # one unnamed ensemble: explain.ensembles names one no more
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "explain.ensembles: ['flair'] are not ensembles of the train section" in \
        result.stderr
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", train={"finetune_from": "pretrained"},
                            explain={"methods": ["lrp"]}, features=None, associate=None)
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "train.finetune_from" in result.stderr and "does not exist" in result.stderr


def test_min_coverage_is_a_share_for_voxel_analyses(tmp_path):
    analysis = {"name": "regions", "scope": "roi", "outcome": "relevance.t1.lrp", "predictor": "age",
                "min_coverage": 0.5}
    with pytest.raises(CatalogError, match=r"associate.0: min_coverage applies to voxel analyses only"):
        load_catalog(write_catalog(tmp_path / "catalog.yaml", workspace="ws", associate=[analysis]))
    analysis.update(scope="voxel", min_coverage=30)
    with pytest.raises(CatalogError, match=r"associate.0.min_coverage: .*less than or equal to 1"):
        load_catalog(write_catalog(tmp_path / "catalog.yaml", workspace="ws", associate=[analysis]))


def test_label_volumes_and_analyses_over_them_are_checked(tmp_path):
    base = yaml.safe_load((REPO / "catalog.yaml").read_text())
    modalities = {**base["modalities"], "APARC": {"path": "{participant_id}/aparc+aseg.mgz", "labels": "freesurfer"}}
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", modalities=modalities)
    with pytest.raises(CatalogError, match=r"modalities.APARC: .*needs an integer dtype .* and kind: label"):
        load_catalog(catalog)
    modalities["APARC"].update(dtype="int16", kind="label")
    analysis = {"name": "parcels", "scope": "roi", "statistic": "pearson", "outcome": "relevance.t1.lrp",
                "predictor": "features.freesurfer.volume", "labels": "T1"}
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", modalities=modalities, associate=[analysis])
    with pytest.raises(CatalogError, match=r"associate\[0\].labels: 'T1' is not a label volume .*\['APARC', "
                                           r"'APARC_ASEG'\]"):
        load_catalog(catalog)
    analysis["labels"] = "APARC"
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", modalities=modalities,
                            associate=[{**analysis, "native": True}])
    with pytest.raises(CatalogError, match=r"associate\[0\].native: .* needs a register section"):
        load_catalog(catalog)
    features = {**base["features"], "freesurfer": None}
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", modalities=modalities, associate=[analysis],
                            features=features)
    with pytest.raises(CatalogError, match=r"'features.freesurfer.volume' needs features.freesurfer"):
        load_catalog(catalog)
    modalities["APARC"]["labels"] = "my_labels.tsv"
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", modalities=modalities, associate=[analysis])
    result = cli("validate", catalog)
    assert result.exit_code == 1 and "modalities.APARC.labels" in result.stderr and "my_labels.tsv does not exist" \
        in result.stderr


def test_named_ensembles_are_checked(tmp_path):
    """Analyses address relevance.<ensemble>.<method> of named ensembles, each explained with its own settings."""
    train = {"modalities": ["T1"], "members": 1, "epochs": 1, "batch_size": 4,
             "split": {"fractions": [0.4, 0.2, 0.4]},
             "ensembles": {"t1": {}, "flair": {"modalities": ["FLAIR"], "members": 2}}}
    analyses = [{"name": "flair_lrp_age", "scope": "roi", "statistic": "pearson", "outcome": "relevance.flair.lrp",
                 "region_statistic": "sum", "predictor": "age"},
                {"name": "t1_gap_lesions", "scope": "subject", "outcome": "features.lesion_load.lesion_volume_mm3",
                 "predictor": "predictions.t1.brain_age_gap"},
                {"name": "t1_lrp_age", "scope": "roi", "statistic": "pearson", "outcome": "relevance.t1.lrp",
                 "region_statistic": "sum", "predictor": "age"}]
    bad = write_catalog(tmp_path / "bad.yaml", workspace="ws", train=train, associate=[
        {**analyses[0], "outcome": "relevance.lrp"}])
    with pytest.raises(CatalogError, match=r"'relevance.lrp': there are several ensembles \(flair, t1\); "
                                           r"name one, e.g. 'relevance.flair.lrp'"):  # (safe_dump sorts the keys)
        load_catalog(bad)
    bad = write_catalog(tmp_path / "bad.yaml", workspace="ws", train={**train, "ensembles": {"lrp": {}}})
    with pytest.raises(CatalogError, match="ensemble name 'lrp' must be an identifier and not a method"):
        load_catalog(bad)
    bad = write_catalog(tmp_path / "bad.yaml", workspace="ws", train={**train, "ensembles": {"t2": {"modalities":
                                                                                                  ["T2"]}}})
    with pytest.raises(CatalogError, match=r"train.ensembles.t2.modalities\[0\]: 'T2' is not one of the modalities"):
        load_catalog(bad)

    explain = {"methods": ["lrp", "gradient"], "ensembles": {"t1": {"methods": ["lrp"]}}}
    bad = write_catalog(tmp_path / "bad.yaml", workspace="ws", train=train, explain=explain, associate=[
        {**analyses[2], "outcome": "relevance.t1.gradient"}])
    with pytest.raises(CatalogError, match=r"'relevance.t1.gradient' needs the explain section to compute method "
                                           r"'gradient' \(explained: \['lrp'\]\)"):
        load_catalog(bad)
    bad = write_catalog(tmp_path / "bad.yaml", workspace="ws", train=train,
                        explain={**explain, "ensembles": {"t2": {"methods": ["lrp"]}}})
    with pytest.raises(CatalogError, match=r"explain.ensembles: \['t2'\] are not ensembles of the train section"):
        load_catalog(bad)
    bad = write_catalog(tmp_path / "bad.yaml", workspace="ws", train=train,
                        explain={**explain, "ensembles": {"t1": {"methods": ["lpr"]}}})
    with pytest.raises(CatalogError, match=r"ensembles.t1: methods: .*unknown method\(s\) \['lpr'\]"):
        load_catalog(bad)


def test_relevance_maps_made_elsewhere_are_an_ensemble_every_analysis_takes(cohort_copy, tmp_path):
    """Per-participant relevance NIfTIs from another tool, declared as a modality and imported as ensemble
    'study': stored exactly, validated inside lesions, and analysed in each participant's own parcels."""
    participants = pd.read_csv(cohort_copy / "participants.tsv", sep="\t")
    rng = np.random.default_rng(8)
    for pid in participants.participant_id:
        gm = nib.load(cohort_copy / f"derivatives/synth/{pid}/{pid}_label-GM_probseg.nii.gz")
        maps = (gm.get_fdata() * rng.normal(1.0, 0.3, gm.shape)).astype(np.float32)
        path = cohort_copy / f"derivatives/innvestigate/{pid}_lrp.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(maps, gm.affine), path)
    modalities = {**yaml.safe_load((REPO / "catalog.yaml").read_text())["modalities"],
                  "LRP_STUDY": "derivatives/innvestigate/{participant_id}_lrp.nii.gz"}
    analysis = {"name": "study_subcortical", "scope": "roi", "statistic": "pearson", "outcome": "relevance.study.lrp",
                "region_statistic": "sum", "labels": "APARC_ASEG", "predictor": "features.freesurfer.volume"}
    catalog = write_catalog(tmp_path / "catalog.yaml", workspace="ws", cohort={"directory": str(cohort_copy)},
                            modalities=modalities, train=None, explain=None, relevance={"study": {"lrp": "LRP_STUDY"}},
                            features={"lesions": "WMH", "freesurfer": {"subjects_dir": "derivatives/freesurfer"}},
                            associate=[analysis], cluster={"profile": "local", "n_workers": 1})
    bad = write_catalog(tmp_path / "bad.yaml", workspace="ws", cohort={"directory": str(cohort_copy)},
                        modalities=modalities, train=None, explain=None, relevance={"study": {"lrp": "LRP"}},
                        associate=None)
    with pytest.raises(CatalogError, match=r"relevance.study.lrp: 'LRP' is not one of the modalities"):
        load_catalog(bad)
    workspace = run_catalog(catalog, quiet())
    relevance = open_relevance(workspace / "ensembles/study/relevance.zarr")
    assert relevance.sizes["member"] == 1 and list(relevance.attribution.values) == ["lrp"]
    images = open_cohort(workspace / "images.zarr")
    assert list(relevance.subject.values) == list(images.subject.values)
    masker = Masker.of(images)
    for pid in relevance.subject.values[:3]:
        stored = masker.to_nifti(relevance.relevance_mean.sel(attribution="lrp", subject=pid)).get_fdata()
        original = nib.load(cohort_copy / f"derivatives/innvestigate/{pid}_lrp.nii.gz").get_fdata()
        inside = np.asanyarray(masker.mask_image().dataobj) > 0
        np.testing.assert_array_equal(stored[inside], original[inside])
    assert (workspace / "ensembles/study/validation/lesion_indices.parquet").is_file()
    correlations = pd.read_parquet(workspace / "associations/study_subcortical/correlations.parquet")
    labels = images.APARC_ASEG.values
    sums = np.where(labels == 53, relevance.relevance_mean.sel(attribution="lrp").values, 0).sum(axis=1)
    aseg = pd.read_parquet(workspace / "features/freesurfer.parquet").query("structure == 'Right-Hippocampus'")
    expected = stats.pearsonr(sums, aseg.set_index("participant_id").loc[images.subject.values, "value"])
    assert abs(correlations.set_index("region").loc["Right-Hippocampus", "r"] - expected.statistic) < 1e-6
    report = (workspace / "report.html").read_text()
    assert "<h3>Ensemble study</h3>" in report and "maps were made elsewhere and imported" in report


def test_status_names_what_each_stage_holds(tiny_workspace):
    """``relcohort status`` in this process: each stage's outputs, counted from the files themselves; the stages
    the run did not have say nothing."""
    status = dict(workspace_status(tiny_workspace))
    assert status["synth"] is None and status["register"] is None and status["experiment"] is None
    images = open_cohort(tiny_workspace / "images.zarr")
    assert f"{images.sizes['subject']} complete subjects × {images.sizes['voxel']} voxels" in status["ingest"]
    for table in ("lesion_load", "regional_gm_volume"):
        rows = len(pd.read_parquet(tiny_workspace / f"features/{table}.parquet"))
        assert f"{table}.parquet ({rows} rows)" in status["features"]
    cards = sorted((tiny_workspace / "models").glob("member_*.json"))
    assert f"models: {len(cards)} member(s); test: {{'ensemble': {{'mae': " in status["train"]
    relevance = open_relevance(tiny_workspace / "relevance.zarr")
    assert (f"{relevance.sizes['attribution']} method(s) ({', '.join(relevance.attribution.values)}) × "
            f"{relevance.sizes['member']} member(s) × {relevance.sizes['subject']} subject(s)") in status["explain"]
    assert all(f"{path.name}" in status["validate"] for path in (tiny_workspace / "validation").glob("*.parquet"))
    assert "report.html: " in status["report"] and "open it in a browser" in status["report"]


def test_the_statistics_settings_are_checked(tmp_path):
    """Settings that do not fit the analysis are named: a per-ensemble PVS dilation for an ensemble that is not
    trained, within outside voxel analyses, a permutation test of robust region models, fwe without permutations,
    an unknown bias correction."""
    cases = [
        ({"features": {"pvs": {"modality": "PVS", "dilate": {"t2": 1}}}},
         r"features.pvs.dilate: \['t2'\] are not ensembles \(\['flair', 't1'\]\)"),
        ({"associate": [{"name": "a", "scope": "roi", "outcome": "relevance.t1.lrp", "predictor": "age",
                         "within": {"name": "juelich"}}]}, "within applies to voxel analyses only"),
        ({"associate": [{"name": "a", "scope": "roi", "outcome": "relevance.t1.lrp", "predictor": "age",
                         "robust": True, "permutations": 100}]}, "permutes OLS fits: not with robust"),
        ({"associate": [{"name": "a", "scope": "roi", "outcome": "relevance.t1.lrp", "predictor": "age",
                         "correction": ["fwe"]}]}, "correction fwe needs permutations"),
        ({"associate": [{"name": "a", "scope": "subject", "outcome": "age", "predictor": "predictions.t1.predicted",
                         "min_region_mm3": 50}]}, "min_region_mm3 apply to roi analyses only"),
        ({"train": {**yaml.safe_load((REPO / "catalog.yaml").read_text())["train"], "bias_correction": "train"}},
         r"train.bias_correction: Input should be 'validation', 'cross_fit', 'test' or 'none'"),
    ]
    for sections, message in cases:
        with pytest.raises(CatalogError, match=message):
            load_catalog(write_catalog(tmp_path / "catalog.yaml", workspace="ws", **sections))


@pytest.mark.parametrize(("analysis", "message"), [
    ({"scope": "gain", "outcome": "relevance.lrp", "predictor": "diagnosis"}, "a gain analysis needs reference"),
    ({"scope": "roi", "outcome": "relevance.lrp", "predictor": "age", "reference": "CN"},
     "reference applies to gain analyses only"),
    ({"scope": "gain", "outcome": "age", "predictor": "diagnosis", "reference": "CN"},
     "a gain analysis reduces a map"),
    ({"outcome": "relevance.lrp", "predictor": "age", "random_intercept": "site"},
     "random_intercept applies to roi and subject analyses only"),
    ({"scope": "roi", "outcome": "relevance.lrp", "predictor": "age", "atlas": {"name": "juelich"},
      "labels": "APARC_ASEG"}, "choose atlas .* or labels .*, not both"),
    ({"scope": "roi", "outcome": "relevance.lrp", "predictor": "age", "labels": "APARC_ASEG", "scans": "mean"},
     "scans: mean averages maps across a participant's scans"),
    ({"scope": "roi", "outcome": "relevance.lrp", "predictor": "age", "native": True}, "native .* needs labels"),
    ({"outcome": "relevance.lrp", "predictor": "age", "robust": True}, "robust applies to roi and subject"),
    ({"scope": "subject", "outcome": "relevance.lrp", "predictor": "age"}, "a subject analysis takes one value"),
    ({"scope": "similarity", "outcome": "relevance.lrp", "predictor": "age"}, "a similarity analysis compares two"),
    ({"outcome": "age", "predictor": "sex"}, "a voxel analysis needs a map"),
    ({"scope": "roi", "outcome": "relevance.lrp", "predictor": "age", "statistic": "pearson", "robust": True},
     "robust and random_intercept apply to statistic: regression"),
    ({"scope": "roi", "outcome": "relevance.lrp", "predictor": "age", "robust": True,
      "random_intercept": "site"}, r"choose robust \(OLS with HC3 errors\) or random_intercept"),
    ({"scope": "roi", "outcome": "relevance.lrp", "predictor": "age", "scans": "all"},
     "scans: all in an roi analysis: a mixed model"),
])
def test_an_analysis_that_does_not_fit_its_scope_is_named(analysis, message):
    with pytest.raises(ValidationError, match=message):
        AnalysisSettings.model_validate({"name": "a", **analysis})
