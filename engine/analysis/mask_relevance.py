"""Relevance inside lesion and PVS masks: the per-participant indices of Hofmann & Goltermann et al. (2025).

:func:`mask_indices` computes, lazily per participant (and method), the study's white-matter lesion
(WML) indices of a relevance map R and a mask L; :func:`compare_to_average` tests, over participants
with enough lesion voxels, whether a lesion voxel carries more relevance than the participant's
average voxel (paired Wilcoxon signed-rank test, rank-biserial correlation, Hodges–Lehmann estimate
with its distribution-free CI) and :func:`comparison_figure` draws it. Perivascular spaces (PVS) get
the same indices on masks that :func:`pvs_mask` makes from PVS probability maps. The Eitel et al.
(2019) lesion share stays :func:`engine.analysis.features.lesion_relevance`.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import ndimage

from engine.analysis.stats import paired_wilcoxon
from engine.data.masker import Masker
from engine.data.store import keyed

INDICES = ("a_voxel", "s_voxel", "n_wml_voxel", "a_wml_voxel", "s_wml_voxel", "s_pos_voxel", "s_neg_voxel",
           "p_wml_voxel", "p_voxel", "ap_voxel")
COMPARISON = ("n", "median_a_voxel", "median_a_wml_voxel", "median_difference", "statistic", "p", "rank_biserial",
              "hodges_lehmann", "ci_low", "ci_high")
#: The fewest pairs with an exact two-sided 95 % signed-rank CI (2 · 2⁻⁶ ≤ 0.05); fewer give NaNs.
MIN_PAIRS = 6
#: 26-neighbourhood for clusters, faces only (6-neighbourhood) for the dilation.
CLUSTER_STRUCTURE = np.ones((3, 3, 3), bool)
DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 1)


def mask_indices(mask: xr.DataArray, relevance: xr.DataArray) -> xr.Dataset:
    """The study's per-participant indices of ``relevance`` inside a (subject × voxel) ``mask`` (nonzero = inside).

    Per subject and any other dim of ``relevance`` (e.g. ``attribution``), all sums in float64:
    ``s_voxel`` Σ R; ``a_voxel`` Σ R / #(R ≠ 0); ``n_wml_voxel`` mask voxels; ``s_wml_voxel`` and
    ``a_wml_voxel`` sum and mean of R over the mask voxels; ``s_pos_voxel`` and ``s_neg_voxel`` the
    positive and negative sums; ``p_wml_voxel`` = s_wml / s_pos; ``ap_voxel`` Σ R⁺ / #(R > 0);
    ``p_voxel`` = ap · n_wml / s_pos, the share expected if mask voxels carried the average
    positive relevance. Zero denominators give NaN. Subjects are matched by their coordinate
    (the mask may hold more); the subject coordinates of ``relevance`` (age, …) come along. Lazy.
    """
    if "subject" not in relevance.dims or "voxel" not in relevance.dims:
        raise ValueError(f"relevance needs 'subject' and 'voxel' dims, got {relevance.dims}")
    if set(mask.dims) != {"subject", "voxel"}:
        raise ValueError(f"masks need dims ('subject', 'voxel'), got {mask.dims}")
    missing = sorted(set(relevance["subject"].values.tolist()) - set(mask["subject"].values.tolist()))
    if missing:
        raise ValueError(f"no mask for participant(s) {missing[:10]}{' …' if len(missing) > 10 else ''}")
    if mask.sizes["voxel"] != relevance.sizes["voxel"]:
        raise ValueError(f"voxel counts differ: masks have {mask.sizes['voxel']} voxels, relevance maps "
                         f"{relevance.sizes['voxel']}: not the same cohort mask")
    inside = mask.sel(subject=relevance["subject"].values) > 0
    inside = inside.drop_vars([name for name in inside.coords if name != "subject"])
    values = relevance.astype(np.float64)
    total = values.sum("voxel")
    positive = values.clip(min=0).sum("voxel")
    count = inside.sum("voxel")
    lesion = values.where(inside, 0).sum("voxel")
    average_positive = positive / _nan_if_zero((values > 0).sum("voxel"))
    return xr.Dataset({
        "a_voxel": total / _nan_if_zero((values != 0).sum("voxel")), "s_voxel": total, "n_wml_voxel": count,
        "a_wml_voxel": lesion / _nan_if_zero(count), "s_wml_voxel": lesion, "s_pos_voxel": positive,
        "s_neg_voxel": values.clip(max=0).sum("voxel"), "p_wml_voxel": lesion / _nan_if_zero(positive),
        "p_voxel": average_positive * count / _nan_if_zero(positive), "ap_voxel": average_positive})


def _nan_if_zero(denominator: xr.DataArray) -> xr.DataArray:
    return denominator.where(denominator != 0)


# ---------------------------------------------------------------------------------------
# Lesion voxels against the average voxel


def index_tables(mask: xr.DataArray, relevance: xr.DataArray, min_voxels: int,
                 predicted: pd.Series | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's indices (:func:`mask_indices`) as a table per method and participant, with age (where it is a
    coordinate) and each scan's ``predicted`` value (indexed by store row, e.g. the brain age), and their
    comparison with each participant's average (:func:`compare_to_average`, over more than ``min_voxels``
    mask voxels)."""
    indices = mask_indices(mask, relevance).compute()
    table = indices.to_dataframe().reset_index().reindex(columns=["subject", "attribution", "age", *indices.data_vars])
    if predicted is not None:
        table.insert(3, "predicted", table["subject"].map(predicted))
    table = keyed(table, indices)
    return table, compare_to_average(table, min_voxels).assign(min_voxels=min_voxels)


