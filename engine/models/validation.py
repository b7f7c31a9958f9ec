"""Scoring relevance maps against planted ground truth, and their robustness across retrained models.

Ground truth is a mask over the cohort's voxels (e.g. the demo cohort's ``truth_regions.nii.gz``,
read with :func:`truth_mask`). Each relevance map is scored by relevance-mass accuracy, voxel
ROC-AUC and top-k region precision; :func:`score_methods` tabulates them per method. Robustness
follows Eitel & Ritter (2019): across the members of an ensemble (retrainings of one model), per
group of subjects (:func:`subject_groups`), the L2 distance between their max-scaled mean |R| maps
and the overlap of their top-k regions by sum, density and gain (Böhle et al. 2019). Relevance
maps are DataArrays with a ``voxel`` dim and any leading dims (``attribution``, ``member``,
``subject``), numpy or dask; voxel reductions stay lazy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import xarray as xr
from scipy.stats import spearmanr
from torch import nn

from engine.analysis.association import OUTCOMES, classification_outcomes
from engine.analysis.atlas import STATISTICS, Atlas, region_reduce, top_k_overlap, top_regions
from engine.data.inputs import load_image
from engine.data.masker import Masker
from engine.models.attribution import AttributionOptions, ExplainedModel, attribute
from engine.models.ensembles import ENSEMBLE
from engine.models.heap import heap_kept
from engine.models.training import load_member
from engine.models.volumes import CohortVolumes

# ---------------------------------------------------------------------------------------
# Ground truth


def truth_mask(truth_image: str | Path | nib.spatialimages.SpatialImage, cohort: xr.Dataset | xr.DataArray,
               labels: Iterable[int] | None = None) -> np.ndarray:
    """Which of the cohort's voxels lie in the ground truth: a (voxel,) boolean array.

    ``truth_image`` is a label (or 0/1) NIfTI on the cohort grid, e.g. the demo cohort's
    ``truth_regions.nii.gz``; ``cohort`` is the store (:func:`~engine.data.store.open_cohort`) or one
    of its arrays. Voxels with a nonzero value count, or only those with one of ``labels``.
    """
    if isinstance(truth_image, (str, Path)):
        name = str(truth_image)
        image, _ = load_image(Path(truth_image))
    else:
        name = truth_image.get_filename() or "the truth image"
        image = truth_image
    try:
        masker = Masker.of(cohort)
    except ValueError:
        raise ValueError("truth_mask needs the cohort store (open_cohort) or one of its arrays: the grid attributes "
                         "and the voxels' i, j, k coordinates are missing") from None
    grid = masker.grid
    shape = image.shape[:3] if len(image.shape) == 4 and image.shape[3] == 1 else image.shape
    if not grid.matches(shape, image.affine, atol=1e-3):
        raise ValueError(f"truth image {name}: grid differs from the cohort's: shape {tuple(shape)} vs {grid.shape}, "
                         f"affine\n{np.round(image.affine, 4)}\nvs\n{np.round(grid.affine, 4)}")
    volume = np.asanyarray(image.dataobj).reshape(shape)
    values = masker.transform(volume)
    if labels is None:
        inside = values > 0
    else:
        labels = sorted(int(label) for label in labels)
        absent = sorted(set(labels) - {int(value) for value in np.unique(volume)})
        if absent:
            raise ValueError(f"truth image {name} has no voxels labelled {absent}")
        inside = np.isin(values, labels)
    if not inside.any():
        raise ValueError(f"truth image {name}: none of the cohort's voxels is in the truth"
                         f"{'' if labels is None else f' (labels {labels})'}")
    return inside


def atlas_truth_regions(atlas: Atlas, truth: np.ndarray, min_fraction: float = 0.5) -> list[str]:
    """Names of the atlas regions with at least ``min_fraction`` of their voxels inside ``truth``."""
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    truth = _truth_vector(truth, atlas.voxel_labels.size)
    n_labels = int(max(atlas.voxel_labels.max(initial=0), atlas.regions.index.max())) + 1
    counts = np.bincount(atlas.voxel_labels, minlength=n_labels)[atlas.regions.index]
    inside = np.bincount(atlas.voxel_labels[truth], minlength=n_labels)[atlas.regions.index]
    share = inside / np.maximum(counts, 1)
    return [name for name, count, fraction in zip(atlas.region_names, counts, share, strict=True)
            if count and fraction >= min_fraction]


# ---------------------------------------------------------------------------------------
# Scores of single maps


def relevance_mass_accuracy(relevance: xr.DataArray, truth: np.ndarray) -> xr.DataArray:
    """Share of each map's positive relevance that falls inside ``truth``: Σ_truth R⁺ / Σ R⁺.

    NaN for a map without positive relevance or with a NaN voxel. A map spread uniformly
    scores the truth's voxel fraction, kept in ``attrs["uniform_expectation"]``.
    """
    relevance = _voxel_last(relevance)
    truth = _truth_vector(truth, relevance.sizes["voxel"])
    positive = relevance.clip(min=0).astype(np.float64)
    inside = xr.dot(positive, xr.DataArray(truth.astype(np.float64), dims="voxel"), dim="voxel")
    total = positive.sum("voxel", skipna=False)
    accuracy = (inside / total.where(total > 0)).rename("mass_accuracy")
    accuracy.attrs["uniform_expectation"] = float(truth.mean())
    return accuracy


def voxel_roc_auc(relevance: xr.DataArray, truth: np.ndarray, absolute: bool = False) -> xr.DataArray:
    """ROC-AUC of each map's voxel scores (or their magnitudes) against ``truth``; NaN for maps with NaN.

    Mann–Whitney U: the chance that a truth voxel outscores an outside voxel, ties counting
    half. 0.5 is chance, 1 perfect.
    """
    relevance = _voxel_last(relevance)
    truth = _truth_vector(truth, relevance.sizes["voxel"])
    if truth.all():
        raise ValueError("the truth mask covers every voxel: ROC-AUC needs voxels outside it")
    scores = abs(relevance) if absolute else relevance
    if scores.chunks is not None:
        scores = scores.chunk({"voxel": -1})
    return xr.apply_ufunc(_rank_auc, scores, kwargs={"truth": truth}, input_core_dims=[["voxel"]],
                          dask="parallelized", output_dtypes=[np.float64]).rename("roc_auc")


def _rank_auc(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mann–Whitney U ÷ (n_inside · n_outside) of each map (last axis): per inside voxel, the outside voxels below it
    plus half those tied, counted on the sorted outside scores (cheaper than ranking every voxel)."""
    flat = scores.reshape(-1, truth.size)
    auc = np.full(len(flat), np.nan)
    outside_sorted = np.sort(flat[:, ~truth], axis=-1)
    for row, (outside, inside) in enumerate(zip(outside_sorted, flat[:, truth], strict=True)):
        if np.isnan(outside[-1]) or np.isnan(inside).any():  # NaN sorts last
            continue
        below = np.searchsorted(outside, inside, side="left").sum(dtype=np.int64)
        tied = np.searchsorted(outside, inside, side="right").sum(dtype=np.int64) - below
        auc[row] = (below + tied / 2) / (inside.size * outside.size)
    return auc.reshape(scores.shape[:-1])


