"""How well an embedding (or a neighbour graph) keeps known cell types together, separates rare ones
and mixes batches.

The metrics are scib-metrics' (the maintained implementation of the scIB benchmark, Luecken et al.
2022) and scikit-learn's, applied identically to every method on the labelled cells only (labels
in ``exclude``, by default ``'unknown'``, are left out of every metric and of the kNN graph):

- ``nmi`` / ``ari``: Leiden clusters at the resolution with the best NMI (scib-metrics'
  ``nmi_ari_cluster_labels_leiden``: 10 resolutions from 0.2 to 2.0, 15-NN graph);
  ``nmi_k`` / ``ari_k``: at the first of ``RESOLUTIONS`` (0.05 to 2.0) whose cluster count is
  closest to the number of labels, a choice that needs no labels.
- ``silhouette``: label silhouette (scib, rescaled to [0, 1]); ``clisi``: cell-type LISI on the
  90-NN graph (scib, scaled so that 1 is pure).
- ``isolated_asw``: scib's isolated-label score, the silhouette of the isolated labels against
  all others; ``isolated_f1``: the original scIB's cluster version, for each isolated label the
  best F1 of any Leiden cluster at any of ``RESOLUTIONS``, averaged (1: a cluster that is exactly
  that label exists at some resolution). Isolated labels are scib's, those present in the fewest
  batches; when that is every label (one batch, or every label in every batch) they are the rare
  labels instead: fewer than ``RARE_FRACTION`` of the labelled cells (at least the rarest one).
- ``knn_acc``: leave-one-out 15-NN majority vote of the labels.
- ``bio``: the mean of ``isolated_asw``, ``nmi``, ``ari``, ``silhouette`` and ``clisi`` (scib-metrics'
  bio-conservation set, with Leiden at the best-NMI resolution in place of k-means); ``bio_graph``:
  the mean of ``nmi``, ``ari`` and ``clisi``, the part that a method giving only a graph (WNN) has.
- With two or more batches: ``ilisi`` (scaled), ``kbet`` (scib's per-label kBET acceptance),
  ``graph_connectivity`` and ``bras`` (batch-removal-adapted silhouette), and their mean ``batch``
  (kBET and BRAS are 0 when no label spans two batches); scib's fifth batch metric (PC regression
  against the unintegrated data) needs the raw data and is not computed.

:func:`graph_scores` scores a method that gives neighbours instead of coordinates (WNN): the same
metrics from its graph, without the silhouettes (NaN) and with its own number of neighbours for
LISI.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors

RESOLUTIONS = tuple(float(r) for r in np.round(np.arange(0.05, 2.001, 0.05), 2))
RARE_FRACTION = 0.02
BIO_KEYS = ("isolated_asw", "nmi", "ari", "silhouette", "clisi")
BIO_GRAPH_KEYS = ("nmi", "ari", "clisi")
BATCH_KEYS = ("ilisi", "kbet", "graph_connectivity", "bras")


def neighbours(embedding: np.ndarray, k: int):
    """Exact k nearest neighbours (self excluded) as scib-metrics' ``NeighborsResults``."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    k = min(k, len(embedding) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    return NeighborsResults(indices=idx[:, 1:], distances=dist[:, 1:])


def isolated_label_set(labels: np.ndarray, batch: np.ndarray | None) -> list[str]:
    """scib's isolated labels (present in the fewest batches), else the rare ones (module doc)."""
    counts = pd.Series(labels).value_counts()
    if batch is not None:
        per_label = pd.DataFrame({"label": labels, "batch": batch}).drop_duplicates().groupby("label").size()
        fewest = per_label[per_label == per_label.min()].index.tolist()
        if len(fewest) < len(counts):
            return sorted(fewest)
    rare = counts[counts < RARE_FRACTION * len(labels)].index.tolist()
    return sorted(rare) if rare else [str(counts.idxmin())]