def compare_to_average(indices: pd.DataFrame | xr.Dataset, min_voxels: int = 30) -> pd.DataFrame:
    """Per method: is the relevance per lesion voxel (``a_wml_voxel``) above the participant's average (``a_voxel``)?

    Over the participants with more than ``min_voxels`` mask voxels (``n_wml_voxel``), a row of
    ``n``, the medians of both and of their paired differences d = a_wml − a_voxel, the two-sided
    ``scipy.stats.wilcoxon`` ``statistic`` (min of the signed-rank sums) and ``p``; the effect size
    ``rank_biserial``, the matched-pairs rank-biserial correlation (W⁺ − W⁻) / (W⁺ + W⁻) over the
    nonzero d (Kerby 2014; > 0: lesion voxels carry more); and ``hodges_lehmann``, the median of
    the Walsh averages (dᵢ + dⱼ)/2, i ≤ j, with its distribution-free 95 % CI ``ci_low``/``ci_high``
    (Hollander & Wolfe): the k-th smallest and largest Walsh averages, k from the exact signed-rank
    distribution up to 50 pairs and its normal approximation (continuity-corrected) beyond. The CI
    is the set of shifts the exact (resp. asymptotic) test does not reject. Fewer than
    ``MIN_PAIRS`` participants give NaNs beside ``n``. ``indices`` is :func:`mask_indices`' Dataset
    or its table (columns a_voxel, a_wml_voxel, n_wml_voxel and optionally attribution).
    """
    rows = [{"attribution": method, **_paired_comparison(average, lesion)}
            for method, average, lesion in _pairs(indices, min_voxels)]
    table = pd.DataFrame(rows, columns=["attribution", *COMPARISON])
    return table if table["attribution"].notna().any() else table.drop(columns="attribution")