def top_k_precision(region_scores: xr.DataArray, truth_regions: Iterable[str], k: int = 10) -> xr.DataArray:
    """Share of the ``k`` highest-scoring regions (along ``region``) that are truth regions.

    NaN where a map has fewer than ``k`` finite region scores. With fewer than ``k`` truth
    regions the best possible precision is their number ÷ ``k``.
    """
    if "region" not in region_scores.dims:
        raise ValueError(f"region scores need a 'region' dimension, got dims {region_scores.dims}")
    region_scores = region_scores.transpose(..., "region").compute()
    truth_regions = _known_regions(truth_regions, region_scores["region"].values)
    _check_k(k, region_scores.sizes["region"])
    top = top_regions(region_scores, k)
    precision = np.isin(top.values, list(truth_regions)).mean(axis=-1)
    enough = np.isfinite(region_scores.values).sum(axis=-1) >= k
    return top.isel(rank=0, drop=True).copy(data=np.where(enough, precision, np.nan)).rename("top_k_precision")


# ---------------------------------------------------------------------------------------
# Robustness across ensemble members (Eitel & Ritter 2019)


def member_l2_distance(member_maps: xr.DataArray) -> xr.DataArray:
    """Mean over pairs of members of the L2 distance between their maps, each divided by its max |value|.

    ``member_maps`` has ``member`` and ``voxel`` dims (e.g. each member's mean map per method);
    the result keeps the other dims.
    """
    member_maps = _voxel_last(member_maps)
    pairs = _member_pairs(member_maps)
    maps = member_maps.astype(np.float64).drop_vars("member", errors="ignore")
    scale = abs(maps).max("voxel", skipna=False)
    scaled = maps / scale.where(scale > 0)
    first, second = (list(members) for members in zip(*pairs, strict=True))
    difference = scaled.isel(member=first) - scaled.isel(member=second)  # one row per pair
    return np.sqrt((difference**2).sum("voxel", skipna=False)).mean("member").rename("l2_distance")


