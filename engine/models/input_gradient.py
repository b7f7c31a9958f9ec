"""The gradient to a 3D CNN's input through its first convolution, as depthwise convolutions (CPU).

oneDNN computes the gradient of a 3D convolution to an input of one or two channels far slower
than the convolution itself: for MRInet's first layer it is over half of a whole gradient pass
(``benchmarks/attribution_cost.py``). That gradient, a transposed convolution with one output
channel per input channel, is also, per input channel, a depthwise convolution of the output
gradient with that channel's flipped filters, summed over the filters, which oneDNN vectorises
over the channels.

:func:`depthwise_input_gradients` routes the input gradient of a model's few-channel convolutions this
way (attribution asks for nothing else); :func:`convolution_with_depthwise_input_gradient` is one such
convolution (LRP's modified pass over the sign-split input).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

#: Convolutions with at most this many input channels take the depthwise route (measured for 1 and 2).
MAX_INPUT_CHANNELS = 2


def input_gradient(gradient: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int]) -> torch.Tensor:
    """∂/∂x of Σ ``gradient`` ⊙ conv3d(x, ``weight``, padding=``padding``) at stride 1: for each input
    channel, the depthwise convolution of ``gradient`` with that channel's flipped filters, summed over them."""
    filters, channels = weight.shape[:2]
    kernel = weight.shape[2:]
    transposed_padding = tuple(k - 1 - p for k, p in zip(kernel, padding, strict=True))
    gradient = gradient.contiguous(memory_format=torch.channels_last_3d)
    flipped = weight.detach().flip(2, 3, 4)
    return torch.stack([
        F.conv3d(gradient, flipped[:, channel:channel + 1].contiguous(memory_format=torch.channels_last_3d),
                 padding=transposed_padding, groups=filters).sum(dim=1)
        for channel in range(channels)], dim=1)


class _InputGradientByDepthwise(torch.autograd.Function):
    """Forward: the convolution of ``x`` (``output``, when it is computed already). Backward: the
    gradient to ``x`` only (:func:`input_gradient`); the weight and bias get none."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, output):
        ctx.save_for_backward(weight)
        ctx.padding = padding
        return F.conv3d(x, weight, bias, padding=padding) if output is None else output.view_as(output)

    @staticmethod
    def backward(ctx, gradient):
        (weight,) = ctx.saved_tensors
        return input_gradient(gradient, weight, ctx.padding), None, None, None, None


def _padding(module: nn.Conv3d) -> tuple[int, int, int] | None:
    """The module's zero padding per axis, if its input gradient can take the depthwise route."""
    padding = module.padding
    if padding == "same":
        padding = tuple(k // 2 for k in module.kernel_size) if all(k % 2 for k in module.kernel_size) else None
    elif padding == "valid":
        padding = (0, 0, 0)
    if padding is None or module.padding_mode != "zeros" or module.groups != 1:
        return None
    if module.stride != (1, 1, 1) or module.dilation != (1, 1, 1):
        return None
    return padding if all(p <= k - 1 for p, k in zip(padding, module.kernel_size, strict=True)) else None


def takes_depthwise_route(module: nn.Module, device: torch.device, channels: int | None = None) -> bool:
    """Whether ``module`` (a Conv3d) on ``device`` (with ``channels`` input channels, default its own) gets its
    input gradient by :func:`input_gradient`: on CPU, at most :data:`MAX_INPUT_CHANNELS` channels, stride 1."""
    return (isinstance(module, nn.Conv3d) and device.type == "cpu" and _padding(module) is not None
            and (channels or module.in_channels) <= MAX_INPUT_CHANNELS)


def convolution_with_depthwise_input_gradient(module: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor,
                                              bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s convolution of ``x`` with ``weight`` and ``bias`` whose gradient goes to ``x`` only, by
    :func:`input_gradient` (check :func:`takes_depthwise_route` first)."""
    detached_bias = None if bias is None else bias.detach()
    return _InputGradientByDepthwise.apply(x, weight.detach(), detached_bias, _padding(module), None)


def input_gradient_by_depthwise(module: nn.Conv3d, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``module``'s ``output`` for input ``x``, its gradient going to ``x`` only, by :func:`input_gradient`."""
    return _InputGradientByDepthwise.apply(x, module.weight.detach(), None, _padding(module), output.detach())


def _route_input_gradient(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    if not (torch.is_grad_enabled() and inputs[0].requires_grad):
        return None
    return input_gradient_by_depthwise(module, inputs[0], output)


@contextmanager
def depthwise_input_gradients(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the gradient to the input of each of ``model``'s convolutions that
    :func:`takes_depthwise_route` comes from :func:`input_gradient`; their weights and biases get no gradient."""
    handles = [module.register_forward_hook(_route_input_gradient) for module in model.modules()
               if isinstance(module, nn.Conv3d) and takes_depthwise_route(module, module.weight.device)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