def knn_accuracy(indices: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out majority vote of each cell's neighbours ``indices`` [cells, k] (ties: the first label
    in sorted order)."""
    codes, uniques = pd.factorize(labels, sort=True)
    votes = np.zeros((len(labels), len(uniques)))
    np.add.at(votes, (np.repeat(np.arange(len(labels)), indices.shape[1]), codes[indices].ravel()), 1)
    return float((votes.argmax(1) == codes).mean())


def sweep_scores(connectivities, labels: np.ndarray, isolated: list[str], *, seed: int = 0) -> dict[str, float]:
    """Leiden on the graph at every one of ``RESOLUTIONS``: NMI / ARI at the label count, and the isolated
    labels' best F1 (module doc)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    adata = sc.AnnData(obs=pd.DataFrame(index=np.arange(len(labels)).astype(str)))
    n_labels = len(np.unique(labels))
    at_k: tuple[int, np.ndarray] | None = None
    best_f1 = dict.fromkeys(isolated, 0.0)
    for resolution in RESOLUTIONS:
        sc.tl.leiden(adata, resolution=resolution, adjacency=connectivities, flavor="igraph", n_iterations=2,
                     directed=False, random_state=seed)
        clusters = adata.obs["leiden"].to_numpy()
        gap = abs(len(np.unique(clusters)) - n_labels)
        if at_k is None or gap < at_k[0]:  # strict: ties keep the smaller resolution
            at_k = (gap, clusters)
        for label in isolated:
            truth = labels == label
            for c in np.unique(clusters[truth]):
                best_f1[label] = max(best_f1[label], f1_score(truth, clusters == c))
    return {"nmi_k": float(normalized_mutual_info_score(labels, at_k[1])),
            "ari_k": float(adjusted_rand_score(labels, at_k[1])),
            "isolated_f1": float(np.mean(list(best_f1.values())))}


def _per_label_batch_scores(x: np.ndarray, labels: np.ndarray, batch: np.ndarray, *, kbet: bool
                            ) -> dict[str, float]:
    """scib's per-label kBET (if ``kbet``) and BRAS; 0 when no label spans two batches (scib-metrics raises)."""
    import scib_metrics as sm

    spans = pd.DataFrame({"label": labels, "batch": batch}).groupby("label")["batch"].nunique()
    mixed = bool((spans > 1).any())
    out = {"bras": float(sm.bras(x, labels, batch)) if mixed else 0.0}
    if kbet:
        out["kbet"] = float(sm.kbet_per_label(neighbours(x, 50), batch, labels)) if mixed else 0.0
    return out


