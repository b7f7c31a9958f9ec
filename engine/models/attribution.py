"""Attribution methods behind one interface, and ``relevance.zarr``.

:func:`attribute` maps ``(model, inputs, method)`` to voxel maps ``(batch, x, y, z)`` (summed
over input channels). LRP is :mod:`engine.models.lrp`; gradient, gradient×input, guided backprop,
SmoothGrad, Integrated Gradients, Grad-CAM, sliding-window occlusion and region occlusion come
from captum; the noise-based importance of Bintsi et al. (2021) is :mod:`engine.models.noise`.
:mod:`engine.models.relevance` runs them over a cohort into ``relevance.zarr``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

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
    lrp_alpha: float = Field(1.0, ge=1, description="α of lrp's convolutions (α − β = 1; 1: sequential_preset_a, "
                             "2: sequential_preset_b)")
    lrp_beta: float = Field(0.0, ge=0, description="β of lrp's convolutions")
    target: int | None = Field(None, ge=0, description="output (class index) to explain; default: the last "
                               "output, i.e. the regression value or the last of the sorted classes (a binary "
                               "classification's positive class, as in the report's TP/FP/TN/FN)")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _alpha_minus_beta_is_one(self):
        lrp.AlphaBeta(self.lrp_alpha, self.lrp_beta)  # raises on α − β ≠ 1
        return self

    def as_dict(self) -> dict:
        return self.model_dump()


def _channel_sum(maps: torch.Tensor) -> torch.Tensor:
    return maps.sum(dim=1)


def _lrp(preset: str) -> Callable:
    def method(model, inputs, options, context):
        rules = lrp.preset(preset, options.lrp_epsilon, options.lrp_alpha, options.lrp_beta)
        return _channel_sum(lrp.lrp(context["lrp_model"], inputs, rules, context["target"]))
    return method


def _gradient(model, inputs, options, context):
    return _channel_sum(Saliency(model).attribute(inputs, target=context["target"], abs=False))


def _gradient_x_input(model, inputs, options, context):
    return _channel_sum(InputXGradient(model).attribute(inputs, target=context["target"]))


def _guided_backprop(model, inputs, options, context):
    with warnings.catch_warnings():  # captum announces the ReLU hooks it sets (and removes) on every call
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations", category=UserWarning)
        return _channel_sum(GuidedBackprop(model).attribute(inputs, target=context["target"]))


def _smoothgrad(model, inputs, options, context):
    noise = options.smoothgrad_noise * float(inputs.detach().max() - inputs.detach().min())
    tunnel = NoiseTunnel(Saliency(model))
    # one noise sample of the whole batch per pass: memory of one gradient pass (all samples at once: 2.1 GB at
    # 4 mm, batch 8, 8 samples, against 0.8 GB), and no slower
    return _channel_sum(tunnel.attribute(inputs, nt_type="smoothgrad", nt_samples=options.smoothgrad_samples,
                                         nt_samples_batch_size=1, stdevs=noise, target=context["target"], abs=False))


def _integrated_gradients(model, inputs, options, context):
    return _channel_sum(IntegratedGradients(model).attribute(
        inputs, baselines=torch.zeros_like(inputs), target=context["target"], n_steps=options.ig_steps,
        internal_batch_size=max(len(inputs), 8)))


def _grad_cam(model, inputs, options, context):
    cam = LayerGradCam(model, model.last_conv).attribute(inputs, target=context["target"])
    return LayerAttribution.interpolate(cam, tuple(inputs.shape[2:]), interpolate_mode="trilinear")[:, 0]


def _occlusion(model, inputs, options, context):
    channels = inputs.shape[1]
    patch, stride = options.occlusion_patch, options.occlusion_stride
    maps = Occlusion(model).attribute(inputs, sliding_window_shapes=(channels, patch, patch, patch),
                                      strides=(channels, stride, stride, stride), baselines=0,
                                      target=context["target"], perturbations_per_eval=8)
    return maps.mean(dim=1)  # every channel of a window carries the window's whole effect


def _region_occlusion(model, inputs, options, context):
    if context.get("region_labels") is None:
        raise ValueError("region_occlusion needs an atlas (the explain stage passes the catalog's atlas)")
    labels = torch.as_tensor(context["region_labels"], device=inputs.device)
    feature_mask = labels.expand(inputs.shape[0], inputs.shape[1], *labels.shape)
    maps = FeatureAblation(model).attribute(inputs, baselines=0, target=context["target"], feature_mask=feature_mask,
                                            perturbations_per_eval=8)
    return maps.mean(dim=1)


def _noise_model(model, inputs, options, context):
    if context.get("noise_model") is None:
        raise ValueError("noise_model needs the member's trained noise network (explain trains one per member over "
                         "the training split; engine.models.noise.train_noise_model)")
    return noise.noise_model_importance(context["noise_model"], inputs)


def _noise_optimisation(model, inputs, options, context):
    return noise.noise_optimisation(model, inputs, steps=options.noise_steps, learning_rate=options.noise_learning_rate,
                                    sparsity=options.noise_sparsity, target=context["target"], seed=options.seed)


METHODS: dict[str, Callable] = {
    "lrp": _lrp("study"),
    "lrp_ignore_bias": _lrp("study_ignore_bias"),
    "lrp_epsilon": _lrp("epsilon"),
    "lrp_alpha2beta1": _lrp("alpha2beta1"),
    "lrp_alpha2beta1_ignore_bias": _lrp("alpha2beta1_ignore_bias"),
    "lrp_zplus": _lrp("zplus"),
    "lrp_zero": _lrp("zero"),
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


def attribute(model: nn.Module, inputs: torch.Tensor, method: str, options: AttributionOptions | None = None,
              region_labels: np.ndarray | None = None, noise_model: nn.Module | None = None) -> torch.Tensor:
    """Voxel maps ``(batch, x, y, z)`` of ``method`` for the eval-mode ``model`` on ``inputs``.

    ``region_labels`` (an integer volume like the inputs' spatial shape) is needed by
    ``region_occlusion``: one forward pass per region with the region set to zero; ``noise_model``
    (:func:`~engine.models.noise.train_noise_model` for this model) by ``noise_model``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; known: {', '.join(METHODS)}")
    options = options or AttributionOptions()
    model.eval()
    context = {"region_labels": region_labels, "noise_model": noise_model, "target": _target(model, options, inputs)}
    if method.startswith("lrp"):
        context["lrp_model"] = lrp.prepare(model)
    torch.manual_seed(options.seed)
    inputs = inputs.detach().requires_grad_(True)
    with depthwise_input_gradients(model):  # LRP's rules route their own (engine.models.lrp)
        return METHODS[method](model, inputs, options, context).detach().to(inputs.dtype)
