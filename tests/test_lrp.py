"""LRP rules against independent references: iNNvestigate's rules written out in numpy float64,
gradient×input, conservation, captum."""

import copy
from itertools import product

import numpy as np
import pytest
import torch
from captum.attr import LRP
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from engine.models.attribution import AttributionOptions, attribute
from engine.models.lrp import (
    COMPOSITES,
    AlphaBeta,
    AlphaBetaEverywhere,
    Epsilon,
    EpsilonAlphaBeta,
    EpsilonEverywhere,
    PresetA,
    PresetB,
    ZPlus,
    ZPlusEverywhere,
    canonical,
    composite,
    lrp,
)
from engine.models.networks import ModelSpec, build_model, place

SHAPE = (12, 14, 10)


def _model(name="mrinet", bias_free=False, shape=SHAPE, in_channels=2, **options):
    torch.manual_seed(3)
    model = build_model(ModelSpec(name, shape, in_channels, 1, options)).double().eval()
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            nn.init.normal_(module.weight, std=0.3)
            nn.init.zeros_(module.bias) if bias_free else nn.init.normal_(module.bias, std=0.05)
    return model


def _inputs(signed=False, shape=SHAPE, channels=2):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, channels, *shape, generator=generator, dtype=torch.float64)
    return x if signed else x.abs()


def _gradient_x_input(model, x):
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    return (x * gradient).detach()


# --- iNNvestigate's rules (relevance_rule.py), one layer at a time in numpy float64 ---------------


def _safe(z):
    """iNNvestigate's safe_divide denominator: exact zeros become K.epsilon() = 1e-7."""
    return np.where(z == 0, 1e-7, z)


