"""The report's PNGs (matplotlib, headless): the UMAP, the latent programs and observed vs predicted
proteins. Each function draws one kind of figure and returns where it wrote it; the page says how to
read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store.results import ResultsReader


def _plt() -> Any:
    """pyplot on the Agg backend: a report is written on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write and close ``fig``: a report draws many figures, and pyplot keeps every open one."""
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def umap(emb: np.ndarray, labels: pd.Series, path: Path, seed: int) -> np.ndarray:
    """UMAP of ``emb`` coloured by Leiden cluster and by ``labels`` into ``path``; returns the clusters
    (the other figures and tables group cells by them)."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.nan_to_num(emb).astype(np.float32))
    sc.pp.neighbors(adata, use_rep="X", n_neighbors=15, transformer="sklearn", random_state=seed)
    sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    sc.tl.umap(adata, random_state=seed)
    clusters = adata.obs["leiden"].astype(int).to_numpy()
    xy = adata.obsm["X_umap"]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, (title, values) in zip(axes, (("Leiden cluster", clusters), (labels.name, labels.to_numpy())),
                                   strict=True):
        cats = pd.Categorical(values)
        cmap = plt.get_cmap("tab20", max(len(cats.categories), 1))
        for i, cat in enumerate(cats.categories):
            sel = cats.codes == i
            ax.scatter(xy[sel, 0], xy[sel, 1], s=2, color=cmap(i), label=str(cat), rasterized=True)
            if len(cats.categories) <= 40:
                ax.annotate(str(cat), xy[sel].mean(0), fontsize=7, ha="center", weight="bold")
        ax.set_title(f"joint embedding, coloured by {title} ({len(cats.categories)})")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(cats.categories) <= 20:
            ax.legend(markerscale=4, fontsize=6, loc="best", frameon=False)
    _save(fig, path)
    return clusters


def programs(reader: ResultsReader, out: Path, top: int) -> list[Path]:
    """``programs_<MOD>.png`` per modality: per latent dim, its ``top`` rising then ``top`` falling
    features' decoded means along the traversal, each scaled to its own range."""
    curves = reader.traversals()
    if curves.empty:
        return []
    plt = _plt()
    paths = []
    for mod, cm in curves.groupby("modality"):
        dims = sorted(cm["dim"].unique())
        ncol = min(5, len(dims))
        nrow = -(-len(dims) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
        for ax, dim in zip(axes.ravel(), dims, strict=False):
            sub = cm[cm["dim"] == dim]
            feats = [f for d in ("up", "down") for f in
                     sub[sub.direction == d].drop_duplicates("feature")["feature"].tolist()[:top]]
            mat = sub.pivot_table(index="feature", columns="step", values="mean").reindex(feats)
            lo, hi = mat.min(1).to_numpy()[:, None], mat.max(1).to_numpy()[:, None]
            ax.imshow((mat.to_numpy() - lo) / np.maximum(hi - lo, 1e-12), aspect="auto", cmap="viridis",
                      vmin=0, vmax=1)
            ax.set_yticks(range(len(feats)), feats, fontsize=5)
            z = sub.drop_duplicates("step").sort_values("step")["z"].to_numpy()
            ax.set_xticks([0, len(z) - 1], [f"{z[0]:.1f}", f"{z[-1]:.1f}"], fontsize=6)
            ax.set_title(f"dim {dim}", fontsize=8)
        for ax in axes.ravel()[len(dims):]:
            ax.axis("off")
        fig.suptitle(f"{mod}: top program features along each latent traversal (rising, then falling; "
                     "each scaled to its range)", fontsize=9)
        paths.append(_save(fig, out / f"programs_{mod}.png"))
    return paths


def protein_clusters(observed: np.ndarray, predicted: np.ndarray, cl: np.ndarray, features: list[str],
                     source: str, target: str, out: Path) -> Path:
    """Observed vs predicted cluster means side by side: the same pattern means the prediction holds."""
    plt = _plt()
    ids = np.unique(cl)
    means = [np.stack([m[cl == c].mean(0) for c in ids]) for m in (observed, predicted)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.18 * len(features) * 2), 0.25 * len(ids) + 2.5))
    for ax, mat, title in zip(axes, means, ("observed", f"predicted from {source}"), strict=True):
        zs = (mat - mat.mean(0)) / np.maximum(mat.std(0), 1e-9)
        ax.imshow(zs, aspect="auto", cmap="RdBu_r", vmin=-2.5, vmax=2.5)
        ax.set_yticks(range(len(ids)), [f"cluster {c}" for c in ids], fontsize=6)
        ax.set_xticks(range(len(features)), features, rotation=90, fontsize=5)
        ax.set_title(f"{target} {title} (mean log1p per 10k, z-scored across clusters)", fontsize=8)
    return _save(fig, out / f"{target}_clusters.png")


def protein_scatter(observed: np.ndarray, predicted: np.ndarray, r: np.ndarray, features: list[str],
                    source: str, target: str, out: Path) -> Path:
    """Per cell, observed vs predicted for the 12 most variable proteins (where errors would show)."""
    plt = _plt()
    order = np.argsort(-observed.var(0))[:12]
    fig, axes = plt.subplots(3, 4, figsize=(12, 9), squeeze=False)
    for ax, j in zip(axes.ravel(), order, strict=False):
        ax.scatter(observed[:, j], predicted[:, j], s=1, alpha=0.3, rasterized=True)
        ax.set_title(f"{features[j]}  r = {r[j]:.2f}", fontsize=8)
        ax.set_xlabel("observed (log1p per 10k)", fontsize=7)
        ax.set_ylabel(f"predicted from {source}", fontsize=7)
    for ax in axes.ravel()[len(order):]:
        ax.axis("off")
    return _save(fig, out / f"{target}_scatter.png")
