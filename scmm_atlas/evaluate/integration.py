"""How well two unpaired sets of cells (scRNA-seq and scATAC-seq) are integrated in one space.

Used by ``scmm-atlas bench unpaired`` (scMM paper §3.3) to compare pseudo-RNA inferred from ATAC,
ATAC gene activity and the model's own joint embedding, each scored the same way:

- :func:`mixing_entropy`: the paper's batch-mixing entropy. For every cell, the Shannon entropy of the
  group labels (here the modality) among its ``k`` nearest neighbours (the cell itself excluded),
  averaged over cells and divided by log(number of groups), so 1 is the most a neighbourhood can
  have and 0 means every neighbourhood is one group. Two things bound what "well mixed" reads as:
  the group sizes (perfect mixing gives the entropy of the overall group fractions,
  :func:`max_mixing_entropy`, which is 1 only for equal groups) and ``k`` (a random neighbourhood of
  k cells fluctuates around those fractions, so small k reads lower; compare methods at one k,
  which must also be well below the group sizes or separated groups read as mixed).
- :func:`transfer_accuracy`: labels carried from reference cells to query cells by a k-NN majority
  vote, scored against the query cells' own labels.
- :func:`pair_recall`: for cells measured both ways (real RNA and the pseudo-RNA of their own ATAC),
  how often a cell's two profiles are neighbours in the integrated space. It needs no labels and is
  high only when the two sets mix *and* line up cell by cell, so the bench uses it on the paired
  (training) cells to choose which pseudo-RNA to integrate before any labelled cell is scored.
- :func:`harmony_embedding`: the shared preprocessing and Harmony run (so that two inputs compared
  with each other get identical treatment).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from .metrics import log_normalise

ENTROPY_K = 50
TRANSFER_K = 15
N_PCS = 30
SCALE_CLIP = 10.0


def _entropy(fractions: np.ndarray) -> np.ndarray:
    """Row-wise Shannon entropy (natural log) of fractions that sum to 1 per row (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(fractions > 0, fractions * np.log(fractions), 0.0)
    return -terms.sum(axis=-1)


def mixing_entropy(embedding: np.ndarray, groups: np.ndarray, *, k: int = ENTROPY_K) -> float:
    """Mean over cells of the entropy of the group labels among each cell's ``k`` nearest neighbours
    (self excluded), divided by log(number of groups): in [0, 1] (module doc)."""
    codes, uniques = pd.factorize(np.asarray(groups), sort=True)
    if len(uniques) < 2:
        raise ValueError("mixing entropy needs at least two groups")
    if not 0 < k < len(codes):
        raise ValueError(f"k must be in [1, {len(codes) - 1}], got {k}")
    idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding, return_distance=False)
    idx = _drop_self(idx, k)
    counts = np.zeros((len(codes), len(uniques)))
    np.add.at(counts, (np.repeat(np.arange(len(codes)), k), codes[idx].ravel()), 1)
    return float(_entropy(counts / k).mean() / np.log(len(uniques)))


def _drop_self(idx: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` neighbours of each row without the row itself (which duplicates may push off column 0)."""
    rows = np.arange(len(idx))[:, None]
    not_self = idx != rows
    # Keep the first k entries that are not the cell itself (there are k or k + 1 of them).
    order = np.argsort(~not_self, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)[:, :k]


def max_mixing_entropy(groups: np.ndarray) -> float:
    """What :func:`mixing_entropy` tends to under perfect mixing and large k: the entropy of the overall
    group fractions over log(number of groups) (1 for equal groups, less the more unequal they are)."""
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    return float(_entropy(counts / counts.sum()) / np.log(len(counts)))


def transfer_accuracy(reference: np.ndarray, reference_labels: np.ndarray, query: np.ndarray,
                      query_labels: np.ndarray, *, k: int = TRANSFER_K) -> float:
    """Fraction of ``query`` cells whose label, the majority vote of their ``k`` nearest ``reference``
    cells (ties: the first label in sorted order), equals their own label."""
    codes, uniques = pd.factorize(np.asarray(reference_labels).astype(str), sort=True)
    k = min(k, len(codes))
    idx = NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(query, return_distance=False)
    votes = np.zeros((len(query), len(uniques)))
    np.add.at(votes, (np.repeat(np.arange(len(query)), k), codes[idx].ravel()), 1)
    predicted = np.asarray(uniques)[votes.argmax(1)]
    return float((predicted == np.asarray(query_labels).astype(str)).mean())


def pair_recall(embedding: np.ndarray, n_pairs: int, *, k: int = ENTROPY_K) -> float:
    """Rows ``i`` and ``n_pairs + i`` of ``embedding`` are one cell's two profiles: the fraction of
    profiles whose partner is among their ``k`` nearest rows (self excluded), over both halves."""
    if embedding.shape[0] != 2 * n_pairs:
        raise ValueError(f"pair recall needs 2 x {n_pairs} rows (the two profiles of each cell), "
                         f"got {embedding.shape[0]}")
    if not 0 < k < embedding.shape[0]:
        raise ValueError(f"k must be in [1, {embedding.shape[0] - 1}], got {k}")
    idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding, return_distance=False)
    partner = (np.arange(2 * n_pairs) + n_pairs) % (2 * n_pairs)
    return float((_drop_self(idx, k) == partner[:, None]).any(axis=1).mean())


def harmony_embedding(blocks: list[np.ndarray | sp.spmatrix], *, n_pcs: int = N_PCS, seed: int = 0) -> np.ndarray:
    """Harmony-corrected PCs of the cells of ``blocks`` (cells x the same genes, one block per group):
    :func:`log_normalise`, genes scaled to unit variance over all cells (clipped at ``SCALE_CLIP``),
    ``n_pcs`` PCs of the concatenation, Harmony on the block label with harmonypy's defaults."""
    import harmonypy
    from sklearn.decomposition import PCA

    x = np.vstack([log_normalise(b) for b in blocks])
    sd = x.std(axis=0)
    x = np.clip((x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0), -SCALE_CLIP, SCALE_CLIP)
    pcs = PCA(n_components=n_pcs, svd_solver="full", random_state=seed).fit_transform(x)
    label = pd.DataFrame({"group": np.repeat(np.arange(len(blocks)).astype(str), [b.shape[0] for b in blocks])})
    out = harmonypy.run_harmony(pcs, label, "group", random_state=seed, verbose=False)
    return np.asarray(out.Z_corr, dtype=np.float64)


def integration_scores(embedding: np.ndarray, is_query: np.ndarray, labels: np.ndarray, *, k_entropy: int = ENTROPY_K,
                       k_transfer: int = TRANSFER_K, seed: int = 0) -> dict[str, float]:
    """Every metric of one integrated space: mixing of reference (``is_query`` False) and query cells,
    labels carried from reference to query, and NMI / ARI of Leiden clusters of all cells against
    ``labels`` at the best-NMI resolution (scib-metrics, via :func:`~.embedding.best_nmi_ari`)."""
    from .embedding import best_nmi_ari

    is_query = np.asarray(is_query, dtype=bool)
    labels = np.asarray(labels).astype(str)
    clusters = best_nmi_ari(embedding, labels, seed=seed)
    return {"entropy": mixing_entropy(embedding, is_query, k=k_entropy),
            "entropy_max": max_mixing_entropy(is_query),
            "transfer_accuracy": transfer_accuracy(embedding[~is_query], labels[~is_query], embedding[is_query],
                                                   labels[is_query], k=k_transfer),
            "ari": clusters["ari"], "nmi": clusters["nmi"]}
