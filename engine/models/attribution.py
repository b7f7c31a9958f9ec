"""Attribution methods behind one interface, and ``relevance.zarr``.

:func:`attribute` maps ``(model, inputs, method)`` to voxel maps ``(batch, x, y, z)`` (summed
over input channels). LRP is :mod:`engine.models.lrp`; gradient, gradient×input, guided backprop,
SmoothGrad, Integrated Gradients, Grad-CAM, sliding-window occlusion and region occlusion come
from captum; the noise-based importance of Bintsi et al. (2021) is :mod:`engine.models.noise`.
:mod:`engine.models.relevance` runs them over a cohort into ``relevance.zarr``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import (
    FeatureAblation,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from engine.models import lrp, noise
from engine.models.input_gradient import depthwise_input_gradients


class AttributionOptions(BaseModel):
    """Settings of the methods that have any; the catalog's ``explain.options`` is this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    smoothgrad_samples: int = Field(16, ge=1, description="noisy copies averaged by SmoothGrad")
    smoothgrad_noise: float = Field(0.1, ge=0, description="SmoothGrad noise SD as a fraction of the input's range")
    ig_steps: int = Field(16, ge=1, description="Integrated Gradients steps from the zero baseline")
    occlusion_patch: int = Field(6, ge=1, description="voxels per side of the sliding occlusion cube")
    occlusion_stride: int = Field(6, ge=1, description="voxels between occlusion cubes")
    noise_model_sparsity: float = Field(1.0, ge=0, description="noise_model's λ: reward for mean noise against the "
                                        "squared prediction error (in target SDs)")
    noise_model_epochs: int = Field(3, ge=1, description="noise_model: passes over the training participants")
    noise_model_learning_rate: float = Field(1e-3, gt=0, description="noise_model: Adam learning rate")
    noise_steps: int = Field(40, ge=1, description="noise_optimisation: steps per batch of participants")
    noise_learning_rate: float = Field(0.1, gt=0, description="noise_optimisation: Adam learning rate")
    noise_sparsity: float = Field(1.0, ge=0, description="noise_optimisation's λ: reward for mean noise against the "
                                  "squared prediction change (in target SDs)")
    lrp_epsilon: float = Field(0.1, ge=0, description="ε of LRP's ε-rules (lrp's dense layers, lrp_epsilon)")
    lrp_alpha: float = Field(1.0, ge=1, description="α of lrp's convolutions (α − β = 1; 1: iNNvestigate's "
                             "sequential_preset_a, 2: sequential_preset_b)")
    lrp_beta: float = Field(0.0, ge=0, description="β of lrp's convolutions")
    target: int | None = Field(None, ge=0, description="output (class index) to explain; default: the last "
                               "output, i.e. the regression value or the last of the sorted classes (a binary "
                               "classification's positive class, as in the report's TP/FP/TN/FN)")
    seed: int = Field(0, ge=0, description="seed of the methods that draw noise (SmoothGrad, noise_optimisation)")

    @model_validator(mode="after")
    def _alpha_minus_beta_is_one(self):
        lrp.AlphaBeta(self.lrp_alpha, self.lrp_beta)  # raises on α − β ≠ 1
        return self

    def as_dict(self) -> dict:
        return self.model_dump()


class ExplainedModel:
    """A trained model ready for every attribution method: in eval mode, with its LRP form
    (:func:`engine.models.lrp.canonical`) made on first use and kept for every later method and batch."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self._canonical: lrp.Canonical | None = None

    @property
    def canonical(self) -> lrp.Canonical:
        if self._canonical is None:
            self._canonical = lrp.canonical(self.model)
        return self._canonical


@dataclass(frozen=True)
class AttributionContext:
    """What a method gets besides the inputs and options: the model, the output it explains, and what some
    methods need (the LRP form of the model, the atlas volume of ``region_occlusion``, the noise network of
    ``noise_model``)."""

    model: nn.Module
    target: int | torch.Tensor
    canonical: lrp.Canonical | None = None
    region_labels: np.ndarray | None = None
    noise_model: nn.Module | None = None


Method = Callable[[AttributionContext, torch.Tensor, AttributionOptions], torch.Tensor]


def _channel_sum(maps: torch.Tensor) -> torch.Tensor:
    return maps.sum(dim=1)


def _lrp(composite: Callable[[AttributionOptions], lrp.Composite]) -> Method:
    """An LRP method: the composite the options give, on the model's canonical form."""
    def method(context, inputs, options):
        return _channel_sum(lrp.lrp(context.canonical, inputs, composite(options), context.target))
    return method


