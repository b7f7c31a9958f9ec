"""Layer-wise Relevance Propagation for 3D CNNs: rules, composites, and the model rewritten once for them.

In the manner of zennit: each rule (:class:`Epsilon`, :class:`AlphaBeta`) is a few declarative
lines on one shared mechanism; a composite is a small named class saying which rule each weighted
layer type gets (:class:`PresetA` is iNNvestigate's ``lrp.sequential_preset_a``); :func:`canonical`
rewrites a model once (BatchNorms and the output scale folded in) before any rule runs, so one
canonical form serves every composite and batch of a model.

The rules are iNNvestigate's (the seed study's analyzer was its ``lrp.sequential_preset_a``),
biases included unless a rule says ``bias=False`` (iNNvestigate's ``…IgnoreBias`` rules). Where a
rule's denominator is zero the neuron passes no relevance; iNNvestigate divides by 1e-7 instead,
which gives the same relevance whenever the neuron's contributions are all zero (the denominator
is their sum, plus the bias for rules that include it; an exact cancellation is the exception).

All rules share one mechanism (the "gradient trick"): a forward hook keeps a layer's output
value ``z`` but routes the gradient through modified forward passes ``ẑ``::

    out = Σ c · (z / ẑ) ⊙ ẑ  +  detach(z − same)

so that ``input × gradient`` at the layer's input is the rule's relevance (the ε-rule, whose
``ẑ`` is ``z`` itself, only rescales the gradient arriving at the layer's output). ReLU, max-pooling
(winner takes all), average pooling (the z-rule of a linear map), dropout in eval mode and
reshapes pass the plain gradient. Relevance at the input is ``input × gradient`` of the output.

A ReLU that follows a weighted layer in an ``nn.Sequential`` — directly, or after max-pooling,
which commutes with it (MRInet pools before its ReLUs) — is absorbed by the layer's rule while the
rules are on: the rule clamps ``z`` in place and zeroes its scale where ``z ≤ 0`` (the ReLU's
gate), which saves the ReLU's own forward and backward passes (a fresh activation-sized buffer
and two passes over it) and changes no relevance.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from engine.models.input_gradient import (
    convolution_with_depthwise_input_gradient,
    input_gradient_by_depthwise,
    takes_depthwise_route,
)
from engine.models.networks import selected_outputs


def _forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's map with a rule's weights and bias (its gradient to a few-channel input by depthwise
    convolutions, :mod:`engine.models.input_gradient`)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if takes_depthwise_route(module, x.device, channels=x.shape[1]):
        return convolution_with_depthwise_input_gradient(module, x, weight, bias)
    return module._conv_forward(x, weight, bias)


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    """The memory format of a layer's output, to keep the extra passes in the model's layout."""
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _stabilise(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + ε·sign(z), with sign(0) = +1 (computed without autograd)."""
    with torch.no_grad():
        return z.abs().add_(epsilon).copysign_(z)


class _Route(torch.autograd.Function):
    """Forward: ``output`` unchanged. Backward: the gradient goes to each ``modified`` times its scale."""

    @staticmethod
    def forward(ctx, output, scales, *modified):
        ctx.scales = scales
        return output.view_as(output)

    @staticmethod
    def backward(ctx, gradient):
        # in place: each scale is used once, and a fresh activation-sized buffer costs page faults
        return (None, None, *(scale.mul_(gradient) for scale in ctx.scales))


