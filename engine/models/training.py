"""Training one ensemble member straight from ``images.zarr``: the settings (:class:`TrainingConfig`), early
stopping with restarts of members that learned nothing, the weights as safetensors beside a JSON card
(config, split, history), and loading a trained member back."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file
from scipy import stats

from engine.data.store import keyed
from engine.layout import ModelsLayout, atomic_output, file_sha256
from engine.models.metrics import classification_metrics
from engine.models.networks import MODELS, ModelSpec, build_model, place, predicted_values
from engine.models.splits import SPLITS, split_hash
from engine.models.volumes import Augmentation, CohortVolumes, augment, epoch_batches
from engine.tasks import torch_device

# ---------------------------------------------------------------------------------------
# Soft labels (Peng et al. 2021)


def value_bins(values, width: float) -> np.ndarray:
    """Edges of value bins of ``width`` covering ``values`` with two spare bins on each side."""
    values = np.asarray(values, float)
    low = (np.floor(values.min() / width) - 2) * width
    high = (np.ceil(values.max() / width) + 2) * width
    return np.arange(round((high - low) / width) + 1) * width + low


def soft_labels(values, edges: np.ndarray, sigma: float) -> np.ndarray:
    """Each value as a Gaussian (SD ``sigma``) integrated over the bins ``edges``, renormalised: ``(n, bins)``."""
    cumulative = stats.norm.cdf((np.asarray(edges, float)[None, :] - np.asarray(values, float)[:, None]) / sigma)
    mass = np.diff(cumulative, axis=1)
    return mass / mass.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------
# Training one member


class TrainingConfig(BaseModel):
    """How each ensemble member is trained; identical configs and seeds give identical members.

    The one definition of the training settings and their defaults: the catalog's ``train:``
    section is this config plus ``members`` and ``split`` (``pipelines.catalog.TrainSettings``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field("age", description="participant column to predict")
    task: Literal["regression", "classification"] = Field("regression", description="predict a number or a class")
    model: str = Field("mrinet", description="architecture: " + ", ".join(MODELS))
    model_options: dict = Field({}, description="architecture options, e.g. mrinet dropout, sfcn channels")
    modalities: tuple[str, ...] = Field(("T1",), min_length=1, description="input channels")
    input_scaling: Literal["zscore", "zscore_brain", "minmax", "max"] = Field(
        "zscore", description="each channel per participant inside the mask: z-score, min–max to [0, 1] or "
        "divided by its maximum (the seed studies: minmax or max; relevance maps depend on it), or "
        "zscore_brain: z-score over its nonzero voxels, the background left at 0")
    augmentation: Augmentation = Field(Augmentation(), description="random shifts and left–right flips of "
                                       "training inputs")
    epochs: int = Field(25, ge=1, description="at most; early stopping keeps the best validation epoch")
    batch_size: int = Field(8, ge=1, description="participants per training step")
    learning_rate: float = Field(5e-4, gt=0, description="the optimiser's initial rate")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam (AdamW with weight decay) or SGD")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum")
    weight_decay: float = Field(0.0, ge=0, description="adam: decoupled weight decay (AdamW; 0 is plain Adam); "
                                "sgd: L2 weight decay")
    loss: Literal["mse", "soft_labels"] = Field(
        "mse", description="regression: mean squared error, or Peng et al.'s (2021) soft labels: the target as a "
        "Gaussian over value bins, a KL-divergence loss, the prediction the expected bin centre")
    bin_width: float = Field(1.0, gt=0, description="soft_labels: width of the value bins (years)")
    soft_label_sigma: float = Field(1.0, gt=0, description="soft_labels: SD of the Gaussian label (years)")
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="learning rate over epochs: constant, cosine annealing to 0 over `epochs`, "
        "or × step_gamma every step_epochs")
    warmup_epochs: int = Field(0, ge=0, description="the learning rate rises linearly over this many first epochs "
                               "(1/n, 2/n, … of the schedule's), so an early large step does not silence the ReLUs")
    step_epochs: int = Field(10, ge=1, description="step schedule: epochs between decays")
    step_gamma: float = Field(0.3, gt=0, le=1, description="step schedule: factor per decay")
    patience: int = Field(5, ge=1, description="epochs without validation improvement before stopping")
    positive_class: str | None = Field(None, description="classification: the class explained by default and "
                                       "called positive in TP/FP/TN/FN (default: the last of the sorted classes)")
    early_stopping: Literal["loss", "balanced_accuracy"] = Field(
        "loss", description="validation criterion that picks the kept epoch (balanced_accuracy: classification)")
    mixed_precision: bool = Field(True, description="bfloat16 autocast on a GPU (ignored on CPU)")
    seed: int = Field(0, ge=0, description="member k trains with seed 1000·seed + k")
    collapse_restarts: int = Field(2, ge=0, description="times a member that learned nothing (collapsed to one "
                                   "constant output, or stuck at the training mean when patience ran out) starts "
                                   "again from a fresh seed")
    finetune_from: Path | None = Field(None, description="models folder or member .safetensors to start from")
    freeze: tuple[str, ...] = Field((), description="parameter-name prefixes to keep fixed, e.g. 'features.0'")
    cache_gib: float = Field(2.0, gt=0, description="training subjects held in memory up to this size")

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
        return model

    @model_validator(mode="after")
    def _criterion_fits_task(self):
        if self.early_stopping == "balanced_accuracy" and self.task != "classification":
            raise ValueError("early_stopping: balanced_accuracy needs task: classification")
        if self.positive_class is not None and self.task != "classification":
            raise ValueError("positive_class needs task: classification")
        if self.loss == "soft_labels" and self.task != "regression":
            raise ValueError("loss: soft_labels needs task: regression")
        return self

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_gib * 2**30)

    def as_dict(self) -> dict:
        """The config as JSON values (what each member's card keeps)."""
        return self.model_dump(mode="json", include=set(TrainingConfig.model_fields))