def _gradient(context, inputs, options):
    return _channel_sum(Saliency(context.model).attribute(inputs, target=context.target, abs=False))


def _gradient_x_input(context, inputs, options):
    return _channel_sum(InputXGradient(context.model).attribute(inputs, target=context.target))


def _guided_backprop(context, inputs, options):
    with warnings.catch_warnings():  # captum announces the ReLU hooks it sets (and removes) on every call
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations", category=UserWarning)
        return _channel_sum(GuidedBackprop(context.model).attribute(inputs, target=context.target))


def _smoothgrad(context, inputs, options):
    noise_sd = options.smoothgrad_noise * float(inputs.detach().max() - inputs.detach().min())
    tunnel = NoiseTunnel(Saliency(context.model))
    # one noise sample of the whole batch per pass: the memory of one gradient pass, and no slower
    return _channel_sum(tunnel.attribute(inputs, nt_type="smoothgrad", nt_samples=options.smoothgrad_samples,
                                         nt_samples_batch_size=1, stdevs=noise_sd, target=context.target, abs=False))


def _integrated_gradients(context, inputs, options):
    return _channel_sum(IntegratedGradients(context.model).attribute(
        inputs, baselines=torch.zeros_like(inputs), target=context.target, n_steps=options.ig_steps,
        internal_batch_size=max(len(inputs), 8)))


def _grad_cam(context, inputs, options):
    cam = LayerGradCam(context.model, context.model.last_conv).attribute(inputs, target=context.target)
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="trilinear")[:, 0]


def _occlusion(context, inputs, options):
    channels = inputs.shape[1]
    patch, stride = options.occlusion_patch, options.occlusion_stride
    maps = Occlusion(context.model).attribute(inputs, sliding_window_shapes=(channels, patch, patch, patch),
                                              strides=(channels, stride, stride, stride), baselines=0,
                                              target=context.target, perturbations_per_eval=8)
    return maps.mean(dim=1)  # every channel of a window carries the window's whole effect


def _region_occlusion(context, inputs, options):
    if context.region_labels is None:
        raise ValueError("region_occlusion needs an atlas (the explain stage passes the catalog's atlas)")
    labels = torch.as_tensor(context.region_labels, device=inputs.device)
    feature_mask = labels.expand(inputs.shape[0], inputs.shape[1], *labels.shape)
    maps = FeatureAblation(context.model).attribute(inputs, baselines=0, target=context.target,
                                                    feature_mask=feature_mask, perturbations_per_eval=8)
    return maps.mean(dim=1)


def _noise_model(context, inputs, options):
    if context.noise_model is None:
        raise ValueError("noise_model needs the member's trained noise network (explain trains one per member over "
                         "the training split; engine.models.noise.train_noise_model)")
    return noise.noise_model_importance(context.noise_model, inputs)


def _noise_optimisation(context, inputs, options):
    return noise.noise_optimisation(context.model, inputs, steps=options.noise_steps,
                                    learning_rate=options.noise_learning_rate, sparsity=options.noise_sparsity,
                                    target=context.target, seed=options.seed)