class _SignSplit(torch.autograd.Function):
    """``[x⁺, x⁻]`` as channels (in the given memory layout); backward: each element of x takes
    the gradient of its own sign's half (a zero input has zero relevance either way)."""

    @staticmethod
    def forward(ctx, x, layout):
        ctx.save_for_backward(x)
        channels = x.shape[1]
        split = torch.empty((x.shape[0], 2 * channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                            memory_format=layout)
        torch.clamp(x, min=0, out=split[:, :channels])
        torch.clamp(x, max=0, out=split[:, channels:])
        return split

    @staticmethod
    def backward(ctx, gradient):
        (x,) = ctx.saved_tensors
        channels = x.shape[1]
        return torch.where(x > 0, gradient[:, :channels], gradient[:, channels:]), None


def _route(output: torch.Tensor, terms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``output``'s value, with the gradient Σ scale · ∂modified (each scale fixed, not differentiated)."""
    return _Route.apply(output.detach(), [scale for _, scale in terms], *(modified for modified, _ in terms))


def _ratio(output: torch.Tensor, denominator: torch.Tensor, weight: float) -> torch.Tensor:
    """weight · output / denominator, in place in the (fresh) denominator; 0 where the denominator is 0."""
    ratio = torch.div(output, denominator, out=denominator).nan_to_num_(0.0, 0.0, 0.0)
    return ratio if weight == 1 else ratio.mul_(weight)


def _bias_of(module: nn.Module, output: torch.Tensor) -> torch.Tensor | float:
    """The layer's bias shaped to broadcast over its output (0 without one)."""
    return 0 if module.bias is None else module.bias.reshape(-1, *[1] * (output.dim() - 2))


@dataclass(frozen=True)
class Epsilon:
    """LRP-ε: R_i = Σ_j x_i w_ij / (z_j + ε·sign z_j) R_j, sign(0) = +1 (ε = 0 is LRP-0).

    ``z_j`` includes the bias b_j (which so keeps a share of the relevance); with ``bias=False``
    it is Σ_i x_i w_ij. The layer's own backward pass does the work: only the gradient arriving
    at its output is rescaled by z / (ẑ + ε·sign ẑ).
    """

    epsilon: float = 0.1
    bias: bool = True

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor,
                 absorbs_relu: bool = False) -> torch.Tensor:
        with torch.no_grad():
            z = output if self.bias else output - _bias_of(module, output)
            denominator = _stabilise(z, self.epsilon) if self.epsilon else z.clone()
            if absorbs_relu:  # the ReLU's gate: a zero output passes no relevance
                output.clamp_(min=0)
            scale = _ratio(output, denominator, 1.0)
        if output.requires_grad:
            if inputs[0].requires_grad and takes_depthwise_route(module, inputs[0].device):
                output = input_gradient_by_depthwise(module, inputs[0], output)
            output.register_hook(lambda gradient: scale.mul_(gradient))
        return output


@dataclass(frozen=True)
class AlphaBeta:
    """LRP-αβ (α − β = 1): activating contributions weighted by α, inhibiting ones by β.

    R_i = α Σ_j (x_i w_ij)⁺/ẑ⁺_j R_j − β Σ_j (x_i w_ij)⁻/ẑ⁻_j R_j, with the activating part
    ẑ⁺ = W⁺x⁺ + W⁻x⁻ and the inhibiting part ẑ⁻ = W⁻x⁺ + W⁺x⁻. With ``bias`` each denominator also
    holds the bias as iNNvestigate adds it (its layer copies keep b⁺ with W⁺ and b⁻ with W⁻), so
    both ẑ⁺ and ẑ⁻ gain the whole b_j; with ``bias=False`` (z⁺ when α = 1) the relevance of active
    neurons is conserved exactly.

    For non-negative inputs (after a ReLU) one extra pass with the positive weights suffices:
    the inhibiting contributions are the layer's output minus the activating ones.
    """

    alpha: float = 1.0
    beta: float = 0.0
    bias: bool = True

    def __post_init__(self):
        if abs(self.alpha - self.beta - 1) > 1e-12 or self.beta < 0:
            raise ValueError(f"LRP-αβ needs α − β = 1 and β ≥ 0, got α={self.alpha}, β={self.beta}")

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor,
                 absorbs_relu: bool = False) -> torch.Tensor:
        x = inputs[0]
        bias = module.bias if self.bias else None
        positive_w = module.weight.clamp(min=0)
        negative = None
        if bool((x >= 0).all()):
            positive = _forward(module, x, positive_w, bias)
            if self.beta:  # W⁻x (+ b) from z = W⁺x + W⁻x + b
                layer_bias = _bias_of(module, output)
                negative = output - positive + layer_bias if self.bias else output - layer_bias - positive
        else:  # signed inputs: both signs of x as channels of one pass, W⁺x⁺ + W⁻x⁻ (and W⁻x⁺ + W⁺x⁻)
            negative_w = module.weight.clamp(max=0)
            split_x = _SignSplit.apply(x, _layout(output))
            positive = _forward(module, split_x, torch.cat([positive_w, negative_w], dim=1), bias)
            if self.beta:
                negative = _forward(module, split_x, torch.cat([negative_w, positive_w], dim=1), bias)
        # The modified outputs' values are not needed by their backward passes (a convolution's
        # backward reads its input and weight), so each one is turned into its scale in place.
        with torch.no_grad():
            if absorbs_relu:  # the ReLU's gate: a zero output passes no relevance
                output.clamp_(min=0)
            terms = [(modified, _ratio(output, modified, weight))
                     for modified, weight in ((positive, self.alpha), (negative, -self.beta)) if modified is not None]
        return _route(output, terms)


def ZPlus() -> AlphaBeta:
    """LRP-z⁺ (α1β0 without biases, iNNvestigate's ``ZPlus``): only positive contributions carry relevance."""
    return AlphaBeta(1.0, 0.0, bias=False)


