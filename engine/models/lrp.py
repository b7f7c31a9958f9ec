"""Layer-wise Relevance Propagation for 3D CNNs: rules, composites, BatchNorm merging.

All rules share one mechanism (the "gradient trick"): a forward hook keeps a layer's output
value ``z`` but routes the gradient through modified forward passes ``ẑ``::

    out = Σ c · (z / ẑ) ⊙ ẑ  +  detach(z − same)

so that ``input × gradient`` at the layer's input is the rule's relevance (the ε-rule, whose
``ẑ`` is ``z`` itself, only rescales the gradient arriving at the layer's output). ReLU, max-pooling
(winner takes all), average pooling (the z-rule of a linear map), dropout in eval mode and
reshapes pass the plain gradient. Relevance at the input is ``input × gradient`` of the output.

A ReLU that directly follows a weighted layer in an ``nn.Sequential`` is absorbed by the layer's
rule while the rules are on: the rule clamps ``z`` in place and zeroes its scale where ``z ≤ 0``
(the ReLU's gate), which saves the ReLU's own forward and backward passes (a fresh
activation-sized buffer and two passes over it) and changes no relevance.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F


def _forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
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
    """weight · output / denominator, in place in the (fresh) denominator."""
    ratio = torch.div(output, denominator, out=denominator)
    return ratio if weight == 1 else ratio.mul_(weight)


@dataclass(frozen=True)
class Epsilon:
    """LRP-ε: R_i = Σ_j x_i w_ij / (z_j + ε·sign z_j) R_j (ε = 0 is LRP-0).

    The layer's own backward pass does the work: only the gradient arriving at its output is
    rescaled by z / (z + ε·sign z).
    """

    epsilon: float = 0.1

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor, absorbs_relu: bool = False) -> None:
        with torch.no_grad():
            scale = _ratio(output, _stabilise(output, self.epsilon if self.epsilon else 1e-12), 1.0)
            if absorbs_relu:
                scale.masked_fill_(output <= 0, 0)
                output.clamp_(min=0)
        if output.requires_grad:
            output.register_hook(lambda gradient: scale.mul_(gradient))


@dataclass(frozen=True)
class AlphaBeta:
    """LRP-αβ: positive contributions weighted by α, negative ones by β (α − β = 1); biases ignored.

    For non-negative inputs (after a ReLU) one extra pass with the positive weights suffices:
    the negative contributions are the layer's bias-free output minus the positive ones.
    """

    alpha: float = 1.0
    beta: float = 0.0
    stabiliser: float = 1e-9

    def __post_init__(self):
        if abs(self.alpha - self.beta - 1) > 1e-12 or self.beta < 0:
            raise ValueError(f"LRP-αβ needs α − β = 1 and β ≥ 0, got α={self.alpha}, β={self.beta}")

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor,
                 absorbs_relu: bool = False) -> torch.Tensor:
        x = inputs[0]
        positive_w = module.weight.clamp(min=0)
        negative = None
        if bool((x >= 0).all()):
            positive = _forward(module, x, positive_w, None)
            if self.beta:
                bias = 0 if module.bias is None else module.bias.reshape(-1, *[1] * (output.dim() - 2))
                negative = output - bias - positive
        else:  # signed inputs: both signs of x as channels of one pass, W⁺x⁺ + W⁻x⁻ (and W⁻x⁺ + W⁺x⁻)
            negative_w = module.weight.clamp(max=0)
            split_x = _SignSplit.apply(x, _layout(output))
            positive = _forward(module, split_x, torch.cat([positive_w, negative_w], dim=1), None)
            if self.beta:
                negative = _forward(module, split_x, torch.cat([negative_w, positive_w], dim=1), None)
        # The modified outputs' values are not needed by their backward passes (a convolution's
        # backward reads its input and weight), so each one is turned into its scale in place.
        with torch.no_grad():
            terms = [(positive, _ratio(output, positive.add_(self.stabiliser), self.alpha))]
            if negative is not None:
                terms.append((negative, _ratio(output, negative.sub_(self.stabiliser), -self.beta)))
            if absorbs_relu:  # each scale has the sign of z (ẑ⁺ > 0 > ẑ⁻, α, β ≥ 0): clamping is the gate
                for _, scale in terms:
                    scale.clamp_(min=0)
                output.clamp_(min=0)
        return _route(output, terms)


def ZPlus() -> AlphaBeta:
    """LRP-z⁺ (= α1β0): only positive contributions carry relevance."""
    return AlphaBeta(1.0, 0.0)


#: Composites: which rule each weighted layer type gets.
PRESETS: dict[str, Mapping[type, object]] = {
    # the study's preset: ε = 0.1 on dense layers, z⁺ (α1β0) on convolutions
    "study": {nn.Linear: Epsilon(0.1), nn.Conv3d: ZPlus()},
    "epsilon": {nn.Linear: Epsilon(0.1), nn.Conv3d: Epsilon(0.1)},
    "alpha2beta1": {nn.Linear: AlphaBeta(2.0, 1.0), nn.Conv3d: AlphaBeta(2.0, 1.0)},
    "zplus": {nn.Linear: ZPlus(), nn.Conv3d: ZPlus()},
    "zero": {nn.Linear: Epsilon(0.0), nn.Conv3d: Epsilon(0.0)},
}


def merge_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm3d folded into the convolution before it.

    Only BatchNorms that directly follow a Conv3d inside an ``nn.Sequential`` can be merged;
    any other BatchNorm raises ``ValueError`` (LRP needs its rule to act on one linear map).
    """
    merged = copy.deepcopy(model).eval()
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


