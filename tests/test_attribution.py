"""Attribution methods against hand-computed references, and relevance.zarr written by Dask tasks."""

import itertools
import re
import threading
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch import nn

from engine.data.store import open_cohort
from engine.models import relevance as relevance_module
from engine.models.attribution import METHODS, AttributionOptions, attribute
from engine.models.networks import ModelSpec, build_model
from engine.models.noise import NoiseNet, noise_model_importance, noise_optimisation, train_noise_model
from engine.models.relevance import explain, open_relevance, relevance_key
from engine.models.training import load_member
from engine.models.volumes import CohortVolumes
from engine.tasks import Execution

SHAPE = (16, 18, 14)


def _model():
    torch.manual_seed(1)
    return build_model(ModelSpec("mrinet", SHAPE, 2, 1), target_mean=50.0).double().eval()


def _inputs():
    return torch.rand(2, 2, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


class Weighted(nn.Module):
    """f(x) = Σ w·x over channel 0: every gradient-based map is known in closed form."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights
        self.output_scale = torch.ones(1, dtype=weights.dtype)

    def forward(self, x):
        return (x[:, 0] * self.weights).sum(dim=(1, 2, 3))[:, None]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_one_finite_map_per_subject(method):
    labels = np.arange(np.prod(SHAPE)).reshape(SHAPE) // 600  # a few blocky "regions"
    options = AttributionOptions(smoothgrad_samples=2, ig_steps=4, occlusion_patch=8, occlusion_stride=8,
                                 noise_steps=3)
    noise_net = NoiseNet(2).double().eval()
    maps = attribute(_model(), _inputs(), method, options, region_labels=labels, noise_model=noise_net)
    assert maps.shape == (2, *SHAPE)
    assert torch.isfinite(maps).all()
    assert maps.abs().sum() > 0


def test_gradient_methods_on_a_linear_model_equal_their_closed_forms():
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model, x = Weighted(weights), _inputs()
    assert torch.allclose(attribute(model, x, "gradient"), weights.expand(2, *SHAPE))
    assert torch.allclose(attribute(model, x, "gradient_x_input"), x[:, 0] * weights)
    # integrated gradients from a zero baseline of a linear function: exactly gradient × input
    assert torch.allclose(attribute(model, x, "integrated_gradients"), x[:, 0] * weights, rtol=1e-10)
    # SmoothGrad of a linear function: its gradient, whatever the noise
    assert torch.allclose(attribute(model, x, "smoothgrad", AttributionOptions(smoothgrad_samples=3)),
                          weights.expand(2, *SHAPE))


def test_region_occlusion_equals_the_prediction_drop_when_a_region_is_zeroed():
    model, x = _model(), _inputs()
    labels = np.zeros(SHAPE, np.int64)
    labels[2:8, 3:9, 2:6], labels[9:14, 10:16, 7:12] = 1, 2
    maps = attribute(model, x, "region_occlusion", region_labels=labels)
    with torch.no_grad():
        full = model(x)[:, 0]
        for region in (0, 1, 2):
            occluded = x.clone()
            occluded[:, :, torch.from_numpy(labels == region)] = 0
            drop = full - model(occluded)[:, 0]
            inside = torch.from_numpy(labels == region)
            assert torch.allclose(maps[:, inside], drop[:, None].expand(-1, int(inside.sum())))


def test_occlusion_of_one_patch_equals_the_prediction_drop():
    model, x = _model(), _inputs()
    options = AttributionOptions(occlusion_patch=8, occlusion_stride=8)
    maps = attribute(model, x, "occlusion", options)
    occluded = x.clone()
    occluded[:, :, 0:8, 0:8, 0:8] = 0
    with torch.no_grad():
        drop = model(x)[:, 0] - model(occluded)[:, 0]
    assert torch.allclose(maps[:, 0, 0, 0], drop)


def test_grad_cam_is_upsampled_to_the_input_grid():
    maps = attribute(_model(), _inputs(), "grad_cam")
    assert maps.shape == (2, *SHAPE)


def test_noise_optimisation_finds_the_voxels_the_prediction_depends_on():
    weights = torch.zeros(SHAPE, dtype=torch.float64)
    weights[4:10, 5:12, 3:9] = 1.0
    model, x = Weighted(weights), _inputs()
    importance = noise_optimisation(model, x, steps=60, learning_rate=0.1, sparsity=0.05)
    inside = importance[:, weights > 0].mean()
    outside = importance[:, weights == 0].mean()
    assert inside > outside + 0.3


def test_noise_model_learns_over_a_cohort_where_the_prediction_needs_its_inputs():
    """Bintsi et al.'s noise network, trained over 40 inputs with the model frozen, puts little noise on the
    planted box the prediction sums (visible in each input, as anatomy is) and much elsewhere, also on new inputs."""
    box = torch.zeros(SHAPE)
    box[4:10, 5:12, 3:9] = 1.0
    model = Weighted(nn.Parameter(box.clone()))
    generator = torch.Generator().manual_seed(4)
    volumes = torch.randn(48, 2, *SHAPE, generator=generator) * 0.5 + 2 * box
    with torch.no_grad():
        targets = model(volumes)[:, 0].numpy()
    weights = model.weights.detach().clone()
    noise_net = train_noise_model(model, lambda positions: volumes[positions].numpy(), np.arange(40), targets[:40],
                                  sparsity=30.0, epochs=10, learning_rate=1e-2)
    assert torch.equal(model.weights, weights) and model.weights.requires_grad  # frozen, then given back
    importance = noise_model_importance(noise_net, volumes[40:])  # participants it was not trained on
    inside, outside = importance[:, box > 0].mean(), importance[:, box == 0].mean()
    assert inside > 0.9 and outside < 0.2
    with pytest.raises(ValueError, match="noise_model needs the member's trained noise network"):
        attribute(model, volumes[:2], "noise_model")


def test_a_binned_model_explains_each_inputs_most_probable_bin():
    """Soft-label models (one output per age bin) are explained at the bin they predict, per input."""
    torch.manual_seed(4)
    model = build_model(ModelSpec("mrinet", SHAPE, 2, 4, bin_centres=(20.0, 40.0, 60.0, 80.0))).double().eval()
    with torch.no_grad():
        model.output_layer.weight.normal_(0, 0.5)
    x = _inputs()
    x[1] = torch.randn(x[1].shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    chosen = model(x).argmax(dim=1)
    assert chosen.tolist() == [0, 1]  # two inputs, two bins
    inputs = x.clone().requires_grad_(True)
    picked = model(inputs).gather(1, chosen[:, None]).sum()
    (gradient,) = torch.autograd.grad(picked, inputs)
    assert torch.allclose(attribute(model, x, "gradient"), gradient.sum(dim=1))
    by_bin = [attribute(model, x[[row]], "gradient", AttributionOptions(target=int(chosen[row]))) for row in range(2)]
    assert torch.allclose(attribute(model, x, "lrp"), torch.cat([attribute(model, x[[row]], "lrp", AttributionOptions(
        target=int(chosen[row]))) for row in range(2)]))
    assert torch.allclose(torch.cat(by_bin), gradient.sum(dim=1))


@pytest.mark.parametrize("name", ["deeplift", "lrp_beta", "lrp_beta0.5", "lrp_beta-1", "lrp_beta0_5x"])
def test_unknown_method_is_named(name):
    with pytest.raises(ValueError, match=f"unknown attribution method '{re.escape(name)}'.*lrp_beta0_5"):
        attribute(_model(), _inputs(), name)


def test_explain_writes_every_method_member_and_subject_and_the_ensemble_mean(trained, tmp_path, client):
    store, models, subjects = trained
    methods = ["lrp", "gradient_x_input"]
    relevance = explain(tmp_path / "relevance.zarr", images=store, models=models, methods=methods, members=[0, 1],
                        subjects=subjects, subjects_per_chunk=4, execution=Execution(client))
    assert relevance.relevance.dims == ("attribution", "member", "subject", "voxel")
    assert list(relevance.attribution.values) == methods and list(relevance.subject.values) == subjects
    assert relevance.relevance.notnull().all()
    volumes = CohortVolumes(store, ["T1"])
    positions = [list(volumes.subjects).index(subject) for subject in subjects[:3]]
    model, _ = load_member(models / "member_1")
    expected = volumes.box.transform(attribute(model, torch.from_numpy(volumes.read(positions)), "lrp").numpy())
    np.testing.assert_allclose(relevance.relevance.sel(attribution="lrp", member=1).isel(subject=slice(0, 3)).values,
                               expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(relevance.relevance_mean.values, relevance.relevance.mean("member").values,
                               rtol=1e-6)
    assert (relevance.i.values == volumes.dataset.i.values).all()
    assert relevance.age.dims == ("subject",)
    assert set(relevance.split.values) <= {"validation", "test"}


def test_a_notebook_selects_a_methods_maps_by_name_and_plain_xarray_opens_both_stores(trained, tmp_path):
    store, models, subjects = trained
    out = tmp_path / "relevance.zarr"
    explain(out, images=store, models=models, methods=["lrp", "gradient"], members=[0, 1], subjects=subjects)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata: xarray's default open needs no fallback
        relevance, images = xr.open_zarr(out), xr.open_zarr(store)
    maps = relevance.relevance_mean.sel(attribution="lrp")
    assert maps.dims == ("subject", "voxel") and maps.sizes["subject"] == len(subjects)
    np.testing.assert_array_equal(maps.values, open_relevance(out).relevance_mean.values[0])
    np.testing.assert_array_equal(images.T1.values, open_cohort(store).T1.values)


def test_a_relevance_store_of_the_earlier_layout_is_named_and_rewritten_by_explain(trained, tmp_path):
    store, models, subjects = trained
    out = tmp_path / "relevance.zarr"
    plan = {"images": store, "models": models, "methods": ["gradient"], "members": [0], "subjects": subjects[:2]}
    explain(out, **plan)
    zarr.open_group(out, mode="r+").attrs["layout"] = "relcohort.relevance/1"  # written before the rename
    with pytest.raises(ValueError, match=r"another relcohort version \(layout relcohort.relevance/1.*run the catalog"):
        open_relevance(out)
    assert relevance_key(out) is None  # what depends on it is not current either
    assert explain(out, **plan).relevance.dims[0] == "attribution"


def test_each_member_is_loaded_and_made_canonical_for_lrp_once_for_all_its_blocks_and_methods(trained, tmp_path,
                                                                                               monkeypatch):
    from engine.models import lrp as lrp_module

    store, models, subjects = trained
    made = []
    canonical = lrp_module.canonical
    monkeypatch.setattr(lrp_module, "canonical", lambda model: made.append(model) or canonical(model))
    monkeypatch.setattr(relevance_module, "_LAST_MEMBER", threading.local())  # no member kept from other tests
    relevance = explain(tmp_path / "relevance.zarr", images=store, models=models, members=[0, 1],
                        methods=["lrp", "lrp_epsilon", "gradient"], subjects=subjects, subjects_per_chunk=2)
    assert len(subjects) > 2 and len(made) == 2  # two members, each over several blocks and two LRP methods
    volumes = CohortVolumes(store, ["T1"])
    positions = [list(volumes.subjects).index(subject) for subject in subjects[-2:]]
    model, _ = load_member(models / "member_0")
    fresh = attribute(model, torch.from_numpy(volumes.read(positions)), "lrp_epsilon").numpy()
    np.testing.assert_array_equal(relevance.relevance.sel(attribution="lrp_epsilon", member=0).values[-2:],
                                  volumes.box.transform(fresh))


def test_explain_trains_a_noise_network_per_member_once(trained, tmp_path):
    store, models, subjects = trained
    plan = {"images": store, "models": models, "methods": ["noise_model"], "members": [0, 1], "subjects": subjects,
            "options": AttributionOptions(noise_model_epochs=1)}
    relevance = explain(tmp_path / "relevance.zarr", **plan)
    maps = relevance.relevance.values
    assert ((maps > 0) & (maps < 1)).all()
    stamps = [(models / f"noise_{member}.safetensors").stat().st_mtime_ns for member in (0, 1)]
    explain(tmp_path / "again.zarr", **plan)  # same members, images, split and settings: the networks are kept
    assert [(models / f"noise_{member}.safetensors").stat().st_mtime_ns for member in (0, 1)] == stamps


def test_noise_networks_of_another_design_are_trained_again_and_their_maps_redone(trained, tmp_path, monkeypatch):
    store, models, subjects = trained
    plan = {"images": store, "models": models, "methods": ["noise_model"], "members": [0], "subjects": subjects,
            "options": AttributionOptions(noise_model_epochs=1)}
    explain(tmp_path / "relevance.zarr", **plan)
    stamp = (models / "noise_0.safetensors").stat().st_mtime_ns
    key = relevance_key(tmp_path / "relevance.zarr")
    monkeypatch.setattr(relevance_module, "_noise_network_layout", lambda: {"out_near.weight": [1, 8, 1, 1, 1]})
    explain(tmp_path / "relevance.zarr", **plan)
    assert (models / "noise_0.safetensors").stat().st_mtime_ns != stamp
    assert relevance_key(tmp_path / "relevance.zarr") != key


def test_explain_resumes_the_blocks_that_are_missing(trained, tmp_path):
    store, models, subjects = trained
    out = tmp_path / "relevance.zarr"
    plan = {"images": store, "models": models, "methods": ["gradient"], "members": [0, 1], "subjects": subjects,
            "subjects_per_chunk": 4}
    first = explain(out, **plan).relevance.values
    group = zarr.open_group(out, mode="r+")
    group["explained"][1, 4:] = False  # as if the run had died before member 1's second block
    group["relevance"][0, 1, 4:] = np.nan
    stamp = group["relevance"][0, 0, :4].copy()
    again = explain(out, **plan)
    np.testing.assert_array_equal(again.relevance.values, first)
    np.testing.assert_array_equal(zarr.open_group(out)["relevance"][0, 0, :4], stamp)
    with pytest.raises(ValueError, match="unknown attribution method"):
        explain(out, images=store, models=models, methods=["gradcam"], members=[0], subjects=subjects)
    with pytest.raises(ValueError, match="not complete"):
        explain(out, images=store, models=models, methods=["gradient"], members=[0], subjects=["sub-nobody"])


def test_an_interrupted_relevance_store_is_not_opened(trained, tmp_path):
    store, models, subjects = trained
    out = tmp_path / "relevance.zarr"
    explain(out, images=store, models=models, methods=["gradient"], members=[0], subjects=subjects[:2])
    zarr.open_group(out, mode="r+").attrs["state"] = "running"
    with pytest.raises(ValueError, match="incomplete"):
        open_relevance(out)


def _timed_sleep(seconds):
    import time

    started = time.monotonic()
    time.sleep(seconds)
    return started, time.monotonic()


def test_tasks_in_flight_are_capped_and_the_next_goes_out_as_one_finishes(client):
    from engine.tasks import run_tasks

    items = [0.3, 0.1, 0.2, 0.1]
    uncapped = sorted(interval for _, interval in run_tasks(_timed_sleep, items, client=client))
    assert any(after[0] < before[1] for before, after in itertools.pairwise(uncapped))  # 2 workers: overlap
    capped = dict(run_tasks(_timed_sleep, items[:3], client=client, in_flight=1))
    assert sorted(capped) == sorted(items[:3])
    intervals = sorted(capped.values())
    assert all(after[0] >= before[1] for before, after in itertools.pairwise(intervals))  # one at a time


@pytest.mark.parametrize("distributed", [False, True])
def test_follow_ups_queued_while_iterating_run_in_the_same_slots(client, distributed):
    """A finished task's follow-up appended to the deque goes out when a slot frees, also after the last task."""
    from collections import deque

    from engine.tasks import run_tasks

    queue = deque([0.2, 0.1])
    seen = []
    for item, interval in run_tasks(_timed_sleep, queue, client=client if distributed else None, in_flight=1):
        seen.append((item, interval))
        if item in (0.2, 0.1):
            queue.append(item / 10)  # a follow-up of each first task, the second's queued after the last went out
    assert sorted(item for item, _ in seen) == sorted([0.2, 0.1, 0.02, 0.01])
    intervals = sorted(interval for _, interval in seen)
    assert all(after[0] >= before[1] for before, after in itertools.pairwise(intervals))  # one slot: one at a time


def test_a_started_task_runs_on_a_worker_while_this_process_goes_on(client):
    import time

    from engine.tasks import start_task

    result = start_task(_timed_sleep, 0.5, client=client)
    asked = time.monotonic()  # back at once, while the task sleeps on a worker
    started, ended = result()
    assert ended - started >= 0.5 and asked < ended
    later = start_task(_timed_sleep, 0.0)  # without a client: run when its result is asked for
    before = time.monotonic()
    assert later()[0] >= before


def test_tasks_ask_for_a_gpu_only_where_workers_advertise_one():
    from distributed import Client, LocalCluster

    from engine.tasks import gpu_resources, run_tasks

    assert gpu_resources(None) is None
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      resources={"GPU": 1}) as cluster, Client(cluster) as client:
        assert gpu_resources(client) == {"GPU": 1}
        results = dict(run_tasks(lambda item: item * 2, [1, 2, 3], client=client, resources=gpu_resources(client)))
        assert results == {1: 2, 2: 4, 3: 6}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        assert gpu_resources(client) is None