def _labelled(labels: np.ndarray, batch: np.ndarray | None, n: int, exclude: tuple[str, ...]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    labels = np.asarray(labels).astype(str)
    if len(labels) != n or (batch is not None and len(batch) != n):
        raise ValueError(f"{n} embedding rows but {len(labels)} labels"
                         + ("" if batch is None else f" and {len(batch)} batch codes"))
    keep = ~np.isin(labels, list(exclude))
    return keep, labels[keep], None if batch is None else np.asarray(batch).astype(str)[keep]


def _graph_part(nn_leiden, nn_lisi, labels: np.ndarray, batch: np.ndarray | None, seed: int) -> dict[str, float]:
    """The metrics that need only neighbours (module doc)."""
    import scib_metrics as sm

    best = sm.nmi_ari_cluster_labels_leiden(nn_leiden, labels, optimize_resolution=True, seed=seed)
    isolated = isolated_label_set(labels, batch)
    out = {"nmi": float(best["nmi"]), "ari": float(best["ari"]),
           **sweep_scores(nn_leiden.knn_graph_connectivities, labels, isolated, seed=seed),
           "clisi": float(sm.clisi_knn(nn_lisi, labels)), "knn_acc": knn_accuracy(nn_leiden.indices[:, :15], labels)}
    out["bio_graph"] = float(np.mean([out[k] for k in BIO_GRAPH_KEYS]))
    if batch is not None and len(np.unique(batch)) > 1:
        out["ilisi"] = float(sm.ilisi_knn(nn_lisi, batch))
        out["graph_connectivity"] = float(sm.graph_connectivity(nn_leiden, labels))
    return out


def best_nmi_ari(embedding: np.ndarray, labels: np.ndarray, *, exclude: tuple[str, ...] = ("unknown",),
                 seed: int = 0) -> dict[str, float]:
    """Only ``nmi`` / ``ari`` at the best-NMI resolution (e.g. against a second, finer set of labels)."""
    import scib_metrics as sm

    keep, labels, _ = _labelled(labels, None, len(embedding), exclude)
    nn = neighbours(np.ascontiguousarray(np.asarray(embedding, dtype=np.float32)[keep]), 15)
    best = sm.nmi_ari_cluster_labels_leiden(nn, labels, optimize_resolution=True, seed=seed)
    return {"nmi": float(best["nmi"]), "ari": float(best["ari"])}


def graph_scores(distances, labels: np.ndarray, *, batch: np.ndarray | None = None,
                 exclude: tuple[str, ...] = ("unknown",), seed: int = 0) -> dict[str, float]:
    """The metrics of a method that gives a neighbour graph: ``distances`` [cells, cells] sparse, the same
    number k >= 15 of neighbours in every row (e.g. WNN's); silhouettes, kBET and BRAS are NaN."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    keep, labels, batch = _labelled(labels, batch, distances.shape[0], exclude)
    d = sp.lil_matrix(sp.csr_matrix(distances)[keep][:, keep])
    d.setdiag(0)  # a cell is not its own neighbour
    d = sp.csr_matrix(d)
    d.eliminate_zeros()
    k = int(np.diff(d.indptr).min())
    if k < 15:
        raise ValueError(f"a graph row has {k} neighbours among the scored cells (need >= 15): build the graph on "
                         "the labelled cells only")
    idx, dist = np.zeros((d.shape[0], k), dtype=np.int64), np.zeros((d.shape[0], k))
    for i in range(d.shape[0]):
        row = slice(d.indptr[i], d.indptr[i + 1])
        order = np.argsort(d.data[row], kind="stable")[:k]
        idx[i], dist[i] = d.indices[row][order], d.data[row][order]
    nn = NeighborsResults(indices=idx, distances=dist)
    out = _graph_part(nn, nn, labels, batch, seed)
    out.update(dict.fromkeys(("silhouette", "isolated_asw", "bio"), float("nan")))
    if "ilisi" in out:
        out.update(dict.fromkeys(("kbet", "bras", "batch"), float("nan")))
    return out


def embedding_scores(embedding: np.ndarray, labels: np.ndarray, *, batch: np.ndarray | None = None,
                     exclude: tuple[str, ...] = ("unknown",), seed: int = 0, kbet: bool = True) -> dict[str, float]:
    """Every metric of the module doc for ``embedding`` [cells, dims] against ``labels`` (and ``batch``).

    ``kbet=False`` leaves kBET out (and out of ``batch``): scib-metrics compiles it anew for each label's
    size, some seconds per label.
    """
    import scib_metrics as sm
    from scib_metrics.utils import silhouette_samples

    keep, labels, batch = _labelled(labels, batch, len(embedding), exclude)
    x = np.ascontiguousarray(np.asarray(embedding, dtype=np.float32)[keep])
    out = _graph_part(neighbours(x, 15), neighbours(x, 90), labels, batch, seed)
    asw = (np.asarray(silhouette_samples(x, labels)) + 1) / 2
    out["silhouette"] = float(sm.silhouette_label(x, labels))
    out["isolated_asw"] = float(np.mean([asw[labels == lab].mean() for lab in isolated_label_set(labels, batch)]))
    out["bio"] = float(np.mean([out[k] for k in BIO_KEYS]))
    if "ilisi" in out:
        out.update(_per_label_batch_scores(x, labels, batch, kbet=kbet))
        out["batch"] = float(np.mean([out[k] for k in BATCH_KEYS if k in out]))
    return out