#: Every method by its catalog name. The LRP methods' composites (engine.models.lrp): ``lrp`` is iNNvestigate's
#: sequential_preset_a with the options' ε, α and β (α2β1: sequential_preset_b).
METHODS: dict[str, Method] = {
    "lrp": _lrp(lambda options: lrp.EpsilonAlphaBeta(options.lrp_epsilon, options.lrp_alpha, options.lrp_beta)),
    "lrp_ignore_bias": _lrp(lambda options: lrp.EpsilonAlphaBeta(options.lrp_epsilon, options.lrp_alpha,
                                                                 options.lrp_beta, bias=False)),
    "lrp_epsilon": _lrp(lambda options: lrp.EpsilonEverywhere(options.lrp_epsilon)),
    "lrp_alpha2beta1": _lrp(lambda options: lrp.AlphaBetaEverywhere(2.0, 1.0)),
    "lrp_alpha2beta1_ignore_bias": _lrp(lambda options: lrp.AlphaBetaEverywhere(2.0, 1.0, bias=False)),
    "lrp_zplus": _lrp(lambda options: lrp.ZPlusEverywhere()),
    "lrp_zero": _lrp(lambda options: lrp.EpsilonEverywhere(0.0)),
    "gradient": _gradient,
    "gradient_x_input": _gradient_x_input,
    "guided_backprop": _guided_backprop,
    "smoothgrad": _smoothgrad,
    "integrated_gradients": _integrated_gradients,
    "grad_cam": _grad_cam,
    "occlusion": _occlusion,
    "region_occlusion": _region_occlusion,
    "noise_model": _noise_model,
    "noise_optimisation": _noise_optimisation,
}


#: A point of Böhle et al.'s β sweep: ``lrp_beta<β>`` is the αβ-rule with α = 1 + β on every weighted layer, β's
#: decimal point written "_" (``lrp_beta0_5``: α1.5β0.5; ``lrp_beta1`` is ``lrp_alpha2beta1``).
BETA_SWEEP = re.compile(r"^lrp_beta(\d+(?:_\d+)?)$")

#: Every method name :func:`method_function` knows, as descriptions and errors list them.
KNOWN_METHODS = (", ".join(METHODS) + ", and lrp_beta<β> (the αβ-rule with α = 1 + β on every layer, e.g. "
                 "lrp_beta0_5)")


def method_function(name: str) -> Method:
    """The attribution method called ``name``: one of :data:`METHODS` or a point of the β sweep
    (:data:`BETA_SWEEP`); a clear error for any other name."""
    if name in METHODS:
        return METHODS[name]
    sweep = BETA_SWEEP.match(name)
    if sweep is None:
        raise ValueError(f"unknown attribution method {name!r}; known: {KNOWN_METHODS}")
    beta = float(sweep.group(1).replace("_", "."))
    return _lrp(lambda options: lrp.AlphaBetaEverywhere(1 + beta, beta))


def is_method(name: str) -> bool:
    """Whether ``name`` is an attribution method (:func:`method_function` knows it)."""
    return name in METHODS or BETA_SWEEP.match(name) is not None


def _target(model: nn.Module, options: AttributionOptions, inputs: torch.Tensor) -> int | torch.Tensor:
    """The output to explain: ``options.target``; else, for a model with value bins, each input's most
    probable bin (given ``inputs``), otherwise the model's last output (its output layer's last unit)."""
    if options.target is not None:
        return options.target
    if getattr(model, "bin_centres", None) is not None:
        with torch.no_grad():
            return model(inputs).argmax(dim=1)
    layer = getattr(model, "output_layer", None)
    return 0 if layer is None else layer.weight.shape[0] - 1


def attribute(model: nn.Module | ExplainedModel, inputs: torch.Tensor, method: str,
              options: AttributionOptions | None = None, region_labels: np.ndarray | None = None,
              noise_model: nn.Module | None = None) -> torch.Tensor:
    """Voxel maps ``(batch, x, y, z)`` of ``method`` for ``model`` on ``inputs``.

    ``model``: a trained model, or an :class:`ExplainedModel` of it (whose LRP form is made once for
    every method and batch). ``region_labels`` (an integer volume like the inputs' spatial shape) is
    needed by ``region_occlusion``: one forward pass per region with the region set to zero;
    ``noise_model`` (:func:`~engine.models.noise.train_noise_model` for this model) by ``noise_model``.
    """
    function = method_function(method)
    options = options or AttributionOptions()
    explained = model if isinstance(model, ExplainedModel) else ExplainedModel(model)
    # the LRP form is copied from the model before the hooks below go on it (a copy would keep them)
    canonical = explained.canonical if method.startswith("lrp") else None
    context = AttributionContext(explained.model, _target(explained.model, options, inputs), canonical,
                                 region_labels, noise_model)
    torch.manual_seed(options.seed)
    inputs = inputs.detach().requires_grad_(True)
    with depthwise_input_gradients(explained.model):  # LRP's rules route their own (engine.models.lrp)
        return function(context, inputs, options).detach().to(inputs.dtype)