def targets_of(dataset: xr.Dataset, config: TrainingConfig, classes: list | None) -> np.ndarray:
    """Each stored subject's target: the regression value, or the index of its class (−1 outside ``classes``)."""
    if config.target not in dataset.coords:
        raise ValueError(f"target {config.target!r} is not a participant column of the store "
                         f"({[name for name in dataset.coords if dataset[name].dims == ('subject',)]})")
    values = dataset[config.target].values
    if config.task == "regression":
        return values.astype(np.float32)
    lookup = {value: index for index, value in enumerate(classes)}
    return np.array([lookup.get(value, -1) for value in values], np.int64)


def _member_seed(config: TrainingConfig, member: int) -> int:
    return config.seed * 1000 + member


def _start_weights(model: torch.nn.Module, spec: ModelSpec, config: TrainingConfig, member: int) -> dict:
    """Load fine-tuning weights (layers whose shape differs stay fresh) and freeze the named layers. Returns the
    fresh layers and, when fine-tuned, the source member's provenance (file, sha256, its modalities, grid and
    scaling). A source trained on another grid, input scaling or number of input channels is an error."""
    fresh, source_record = [], None
    if config.finetune_from:
        source = Path(config.finetune_from)
        if source.is_dir():
            members = sorted(source.glob("member_*.safetensors"))
            if not members:
                raise FileNotFoundError(f"finetune_from: no member_*.safetensors in {source}")
            source = members[member % len(members)]
        card_path = source.with_suffix(".json")
        if card_path.is_file():
            card = json.loads(card_path.read_text())
            theirs = {"grid": tuple(card["spec"]["input_shape"]), "input_scaling": card["config"]["input_scaling"],
                      "input channels": len(card["config"]["modalities"])}
            ours = {"grid": tuple(spec.input_shape), "input_scaling": config.input_scaling,
                    "input channels": len(config.modalities)}
            differing = [f"{name} {theirs[name]} (here {ours[name]})" for name in ours if theirs[name] != ours[name]]
            if differing:
                raise ValueError(f"finetune_from: {source} was trained on other inputs: {'; '.join(differing)}")
            source_record = {"modalities": card["config"]["modalities"], "target": card["config"]["target"],
                             "classes": card.get("classes"), **{key: value for key, value in theirs.items()
                                                                 if key != "input channels"}}
        state = load_file(source)
        own = model.state_dict()
        usable = {name: value for name, value in state.items() if name in own and own[name].shape == value.shape}
        fresh = sorted(set(own) - set(usable))
        model.load_state_dict(usable, strict=False)
        source_record = {"file": str(source.resolve()), "sha256": file_sha256(source), **(source_record or {})}
    names = [name for name, _ in model.named_parameters()]
    for prefix in config.freeze:
        matched = [name for name in names if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            raise ValueError(f"freeze: {prefix!r} names no layer; parameters are {names}")
        for name, parameter in model.named_parameters():
            if name in matched:
                parameter.requires_grad_(False)
    return {"fresh_layers": fresh, "finetuned_from": source_record}


def _schedule(optimiser: torch.optim.Optimizer, config: TrainingConfig):
    """The learning rate of epoch e (from 0): the initial rate × the warm-up ramp × the schedule's factor."""
    if config.schedule == "constant" and not config.warmup_epochs:
        return None

    def factor(epoch: int) -> float:
        ramp = min(1.0, (epoch + 1) / config.warmup_epochs) if config.warmup_epochs else 1.0
        if config.schedule == "cosine":  # annealed to 0 over the epochs
            return ramp * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
        if config.schedule == "step":
            return ramp * config.step_gamma ** (epoch // config.step_epochs)
        return ramp

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


#: Validation outputs whose spread across participants is at most this fraction of the training
#: targets' SD (regression) or this many logits (classification) are one constant value.
CONSTANT_OUTPUT = 1e-6
#: A member whose kept validation loss is not at least this share below the loss of the best constant
#: (the training mean, or the training split's class or bin frequencies) has learned nothing.
MIN_GAIN = 0.05
#: Why a run learned nothing (a restart's ``reason``).
COLLAPSED, NO_BETTER = "constant output", "no better than a constant"
#: A restarted member's seed: its own seed plus this times the attempt (no other member's seed).
RESTART_SEED_STEP = 1_000_000
#: Devices on which ``mixed_precision`` trains under bfloat16 autocast (a CPU's bfloat16 3D
#: convolutions are slower than float32 without AVX512-BF16 or AMX).
MIXED_PRECISION_DEVICES = ("cuda",)


class MemberCollapsed(RuntimeError):
    """A member's network put out one constant for every participant and could not learn again."""


def _constant_output(targets: np.ndarray, n: int, config: TrainingConfig, edges: np.ndarray | None,
                     classes: list | None) -> torch.Tensor:
    """The best constant model's outputs for ``n`` participants, from the training ``targets``: their mean
    (regression), or the logits of their bin (soft labels) or class frequencies."""
    if config.task == "regression" and edges is None:
        return torch.full((n, 1), float(targets.mean()))
    if edges is not None:
        frequencies = soft_labels(targets, edges, config.soft_label_sigma).mean(axis=0)
    else:
        frequencies = np.bincount(targets, minlength=len(classes)) / len(targets)
    logits = torch.from_numpy(np.log(np.maximum(frequencies, 1e-12))).float()
    return logits.expand(n, -1)


def train_member(store: str | Path, config: TrainingConfig, split: pd.Series, member: int, out_dir: str | Path,
                 classes: list | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train member ``member`` and write its weights, predictions and card into ``out_dir`` (``models/``).

    Early stopping keeps the weights of the epoch with the best validation criterion (loss, or
    balanced accuracy) and stops after ``patience`` epochs without improvement. A member that learned
    nothing starts again from a fresh seed, up to ``collapse_restarts`` times (the card lists the restarts):

    - its validation outputs were one constant in two successive epochs and its kept epoch is such a
      constant (collapsed: every ReLU silent, no gradient reaches the layers before them again); if the
      last attempt collapses too, training fails with :class:`MemberCollapsed`;
    - or patience ended it before its last epoch while its kept epoch's validation loss was not
      ``MIN_GAIN`` below the best constant's (stuck at the training mean: the plateau every member
      starts on, which some do not leave before patience runs out); if the last attempt is stuck too,
      it is kept. The card's ``learned_nothing`` says whether the kept member beats the best constant
      by less than ``MIN_GAIN`` — the target may not be predictable from the inputs, and that is a
      result.

    Returns the card.
    """
    started = time.perf_counter()
    files = ModelsLayout(Path(out_dir))
    volumes = CohortVolumes(store, config.modalities, config.input_scaling)
    targets = targets_of(volumes.dataset, config, classes)
    subject_split = split.reindex(volumes.subjects).to_numpy()
    train = np.flatnonzero(subject_split == "train")
    validation = np.flatnonzero(subject_split == "validation")
    if config.task == "classification":
        unlabelled = [volumes.subjects[p] for p in np.flatnonzero(targets < 0) if subject_split[p] in SPLITS]
        if unlabelled:
            raise ValueError(f"participants {unlabelled[:5]} have a {config.target!r} outside the classes {classes}")
    if len(train) == 0 or len(validation) == 0:
        raise ValueError("training needs participants in both the train and the validation split")

    restarts = []
    for attempt in range(config.collapse_restarts + 1):
        seed = _member_seed(config, member) + RESTART_SEED_STEP * attempt
        fit = _fit(volumes, targets, train, validation, config, member, seed, classes, log)
        if fit["failure"] is None:
            break
        restarts.append({"seed": seed, **fit["failure"]})
        if log:
            log(f"member {member} learned nothing ({fit['failure']['reason']} at epoch {fit['failure']['epoch']}, "
                f"seed {seed})")
    else:
        if fit["failure"]["reason"] == COLLAPSED:
            raise MemberCollapsed(
                f"member {member} collapsed to a constant output (every ReLU silent) in its last attempt; all "
                f"{len(restarts)} attempts learned nothing (seeds {[restart['seed'] for restart in restarts]}); "
                "lower learning_rate or set warmup_epochs")
        restarts.pop()  # a last attempt that is only stuck is kept, not restarted
    model, best = fit["model"], fit["best"]
    model.load_state_dict(best["state"])
    with atomic_output(files.weights(member)) as partial:
        save_file({name: value.contiguous() for name, value in best["state"].items()}, partial)

    predictions = predict(model, volumes, np.arange(len(volumes.subjects)), config.task, classes)
    predictions.insert(1, "split", subject_split)
    predictions.insert(2, "member", str(member))
    predictions = keyed(predictions, volumes.dataset)
    with atomic_output(files.member_predictions(member)) as partial:
        predictions.to_parquet(partial, index=False)
    card = {"member": member, "seed": seed, "spec": fit["spec"].as_dict(), "config": config.as_dict(),
            "classes": classes, "split": split_hash(split), "best_epoch": best["epoch"],
            "epochs_run": len(fit["history"]), "history": fit["history"], "restarts": restarts,
            "learned_nothing": fit["learned_nothing"], "constant_loss": fit["constant_loss"],
            "fresh_layers": fit["fresh_layers"], "finetuned_from": fit["finetuned_from"], "device": str(fit["device"]),
            "seconds": time.perf_counter() - started}
    with atomic_output(files.card(member)) as partial:  # written last: marks the member done
        partial.write_text(json.dumps(card, indent=1))
    return card


def _fit(volumes: CohortVolumes, targets: np.ndarray, train: np.ndarray, validation: np.ndarray,
         config: TrainingConfig, member: int, seed: int, classes: list | None,
         log: Callable[[str], None] | None) -> dict:
    """One training run from ``seed``: the model, its best epoch (``best``: criterion, loss, epoch, state), the
    history, the validation loss of the best constant model and the run's ``failure`` (``None``, or the
    reason the run learned nothing and its last epoch)."""
    torch.manual_seed(seed)
    device = torch_device()
    regression = config.task == "regression"
    edges = value_bins(targets[train], config.bin_width) if config.loss == "soft_labels" else None
    if edges is not None:
        centres = tuple(float(centre) for centre in (edges[:-1] + edges[1:]) / 2)
        spec = ModelSpec(config.model, volumes.shape, len(config.modalities), len(centres),
                         dict(config.model_options), bin_centres=centres)
        model = build_model(spec)
    else:
        n_outputs = 1 if regression else len(classes)
        spec = ModelSpec(config.model, volumes.shape, len(config.modalities), n_outputs, dict(config.model_options))
        model = build_model(spec, target_mean=float(targets[train].mean()) if regression else None,
                            target_scale=float(targets[train].std()) if regression else None)
    start = _start_weights(model, spec, config, member)
    model = place(model, device)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "sgd":
        optimiser = torch.optim.SGD(trainable, lr=config.learning_rate, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimiser = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = _schedule(optimiser, config)
    loss_fn = torch.nn.MSELoss() if regression else torch.nn.CrossEntropyLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=config.mixed_precision and device.type in MIXED_PRECISION_DEVICES)
    # the spread below which the validation outputs are one constant: outputs are in the target's units
    # (regression), or logits
    constant_spread = CONSTANT_OUTPUT * (float(targets[train].std()) if regression and edges is None else 1.0)

    def outputs_of(inputs: np.ndarray) -> torch.Tensor:
        with autocast:
            return model(torch.from_numpy(inputs).to(device)).float()

    def loss_of(output: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        if edges is not None:  # KL(soft label ‖ predicted distribution), averaged over the batch
            labels = torch.from_numpy(soft_labels(targets[positions], edges, config.soft_label_sigma)).to(output)
            return torch.nn.functional.kl_div(torch.log_softmax(output, dim=1), labels, reduction="batchmean")
        target = torch.from_numpy(targets[positions]).to(device)
        return loss_fn(output[:, 0], target) if regression else loss_fn(output, target)

    rng = np.random.default_rng(seed)
    cache: dict = {}
    validation_inputs = volumes.read(validation)
    constant_loss = float(loss_of(_constant_output(targets[train], len(validation), config, edges, classes).to(device),
                                  validation))
    history, best = [], {"score": -math.inf, "epoch": -1, "state": None, "constant": False}
    constant_before, collapsed_at = False, None
    for epoch in range(config.epochs):
        model.train()
        total = 0.0
        for positions, inputs in epoch_batches(volumes, train, config.batch_size, rng, cache, config.cache_bytes):
            inputs = augment(inputs, config.augmentation, rng, volumes.left_right_axis)
            optimiser.zero_grad()
            loss = loss_of(outputs_of(inputs), positions)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(positions)
        model.eval()
        with torch.no_grad():
            output = torch.cat([outputs_of(validation_inputs[s:s + 32]) for s in range(0, len(validation), 32)])
            scores = {"validation_loss": float(loss_of(output, validation))}
            if config.task == "classification":
                probabilities = torch.softmax(output, dim=1).cpu().numpy()
                scores["validation_balanced_accuracy"] = classification_metrics(targets[validation],
                                                                                probabilities)["balanced_accuracy"]
        constant = len(validation) > 1 and float(output.std(dim=0).max()) <= constant_spread
        history.append({"epoch": epoch + 1, "train_loss": total / len(train), **scores,
                        "learning_rate": optimiser.param_groups[0]["lr"], "constant_output": constant})
        if log:
            log(f"member {member} epoch {epoch + 1}: train {total / len(train):.3f}, "
                + ", ".join(f"{name.removeprefix('validation_')} {value:.3f}" for name, value in scores.items()))
        score = -scores["validation_loss"] if config.early_stopping == "loss" else scores[
            "validation_balanced_accuracy"]
        if score > best["score"]:
            best = {"score": score, "loss": scores["validation_loss"], "epoch": epoch + 1, "constant": constant,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        if constant and constant_before:  # collapsed: nothing more can be learned (before patience ends the run)
            collapsed_at = epoch + 1 if best["constant"] else None
            break
        if epoch + 1 - best["epoch"] >= config.patience:
            break
        constant_before = constant
        if schedule is not None:
            schedule.step()
    learned_nothing = best["loss"] > (1 - MIN_GAIN) * constant_loss
    if collapsed_at is not None:
        failure = {"reason": COLLAPSED, "epoch": collapsed_at}
    elif learned_nothing and len(history) < config.epochs:  # patience ran out on the plateau
        failure = {"reason": NO_BETTER, "epoch": len(history)}
    else:
        failure = None
    return {"model": model, "spec": spec, "best": best, "history": history, "failure": failure,
            "learned_nothing": learned_nothing, "constant_loss": constant_loss, **start,
            "device": device}


def predict(model: torch.nn.Module, volumes: CohortVolumes, positions: np.ndarray, task: str,
            classes: list | None = None, batch_size: int = 16) -> pd.DataFrame:
    """Predictions for the given store positions (column ``subject``, the store rows' labels): ``predicted`` or one
    ``p_<class>`` column per class."""
    device = next(model.parameters()).device
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(positions), batch_size):
            batch = positions[start:start + batch_size]
            outputs.append(model(torch.from_numpy(volumes.read(batch)).to(device)).cpu().double().numpy())
    output = np.concatenate(outputs)
    table = pd.DataFrame({"subject": volumes.subjects[positions]})
    if task == "regression":
        table["predicted"] = predicted_values(model, torch.from_numpy(output)).numpy()
    else:
        probabilities = torch.softmax(torch.from_numpy(output), dim=1).numpy()
        for index, name in enumerate(classes):
            table[f"p_{name}"] = probabilities[:, index]
    return table


def load_member(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """A trained member in eval mode and its card, from ``member_<k>.json`` / ``.safetensors`` (weights only).

    ``path`` is the member's path without a suffix (``ModelsLayout.member``) or one of the two files.
    """
    path = Path(path).with_suffix("")
    card = json.loads(path.with_suffix(".json").read_text())
    model = build_model(ModelSpec.from_dict(card["spec"]))
    model.load_state_dict(load_file(path.with_suffix(".safetensors")))
    return place(model, device).eval(), card