#: A rule: the forward hook of a weighted layer (its module, inputs and output; whether it absorbs the ReLU after it).
Rule = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------
# Composites: which rule each weighted layer type gets


class Composite:
    """Rules by layer type: :meth:`rules` maps ``nn.Linear`` and ``nn.Conv3d`` (and their subclasses) to a rule."""

    def rules(self) -> dict[type[nn.Module], Rule]:
        raise NotImplementedError


@dataclass(frozen=True)
class EpsilonAlphaBeta(Composite):
    """The ε-rule on dense layers and the αβ-rule on convolutions, biases included unless ``bias=False``:
    iNNvestigate's sequential presets (:class:`PresetA`, :class:`PresetB`) with any ε and α − β = 1."""

    epsilon: float = 0.1
    alpha: float = 1.0
    beta: float = 0.0
    bias: bool = True

    def rules(self) -> dict[type[nn.Module], Rule]:
        return {nn.Linear: Epsilon(self.epsilon, self.bias), nn.Conv3d: AlphaBeta(self.alpha, self.beta, self.bias)}


@dataclass(frozen=True)
class PresetA(EpsilonAlphaBeta):
    """iNNvestigate's ``lrp.sequential_preset_a``: ε (0.1) on dense layers, α1β0 on convolutions, with biases."""


@dataclass(frozen=True)
class PresetB(EpsilonAlphaBeta):
    """iNNvestigate's ``lrp.sequential_preset_b``: ε (0.1) on dense layers, α2β1 on convolutions, with biases."""

    alpha: float = 2.0
    beta: float = 1.0


@dataclass(frozen=True)
class EpsilonEverywhere(Composite):
    """The ε-rule on every weighted layer (iNNvestigate's ``lrp.epsilon``; ε = 0 is LRP-0)."""

    epsilon: float = 0.1
    bias: bool = True

    def rules(self) -> dict[type[nn.Module], Rule]:
        rule = Epsilon(self.epsilon, self.bias)
        return {nn.Linear: rule, nn.Conv3d: rule}


@dataclass(frozen=True)
class AlphaBetaEverywhere(Composite):
    """The αβ-rule on every weighted layer (iNNvestigate's ``lrp.alpha_2_beta_1`` with the defaults)."""

    alpha: float = 2.0
    beta: float = 1.0
    bias: bool = True

    def rules(self) -> dict[type[nn.Module], Rule]:
        rule = AlphaBeta(self.alpha, self.beta, self.bias)
        return {nn.Linear: rule, nn.Conv3d: rule}


@dataclass(frozen=True)
class ZPlusEverywhere(Composite):
    """The z⁺-rule on every weighted layer (iNNvestigate's ``lrp.z_plus``)."""

    def rules(self) -> dict[type[nn.Module], Rule]:
        rule = ZPlus()
        return {nn.Linear: rule, nn.Conv3d: rule}


#: Composites by name, each with its defaults; ``lrp(..., rules="preset_a")`` takes a name.
COMPOSITES: dict[str, Callable[[], Composite]] = {
    "preset_a": PresetA,
    "preset_b": PresetB,
    "epsilon": EpsilonEverywhere,
    "alpha2beta1": AlphaBetaEverywhere,
    "zplus": ZPlusEverywhere,
    "zero": partial(EpsilonEverywhere, epsilon=0.0),
}
#: Earlier names of composites: still understood, with a warning that names the new one.
_RENAMED = {"study": "preset_a"}


def composite(name: str) -> Composite:
    """The composite called ``name`` (one of :data:`COMPOSITES`) with its defaults."""
    if name in _RENAMED:
        warnings.warn(f"the LRP composite {name!r} is now called {_RENAMED[name]!r}", DeprecationWarning,
                      stacklevel=3)
        name = _RENAMED[name]
    if name not in COMPOSITES:
        raise ValueError(f"unknown LRP composite {name!r}; known: {', '.join(COMPOSITES)}")
    return COMPOSITES[name]()


# ---------------------------------------------------------------------------------------
# Canonicalisation: the model rewritten once into the form the rules act on


@dataclass(frozen=True)
class Canonical:
    """A model in the form LRP's rules act on, made once and used for every composite and batch: a copy of the
    eval-mode model with its BatchNorms and output scale folded in (:func:`canonical`), and the ReLUs that the
    rules of the layers before them absorb (see the module's docstring)."""

    model: nn.Module
    absorbed_relus: dict[nn.Module, tuple[nn.Sequential, int]]


def canonical(model: nn.Module) -> Canonical:
    """``model`` (eval mode) rewritten for LRP: a folded copy (:func:`_folded`) and its absorbed ReLUs."""
    folded = _folded(model)
    return Canonical(folded, _following_relus(folded))