def _pairs(indices: pd.DataFrame | xr.Dataset, min_voxels: int) -> list[tuple[str | None, np.ndarray, np.ndarray]]:
    """Per method (None without one): a_voxel and a_wml_voxel of the participants with > min_voxels mask voxels."""
    needed = ["a_voxel", "a_wml_voxel", "n_wml_voxel"]
    if isinstance(indices, xr.Dataset):
        missing = sorted(set(needed) - set(indices.data_vars))
        table = None if missing else indices[needed].to_dataframe().reset_index()
    else:
        missing, table = sorted(set(needed) - set(indices.columns)), indices
    if missing:
        raise ValueError(f"the indices lack {missing}: pass mask_indices' Dataset or its table")
    groups = table.groupby("attribution", sort=False) if "attribution" in table.columns else [(None, table)]
    pairs = []
    for method, group in groups:
        chosen = group[group["n_wml_voxel"] > min_voxels].dropna(subset=needed[:2])
        pairs.append((method, chosen["a_voxel"].to_numpy(np.float64), chosen["a_wml_voxel"].to_numpy(np.float64)))
    return pairs


def _paired_comparison(average: np.ndarray, lesion: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    n = len(average)
    if n < MIN_PAIRS:
        return {"n": n, **dict.fromkeys(COMPARISON[1:], np.nan)}
    result = paired_wilcoxon(average, lesion, confidence)
    return {"n": n, "median_a_voxel": result["median_first"], "median_a_wml_voxel": result["median_second"],
            **{name: result[name] for name in COMPARISON[3:]}}


def comparison_figure(indices: pd.DataFrame | xr.Dataset, min_voxels: int = 30,
                      ax: Axes | Sequence[Axes] | None = None) -> Figure:
    """Per method a panel: half-violins and strips of ``a_voxel`` and ``a_wml_voxel`` of the participants with more
    than ``min_voxels`` mask voxels, each participant's pair joined by a line; titled with n and the Wilcoxon p.

    ``ax`` (one axes per method) draws into an existing figure; without it a new one is made.
    """
    pairs = _pairs(indices, min_voxels)
    if ax is None:
        figure = Figure(figsize=(3.4 * len(pairs), 3.8), facecolor="white", layout="constrained")
        axes = figure.subplots(1, len(pairs), squeeze=False)[0]
    else:
        axes = np.atleast_1d(np.asarray(ax, dtype=object))
        if len(axes) != len(pairs):
            raise ValueError(f"{len(axes)} axes for {len(pairs)} method(s): pass one per method")
        figure = axes[0].figure
    jitter = np.random.default_rng(0)
    for axis, (method, average, lesion) in zip(axes, pairs, strict=True):
        result = _paired_comparison(average, lesion)
        offset = jitter.uniform(0.04, 0.2, average.size)
        axis.plot(np.vstack([offset, 1 - offset]), np.vstack([average, lesion]), color="0.6", lw=0.5, alpha=0.5)
        axis.scatter(offset, average, s=8, color="C0", zorder=3)
        axis.scatter(1 - offset, lesion, s=8, color="C1", zorder=3)
        if result["n"] >= MIN_PAIRS:
            bodies = axis.violinplot([average, lesion], positions=[0, 1], widths=0.8, showextrema=False)["bodies"]
            for body, centre, keep, colour in zip(bodies, (0, 1), (np.minimum, np.maximum), ("C0", "C1"), strict=True):
                vertices = body.get_paths()[0].vertices
                vertices[:, 0] = keep(vertices[:, 0], centre)  # the outer half only; strips fill the inner side
                body.set_facecolor(colour)
        axis.set_xticks([0, 1], ["all voxels\n(a_voxel)", "mask voxels\n(a_wml_voxel)"])
        axis.set_ylabel("relevance per voxel")
        label = f"{method}: " if method is not None else ""
        axis.set_title(f"{label}Wilcoxon p = {result['p']:.2g}, n = {result['n']}", fontsize=9)
    return figure


# ---------------------------------------------------------------------------------------
# PVS masks from probability maps


def pvs_mask(probability: xr.DataArray, masker: Masker, threshold: float = 0.5, min_cluster: int = 5,
             dilate: int = 0) -> xr.DataArray:
    """Boolean PVS masks from (subject × voxel) PVS probability maps, lazily per subject chunk.

    Voxels with probability ≥ ``threshold`` in 3D clusters (26-neighbourhood) of at least
    ``min_cluster`` voxels, dilated ``dilate`` times by the 6-neighbourhood (faces only: the
    least growth that reaches the bright tissue around a dark T1 PVS, where LRP relevance,
    proportional to the input, lands) through the cohort's voxels only. ``masker`` places the
    voxels on their grid (``Masker.of(store)``).
    """
    if dilate < 0:
        raise ValueError(f"dilate must be 0 or more voxels, got {dilate}")
    data, boxed = _probability_blocks(probability, masker, min_cluster)
    masks = data.map_blocks(_mask_block, masker=boxed, threshold=threshold, min_cluster=min_cluster, dilate=dilate,
                            dtype=bool)
    return xr.DataArray(masks, dims=("subject", "voxel"), coords=probability.coords, name="pvs_mask",
                        attrs={**probability.attrs, "threshold": threshold, "min_cluster": min_cluster,
                               "dilate": dilate})


def cluster_count(probability: xr.DataArray, masker: Masker, threshold: float = 0.5,
                  min_cluster: int = 5) -> xr.Dataset:
    """Per subject the clusters :func:`pvs_mask` keeps (``pvs_count``) and their voxels (``pvs_voxels``, before any
    dilation, which may join clusters). Lazy."""
    data, boxed = _probability_blocks(probability, masker, min_cluster)
    counts = data.map_blocks(_count_block, masker=boxed, threshold=threshold, min_cluster=min_cluster,
                             dtype=np.int64, chunks=(data.chunks[0], (2,)))
    coords = {name: coord for name, coord in probability.coords.items() if "voxel" not in coord.dims}
    return xr.Dataset({"pvs_count": ("subject", counts[:, 0]), "pvs_voxels": ("subject", counts[:, 1])},
                      coords=coords, attrs={"threshold": threshold, "min_cluster": min_cluster})


def _probability_blocks(probability: xr.DataArray, masker: Masker, min_cluster: int) -> tuple[da.Array, Masker]:
    """Probability rows as dask blocks of whole subjects, and the masker on the voxels' bounding box."""
    if set(probability.dims) != {"subject", "voxel"}:
        raise ValueError(f"probability maps need dims ('subject', 'voxel'), got {probability.dims}")
    if probability.sizes["voxel"] != len(masker):
        raise ValueError(f"probability maps have {probability.sizes['voxel']} voxels, the masker {len(masker)}")
    if min_cluster < 1:
        raise ValueError(f"min_cluster must be at least 1 voxel, got {min_cluster}")
    return da.asarray(probability.transpose("subject", "voxel").data).rechunk({1: -1}), masker.box()


def _kept_clusters(row: np.ndarray, masker: Masker, threshold: float, min_cluster: int) -> tuple[np.ndarray, int]:
    """The voxels ≥ threshold in 26-connected clusters of ≥ min_cluster voxels, as a volume, and the cluster count."""
    labels, _ = ndimage.label(masker.inverse_transform(row >= threshold, fill=False), structure=CLUSTER_STRUCTURE)
    kept = np.bincount(labels.ravel()) >= min_cluster
    kept[0] = False
    return kept[labels], int(kept.sum())


def _mask_block(block: np.ndarray, masker: Masker, threshold: float, min_cluster: int, dilate: int) -> np.ndarray:
    cohort = masker.inverse_transform(np.ones(len(masker), bool), fill=False)
    masks = np.zeros(block.shape, bool)
    for row, values in enumerate(block):
        volume, _ = _kept_clusters(values, masker, threshold, min_cluster)
        if dilate:
            volume = ndimage.binary_dilation(volume, DILATION_STRUCTURE, iterations=dilate, mask=cohort)
        masks[row] = masker.transform(volume)
    return masks


def _count_block(block: np.ndarray, masker: Masker, threshold: float, min_cluster: int) -> np.ndarray:
    counts = np.zeros((block.shape[0], 2), np.int64)
    for row, values in enumerate(block):
        volume, clusters = _kept_clusters(values, masker, threshold, min_cluster)
        counts[row] = clusters, volume.sum()
    return counts