def member_robustness(relevance: xr.DataArray, atlas: Atlas, groups: Mapping[str, np.ndarray], *,
                      controls: np.ndarray | None = None, k: int = 10) -> pd.DataFrame:
    """Agreement of an ensemble's retrained members on absolute relevance (Eitel & Ritter 2019).

    ``relevance`` holds per-subject maps with dims ``member``, ``subject``, ``voxel`` and
    optionally others such as ``attribution``; ``groups`` names boolean subject masks to score
    separately (their paper: true positives and true negatives; in regression, age bands).
    One row per method and group: ``n`` (subjects), ``l2_distance`` (mean pairwise L2 distance
    between the members' max-scaled mean |R| maps of the group) and the mean pairwise overlap
    |A∩B|/k of the members' top-``k`` regions ranked by the group's mean region sum of |R|
    (``top_k_overlap_sum``), by that per voxel (``density``) and by its gain over the
    ``controls`` (Böhle et al. 2019: the group's mean region sum ÷ the healthy controls'; NaN
    without controls, and for the controls themselves).
    """
    relevance = _voxel_last(relevance)
    missing = [dim for dim in ("member", "subject") if dim not in relevance.dims]
    if missing:
        raise ValueError(f"member_robustness needs dims 'member', 'subject' and 'voxel'; {missing} missing from "
                         f"{relevance.dims}")
    _member_pairs(relevance)
    if not groups:
        raise ValueError("member_robustness needs at least one group of subjects")
    masks = {name: _subject_mask(mask, relevance, f"group {name!r}") for name, mask in groups.items()}
    magnitude = abs(relevance)
    regions, counts = _region_statistic(magnitude, atlas, "sum")
    _check_k(k, counts.size)
    control_sums = None
    if controls is not None:
        controls = _subject_mask(controls, relevance, "controls")
        control_sums = regions.isel(subject=controls).mean("subject")
    tables = []
    for name, mask in masks.items():
        sums = regions.isel(subject=mask).mean("subject")
        scores = {"l2_distance": member_l2_distance(magnitude.isel(subject=mask).astype(np.float64).mean("subject")),
                  "sum": sums, "density": sums / counts}
        if control_sums is not None and not np.array_equal(mask, controls):  # the controls' own gain is 1
            scores["gain"] = sums / control_sums.where(control_sums != 0)
        scores = xr.Dataset(scores).compute()
        table = xr.Dataset({"l2_distance": scores["l2_distance"]})
        for ranking in ("sum", "density", "gain"):
            if ranking not in scores:
                table[f"top_k_overlap_{ranking}"] = xr.full_like(scores["l2_distance"], np.nan)
                continue
            top = top_regions(scores[ranking].transpose(..., "member", "region"), k)
            table[f"top_k_overlap_{ranking}"] = xr.apply_ufunc(
                _mean_pairwise_overlap, top, input_core_dims=[["member", "rank"]], vectorize=True,
                output_dtypes=[np.float64])
        frame = _to_frame(table, relevance)
        frame.insert(0, "n", int(mask.sum()))
        frame.insert(0, "group", name)
        tables.append(frame)
    return pd.concat(tables)