def _conv(x, weight):
    """A 'same'-padded 3D cross-correlation of one sample (channels, x, y, z), without bias."""
    k = weight.shape[-1]
    padded = np.pad(x, ((0, 0), *[(k // 2, k // 2)] * 3))
    out = np.zeros((weight.shape[0], *x.shape[1:]))
    for a, b, c in product(range(k), repeat=3):
        window = padded[:, a:a + x.shape[1], b:b + x.shape[2], c:c + x.shape[3]]
        out += np.einsum("oc,cxyz->oxyz", weight[:, :, a, b, c], window)
    return out


def _conv_backward(signal, weight, shape):
    """Σ_j w_ij s_j: the transpose of :func:`_conv` applied to an output-shaped signal."""
    k = weight.shape[-1]
    grown = np.zeros((weight.shape[1], *[n + 2 * (k // 2) for n in shape]))
    for a, b, c in product(range(k), repeat=3):
        grown[:, a:a + shape[0], b:b + shape[1], c:c + shape[2]] += np.einsum("oc,oxyz->cxyz",
                                                                              weight[:, :, a, b, c], signal)
    return grown[:, k // 2:k // 2 + shape[0], k // 2:k // 2 + shape[1], k // 2:k // 2 + shape[2]]


def _max_pool(x):
    """3×3×3 max-pooling, stride 2, padding 1: the output and each output's winning input (flat index)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1)), constant_values=-np.inf)
    windows = sliding_window_view(padded, (3, 3, 3), axis=(1, 2, 3))[:, ::2, ::2, ::2]
    flat = windows.reshape(*windows.shape[:4], 27)
    best = flat.argmax(axis=-1)
    a, b, c = np.unravel_index(best, (3, 3, 3))
    channel, i, j, k = np.indices(best.shape)
    winners = np.ravel_multi_index((channel, 2 * i + a - 1, 2 * j + b - 1, 2 * k + c - 1), x.shape)
    return flat.max(axis=-1), winners


def _epsilon_rule(x, weight, bias, relevance, epsilon, use_bias, forward, backward):
    z = forward(x, weight) + (bias if use_bias else 0)
    denominator = z + np.where(z >= 0, 1, -1) * epsilon if epsilon else _safe(z)
    return x * backward(relevance / denominator, weight)


def _alpha_beta_rule(x, weight, bias, relevance, alpha, beta, use_bias, forward, backward):
    """AlphaBetaRule.apply: each part's layer copy keeps its sign's share of the bias (b⁺ or b⁻)."""
    positive_x, negative_x = np.maximum(x, 0), np.minimum(x, 0)
    positive_w, negative_w = np.maximum(weight, 0), np.minimum(weight, 0)
    positive_b, negative_b = (np.maximum(bias, 0), np.minimum(bias, 0)) if use_bias else (0, 0)

    def part(w1, b1, w2, b2):
        z = forward(positive_x, w1) + b1 + forward(negative_x, w2) + b2
        signal = relevance / _safe(z)
        return positive_x * backward(signal, w1) + negative_x * backward(signal, w2)

    activating = part(positive_w, positive_b, negative_w, negative_b)
    if not beta:
        return activating
    return alpha * activating - beta * part(negative_w, negative_b, positive_w, positive_b)


def _reference_lrp(model, x, dense_rule, conv_rule):
    """LRP of an MRInet, sample by sample, each layer's relevance from its stored input; the output
    scale is folded into the output layer as in the same network trained without it."""
    features = [m for m in model.features if not isinstance(m, nn.ReLU)]
    hidden, output = model.head[1], model.head[3]
    scale = model.output_scale.detach().numpy()
    numpy = lambda tensor: tensor.detach().numpy().astype(np.float64)  # noqa: E731
    dense = (lambda a, w: w @ a, lambda s, w: w.T @ s)
    maps = []
    for sample in x.numpy():
        stored, a = [], sample
        for layer in features:
            stored.append(a)
            if isinstance(layer, nn.Conv3d):
                a = np.maximum(_conv(a, numpy(layer.weight)) + numpy(layer.bias)[:, None, None, None], 0)
            else:
                a, winners = _max_pool(a)
                stored[-1] = (stored[-1], winners)
        flat = a.reshape(-1)
        h = np.maximum(numpy(hidden.weight) @ flat + numpy(hidden.bias), 0)
        w_out, b_out = numpy(output.weight) * scale[:, None], numpy(output.bias) * scale
        relevance = w_out @ h + b_out  # LRP starts from the output's value
        relevance = dense_rule(h, w_out, b_out, relevance[:1], *dense)
        relevance = dense_rule(flat, numpy(hidden.weight), numpy(hidden.bias), relevance, *dense).reshape(a.shape)
        for layer, kept in zip(features[::-1], stored[::-1], strict=True):
            if isinstance(layer, nn.Conv3d):
                weight, bias = numpy(layer.weight), numpy(layer.bias)[:, None, None, None]
                relevance = conv_rule(kept, weight, bias, relevance, _conv,
                                      lambda s, w, shape=kept.shape[1:]: _conv_backward(s, w, shape))
            else:
                before, winners = kept
                spread = np.zeros(before.size)
                np.add.at(spread, winners.reshape(-1), relevance.reshape(-1))
                relevance = spread.reshape(before.shape)
        maps.append(relevance)
    return torch.from_numpy(np.stack(maps))


def _epsilon(epsilon, use_bias=True):
    return lambda x, w, b, r, forward, backward: _epsilon_rule(x, w, b, r, epsilon, use_bias, forward, backward)


def _alpha_beta(alpha, beta, use_bias=True):
    return lambda x, w, b, r, forward, backward: _alpha_beta_rule(x, w, b, r, alpha, beta, use_bias, forward,
                                                                  backward)


REFERENCES = {  # method: (rule of the dense layers, rule of the convolutions, options)
    "lrp": (_epsilon(0.1), _alpha_beta(1, 0), {}),
    "lrp_ignore_bias": (_epsilon(0.1, False), _alpha_beta(1, 0, False), {}),
    "lrp_epsilon": (_epsilon(0.1), _epsilon(0.1), {}),
    "lrp_alpha2beta1": (_alpha_beta(2, 1), _alpha_beta(2, 1), {}),
    "lrp_alpha2beta1_ignore_bias": (_alpha_beta(2, 1, False), _alpha_beta(2, 1, False), {}),
    "lrp_zplus": (_alpha_beta(1, 0, False), _alpha_beta(1, 0, False), {}),
    "lrp_zero": (_epsilon(0), _epsilon(0), {}),
    # points of Böhle et al.'s β sweep: the αβ-rule with α = 1 + β on every layer
    "lrp_beta0_5": (_alpha_beta(1.5, 0.5), _alpha_beta(1.5, 0.5), {}),
    "lrp_beta0_25": (_alpha_beta(1.25, 0.25), _alpha_beta(1.25, 0.25), {}),
    # the catalog's ε, α, β: sequential_preset_b with ε = 0.5
    "lrp_preset_b": (_epsilon(0.5), _alpha_beta(2, 1), {"lrp_epsilon": 0.5, "lrp_alpha": 2.0, "lrp_beta": 1.0}),
}


# one input channel: the first layer's gradient to the input by depthwise convolutions
# (engine.models.input_gradient), over the sign split too; two: only where the inputs are non-negative
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("method", list(REFERENCES))
def test_lrp_methods_equal_innvestigates_rules_with_biases(method, signed, channels):
    """Biases drawn large enough to matter, a rescaled output, signed inputs (z-scored scans) or not."""
    model, x = _model(in_channels=channels), _inputs(signed, channels=channels)
    with torch.no_grad():
        model.output_scale.fill_(7.0)
        for module in model.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                module.bias.normal_(0, 0.5)
    dense_rule, conv_rule, options = REFERENCES[method]
    relevance = attribute(model, x, method.replace("_preset_b", ""), AttributionOptions(**options))
    reference = _reference_lrp(model, x, dense_rule, conv_rule).sum(dim=1)
    assert reference.abs().max() > 0
    assert torch.allclose(relevance, reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())


def test_biases_change_the_study_presets_relevance():
    """The bias-including and bias-free presets differ on a network with biases and agree without."""
    model, x = _model(), _inputs()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                module.bias.normal_(0, 0.5)
    with_bias, without = lrp(model, x, "preset_a"), lrp(model, x, PresetA(bias=False))
    assert (with_bias - without).abs().max() > 0.01 * without.abs().max()
    model = _model(bias_free=True)
    assert torch.allclose(lrp(model, x, "preset_a"), lrp(model, x, PresetA(bias=False)), rtol=1e-10)


def test_folding_the_output_scale_keeps_the_function():
    model, x = _model(), _inputs()
    with torch.no_grad():
        model.output_scale.fill_(7.0)
    prepared = canonical(model).model
    assert float(prepared.output_scale[0]) == 1.0 and float(model.output_scale[0]) == 7.0
    assert torch.allclose(prepared(x), model(x), rtol=1e-12)


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


@pytest.mark.parametrize("preset", ["epsilon", "preset_a"])
def test_lrp_equals_captum_where_both_apply(preset):
    """captum's z⁺ ignores biases: compared with ε (bias included) on dense layers and z⁺ on convolutions."""
    model, x = _model(), _inputs()
    reference_model = copy.deepcopy(model)
    for module in reference_model.modules():
        if isinstance(module, nn.Linear):
            module.rule = EpsilonRule(0.1)
        elif isinstance(module, nn.Conv3d):
            module.rule = EpsilonRule(0.1) if preset == "epsilon" else Alpha1_Beta0_Rule(set_bias_to_zero=True)
        elif isinstance(module, nn.MaxPool3d):
            module.rule = EpsilonRule(1e-12)
    reference = LRP(reference_model).attribute(x.clone().requires_grad_(True), target=0).detach()
    rules = "epsilon" if preset == "epsilon" else {nn.Linear: Epsilon(0.1), nn.Conv3d: ZPlus()}
    relevance = lrp(model, x, rules)
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


@pytest.mark.parametrize("preset", ["preset_a", PresetA(bias=False), "alpha2beta1", "epsilon", "zero"])
def test_relus_absorbed_by_the_rule_before_them_change_no_relevance(preset):
    """Rules clamp z and zero their scale where z ≤ 0 in place of the ReLU that follows; the
    relevance equals that with the ReLU and autograd's own gate."""
    from engine.models.lrp import _following_relus

    model, x = _model(), _inputs(signed=True)
    convolutions = [module for module in model.features if isinstance(module, nn.Conv3d)]
    assert set(convolutions) <= set(_following_relus(model))  # MRInet's ReLUs come after its max-pools
    relevance, reference = lrp(model, x, preset), lrp(_with_kept_gates(model), x, preset)
    assert torch.allclose(relevance, reference, rtol=1e-12, atol=1e-14 * reference.abs().max().item())


def test_absorbed_relus_are_put_back_even_when_lrp_fails():
    model, x = _model(), _inputs()
    relus = [module for module in model.modules() if type(module) is nn.ReLU]
    with pytest.raises(IndexError):
        lrp(model, x, "preset_a", target=3)  # the model has one output
    assert [module for module in model.modules() if type(module) is nn.ReLU] == relus
    assert not any(isinstance(module, nn.Identity) for module in model.modules())


def test_a_layer_used_twice_does_not_absorb_its_relu():
    """A convolution used before a ReLU and again before a layer without a rule keeps the ReLU."""
    torch.manual_seed(4)
    conv = nn.Conv3d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv, nn.Identity(), nn.Flatten(), nn.Linear(2 * 6 * 6 * 6, 1)).double()
    x = torch.randn(2, 2, 6, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    relevance, reference = lrp(model.eval(), x, "preset_a"), lrp(_with_kept_gates(model), x, "preset_a")
    assert torch.allclose(relevance, reference, rtol=1e-12, atol=1e-14 * reference.abs().max().item())


def test_patch_individual_convolutions_take_rules_like_any_convolution():
    """z⁺ conserves relevance through patch-individual filters and the average over their overlaps."""
    shape = (48, 40, 40)  # the last convolution sees 3×3×3 voxels: 2×2×2 patches overlap by 1
    model, x = _model("mrinet_pif", bias_free=True, shape=shape), _inputs(shape=shape)
    assert (model.last_conv.coverage > 1).any()
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
    merged = canonical(model).model
    assert not any(isinstance(module, nn.BatchNorm3d) for module in merged.modules())
    assert torch.allclose(merged(x), model(x), rtol=1e-10)
    relevance = lrp(merged, x, "zplus")
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_the_four_block_cnn_folds_its_batchnorms_and_conserves_relevance():
    """Böhle et al.'s network: Conv → BatchNorm → ReLU → MaxPool blocks. Folding keeps the function with any
    BatchNorm statistics; with BatchNorms that add no offset (and no biases) z⁺ conserves the output."""
    model = _model("cnn4")
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm3d)]
    assert len(norms) == 4
    for module in norms:
        module.running_var.uniform_(0.5, 2)
        nn.init.normal_(module.weight, 1, 0.2)
    x = _inputs()
    for offset in (False, True):
        for module in norms:
            module.running_mean.normal_(0, 0.3) if offset else module.running_mean.zero_()
            nn.init.normal_(module.bias, 0, 0.2) if offset else nn.init.zeros_(module.bias)
        merged = canonical(model).model
        assert not any(isinstance(module, nn.BatchNorm3d) for module in merged.modules())
        assert torch.allclose(merged(x), model(x), rtol=1e-10)
    bias_free = _model("cnn4", bias_free=True)
    for module in bias_free.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_var.uniform_(0.5, 2)
            nn.init.normal_(module.weight, 1, 0.2)
    output = bias_free(x)[:, 0].detach()
    assert torch.allclose(lrp(bias_free, x, "zplus").sum(dim=(1, 2, 3, 4)), output, rtol=1e-6)


def test_batchnorm_that_follows_no_convolution_is_refused():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.BatchNorm3d(2)).eval()
    with pytest.raises(ValueError, match="do not directly follow a Conv3d"):
        canonical(model)


def test_bad_rules_and_presets_are_refused():
    with pytest.raises(ValueError, match="α − β = 1 and β ≥ 0"):
        AlphaBeta(2.0, 0.5)
    with pytest.raises(ValueError, match="α − β = 1 and β ≥ 0"):
        AlphaBeta(0.5, -0.5)
    with pytest.raises(ValueError, match="unknown LRP composite 'gamma'"):
        lrp(_model(), _inputs(), "gamma")
    with pytest.raises(ValueError, match="α − β = 1"):
        AttributionOptions(lrp_alpha=2.0)


@pytest.mark.parametrize("preset", ["preset_a", "alpha2beta1", "epsilon"])
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


def test_composites_are_named_classes_whose_parameters_are_the_rules_parameters():
    """Each composite gives every weighted layer type the rule with its own ε, α, β and bias."""
    assert PresetA().rules() == {nn.Linear: Epsilon(0.1), nn.Conv3d: AlphaBeta(1.0, 0.0)}  # sequential_preset_a
    assert PresetB().rules() == {nn.Linear: Epsilon(0.1), nn.Conv3d: AlphaBeta(2.0, 1.0)}  # sequential_preset_b
    assert EpsilonAlphaBeta(0.3, 3.0, 2.0, bias=False).rules() == {nn.Linear: Epsilon(0.3, False),
                                                                   nn.Conv3d: AlphaBeta(3.0, 2.0, False)}
    assert EpsilonEverywhere(0.7).rules() == {nn.Linear: Epsilon(0.7), nn.Conv3d: Epsilon(0.7)}
    assert AlphaBetaEverywhere(3.0, 2.0).rules() == {nn.Linear: AlphaBeta(3.0, 2.0), nn.Conv3d: AlphaBeta(3.0, 2.0)}
    assert ZPlusEverywhere().rules() == {nn.Linear: ZPlus(), nn.Conv3d: ZPlus()}
    assert composite("zero").rules() == {nn.Linear: Epsilon(0.0), nn.Conv3d: Epsilon(0.0)}
    assert set(COMPOSITES) == {"preset_a", "preset_b", "epsilon", "alpha2beta1", "zplus", "zero"}
    model, x = _model(), _inputs(signed=True)
    assert not torch.allclose(lrp(model, x, EpsilonEverywhere(0.1)), lrp(model, x, EpsilonEverywhere(5.0)))


def test_the_former_name_of_preset_a_still_works_with_a_warning_naming_the_new_one():
    model, x = _model(), _inputs()
    with pytest.warns(DeprecationWarning, match="'study' is now called 'preset_a'"):
        relevance = lrp(model, x, "study")
    assert torch.equal(relevance, lrp(model, x, "preset_a"))


def test_one_canonical_form_serves_every_composite_and_batch_and_leaves_the_model_alone():
    model, x = _model(), _inputs(signed=True)
    with torch.no_grad():
        model.output_scale.fill_(7.0)
    form = canonical(model)
    assert form.model is not model and float(model.output_scale[0]) == 7.0
    for rules in ("preset_a", "epsilon", "zero"):
        for batch in (x[:1], x):
            assert torch.equal(lrp(form, batch, rules), lrp(model, batch, rules))
    kinds = [type(module) for module in form.model.modules()]
    assert kinds == [type(module) for module in canonical(model).model.modules()]  # the ReLUs put back