def _following_relus(model: nn.Module) -> dict[nn.Module, tuple[nn.Sequential, int]]:
    """Each layer whose output only feeds a ReLU, with the place of that ReLU: the next module of
    an ``nn.Sequential``, the layer used nowhere else in the model."""
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    return {sequential[index - 1]: (sequential, index)
            for sequential in model.modules() if isinstance(sequential, nn.Sequential)
            for index in range(1, len(sequential))
            if type(sequential[index]) is nn.ReLU and uses[id(sequential[index - 1])] == 1}


@contextmanager
def lrp_rules(model: nn.Module, composite: str | Mapping[type, object]) -> Iterator[nn.Module]:
    """Within the block, ``model``'s weighted layers propagate relevance by the composite's rules.

    Each ReLU that a rule absorbs (see the module's docstring) is an ``nn.Identity`` in its
    ``nn.Sequential`` until the block ends.
    """
    rules = PRESETS[composite] if isinstance(composite, str) else composite
    following_relus = _following_relus(model)
    handles, absorbed = [], []
    try:
        for module in list(model.modules()):
            rule = next((rule for kind, rule in rules.items() if isinstance(module, kind)), None)
            if rule is None:
                continue
            place = following_relus.get(module)
            handles.append(module.register_forward_hook(partial(rule, absorbs_relu=place is not None)))
            if place is not None:
                sequential, index = place
                absorbed.append((sequential, index, sequential[index]))
                sequential[index] = nn.Identity()
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for sequential, index, relu in absorbed:
            sequential[index] = relu


def lrp(model: nn.Module, inputs: torch.Tensor, composite: str | Mapping[type, object] = "study",
        target: int = 0) -> torch.Tensor:
    """Relevance of each input element for output ``target`` (raw, unnormalised), same shape as inputs.

    ``model`` must be in eval mode with BatchNorms merged (see :func:`merge_batchnorm`).
    """
    if isinstance(composite, str) and composite not in PRESETS:
        raise ValueError(f"unknown LRP preset {composite!r}; known: {', '.join(PRESETS)}")
    inputs = inputs.detach().clone().requires_grad_(True)
    with lrp_rules(model, composite), torch.enable_grad():
        output = model(inputs)[:, target]
        (gradient,) = torch.autograd.grad(output.sum(), inputs)
    return (inputs * gradient).detach()