@dataclass(frozen=True)
class SubjectGroups:
    """Named boolean subject masks to compare explanations between, and the two groups a gain divides."""

    kind: str
    masks: dict[str, np.ndarray]
    gain_numerator: np.ndarray | None = None
    gain_denominator: np.ndarray | None = None
    gain_description: str = "not computed: no groups"


def subject_groups(subjects: Sequence[str], age: np.ndarray | None, predictions: pd.DataFrame | None,
                   age_bands: Sequence[float] = (40, 60)) -> SubjectGroups:
    """The groups of explained subjects that explanations are compared between.

    For a binary classification (``predictions``: the ensemble's rows with ``observed`` and one
    ``p_<class>`` column per class, sorted classes), the outcomes TP, FP, TN, FN with the last class
    positive (the class the explanations explain by default), and gain as Böhle et al. (2019)
    defined it: patients (observed positive class) over healthy controls (observed negative class).
    Otherwise age bands cut at ``age_bands``, with gain of the oldest band over the youngest.
    """
    outcome = None if predictions is None else classification_outcomes(predictions)
    if outcome is not None:
        classes = [column.removeprefix("p_") for column in predictions if column.startswith("p_")]
        if len(classes) == 2:
            outcome = outcome.reindex(list(subjects))
            positive = outcome.isin(["TP", "FN"]).to_numpy()
            outcomes = {name: (outcome == name).to_numpy() for name in OUTCOMES}
            has_both = positive.any() and (~positive).any()
            return SubjectGroups(
                f"outcome (positive class {classes[1]})", {name: mask for name, mask in outcomes.items() if mask.any()},
                positive if has_both else None, ~positive if has_both else None,
                f"patients ({classes[1]}) over controls ({classes[0]})" if has_both else "not computed: one class only")
    if age is None:
        return SubjectGroups("", {})
    age = np.asarray(age, dtype=float)
    edges = [-np.inf, *age_bands, np.inf]
    masks = {}
    for low, high in pairwise(edges):
        name = (f"age < {high:g}" if low == -np.inf else f"age ≥ {low:g}" if high == np.inf
                else f"age {low:g}–{high:g}")
        mask = (age >= low) & (age < high)
        if mask.any():
            masks[name] = mask
    if len(masks) < 2:
        return SubjectGroups("age band", masks)
    (youngest, young), *_, (oldest, old) = masks.items()
    return SubjectGroups("age band", masks, old, young, f"{oldest} over {youngest}")


def robustness_table(relevance: xr.Dataset, atlas: Atlas, predictions: pd.DataFrame | None = None,
                     age_bands: Sequence[float] = (40, 60)) -> pd.DataFrame:
    """Eitel & Ritter's robustness of a relevance store's members per method (:func:`member_robustness`): for the
    true positives and true negatives of a binary classification (``predictions``, the ensemble's; gain: patients
    over controls) or per age band (gain: the oldest band over the youngest); ``gain_definition`` says which."""
    if predictions is not None:
        predictions = predictions[predictions.member == ENSEMBLE]
    age = relevance["age"].values if "age" in relevance.coords else None
    groups = subject_groups(relevance.subject.values, age, predictions, age_bands)
    masks = ({name: mask for name, mask in groups.masks.items() if name in ("TP", "TN")} if predictions is not None
             else groups.masks)
    table = member_robustness(relevance.relevance, atlas, masks, controls=groups.gain_denominator)
    return table.reset_index().assign(gain_definition=groups.gain_description)


