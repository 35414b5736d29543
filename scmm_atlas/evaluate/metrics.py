"""Prediction metrics applied identically to every method (ours, totalVI, MultiVI, the kNN baseline).

Conventions (embedding metrics: :mod:`.embedding`):

- Prediction: per feature, across cells, correlation between prediction and observation after both are normalised
  to 10,000 per cell over that modality's features and log1p-transformed; features constant (after that transform)
  in either are skipped. Normalising the prediction too puts any non-negative prediction (expected counts, rates,
  probabilities) on one scale; Spearman is unaffected by the log but not by the normalisation.
- Open/closed prediction (ATAC): per-region AUROC of the predicted score against the observed peak being open
  (count > 0), across cells, and per-cell AUPRC (average precision) across regions; regions or cells that are all
  open or all closed are skipped. Ranks only, so no normalisation.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

TARGET_SUM = 1e4


def log_normalise(x: np.ndarray | sp.spmatrix, *, target: float = TARGET_SUM, sparse: bool = False
                  ) -> np.ndarray | sp.csr_matrix:
    """log1p of each cell scaled to ``target`` in total (log1p CP10k); a cell with nothing stays 0. Scale-free
    per cell, so counts and an expected expression per 10k (pseudo-RNA, predictions) are treated alike.
    Dense float64, or with ``sparse`` a float32 CSR matrix (zeros stay zeros: for many features)."""
    if sparse:
        x = sp.csr_matrix(x, dtype=np.float32)
        totals = np.asarray(x.sum(axis=1)).ravel()
        scale = np.where(totals > 0, target / np.where(totals > 0, totals, 1.0), 0.0).astype(np.float32)
        return (sp.diags(scale) @ x).log1p().tocsr()
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    totals = x.sum(axis=1, keepdims=True)
    return np.log1p(x / np.where(totals > 0, totals, 1.0) * target)


def columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r per column; NaN where either column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    valid = (np.ptp(a, axis=0) > 0) & (np.ptp(b, axis=0) > 0)
    out = np.full(a.shape[1], np.nan)
    out[valid] = (a[:, valid] * b[:, valid]).sum(axis=0) / denom[valid]
    return out


def feature_correlations(pred: np.ndarray | sp.spmatrix, observed: np.ndarray | sp.spmatrix) -> dict:
    """Per-feature Pearson/Spearman across cells, both sides normalised to 10k per cell and log1p (module doc).

    ``pearson``/``spearman`` are means over features that vary in both prediction and observation; the
    ``*_per_feature`` arrays hold NaN for the skipped features.
    """
    if pred.shape != observed.shape:
        raise ValueError(f"prediction {pred.shape} and observation {observed.shape} differ in shape")
    p, o = log_normalise(pred), log_normalise(observed)
    pearson = columnwise_pearson(p, o)
    spearman = columnwise_pearson(rankdata(p, axis=0), rankdata(o, axis=0))
    return {
        "pearson": float(np.nanmean(pearson)) if np.isfinite(pearson).any() else float("nan"),
        "spearman": float(np.nanmean(spearman)) if np.isfinite(spearman).any() else float("nan"),
        "pearson_per_feature": pearson,
        "spearman_per_feature": spearman,
    }


def open_region_scores(pred: np.ndarray | sp.spmatrix, observed: np.ndarray | sp.spmatrix) -> dict:
    """``auroc``: mean per-region AUROC across cells; ``auprc``: mean per-cell average precision across regions
    (module doc). Ties in the prediction count half, as in scikit-learn's ``roc_auc_score``."""
    if pred.shape != observed.shape:
        raise ValueError(f"prediction {pred.shape} and observation {observed.shape} differ in shape")
    p = pred.toarray() if sp.issparse(pred) else np.asarray(pred, dtype=np.float64)
    o = (observed.toarray() if sp.issparse(observed) else np.asarray(observed)) > 0
    n_pos = o.sum(axis=0)
    n_neg = o.shape[0] - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    ranks = rankdata(p[:, valid], axis=0)  # Mann-Whitney U per region
    u = (ranks * o[:, valid]).sum(axis=0) - n_pos[valid] * (n_pos[valid] + 1) / 2
    auroc = u / (n_pos[valid] * n_neg[valid])
    cells = np.flatnonzero(o.any(axis=1) & ~o.all(axis=1))
    auprc = [average_precision_score(o[i], p[i]) for i in cells]
    return {"auroc": float(np.mean(auroc)) if len(auroc) else float("nan"),
            "auprc": float(np.mean(auprc)) if auprc else float("nan"),
            "n_regions": int(valid.sum()), "n_cells": len(cells)}


