"""3D CNN architectures for brain MRI and their registry.

Every model takes ``(batch, channels, x, y, z)`` volumes (one channel per modality) and returns
``(batch, n_outputs)``: one value for regression (brain age), one logit per class for
classification. Activations are ``nn.ReLU`` modules and flattening is a reshape inside
``forward``, so attribution hooks (LRP rules, guided backprop) see every layer they need.
A model is rebuilt from its :class:`ModelSpec`, which checkpoints store beside the weights.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


class PatchIndividualConv3d(nn.Module):
    """Patch-individual filters (Eitel et al. 2021): separate convolution weights per spatial patch.

    The input is cut into a ``patches`` grid (along x, y, z) of equal-as-possible boxes, each
    grown by ``overlap`` voxels on every side (within the input). Each patch has its own
    ``nn.Conv3d`` (padded inside the patch); the output is the patches' outputs put back in place,
    averaged where patches overlap, so relevance propagated back is shared among the overlapping
    patches in proportion to their contributions.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, input_shape: tuple[int, int, int],
                 patches: tuple[int, int, int] = (2, 2, 2), overlap: int = 0):
        super().__init__()
        if any(p < 1 or p > n for p, n in zip(patches, input_shape, strict=True)):
            raise ValueError(f"patches {patches} must each be between 1 and the input size {input_shape}")
        if overlap < 0:
            raise ValueError(f"patch overlap must be ≥ 0 voxels, got {overlap}")
        edges = [[(n * i) // p for i in range(p + 1)] for p, n in zip(patches, input_shape, strict=True)]
        per_axis = []  # each patch's (start, stop) along each axis, grown by the overlap
        for e, n in zip(edges, input_shape, strict=True):
            per_axis.append([(max(start - overlap, 0), min(stop + overlap, n))
                             for start, stop in itertools.pairwise(e)])
        self.boxes = [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]
        self.convs = nn.ModuleList(nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
                                   for _ in self.boxes)
        coverage = torch.zeros(tuple(input_shape))
        for box in self.boxes:
            coverage[tuple(slice(*bounds) for bounds in box)] += 1
        self.register_buffer("coverage", coverage, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = None
        for conv, box in zip(self.convs, self.boxes, strict=True):
            where = (slice(None), slice(None), *(slice(*bounds) for bounds in box))
            part = conv(x[where])
            if output is None:
                output = x.new_zeros((x.shape[0], part.shape[1], *x.shape[2:]))
            output[where] = output[where] + part
        return output / self.coverage.to(output)


class _FlatHeadCNN(nn.Module):
    """A CNN whose ``features`` are flattened into a dense ``head``, its output scaled by ``output_scale``."""

    features: nn.Sequential
    head: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).reshape(x.shape[0], -1)) * self.output_scale

    @property
    def output_layer(self) -> nn.Linear:
        return self.head[-1]


class MRInet(_FlatHeadCNN):
    """The seed study's base model "MRInet" (Hofmann et al. 2022, a Keras 3D CNN; Adam lr 5e-4, MSE loss).

    Conv 16 → pool → Conv 16 → pool → Conv 32 → pool → Conv 64 → pool → Conv 32 (1×1×1) → pool →
    flatten → dropout 0.5 → dense 64 → dense ``n_outputs``. Convolutions are 3×3×3 with 'same'
    padding and max-pooling is 3×3×3 with stride 2 and padding 1, so each pool halves the grid
    (rounding up) and the model works at 1, 2 or 4 mm. Each ReLU follows its pool: max-pooling
    commutes with a ReLU, so the function (and every gradient) is the study's, with the ReLU on an
    eighth of the voxels (a cheaper training step); guided backprop, which gates the
    backward pass at the ReLUs, now gates each overlapping pooling window's share before they add
    up. With ``patch_individual`` (``{"patches": [x, y, z], "overlap": voxels}``) the last (1×1×1)
    convolution learns separate filters per spatial patch (:class:`PatchIndividualConv3d`, the PIF
    variant).
    """

    def __init__(self, input_shape: tuple[int, int, int], in_channels: int = 1, n_outputs: int = 1,
                 patch_individual: dict | None = None, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        shape = tuple(input_shape)
        channels = in_channels
        for width, kernel in ((16, 3), (16, 3), (32, 3), (64, 3), (32, 1)):
            if kernel == 1 and patch_individual is not None:
                layers.append(PatchIndividualConv3d(channels, width, kernel, shape,
                                                    tuple(patch_individual.get("patches", (2, 2, 2))),
                                                    int(patch_individual.get("overlap", 0))))
            else:
                layers.append(nn.Conv3d(channels, width, kernel, padding=kernel // 2))
            layers += [nn.MaxPool3d(3, stride=2, padding=1), nn.ReLU()]
            shape = tuple((n + 1) // 2 for n in shape)
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels * math.prod(shape), 64), nn.ReLU(),
                                  nn.Linear(64, n_outputs))
        self.register_buffer("output_scale", torch.ones(n_outputs))

    @property
    def last_conv(self) -> nn.Module:
        return self.features[-3]


class SFCN(nn.Module):
    """Simple Fully Convolutional Network (Peng et al. 2021), the standard lightweight brain-age CNN.

    Five blocks of 3×3×3 conv → BatchNorm → max-pool 2 → ReLU, a 1×1×1 conv → BatchNorm → ReLU,
    then global average pooling, dropout and a 1×1×1 conv to ``n_outputs``. The published model
    predicts a distribution over age bins; here the head is a regression value or class logits.
    ``channels`` scales the widths (published: 32, 64, 128, 256, 256, 64).
    """

    def __init__(self, input_shape: tuple[int, int, int], in_channels: int = 1, n_outputs: int = 1,
                 channels: tuple[int, ...] = (32, 64, 128, 256, 256, 64), dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(channels):
            last = index == len(channels) - 1
            layers += [nn.Conv3d(previous, width, 1 if last else 3, padding=0 if last else 1), nn.BatchNorm3d(width)]
            if not last:
                layers.append(nn.MaxPool3d(2, ceil_mode=True))
            layers.append(nn.ReLU())
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Dropout(dropout), nn.Conv3d(previous, n_outputs, 1))
        self.register_buffer("output_scale", torch.ones(n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).reshape(x.shape[0], -1) * self.output_scale

    @property
    def output_layer(self) -> nn.Conv3d:
        return self.head[-1]

    @property
    def last_conv(self) -> nn.Module:
        return self.features[-3]


class FourBlockCNN(_FlatHeadCNN):
    """The Alzheimer's-disease classifier of Böhle et al. 2019 and Eitel & Ritter 2019: four blocks of
    3×3×3 convolution ('same' padding; 8, 16, 32, 64 filters) → BatchNorm → ReLU → max-pooling (windows 2, 3,
    2, 3, rounding up), then dropout 0.4 → dense 128 → ReLU → dropout 0.4 → dense ``n_outputs``. The papers
    trained it with Adam (learning rate 1e-4, weight decay 1e-4) and early stopping after 8 epochs; LRP folds
    each BatchNorm into the convolution before it."""

    def __init__(self, input_shape: tuple[int, int, int], in_channels: int = 1, n_outputs: int = 2,
                 channels: tuple[int, ...] = (8, 16, 32, 64), pools: tuple[int, ...] = (2, 3, 2, 3),
                 hidden: int = 128, dropout: float = 0.4):
        super().__init__()
        if len(channels) != len(pools):
            raise ValueError(f"{len(channels)} blocks' channels but {len(pools)} pooling windows")
        layers: list[nn.Module] = []
        previous = in_channels
        for width, pool in zip(channels, pools, strict=True):
            layers += [nn.Conv3d(previous, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(),
                       nn.MaxPool3d(pool, ceil_mode=True)]
            previous = width
        self.features = nn.Sequential(*layers)
        shape = tuple(input_shape)
        for pool in pools:
            shape = tuple(math.ceil(n / pool) for n in shape)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(previous * math.prod(shape), hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, n_outputs))
        self.register_buffer("output_scale", torch.ones(n_outputs))

    @property
    def last_conv(self) -> nn.Module:
        return self.features[-4]


MODELS = {
    "mrinet": MRInet,
    "mrinet_pif": lambda input_shape, patch_individual=None, **options: MRInet(
        input_shape, patch_individual=patch_individual or {"patches": (2, 2, 2), "overlap": 1}, **options),
    "sfcn": SFCN,
    "cnn4": FourBlockCNN,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model before loading its weights.

    ``bin_centres`` makes a regression model predict a distribution over value bins (Peng et
    al. 2021's soft-label brain age): one output per bin, the prediction the expected bin centre.
    """

    name: str
    input_shape: tuple[int, int, int]
    in_channels: int = 1
    n_outputs: int = 1
    options: dict = field(default_factory=dict)
    bin_centres: tuple[float, ...] | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, spec: dict) -> ModelSpec:
        bins = spec.get("bin_centres")
        return cls(**{**spec, "input_shape": tuple(spec["input_shape"]), "bin_centres": tuple(bins) if bins else None})


def build_model(spec: ModelSpec, target_mean: float | None = None, target_scale: float | None = None) -> nn.Module:
    """A fresh model from the registry (He-initialised weights, zero biases).

    For regression, the output is ``output_scale × (last layer)``: with ``target_scale`` (e.g.
    the targets' standard deviation) the network learns in standardised units, and the output
    bias starts so that every prediction starts at ``target_mean``.
    """
    if spec.name not in MODELS:
        raise ValueError(f"unknown model {spec.name!r}; known: {', '.join(MODELS)}")
    model = MODELS[spec.name](spec.input_shape, in_channels=spec.in_channels, n_outputs=spec.n_outputs,
                              **{key: tuple(value) if isinstance(value, list) else value
                                 for key, value in spec.options.items()})
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.output_layer.weight, std=0.01)  # start every prediction near the bias
    if spec.bin_centres is not None:
        if len(spec.bin_centres) != spec.n_outputs:
            raise ValueError(f"{len(spec.bin_centres)} bin centres for {spec.n_outputs} outputs")
        model.register_buffer("bin_centres", torch.tensor(spec.bin_centres, dtype=torch.float32))
        return model
    with torch.no_grad():
        if target_scale is not None:
            model.output_scale.fill_(float(target_scale))
        if target_mean is not None:
            model.output_layer.bias.fill_(float(target_mean) / float(model.output_scale[0]))
    return model


def selected_outputs(output: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """``output[:, target]``, with ``target`` one output index or one per row."""
    if isinstance(target, torch.Tensor):
        return output.gather(1, target.reshape(-1, 1).to(output.device))[:, 0]
    return output[:, target]


def predicted_values(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A regression model's predictions from its ``output``: the first output, or for a model with
    ``bin_centres`` the expected bin centre under the softmax of its outputs."""
    centres = getattr(model, "bin_centres", None)
    if centres is None:
        return output[:, 0]
    return torch.softmax(output, dim=1) @ centres.to(output)


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` moved to ``device`` with its convolution weights channels-last.

    oneDNN's 3D convolutions are faster on channels-last weights (``benchmarks/attribution_cost.py``); their
    outputs follow the weights. On a GPU, cuDNN's bfloat16 3D convolutions take the same layout.
    """
    return model.to(device).to(memory_format=torch.channels_last_3d)
