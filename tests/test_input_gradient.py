"""engine.models.input_gradient: a convolution's gradient to its input by depthwise convolutions, against
PyTorch's own convolution backward."""

import pytest
import torch
from torch import nn

from engine.models.input_gradient import depthwise_input_gradients, input_gradient, takes_depthwise_route
from engine.models.networks import ModelSpec, build_model, place


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel, padding", [(3, 1), (3, 0), (3, 2), (1, 0), (5, 2), ((3, 1, 5), (1, 0, 2))])
@pytest.mark.parametrize("channels", [1, 2])
def test_input_gradient_equals_pytorchs_convolution_backward(channels, kernel, padding, channels_last):
    generator = torch.Generator().manual_seed(channels)
    kernel = kernel if isinstance(kernel, tuple) else (kernel,) * 3
    padding = padding if isinstance(padding, tuple) else (padding,) * 3
    x = torch.randn(2, channels, 7, 9, 8, dtype=torch.float64, generator=generator)
    weight = torch.randn(5, channels, *kernel, dtype=torch.float64, generator=generator)
    output_shape = [n + 2 * p - k + 1 for n, p, k in zip(x.shape[2:], padding, kernel, strict=True)]
    gradient = torch.randn(2, 5, *output_shape, dtype=torch.float64, generator=generator)
    if channels_last:
        gradient = gradient.contiguous(memory_format=torch.channels_last_3d)
    expected = torch.ops.aten.convolution_backward(gradient, x, weight, None, (1, 1, 1), padding, (1, 1, 1), False,
                                                   (0, 0, 0), 1, (True, False, False))[0]
    found = input_gradient(gradient, weight, padding)
    assert found.shape == x.shape
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)


def test_models_input_gradient_is_unchanged_and_the_hooks_go_after_the_block():
    model = build_model(ModelSpec("mrinet", (12, 14, 10), 1, 1)).double().eval()
    x = torch.randn(3, 1, 12, 14, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def input_gradient_of(model):
        inputs = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)[0]

    expected = input_gradient_of(model)
    with depthwise_input_gradients(model):
        assert len(model.features[0]._forward_hooks) == 1  # the first convolution: one input channel
        assert not any(module._forward_hooks for module in model.features[1:])  # 16 channels and more: PyTorch's
        found = input_gradient_of(model)
        output = model(x.clone().requires_grad_(True))[:, 0].sum()
        assert torch.autograd.grad(output, model.features[0].weight, allow_unused=True)[0] is None
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-12)
    assert not model.features[0]._forward_hooks
    output = model(x)[:, 0].sum()  # the weights get their gradient again
    assert torch.autograd.grad(output, model.features[0].weight)[0].abs().sum() > 0


def test_channels_last_float32_model_gets_the_same_input_gradient():
    model = place(build_model(ModelSpec("mrinet", (20, 24, 18), 1, 1)), "cpu").eval()
    x = torch.randn(4, 1, 20, 24, 18, generator=torch.Generator().manual_seed(2))
    inputs = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)[0]
    with depthwise_input_gradients(model):
        inputs = x.clone().requires_grad_(True)
        found = torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)[0]
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("convolution, routed", [
    (nn.Conv3d(1, 16, 3, padding=1), True),
    (nn.Conv3d(2, 16, 3, padding="same"), True),
    (nn.Conv3d(1, 16, 3, padding="valid"), True),
    (nn.Conv3d(3, 16, 3, padding=1), False),  # more input channels than measured
    (nn.Conv3d(1, 16, 3, padding=1, stride=2), False),
    (nn.Conv3d(1, 16, 3, padding=2, dilation=2), False),
    (nn.Conv3d(2, 16, 3, padding=1, groups=2), False),
    (nn.Conv3d(1, 16, 3, padding=1, padding_mode="reflect"), False),
    (nn.Conv3d(1, 16, 3, padding=3), False),  # more padding than a transposed convolution can undo
    (nn.Conv2d(1, 16, 3, padding=1), False),
])
def test_only_stride_one_few_channel_convolutions_take_the_route(convolution, routed):
    assert takes_depthwise_route(convolution, torch.device("cpu")) is routed