def _mean_pairwise_overlap(top: np.ndarray) -> float:
    return float(np.mean([top_k_overlap(first, second) for first, second in combinations(top, 2)]))


# ---------------------------------------------------------------------------------------
# Sanity check (Adebayo et al. 2018)


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every convolution and dense layer drawn afresh as a new model starts
    (He-normal weights, zero biases; buffers such as the output scale are kept)."""
    randomised = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in randomised.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                fan_in = module.weight[0].numel()
                fresh = torch.randn(module.weight.shape, generator=generator) * math.sqrt(2 / fan_in)
                module.weight.copy_(fresh.to(module.weight))
                if module.bias is not None:
                    module.bias.zero_()
    return randomised


def parameter_randomisation(model: nn.Module, inputs: torch.Tensor, methods: Sequence[str], *,
                            options=None, inside: np.ndarray | None = None, randomised: nn.Module | None = None,
                            region_labels: np.ndarray | None = None, seed: int = 0) -> pd.DataFrame:
    """The model-parameter randomisation test of Adebayo et al. (2018), one row per method.

    Each method explains ``inputs`` with the trained ``model`` and with ``randomised`` (default:
    :func:`randomised_copy`, every layer re-drawn); a map that reflects what the model learned
    should change. Columns: ``spearman`` and ``spearman_abs``, the mean over inputs of the rank
    correlation between the two maps (signed, and of their magnitudes) over the voxels ``inside``
    (a boolean volume, e.g. the brain mask; default all). Near 0 passes, near 1 fails.
    ``region_labels`` is the atlas volume ``region_occlusion`` needs.
    """
    randomised = randomised_copy(model, seed) if randomised is None else randomised
    networks = (ExplainedModel(model), ExplainedModel(randomised))  # each one's LRP form made once
    inside = np.ones(inputs.shape[2:], bool) if inside is None else np.asarray(inside, bool)
    rows = []
    with heap_kept():
        for method in methods:
            trained, shuffled = (attribute(network, inputs, method, options, region_labels).cpu().numpy()[:, inside]
                                 for network in networks)
            signed = [spearmanr(a, b).statistic for a, b in zip(trained, shuffled, strict=True)]
            magnitude = [spearmanr(np.abs(a), np.abs(b)).statistic for a, b in zip(trained, shuffled, strict=True)]
            rows.append({"attribution": method, "n": len(trained), "spearman": float(np.mean(signed)),
                         "spearman_abs": float(np.mean(magnitude))})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class RandomisationTest:
    """The parameter randomisation test of ``methods`` on one trained member (``member``: its path without a
    suffix, ``engine.layout.ModelsLayout.member``) over some ``subjects`` of the images store ``images``."""

    member: str
    images: str
    methods: tuple[str, ...]
    subjects: tuple[str, ...]
    options: AttributionOptions
    region_labels: np.ndarray | None = None


def randomisation_test(test: RandomisationTest) -> pd.DataFrame:
    """:func:`parameter_randomisation` of a :class:`RandomisationTest` (a task: it loads the member and its
    subjects' inputs, the voxels inside the cohort mask scored)."""
    model, card = load_member(test.member)
    volumes = CohortVolumes(test.images, card["config"]["modalities"], card["config"]["input_scaling"])
    positions = [list(volumes.subjects).index(subject) for subject in test.subjects]
    inside = volumes.box.inverse_transform(np.ones(len(volumes.box), bool), fill=False)
    return parameter_randomisation(model, torch.from_numpy(volumes.read(positions)), list(test.methods),
                                   options=test.options, inside=inside, region_labels=test.region_labels)


# ---------------------------------------------------------------------------------------
# The table of methods


def score_methods(relevance: xr.DataArray, truth: np.ndarray, atlas: Atlas | None = None, *, k: int = 10,
                  truth_regions: Iterable[str] | None = None, min_fraction: float = 0.5, absolute: bool = False,
                  average_over: Sequence[str] = ("subject",)) -> pd.DataFrame:
    """Ground-truth scores of every map, averaged over ``average_over``: one row per remaining index.

    Rows are e.g. per ``attribution`` method and ``member``; pass ``relevance.mean("member")`` to score the
    ensemble. Columns: ``n_maps`` (maps without NaN, which are the ones averaged),
    ``mass_accuracy`` and its ``mass_accuracy_uniform`` expectation, ``roc_auc`` (chance 0.5;
    of |R| if ``absolute``) and, with an ``atlas``, ``top_k_precision`` of the regions ranked by
    relevance density (|R| if ``absolute``) and its ``top_k_precision_uniform`` expectation. The
    truth regions are ``truth_regions`` or the atlas regions at least ``min_fraction`` inside
    ``truth``.
    """
    relevance = _voxel_last(relevance)
    truth = _truth_vector(truth, relevance.sizes["voxel"])
    scores = {
        "available": relevance.notnull().all("voxel"),
        "mass_accuracy": relevance_mass_accuracy(relevance, truth),
        "roc_auc": voxel_roc_auc(relevance, truth, absolute),
    }
    if atlas is not None:
        region_values, counts = _region_statistic(relevance, atlas, "abs_sum" if absolute else "sum")
        _check_k(k, counts.size)
        scores["density"] = region_values / counts
        truth_regions = (atlas_truth_regions(atlas, truth, min_fraction) if truth_regions is None
                         else _known_regions(truth_regions, counts["region"].values))
        if not truth_regions:
            raise ValueError(f"no atlas region has at least {min_fraction:.0%} of its voxels inside the truth mask; "
                             "lower min_fraction or pass truth_regions")
    scores = xr.Dataset(scores).compute()
    maps = xr.Dataset({"mass_accuracy": scores["mass_accuracy"], "roc_auc": scores["roc_auc"]})
    if atlas is not None:
        maps["top_k_precision"] = top_k_precision(scores["density"], truth_regions, k)
    maps = maps.where(scores["available"])
    over = [dim for dim in average_over if dim in maps.dims]
    table = maps.mean(over) if over else maps
    table["n_maps"] = scores["available"].sum(over) if over else scores["available"].astype(int)
    table["mass_accuracy_uniform"] = float(truth.mean())
    if atlas is not None:
        table["top_k_precision_uniform"] = len(truth_regions) / scores.sizes["region"]
    columns = ["n_maps", "mass_accuracy", "mass_accuracy_uniform", "roc_auc", "top_k_precision",
               "top_k_precision_uniform"]
    return _to_frame(table, relevance)[[column for column in columns if column in table]]


def score_table(relevance: xr.Dataset, truth: np.ndarray, atlas: Atlas | None = None) -> pd.DataFrame:
    """:func:`score_methods` of a relevance store's ensemble-mean maps (``member`` "ensemble") and of each member's,
    on signed relevance (``scored`` "R") and on its magnitude ("|R|", for maps whose sign flips)."""
    tables = []
    for absolute in (False, True):
        scored = "|R|" if absolute else "R"
        ensemble = score_methods(relevance.relevance_mean, truth, atlas, absolute=absolute).reset_index()
        members = score_methods(relevance.relevance, truth, atlas, absolute=absolute).reset_index()
        tables += [ensemble.assign(member=ENSEMBLE, scored=scored),
                   members.assign(member=members["member"].astype(str), scored=scored)]
    return pd.concat(tables, ignore_index=True)


# ---------------------------------------------------------------------------------------
# Helpers


def _voxel_last(relevance: xr.DataArray) -> xr.DataArray:
    if not isinstance(relevance, xr.DataArray):
        raise ValueError(f"relevance maps must be an xarray DataArray, got {type(relevance).__name__}")
    if "voxel" not in relevance.dims:
        raise ValueError(f"relevance maps need a 'voxel' dimension, got dims {relevance.dims}")
    return relevance.transpose(..., "voxel")


def _truth_vector(truth, n_voxels: int) -> np.ndarray:
    truth = np.asarray(truth.values if isinstance(truth, xr.DataArray) else truth)
    if truth.shape != (n_voxels,):
        raise ValueError(f"the truth mask must have one value per voxel ({n_voxels}), got shape {truth.shape}")
    if truth.dtype != bool:
        if not np.isin(truth, (0, 1)).all():
            raise ValueError(f"the truth mask must be boolean (or 0/1), got values {np.unique(truth)[:10]}")
        truth = truth.astype(bool)
    if not truth.any():
        raise ValueError("the truth mask is empty")
    return truth


def _subject_mask(mask, relevance: xr.DataArray, name: str) -> np.ndarray:
    mask = np.asarray(mask.values if isinstance(mask, xr.DataArray) else mask)
    if mask.dtype != bool or mask.shape != (relevance.sizes["subject"],):
        raise ValueError(f"{name} must be a boolean array with one value per subject ({relevance.sizes['subject']}), "
                         f"got {mask.dtype} of shape {mask.shape}")
    if not mask.any():
        raise ValueError(f"{name} has no subjects")
    return mask


def _member_pairs(maps: xr.DataArray) -> list[tuple[int, int]]:
    if maps.sizes.get("member", 0) < 2:
        raise ValueError(f"robustness needs a 'member' dimension with at least two members, got {dict(maps.sizes)}")
    return list(combinations(range(maps.sizes["member"]), 2))


def _known_regions(truth_regions: Iterable[str], region_names) -> set[str]:
    truth_regions = set(truth_regions)
    if unknown := sorted(truth_regions - set(region_names)):
        raise ValueError(f"truth regions {unknown} are not among the scored regions")
    return truth_regions


def _check_k(k: int, n_regions: int) -> None:
    if not 1 <= k <= n_regions:
        raise ValueError(f"k must be between 1 and the number of regions ({n_regions}), got {k}")


def _region_statistic(relevance: xr.DataArray, atlas: Atlas, statistic: str) -> tuple[xr.DataArray, xr.DataArray]:
    """``region_reduce``'s ``statistic`` of every map (any leading dims) and the voxel counts, of nonempty regions."""
    counts = xr.DataArray(atlas.voxel_counts().to_numpy(), dims="region", coords={"region": atlas.region_names})
    nonempty = (counts > 0).values
    return _region_reduce_maps(relevance, atlas)[statistic].isel(region=nonempty), counts.isel(region=nonempty)


def _region_reduce_maps(relevance: xr.DataArray, atlas: Atlas) -> xr.Dataset:
    outer = [dim for dim in relevance.dims[:-1] if dim != "subject"]
    if outer:
        dim = outer[0]
        parts = [_region_reduce_maps(relevance.isel({dim: n}), atlas) for n in range(relevance.sizes[dim])]
        regions = xr.concat(parts, dim=dim, join="exact")
        return regions.assign_coords({dim: relevance[dim]}) if dim in relevance.coords else regions
    if "subject" in relevance.dims:
        return region_reduce(relevance, atlas)[list(STATISTICS)]
    return region_reduce(relevance.expand_dims("subject"), atlas)[list(STATISTICS)].isel(subject=0, drop=True)


def _to_frame(table: xr.Dataset, relevance: xr.DataArray) -> pd.DataFrame:
    """A table of scores; with no dims left, one row named by the maps' scalar ``attribution`` or "relevance"."""
    table = table.reset_coords(drop=True)
    if not table.dims:
        method = relevance.coords.get("attribution")
        table = table.expand_dims(attribution=[method.item() if method is not None and method.ndim == 0
                                               else "relevance"])
    return table.to_dataframe()
