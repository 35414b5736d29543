"""scmm_atlas.evaluate.metrics on synthetic data with known answers (fast; no model training)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from scmm_atlas.evaluate.metrics import cluster_scores, feature_correlations, knn_regression


def blobs(n_per: int = 80, n_types: int = 4, dim: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 20, (n_types, dim))
    labels = np.repeat(np.array([f"t{i}" for i in range(n_types)], dtype=object), n_per)
    return centres[np.repeat(np.arange(n_types), n_per)] + rng.normal(0, 1, (n_types * n_per, dim)), labels


def test_cluster_scores_separated_blobs_score_near_one():
    emb, labels = blobs()
    labels[:10] = "unknown"  # left out of the label metrics, still clustered
    out = cluster_scores(emb, labels)
    assert out["ari"] > 0.98 and out["nmi"] > 0.98
    assert out["n_clusters"] == 4
    assert 0.05 <= out["resolution"] <= 2.0
    assert cluster_scores(emb, labels) == out  # deterministic for a fixed seed


def test_cluster_scores_random_labels_score_near_zero():
    emb, labels = blobs()
    shuffled = np.random.default_rng(1).permutation(labels)
    out = cluster_scores(emb, shuffled)
    assert abs(out["ari"]) < 0.05 and out["nmi"] < 0.05


def test_cluster_scores_rejects_length_mismatch():
    emb, labels = blobs()
    with pytest.raises(ValueError, match="labels"):
        cluster_scores(emb, labels[:-1])


def test_feature_correlations_match_scipy():
    rng = np.random.default_rng(0)
    observed = rng.poisson(3.0, (200, 6)).astype(float)
    observed[:, 2] = 0  # constant: skipped
    pred = observed + rng.gamma(2.0, 1.0, observed.shape)
    out = feature_correlations(pred, sp.csr_matrix(observed))

    def transform(x):
        return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)

    p, o = transform(pred), transform(observed)
    for j in range(6):
        if j == 2:
            assert np.isnan(out["pearson_per_feature"][j]) and np.isnan(out["spearman_per_feature"][j])
            continue
        assert out["pearson_per_feature"][j] == pytest.approx(stats.pearsonr(p[:, j], o[:, j])[0], abs=1e-10)
        assert out["spearman_per_feature"][j] == pytest.approx(stats.spearmanr(p[:, j], o[:, j])[0], abs=1e-10)
    assert out["pearson"] == pytest.approx(np.nanmean(out["pearson_per_feature"]))
    assert out["spearman"] == pytest.approx(np.nanmean(out["spearman_per_feature"]))
    assert 0.3 < out["pearson"] < 1.0


def test_feature_correlations_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        feature_correlations(np.ones((3, 2)), np.ones((3, 3)))


def test_knn_regression_beats_shuffled_baseline():
    # RNA from 5 cell states; the target's composition is a deterministic function of the state.
    rng = np.random.default_rng(0)
    n, n_genes, n_states = 600, 100, 5
    state = rng.integers(0, n_states, n)
    gene_profile = rng.gamma(0.5, 1.0, (n_states, n_genes))
    rna = sp.csr_matrix(rng.poisson(gene_profile[state] * rng.uniform(2, 6, (n, 1))))
    target_profile = rng.gamma(1.0, 1.0, (n_states, 8))
    target = rng.poisson(target_profile[state] * 50)
    train, test = np.arange(500), np.arange(500, n)
    pred = knn_regression(rna[train], target[train], rna[test], n_pcs=10, k=10)
    assert pred.shape == (len(test), 8)
    np.testing.assert_allclose(pred.sum(axis=1), 1e4)  # per-10k normalised
    ours = feature_correlations(pred, target[test])["pearson"]
    shuffled = feature_correlations(pred[rng.permutation(len(test))], target[test])["pearson"]
    assert ours > 0.8 and ours > shuffled + 0.5