def _folded(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model computing the same function with one linear map per weighted layer.

    Each BatchNorm3d is folded into the convolution before it: only BatchNorms that directly
    follow a Conv3d inside an ``nn.Sequential`` can be, any other raises ``ValueError`` (a rule
    needs one linear map). A model's ``output_scale`` (``engine.models.networks``) is folded into
    its ``output_layer``, so the output layer's rule sees the prediction in the target's units, as
    it would in the same network trained without the rescaling (ε = 0.1 is then 0.1 years).
    """
    merged = copy.deepcopy(model).eval()
    if isinstance(getattr(merged, "output_scale", None), torch.Tensor):
        scale, layer = merged.output_scale, merged.output_layer
        with torch.no_grad():
            layer.weight.mul_(scale.reshape(-1, *[1] * (layer.weight.dim() - 1)))
            layer.bias.mul_(scale)
            scale.fill_(1)
    for sequential in [module for module in merged.modules() if isinstance(module, nn.Sequential)]:
        for index in range(1, len(sequential)):
            conv, norm = sequential[index - 1], sequential[index]
            if isinstance(norm, nn.BatchNorm3d) and isinstance(conv, nn.Conv3d):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                fused = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  conv.dilation, conv.groups, bias=True).to(conv.weight)
                fused.to(memory_format=_layout(conv.weight))
                with torch.no_grad():
                    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1, 1))
                    fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
                sequential[index - 1], sequential[index] = fused, nn.Identity()
    leftover = [name for name, module in merged.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if leftover:
        raise ValueError(f"BatchNorm layer(s) {leftover} do not directly follow a Conv3d and cannot be merged for LRP")
    return merged


#: Modules between a layer and its ReLU that commute with the ReLU (so the layer's rule may clamp instead).
_COMMUTE_WITH_RELU = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity)


def _following_relus(model: nn.Module) -> dict[nn.Module, tuple[nn.Sequential, int]]:
    """Each layer whose output only feeds a ReLU, with the place of that ReLU: a later module of an
    ``nn.Sequential`` with only max-pools (or identities) between them, the layer used nowhere else."""
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    found = {}
    for sequential in [module for module in model.modules() if isinstance(module, nn.Sequential)]:
        for index in range(1, len(sequential)):
            if type(sequential[index]) is not nn.ReLU:
                continue
            layer = index - 1
            while layer > 0 and isinstance(sequential[layer], _COMMUTE_WITH_RELU):
                layer -= 1
            if not isinstance(sequential[layer], _COMMUTE_WITH_RELU) and uses[id(sequential[layer])] == 1:
                found[sequential[layer]] = (sequential, index)
    return found


@contextmanager
def lrp_rules(model: Canonical, rules: Composite | Mapping[type, Rule]) -> Iterator[nn.Module]:
    """Within the block, the canonical model's weighted layers propagate relevance by ``rules`` (a composite, or
    rules by layer type) and each ReLU that a rule absorbs is an ``nn.Identity`` in its ``nn.Sequential``;
    yields the network to run."""
    rules = rules.rules() if isinstance(rules, Composite) else rules
    following_relus = model.absorbed_relus
    handles, absorbed = [], []
    try:
        for module in list(model.model.modules()):
            rule = next((rule for kind, rule in rules.items() if isinstance(module, kind)), None)
            if rule is None:
                continue
            place = following_relus.get(module)
            handles.append(module.register_forward_hook(partial(rule, absorbs_relu=place is not None)))
            if place is not None:
                sequential, index = place
                absorbed.append((sequential, index, sequential[index]))
                sequential[index] = nn.Identity()
        yield model.model
    finally:
        for handle in handles:
            handle.remove()
        for sequential, index, relu in absorbed:
            sequential[index] = relu


def lrp(model: nn.Module | Canonical, inputs: torch.Tensor,
        rules: str | Composite | Mapping[type, Rule] = "preset_a", target: int | torch.Tensor = 0) -> torch.Tensor:
    """Relevance of each input element for output ``target`` (one index, or one per input; raw,
    unnormalised), same shape as inputs.

    ``model``: an eval-mode model, or its :func:`canonical` form (made once per model, for every composite and
    batch); ``rules``: a composite (or its name in :data:`COMPOSITES`), or rules by layer type.
    """
    model = model if isinstance(model, Canonical) else canonical(model)
    rules = composite(rules) if isinstance(rules, str) else rules
    inputs = inputs.detach().clone().requires_grad_(True)
    with lrp_rules(model, rules) as network, torch.enable_grad():
        output = selected_outputs(network(inputs), target)
        (gradient,) = torch.autograd.grad(output.sum(), inputs)
    return (inputs * gradient).detach()
