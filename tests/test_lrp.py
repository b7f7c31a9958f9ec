"""LRP rules against independent references: gradient×input, conservation, captum."""

import copy

import pytest
import torch
from captum.attr import LRP
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule
from torch import nn

from engine.models.lrp import AlphaBeta, Epsilon, lrp, merge_batchnorm
from engine.models.networks import ModelSpec, build_model, place

SHAPE = (12, 14, 10)


def _model(name="mrinet", bias_free=False, shape=SHAPE, **options):
    torch.manual_seed(3)
    model = build_model(ModelSpec(name, shape, 2, 1, options)).double().eval()
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            nn.init.normal_(module.weight, std=0.3)
            nn.init.zeros_(module.bias) if bias_free else nn.init.normal_(module.bias, std=0.05)
    return model


def _inputs(signed=False, shape=SHAPE):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, *shape, generator=generator, dtype=torch.float64)
    return x if signed else x.abs()


def _gradient_x_input(model, x):
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    return (x * gradient).detach()


def test_lrp_zero_equals_gradient_times_input_on_bias_free_relu_network():
    model, x = _model(bias_free=True), _inputs(signed=True)
    relevance, reference = lrp(model, x, "zero"), _gradient_x_input(model, x)
    assert torch.allclose(relevance, reference, rtol=1e-8, atol=1e-8 * reference.abs().max().item())


@pytest.mark.parametrize("preset", ["zplus", "alpha2beta1"])
@pytest.mark.parametrize("signed", [False, True])
def test_alpha_beta_rules_conserve_relevance_without_biases(preset, signed):
    model, x = _model(bias_free=True), _inputs(signed)
    output = model(x)[:, 0].detach()
    totals = lrp(model, x, preset).sum(dim=(1, 2, 3, 4))
    assert torch.allclose(totals, output, rtol=1e-6)


def test_epsilon_rule_conserves_relevance_as_epsilon_vanishes_and_absorbs_it_otherwise():
    model, x = _model(bias_free=True), _inputs()
    output = model(x)[:, 0].detach()
    tiny = {nn.Linear: Epsilon(1e-9), nn.Conv3d: Epsilon(1e-9)}
    assert torch.allclose(lrp(model, x, tiny).sum(dim=(1, 2, 3, 4)), output, rtol=1e-6)
    large = {nn.Linear: Epsilon(10.0), nn.Conv3d: Epsilon(10.0)}
    assert (lrp(model, x, large).sum(dim=(1, 2, 3, 4)).abs() < output.abs()).all()


@pytest.mark.parametrize("preset", ["epsilon", "study"])
def test_lrp_equals_captum_where_both_apply(preset):
    model, x = _model(), _inputs()
    reference_model = copy.deepcopy(model)
    for module in reference_model.modules():
        if isinstance(module, nn.Linear):
            module.rule = EpsilonRule(0.1)
        elif isinstance(module, nn.Conv3d):
            module.rule = EpsilonRule(0.1) if preset == "epsilon" else Alpha1_Beta0_Rule(set_bias_to_zero=True)
        elif isinstance(module, nn.MaxPool3d):
            module.rule = EpsilonRule(1e-12)
    reference = LRP(reference_model).attribute(x.clone(), target=0).detach()
    relevance = lrp(model, x, preset)
    assert torch.allclose(relevance, reference, rtol=1e-6, atol=1e-9 * reference.abs().max().item())


class _KeptGate(nn.ReLU):
    """A ReLU that LRP rules leave in place (they absorb only exact ``nn.ReLU`` modules)."""


def _with_kept_gates(model):
    kept = copy.deepcopy(model)
    for sequential in [module for module in kept.modules() if isinstance(module, nn.Sequential)]:
        for index, module in enumerate(sequential):
            if type(module) is nn.ReLU:
                sequential[index] = _KeptGate()
    return kept


