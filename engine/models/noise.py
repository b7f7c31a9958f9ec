"""Noise-based importance (Bintsi et al. 2021): voxels the prediction does not need tolerate noise.

- :class:`NoiseNet` maps an input to a noise level σ ∈ (0, 1) per voxel (a small 3D encoder–decoder).
- :func:`train_noise_model` fits a NoiseNet over the training participants with the prediction
  model frozen, adding as much noise as it can without harming the prediction: it minimises
  ``((f(x + σ·s·ε) − y) / scale)² − λ · mean(σ)`` (``s``: the input's standard deviation, ``ε``
  standard normal noise, ``y`` the participant's target, ``scale`` the model's output scale; a
  classification's cross-entropy of the true class in place of the squared error). A
  participant's importance map is ``1 − σ(x)``; the population map is its mean over participants.
- :func:`noise_optimisation` learns σ for one batch of inputs directly, per voxel, without a
  network (keeping the prediction of the noised input near the clean input's): the per-participant
  variant, not the published method.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.models.input_gradient import depthwise_input_gradients
from engine.models.networks import place, predicted_values, selected_outputs


class NoiseNet(nn.Module):
    """Per-voxel noise logits for an input ``(batch, channels, x, y, z)``: two scales, one skip connection."""

    def __init__(self, in_channels: int, width: int = 8):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv3d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv3d(width, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv3d(2 * width, 1, 3, padding=1)
        nn.init.constant_(self.out.bias, -2.0)  # start with little noise (σ ≈ 0.12) everywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        near = self.encode(x)
        far = F.interpolate(self.down(near), size=x.shape[2:], mode="trilinear", align_corners=False)
        return self.out(torch.cat([near, far], dim=1))

    def noise_level(self, x: torch.Tensor) -> torch.Tensor:
        """σ ∈ (0, 1) per voxel, ``(batch, 1, x, y, z)``."""
        return torch.sigmoid(self(x))


def _spread(inputs: torch.Tensor) -> torch.Tensor:
    return inputs.std(dim=(1, 2, 3, 4), keepdim=True)


def _prediction_loss(model: nn.Module, noisy: torch.Tensor, targets: torch.Tensor,
                     classification: bool) -> torch.Tensor:
    output = model(noisy)
    if classification:
        return F.cross_entropy(output, targets.long())
    scale = getattr(model, "output_scale", torch.ones(1, device=noisy.device))[0]
    return (((predicted_values(model, output) - targets) / scale) ** 2).mean()


def train_noise_model(model: nn.Module, read, positions: np.ndarray, targets: np.ndarray, *, sparsity: float,
                      epochs: int, learning_rate: float = 1e-3, batch_size: int = 8, classification: bool = False,
                      seed: int = 0) -> NoiseNet:
    """A NoiseNet for the frozen ``model``, trained over ``positions`` (``read(positions)`` gives their inputs as a
    float32 array, ``targets`` their regression values or class indices) for ``epochs`` passes by Adam."""
    device = next(model.parameters()).device
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    first = torch.from_numpy(read(positions[:1]))
    noise_net = place(NoiseNet(first.shape[1]).to(dtype=first.dtype), device)
    optimiser = torch.optim.Adam(noise_net.parameters(), lr=learning_rate)
    targets = torch.as_tensor(np.asarray(targets), dtype=first.dtype)
    try:
        with depthwise_input_gradients(model):  # the frozen model's weights need no gradient
            for _ in range(epochs):
                order = rng.permutation(len(positions))
                for start in range(0, len(order), batch_size):
                    batch = order[start:start + batch_size]
                    inputs = torch.from_numpy(read(positions[batch])).to(device)
                    sigma = noise_net.noise_level(inputs)
                    noise = torch.randn(inputs.shape, generator=generator, device=device, dtype=inputs.dtype)
                    noisy = inputs + sigma * _spread(inputs) * noise
                    loss = (_prediction_loss(model, noisy, targets[batch].to(device), classification)
                            - sparsity * sigma.mean())
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return noise_net.eval()


def noise_model_importance(noise_net: NoiseNet, inputs: torch.Tensor) -> torch.Tensor:
    """Importance ``1 − σ`` per voxel, ``(batch, x, y, z)``: high where the prediction tolerates little noise."""
    with torch.no_grad():
        return 1 - noise_net.noise_level(inputs)[:, 0]


def noise_optimisation(model: nn.Module, inputs: torch.Tensor, *, steps: int, learning_rate: float,
                       sparsity: float, target: int | torch.Tensor = 0, seed: int = 0) -> torch.Tensor:
    """Per batch of inputs, σ_v ∈ (0, 1) learned by Adam for every voxel minimising
    ``((f(x + σ·s·ε) − f(x)) / scale)² − λ · mean(σ)``; importance is ``1 − σ_v``, ``(batch, x, y, z)``."""
    inputs = inputs.detach()
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    spread = _spread(inputs)
    scale = getattr(model, "output_scale", None)
    scale = 1 if scale is None else selected_outputs(scale.expand(len(inputs), -1), target)
    logits = torch.zeros((inputs.shape[0], 1, *inputs.shape[2:]), device=inputs.device, dtype=inputs.dtype,
                         requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=learning_rate)
    with torch.no_grad():
        reference = selected_outputs(model(inputs), target)
    for _ in range(steps):
        sigma = torch.sigmoid(logits)
        noise = torch.randn(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
        change = (selected_outputs(model(inputs + sigma * spread * noise), target) - reference) / scale
        loss = (change ** 2).mean() - sparsity * sigma.mean(dim=(1, 2, 3, 4)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return (1 - torch.sigmoid(logits)).detach()[:, 0]