def rna_pca(rna: np.ndarray | sp.spmatrix, *, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """RNA embedded the baseline's way: log1p counts per 10k, then PCA (the kNN row's embedding)."""
    x = log_normalise(rna)
    n_components = min(n_pcs, x.shape[0] - 1, x.shape[1] - 1)
    return PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit_transform(x)


def knn_regression(train_rna: np.ndarray | sp.spmatrix, train_target: np.ndarray | sp.spmatrix,
                   test_rna: np.ndarray | sp.spmatrix, *, n_pcs: int = 50, k: int = 15, seed: int = 0) -> np.ndarray:
    """The kNN regression baseline in RNA PCA space: predicts a second modality from RNA without any model.

    RNA counts -> log1p counts per 10k -> PCA fitted on the training cells; each test cell gets the mean of its
    ``k`` nearest training cells' target, normalised to 10k per cell. Returns a dense (n_test, n_target) array.
    """
    train_x, test_x = log_normalise(train_rna), log_normalise(test_rna)
    n_components = min(n_pcs, train_x.shape[0] - 1, train_x.shape[1] - 1)
    pca = PCA(n_components=n_components, svd_solver="randomized", random_state=seed).fit(train_x)
    index = NearestNeighbors(n_neighbors=min(k, train_x.shape[0])).fit(pca.transform(train_x))
    neighbours = index.kneighbors(pca.transform(test_x), return_distance=False)
    target = sp.csr_matrix(train_target, dtype=np.float64)
    totals = np.asarray(target.sum(axis=1)).ravel()
    target = sp.diags(np.where(totals > 0, TARGET_SUM / np.where(totals > 0, totals, 1.0), 0.0)) @ target
    n_test, n_k = neighbours.shape
    weights = sp.csr_matrix((np.full(n_test * n_k, 1.0 / n_k), neighbours.ravel(),
                             np.arange(0, n_test * n_k + 1, n_k)), shape=(n_test, target.shape[0]))
    return (weights @ target).toarray()


def panel_correlations(pred: np.ndarray | sp.spmatrix, pred_names: list[str], observed: np.ndarray | sp.spmatrix,
                       observed_names: list[str], match: dict[str, str]) -> dict:
    """Prediction against observation when the two panels differ (a query measured with other antibodies).

    Each side is log1p(CP10k) over its *own* panel (the prediction over the reference's proteins, the
    observation over the query's), then the ``match`` pairs (predicted name -> observed name) present in
    both are compared per protein across cells: Pearson, Spearman and the z-scored SSE (both sides
    z-scored across cells, squared differences summed over cells; equal to 2 n (1 - r)). ``pearson``,
    ``spearman`` and ``sse`` are means over the proteins that vary on both sides.
    """
    pairs = [(p, o) for p, o in match.items() if p in pred_names and o in observed_names]
    if not pairs:
        raise ValueError("no protein of the match table is in both panels")
    p = log_normalise(pred)[:, [pred_names.index(a) for a, _ in pairs]]
    o = log_normalise(observed)[:, [observed_names.index(b) for _, b in pairs]]
    pearson = columnwise_pearson(p, o)
    spearman = columnwise_pearson(rankdata(p, axis=0), rankdata(o, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        zp, zo = (p - p.mean(0)) / p.std(0), (o - o.mean(0)) / o.std(0)
    sse = np.where(np.isfinite(pearson), ((zp - zo) ** 2).sum(axis=0), np.nan)
    return {"pearson": float(np.nanmean(pearson)), "spearman": float(np.nanmean(spearman)),
            "sse": float(np.nanmean(sse)), "n_proteins": int(np.isfinite(pearson).sum()),
            "per_protein": {a: float(r) for (a, _), r in zip(pairs, pearson, strict=True)}}
