"""Feature statistics and feature selection, computed out of core with dask over the store.

Blocks of cells are read by dask tasks (each opens the store itself) and reduced pairwise, so memory
is bounded by a few blocks whatever the number of cells. Statistics are over the cells that have the
modality. Selection, recorded in ``var['selected']`` so that training reads only those features:
- RNA: highly variable genes on raw counts, Seurat v3 'vst' (the flavour ``scanpy`` calls
  ``seurat_v3``: loess of log variance on log mean, clipped standardised variance), the top
  ``N_TOP_GENES`` (the defaults are in :mod:`.selection`);
- ATAC: peaks in the top quartile (``ATAC_QUANTILE``) of total counts;
- proteins and other modalities: all features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import dask
import numpy as np
import pandas as pd
from dask.diagnostics import ProgressBar

from ..store.base import Store
from .selection import ATAC_QUANTILE, N_TOP_GENES

log = logging.getLogger(__name__)

BLOCK_NNZ = 1 << 22


@dataclass
class Moments:
    n: float
    sums: np.ndarray
    sumsq: np.ndarray
    nnz: np.ndarray

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.sums + other.sums, self.sumsq + other.sumsq, self.nnz + other.nnz)


def _blocks(store: Store, mod: str, present: np.ndarray) -> list[tuple[int, int]]:
    """Cell ranges holding about BLOCK_NNZ stored values each."""
    nnz = store.obs([f"n_features_{mod}"])[f"n_features_{mod}"].to_numpy()
    cum = np.concatenate([[0], np.cumsum(nnz)])
    bounds, start, n = [], 0, len(present)
    while start < n:
        stop = int(np.searchsorted(cum, cum[start] + BLOCK_NNZ, side="right")) - 1
        stop = min(n, max(start + 1, stop, start + 1024))
        bounds.append((start, stop))
        start = stop
    return bounds


def _tree_sum(parts: list) -> object:
    add = dask.delayed(lambda a, b: a + b, pure=True)
    while len(parts) > 1:
        parts = [add(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _reduce_blocks(store: Store, mod: str, present: np.ndarray, blocks: list[tuple[int, int]], fn: Callable,
                   progress: bool) -> Moments:
    """Sum ``fn(counts_block)`` over blocks of present cells, one dask task per block."""
    uri = store.uri

    def task(start: int, stop: int) -> Moments:
        from ..store import open_store

        with open_store(uri) as st:
            mat = st.read(mod, start, stop)
        rows = present[start:stop]
        return fn(mat[rows] if not rows.all() else mat)

    parts = [dask.delayed(task, pure=True)(a, b) for a, b in blocks]
    total = _tree_sum(parts)
    with ProgressBar(minimum=2) if progress else nullcontext():
        (result,) = dask.compute(total, scheduler="threads", num_workers=os.cpu_count() or 1)
    return result


def _moments(n_var: int, clip: np.ndarray | None = None) -> Callable:
    def fn(mat) -> Moments:
        data = mat.data.astype(np.float64)
        if clip is not None:
            data = np.minimum(data, clip[mat.indices])
        return Moments(mat.shape[0], np.bincount(mat.indices, data, n_var),
                       np.bincount(mat.indices, data * data, n_var),
                       np.bincount(mat.indices[data > 0], minlength=n_var).astype(np.float64))

    return fn


LOESS_SPANS = (0.3, 0.6, 1.0)  # Seurat's span first; wider ones when the local fits are singular


def variance_trend(log_mean: np.ndarray, log_var: np.ndarray) -> tuple[np.ndarray, str]:
    """Fitted log10 variance at each gene's log10 mean, and how it was fitted.

    Seurat v3's loess (span 0.3, degree 2) fails on valid but small data, where many genes share
    the same (mean, variance) (e.g. seen once in 300 cells) and its local fits are singular. Then
    wider spans are tried, and last a global quadratic (Seurat's trend, without the locality).
    """
    from skmisc.loess import loess

    errors = []
    if len(log_mean) >= 10:
        for span in LOESS_SPANS:
            try:
                model = loess(log_mean, log_var, span=span, degree=2)
                model.fit()
            except ValueError as exc:
                errors.append(f"span {span}: {exc}")
                continue
            fitted = np.asarray(model.outputs.fitted_values)
            if np.isfinite(fitted).all():
                return fitted, f"loess span {span}"
    coef = np.polyfit(log_mean, log_var, deg=min(2, max(len(np.unique(log_mean)) - 1, 0)))
    reason = "; ".join(errors) if errors else f"{len(log_mean)} variable genes"
    return np.polyval(coef, log_mean), f"quadratic trend (loess failed: {reason})"


def seurat_v3_norm_var(mean: np.ndarray, var: np.ndarray, n: float, clipped: Callable[[np.ndarray], Moments]
                       ) -> tuple[np.ndarray, str]:
    """Seurat v3 standardised variance per gene (``clipped(clip)`` gives moments of clipped counts), and
    how the mean-variance trend was fitted (:func:`variance_trend`)."""
    not_const = var > 0
    estimate = np.zeros(len(mean))
    trend = "no variable genes"
    if not_const.any():
        estimate[not_const], trend = variance_trend(np.log10(mean[not_const]), np.log10(var[not_const]))
    reg_std = np.sqrt(10**estimate)
    clip = reg_std * np.sqrt(n) + mean
    m = clipped(clip)
    return (n * mean**2 + m.sumsq - 2 * m.sums * mean) / ((n - 1) * reg_std**2), trend


def compute_stats(store: Store, *, n_top_genes: int = N_TOP_GENES, atac_quantile: float = ATAC_QUANTILE,
                  progress: bool = False) -> dict[str, pd.DataFrame]:
    """Compute and record statistics and the selection for every modality of ``store``."""
    out = {}
    obs = store.obs([f"has_{m}" for m in store.modalities])
    for mod in store.modalities:
        present = obs[f"has_{mod}"].to_numpy()
        n_var = len(store.var(mod))
        blocks = _blocks(store, mod, present)  # one obs read per modality, shared by both passes
        m = _reduce_blocks(store, mod, present, blocks, _moments(n_var), progress)
        n = max(m.n, 1.0)
        mean = m.sums / n
        var = np.maximum(m.sumsq - n * mean**2, 0) / max(n - 1, 1.0)
        stats = pd.DataFrame({"n_cells": m.nnz.astype(np.int64), "total_counts": m.sums, "mean": mean,
                              "variance": var, "variances_norm": np.nan, "hvg_rank": np.nan})
        kind = store.kind(mod)
        if kind == "rna" and n_top_genes < n_var:
            norm, trend = seurat_v3_norm_var(
                mean, var, n, lambda clip, mod=mod, present=present, blocks=blocks, n_var=n_var: _reduce_blocks(
                    store, mod, present, blocks, _moments(n_var, clip), progress))
            rank = np.empty(n_var)
            rank[np.argsort(-norm, kind="stable")] = np.arange(n_var)
            stats["variances_norm"], stats["hvg_rank"] = norm, rank
            selected = rank < n_top_genes
            method = f"seurat_v3 top {n_top_genes}"
            if not trend.startswith(f"loess span {LOESS_SPANS[0]}"):
                method += f", {trend}"
                log.warning("%s: %s highly variable genes: %s", store.uri, mod, trend)
        elif kind == "atac":
            selected = m.sums >= np.quantile(m.sums, atac_quantile)
            method = f"total counts >= {atac_quantile:.0%} quantile"
        else:
            selected = np.ones(n_var, dtype=bool)
            method = "all"
        stats["selected"] = selected
        store.write_var_stats(mod, stats)
        store.info.selection[mod] = {"method": method, "n_selected": int(selected.sum())}
        out[mod] = stats
    store.info.stats_n_obs = store.n_obs
    store.save_info()
    return out
