"""scmm_atlas.evaluate.metrics on synthetic data with known answers (fast; no model training)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from scmm_atlas.evaluate.metrics import feature_correlations, knn_regression, panel_correlations


def blobs(n_per: int = 80, n_types: int = 4, dim: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 20, (n_types, dim))
    labels = np.repeat(np.array([f"t{i}" for i in range(n_types)], dtype=object), n_per)
    return centres[np.repeat(np.arange(n_types), n_per)] + rng.normal(0, 1, (n_types * n_per, dim)), labels


@pytest.mark.slow
def test_embedding_scores_reject_length_mismatch():
    from scmm_atlas.evaluate.embedding import embedding_scores

    emb, labels = blobs()
    with pytest.raises(ValueError, match="labels"):
        embedding_scores(emb, labels[:-1])


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


def test_panel_correlations_normalise_each_panel_on_its_own():
    rng = np.random.default_rng(0)
    observed = rng.poisson(20, (300, 4)).astype(float)  # query panel: A, B, C, X
    pred = np.column_stack([observed[:, 1] * 3, observed[:, 0], rng.poisson(50, 300)]).astype(float)  # b, a, Y
    out = panel_correlations(pred, ["b", "a", "Y"], observed, ["A", "B", "C", "X"],
                             {"a": "A", "b": "B", "c": "C", "Q": "X"})
    assert out["n_proteins"] == 2 and set(out["per_protein"]) == {"a", "b"}  # c and Q are not in both panels

    def log_cp10k(x: np.ndarray) -> np.ndarray:
        return np.log1p(x / x.sum(1, keepdims=True) * 1e4)

    lp, lo = log_cp10k(pred), log_cp10k(observed)  # each over its whole panel, then matched
    want = {"a": stats.pearsonr(lp[:, 1], lo[:, 0])[0], "b": stats.pearsonr(lp[:, 0], lo[:, 1])[0]}
    assert out["per_protein"] == pytest.approx(want)
    assert out["pearson"] == pytest.approx(np.mean(list(want.values())))
    assert out["sse"] == pytest.approx(np.mean([2 * 300 * (1 - r) for r in want.values()]))  # z-scored SSE
    assert out["spearman"] == pytest.approx(np.mean([stats.spearmanr(lp[:, 1], lo[:, 0])[0],
                                                     stats.spearmanr(lp[:, 0], lo[:, 1])[0]]))
    with pytest.raises(ValueError, match="no protein"):
        panel_correlations(pred, ["b", "a", "Y"], observed, ["A", "B", "C", "X"], {"Z": "A"})


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


def test_open_region_scores_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from scmm_atlas.evaluate.metrics import open_region_scores

    rng = np.random.default_rng(0)
    observed = (rng.random((120, 8)) < 0.3).astype(float)
    observed[:, 3] = 0  # never open: skipped
    observed[5] = 0  # a cell with nothing open: skipped
    pred = observed * 0.5 + rng.random(observed.shape)
    pred[:, 1] = np.round(pred[:, 1], 1)  # ties
    out = open_region_scores(pred, sp.csr_matrix(observed))
    regions = [j for j in range(8) if j != 3]
    assert out["n_regions"] == 7
    assert out["auroc"] == pytest.approx(np.mean([roc_auc_score(observed[:, j], pred[:, j]) for j in regions]))
    cells = [i for i in range(120) if 0 < observed[i].sum() < 8]
    assert out["n_cells"] == len(cells) and 5 not in cells
    assert out["auprc"] == pytest.approx(np.mean([average_precision_score(observed[i], pred[i]) for i in cells]))
    assert open_region_scores(observed, observed)["auroc"] == pytest.approx(1.0)
    assert open_region_scores(rng.random(observed.shape), observed)["auroc"] == pytest.approx(0.5, abs=0.08)


@pytest.mark.slow
def test_embedding_scores_separated_types_and_mixed_batches():
    from scmm_atlas.evaluate.embedding import embedding_scores

    emb, labels = blobs(n_per=100, n_types=5)
    labels[-10:] = "unknown"  # left out of every metric
    labels[:60] = "t_rare"  # 60 of 500 cells: not rare (>= 2 %), so the rarest label is the isolated one
    emb[:60] += 40  # separated from everything
    batch = np.tile([0, 1], len(labels) // 2)  # batches mixed within every type
    out = embedding_scores(emb, labels, batch=batch, kbet=False)
    for key in ("nmi", "ari", "nmi_k", "ari_k", "knn_acc", "isolated_f1", "clisi"):
        assert out[key] > 0.97, (key, out[key])
    assert out["silhouette"] > 0.8 and out["isolated_asw"] > 0.8
    assert out["bio"] == pytest.approx(np.mean([out[k] for k in ("isolated_asw", "nmi", "ari", "silhouette",
                                                                 "clisi")]))
    assert out["ilisi"] > 0.8 and out["graph_connectivity"] > 0.97 and out["bras"] > 0.8
    assert "kbet" not in out
    assert out["batch"] == pytest.approx(np.mean([out[k] for k in ("ilisi", "graph_connectivity", "bras")]))


@pytest.mark.slow
def test_embedding_scores_punish_merged_rare_type_and_unmixed_batches():
    from scmm_atlas.evaluate.embedding import embedding_scores, isolated_label_set

    emb, labels = blobs(n_per=100, n_types=4)
    labels[:6] = "rare"  # 6 of 400 cells, placed inside type t0: no cluster can be it
    assert isolated_label_set(labels, None) == ["rare"]
    batch = (emb[:, 0] > np.median(emb[:, 0])).astype(int)  # batches follow the embedding
    out = embedding_scores(emb, labels, batch=batch, kbet=False)
    assert out["isolated_f1"] < 0.3 and out["isolated_asw"] < 0.55
    assert out["knn_acc"] < 0.99
    assert out["ilisi"] < 0.2 and out["bras"] == 0.0  # no type spans both batches
    shuffled = embedding_scores(emb, np.random.default_rng(0).permutation(labels))
    assert shuffled["nmi"] < 0.1 and abs(shuffled["ari_k"]) < 0.05 and shuffled["knn_acc"] < 0.45
    assert "ilisi" not in shuffled
    assert embedding_scores(emb, labels, batch=batch, kbet=False) == out  # deterministic for a fixed seed


@pytest.mark.slow
def test_graph_scores_of_the_embeddings_own_neighbours_match_embedding_scores():
    from sklearn.neighbors import kneighbors_graph

    from scmm_atlas.evaluate.embedding import embedding_scores, graph_scores

    emb, labels = blobs(n_per=60, n_types=4)
    batch = np.tile([0, 1], len(labels) // 2)
    graph = graph_scores(kneighbors_graph(emb, 15, mode="distance"), labels, batch=batch)
    full = embedding_scores(emb, labels, batch=batch, kbet=False)
    for key in ("nmi", "ari", "nmi_k", "ari_k", "isolated_f1", "knn_acc", "graph_connectivity"):
        assert graph[key] == pytest.approx(full[key], abs=1e-9), key
    assert np.isnan(graph["silhouette"]) and np.isnan(graph["bio"]) and graph["bio_graph"] > 0.9
    assert graph["clisi"] == pytest.approx(1.0, abs=1e-3)
    cut = labels.copy()
    cut[::2] = "unknown"  # scoring only half the cells leaves ~7 neighbours per row: refused, not -1 LISI
    with pytest.raises(ValueError, match="need >= 15"):
        graph_scores(kneighbors_graph(emb, 15, mode="distance"), cut)


def test_isolated_labels_follow_batches_when_they_differ():
    from scmm_atlas.evaluate.embedding import isolated_label_set

    labels = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 10)
    batch = np.array([0, 1] * 10 + [0] * 10)  # c is in one batch only
    assert isolated_label_set(labels, batch) == ["c"]
    assert isolated_label_set(labels, np.zeros(30)) == ["a"]  # one batch, no rare type: the rarest (ties: first)


@pytest.mark.slow
def test_kbet_accepts_mixed_batches_and_rejects_separated_ones():
    from scmm_atlas.evaluate.embedding import embedding_scores

    emb, labels = blobs(n_per=60, n_types=2)
    mixed = np.tile([0, 1], len(labels) // 2)
    shifted = emb.copy()
    shifted[mixed == 1] += 6  # batch 1 moved away from batch 0 inside every type
    assert embedding_scores(emb, labels, batch=mixed)["kbet"] > 0.6
    assert embedding_scores(shifted, labels, batch=mixed)["kbet"] < 0.2


def test_numba_code_still_compiles_after_a_ray_progress_bar_in_this_process(ray_session, monkeypatch) -> None:
    """A notebook that trained or inferred (Ray's progress bars drawn by this process) then scores with kBET or
    scanpy's neighbours: pynndescent's numba code calls print, which Ray's bars would have replaced."""
    import builtins

    import numba
    from ray.experimental import tqdm_ray

    from scmm_atlas.data.ray_session import ensure_ray

    monkeypatch.delenv("RAY_TQDM_PATCH_PRINT", raising=False)
    monkeypatch.setattr(tqdm_ray, "_manager", None)  # as in a fresh process: no Ray bar drawn here yet
    monkeypatch.setattr(builtins, "print", builtins.print)  # put back after the test, whatever happens
    original = builtins.print
    ensure_ray(None)  # Ray is up: only this process's settings
    bar = tqdm_ray.tqdm(total=2, desc="epochs")  # drawn by this process, as Ray Data's bars are
    bar.update(2)
    bar.close()
    assert builtins.print is original

    @numba.njit
    def plus_one(n: int) -> int:
        if n < 0:
            print("negative")
        return n + 1

    assert plus_one(1) == 2


def test_a_saved_summary_reads_back_as_the_same_lines(tmp_path):
    """The demo prints a rerun's summary from the saved one: numpy numbers and programs must survive."""
    import pandas as pd

    from scmm_atlas.evaluate.summary import Summary

    clustering = {k: np.float32(0.123456) for k in ("ari", "nmi", "ari_k", "nmi_k", "silhouette", "clisi",
                                                    "isolated_asw", "isolated_f1", "knn_acc", "bio")}
    programs = pd.DataFrame({"dim": [3, 3], "modality": ["RNA", "ADT"], "direction": ["up", "up"],
                             "features": [["A", "B"], ["p1"]]})
    summary = Summary(n_cells=np.int64(12), modalities={"RNA": 12, "ADT": 9}, version="1",
                      clustering={**clustering, "n_labels": np.int64(2)},
                      heldout={"ADT_from_RNA": {"mean_pearson": 0.5, "median_pearson": 0.25, "features": 1,
                                                "cells": 4}}, programs=programs)
    summary.save(tmp_path / "s" / "v1.json")
    again = Summary.load(tmp_path / "s" / "v1.json")
    assert again.lines() == summary.lines() and len(again.lines()) == 4
    assert Summary.load(tmp_path / "s" / "v1.json").programs["features"].tolist() == [["A", "B"], ["p1"]]
    assert not list((tmp_path / "s").glob("*.part"))
