"""What distinguishes the groups an embedding finds: differential features of clusters and of the
sub-clusters inside each labelled type (the seed paper's §3.1: two CD4+ T groups that differ in
activation proteins).

Groups: Leiden clusters of the embedding's 15-NN graph (exact neighbours) at ``resolution``; inside
each label with at least ``min_cells`` cells, Leiden on that label's own cells at
``sub_resolution``. Test: scanpy's ``rank_genes_groups`` (Wilcoxon rank-sum, each group against the
rest of its level: all cells for clusters, the label's other cells for sub-clusters, Benjamini-
Hochberg), on log1p of counts per 10,000 over each modality's features. Effect sizes: log2 fold
change of the group's mean expression over the rest's (scanpy's), and the fraction of cells with a
nonzero count in and outside the group.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from .metrics import log_normalise

COLUMNS = ["level", "group", "n_cells", "modality", "rank", "feature", "log2fc", "score", "pval_adj",
           "frac_in", "frac_out"]


def leiden(embedding: np.ndarray, resolution: float, *, seed: int = 0) -> np.ndarray:
    """Leiden clusters (as strings '0', '1', ... by size) of the exact 15-NN graph of ``embedding``."""
    x = np.ascontiguousarray(np.nan_to_num(embedding), dtype=np.float32)
    adata = ad.AnnData(x, obs=pd.DataFrame(index=np.arange(len(x)).astype(str)))
    sc.pp.neighbors(adata, n_neighbors=min(15, len(adata) - 1), use_rep="X", transformer="sklearn",
                    random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return adata.obs["leiden"].astype(str).to_numpy()


def _rank(x: sp.csr_matrix, names: list[str], groups: np.ndarray, top: int) -> pd.DataFrame:
    """Top ``top`` features of each group (of at least 2 groups with >= 2 cells) against the rest."""
    counts = pd.Series(groups).value_counts()
    keep = np.isin(groups, counts[counts >= 2].index)
    if (counts >= 2).sum() < 2:
        return pd.DataFrame(columns=COLUMNS[1:])
    obs = pd.DataFrame({"g": pd.Categorical(groups[keep])}, index=np.flatnonzero(keep).astype(str))
    adata = ad.AnnData(x[keep], obs=obs,
                       var=pd.DataFrame(index=pd.Index(names).astype(str)))
    adata.var_names_make_unique()
    with warnings.catch_warnings():  # scanpy: 0/0 z-scores of features constant in a pair, fragmented frames
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(adata, "g", method="wilcoxon", pts=True, n_genes=min(top, len(names)),
                                tie_correct=True)
    table = sc.get.rank_genes_groups_df(adata, group=None)
    table["rank"] = table.groupby("group", observed=True).cumcount() + 1
    table["n_cells"] = table["group"].map(counts).astype(int)
    return table.rename(columns={"names": "feature", "logfoldchanges": "log2fc", "scores": "score",
                                 "pvals_adj": "pval_adj", "pct_nz_group": "frac_in",
                                 "pct_nz_reference": "frac_out"})


def markers(embedding: np.ndarray, counts: Mapping[str, tuple[np.ndarray | sp.spmatrix, list[str]]], *,
            labels: np.ndarray | None = None, resolution: float = 1.0, sub_resolution: float = 0.3,
            min_cells: int = 50, top: int = 10, seed: int = 0) -> pd.DataFrame:
    """Differential features (module doc) as one table, rows ``COLUMNS``.

    ``counts``: modality -> (cells x features counts, feature names), rows as ``embedding``'s.
    ``level`` is ``cluster`` (``group`` = cluster id) or ``subcluster`` (``group`` = 'label/id').
    """
    normed = {m: (log_normalise(x, sparse=True), list(names)) for m, (x, names) in counts.items()}
    parts = []
    clusters = leiden(embedding, resolution, seed=seed)
    for mod, (x, names) in normed.items():
        parts.append(_rank(x, names, clusters, top).assign(level="cluster", modality=mod))
    if labels is not None:
        labels = np.asarray(labels).astype(str)
        for label in sorted(pd.unique(labels)):
            rows = np.flatnonzero(labels == label)
            if len(rows) < min_cells:
                continue
            sub = np.array([f"{label}/{c}" for c in leiden(embedding[rows], sub_resolution, seed=seed)])
            for mod, (x, names) in normed.items():
                parts.append(_rank(x[rows], names, sub, top).assign(level="subcluster", modality=mod))
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(parts, ignore_index=True)[COLUMNS]