@pytest.mark.parametrize("preset", ["study", "alpha2beta1", "epsilon", "zero"])
def test_relus_absorbed_by_the_rule_before_them_change_no_relevance(preset):
    """Rules clamp z and zero their scale where z ≤ 0 in place of the ReLU that follows; the
    relevance equals that with the ReLU and autograd's own gate."""
    model, x = _model(), _inputs(signed=True)
    relevance, reference = lrp(model, x, preset), lrp(_with_kept_gates(model), x, preset)
    assert torch.allclose(relevance, reference, rtol=1e-12, atol=1e-14 * reference.abs().max().item())


def test_absorbed_relus_are_put_back_even_when_lrp_fails():
    model, x = _model(), _inputs()
    relus = [module for module in model.modules() if type(module) is nn.ReLU]
    with pytest.raises(IndexError):
        lrp(model, x, "study", target=3)  # the model has one output
    assert [module for module in model.modules() if type(module) is nn.ReLU] == relus
    assert not any(isinstance(module, nn.Identity) for module in model.modules())


def test_a_layer_used_twice_does_not_absorb_its_relu():
    """A convolution used before a ReLU and again before a layer without a rule keeps the ReLU."""
    torch.manual_seed(4)
    conv = nn.Conv3d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv, nn.Identity(), nn.Flatten(), nn.Linear(2 * 6 * 6 * 6, 1)).double()
    x = torch.randn(2, 2, 6, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    relevance, reference = lrp(model.eval(), x, "study"), lrp(_with_kept_gates(model), x, "study")
    assert torch.allclose(relevance, reference, rtol=1e-12, atol=1e-14 * reference.abs().max().item())


def test_patch_individual_convolutions_take_rules_like_any_convolution():
    shape = (24, 20, 20)  # the last convolution sees 2×2×2 voxels: one per patch
    model, x = _model("mrinet_pif", bias_free=True, shape=shape), _inputs(shape=shape)
    output = model(x)[:, 0].detach()
    assert torch.allclose(lrp(model, x, "zplus").sum(dim=(1, 2, 3, 4)), output, rtol=1e-6)


def test_merged_batchnorm_keeps_the_function_and_lrp_runs_on_sfcn():
    model = _model("sfcn", channels=[4, 6, 8, 6])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.normal_(0, 0.3)
            module.running_var.uniform_(0.5, 2)
            nn.init.normal_(module.weight, 1, 0.2)
            nn.init.normal_(module.bias, 0, 0.2)
    x = _inputs()
    merged = merge_batchnorm(model)
    assert not any(isinstance(module, nn.BatchNorm3d) for module in merged.modules())
    assert torch.allclose(merged(x), model(x), rtol=1e-10)
    relevance = lrp(merged, x, "zplus")
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_batchnorm_that_follows_no_convolution_is_refused():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.BatchNorm3d(2)).eval()
    with pytest.raises(ValueError, match="do not directly follow a Conv3d"):
        merge_batchnorm(model)


def test_bad_rules_and_presets_are_refused():
    with pytest.raises(ValueError, match="α − β = 1 and β ≥ 0"):
        AlphaBeta(2.0, 0.5)
    with pytest.raises(ValueError, match="α − β = 1 and β ≥ 0"):
        AlphaBeta(0.5, -0.5)
    with pytest.raises(ValueError, match="unknown LRP preset 'gamma'"):
        lrp(_model(), _inputs(), "gamma")


@pytest.mark.parametrize("preset", ["study", "alpha2beta1", "epsilon"])
def test_channels_last_placement_changes_no_relevance(preset):
    """The engine places models channels-last on CPU (engine.models.networks.place); outputs and LRP maps
    equal those of PyTorch's default layout, signed inputs included."""
    model, x = _model(), _inputs(signed=True)
    placed = place(copy.deepcopy(model), "cpu")
    assert placed.features[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not model.features[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(placed(x), model(x), rtol=1e-12)
    relevance, reference = lrp(placed, x, preset), lrp(model, x, preset)
    assert torch.allclose(relevance, reference, rtol=1e-9, atol=1e-12 * reference.abs().max().item())
