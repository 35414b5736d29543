"""``bench unpaired``: the stable three-way split, the mosaic files and the integration metrics (no training)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scmm_atlas.bench.unpaired import ATAC_ONLY, PAIRED, RNA_ONLY, split_thirds, third, write_mosaic
from scmm_atlas.evaluate.integration import (
    harmony_embedding,
    max_mixing_entropy,
    mixing_entropy,
    pair_recall,
    transfer_accuracy,
)
from scmm_atlas.evaluate.metrics import log_normalise

BARCODES = [f"cell{i:05d}_{'ACGT'[i % 4]}" for i in range(3000)]


def test_third_is_stable_whatever_the_order_or_subset():
    full = split_thirds(BARCODES)
    perm = np.random.default_rng(0).permutation(len(BARCODES))
    assert np.array_equal(split_thirds([BARCODES[i] for i in perm]), full[perm])
    subset = perm[:50]
    assert np.array_equal(split_thirds([BARCODES[i] for i in subset]), full[subset])
    # fixed values (blake2b of the barcode mod 3), the same in every process, unlike Python's salted hash()
    barcodes = ["09A_CAGCCCCGCCTT", "sci_RNA_A_001_TCTCTCATCC", "AAACCTGAGAAACCAT-1", "a", "b", "c", "d"]
    assert [third(b) for b in barcodes] == [1, 0, 0, 2, 2, 0, 2]


def test_thirds_are_disjoint_covering_and_about_equal():
    parts = split_thirds(BARCODES)
    assert set(np.unique(parts)) == {PAIRED, RNA_ONLY, ATAC_ONLY}
    counts = np.bincount(parts, minlength=3)
    assert counts.sum() == len(BARCODES)  # every barcode in exactly one third
    assert np.all(np.abs(counts - 1000) < 90), counts  # ~5 sd of a binomial(3000, 1/3)


def test_write_mosaic_keeps_each_modality_of_the_right_cells(tmp_path):
    n = 60
    obs_names = BARCODES[:n]
    rng = np.random.default_rng(0)
    for name, width in (("rna.h5ad", 5), ("atac.h5ad", 7)):
        x = sp.csr_matrix(rng.poisson(2.0, size=(n, width)).astype(np.int32))
        adata = ad.AnnData(x)
        adata.obs_names = obs_names
        adata.write_h5ad(tmp_path / name)
    rna, atac = write_mosaic(tmp_path / "rna.h5ad", tmp_path / "atac.h5ad", tmp_path / "out")
    parts = dict(zip(obs_names, split_thirds(obs_names), strict=True))
    rna_cells, atac_cells = set(ad.read_h5ad(rna).obs_names), set(ad.read_h5ad(atac).obs_names)
    assert rna_cells == {b for b, p in parts.items() if p in (PAIRED, RNA_ONLY)}
    assert atac_cells == {b for b, p in parts.items() if p in (PAIRED, ATAC_ONLY)}
    source = ad.read_h5ad(tmp_path / "atac.h5ad")
    written = ad.read_h5ad(atac)
    assert np.array_equal(written.X.toarray(), source[written.obs_names].X.toarray())  # counts follow the cells


def _mixed_clusters(m: int, n_clusters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Clusters far apart, each holding m cells of group a and m of group b at (nearly) one spot."""
    rng = np.random.default_rng(0)
    centres = np.repeat(np.arange(n_clusters) * 100.0, 2 * m)[:, None] * np.ones((1, 2))
    emb = centres + rng.normal(scale=0.01, size=centres.shape)
    groups = np.tile(np.repeat(["a", "b"], m), n_clusters)
    return emb, groups


def test_entropy_mixed_is_maximal_separated_is_zero():
    emb, groups = _mixed_clusters(50)
    assert mixing_entropy(emb, groups, k=99) > 0.999  # 49 vs 50 of the other group: ~log 2
    separated = np.where((groups == "a")[:, None], emb, emb + 1e4)
    assert mixing_entropy(separated, groups, k=30) == 0.0
    assert max_mixing_entropy(groups) == pytest.approx(1.0)


def test_entropy_depends_on_k_and_balance():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(2000, 2))
    groups = rng.integers(0, 2, size=2000)  # randomly mixed, ~50/50
    small, large = mixing_entropy(emb, groups, k=5), mixing_entropy(emb, groups, k=50)
    assert small < large < 1.0  # a few neighbours fluctuate away from 50/50
    assert small < 0.9 and large > 0.97
    emb, groups = _mixed_clusters(25, n_clusters=2)  # 50 cells per group
    separated = np.where((groups == "a")[:, None], emb, emb + 1e4)
    assert mixing_entropy(separated, groups, k=60) > 0.0  # k beyond the group size reaches the other group
    unequal = np.array(["a"] * 900 + ["b"] * 100)
    assert max_mixing_entropy(unequal) == pytest.approx(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(2))
    assert mixing_entropy(rng.normal(size=(1000, 2)), unequal, k=50) == pytest.approx(max_mixing_entropy(unequal),
                                                                                      abs=0.05)


def test_entropy_rejects_one_group_and_bad_k():
    with pytest.raises(ValueError, match="two groups"):
        mixing_entropy(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match="k must be"):
        mixing_entropy(np.zeros((10, 2)), np.arange(10) % 2, k=10)


def test_pair_recall_finds_partners_only_when_aligned_and_mixed():
    rng = np.random.default_rng(0)
    cells = rng.normal(scale=10.0, size=(200, 5))
    aligned = np.vstack([cells, cells + rng.normal(scale=0.01, size=cells.shape)])
    assert pair_recall(aligned, 200, k=1) == 1.0
    shuffled = np.vstack([cells, cells[rng.permutation(200)] + 0.01])
    assert pair_recall(shuffled, 200, k=5) < 0.1  # mixed, but each partner is elsewhere
    apart = np.vstack([cells, cells + 1e3])
    assert pair_recall(apart, 200, k=50) == 0.0  # lined up, but the halves never meet
    with pytest.raises(ValueError, match="2 x 150 rows"):
        pair_recall(aligned, 150)


def test_transfer_accuracy_toy():
    reference = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    ref_labels = np.array(["x", "x", "x", "y", "y", "y"])
    query = np.array([[0.05], [10.05], [9.9], [0.3]])
    assert transfer_accuracy(reference, ref_labels, query, np.array(["x", "y", "y", "x"]), k=3) == 1.0
    assert transfer_accuracy(reference, ref_labels, query, np.array(["x", "y", "x", "y"]), k=3) == 0.5
    # k larger than one label's cells: the vote reaches the other cluster and ties go to the first label
    assert transfer_accuracy(reference, ref_labels, query, np.array(["x", "x", "x", "x"]), k=6) == 1.0


def test_log_normalise_treats_counts_and_expression_per_10k_alike():
    counts = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [5.0, 5.0, 10.0]])
    per_10k = counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4
    assert np.allclose(log_normalise(sp.csr_matrix(counts)), log_normalise(per_10k))
    assert np.allclose(log_normalise(counts)[0], np.log1p([2500.0, 7500.0, 0.0]))
    assert np.all(log_normalise(counts)[1] == 0)  # an empty cell stays empty, not NaN
    kept_sparse = log_normalise(counts, sparse=True)  # the markers' form, for many features
    assert sp.isspmatrix_csr(kept_sparse) and kept_sparse.nnz == 5
    assert np.allclose(kept_sparse.toarray(), log_normalise(counts), rtol=1e-6)


def test_harmony_embedding_mixes_a_shifted_copy():
    rng = np.random.default_rng(0)
    profiles = rng.gamma(1.0, 1.0, size=(3, 40))  # three cell types
    types = np.repeat(np.arange(3), 100)
    a = rng.poisson(profiles[types] * 20)
    b = rng.poisson(profiles[types] * 20 * rng.gamma(2.0, 0.5, size=40))  # a gene-wise technical shift
    emb = harmony_embedding([a, b], n_pcs=10)
    assert emb.shape == (600, 10)
    groups = np.repeat([0, 1], 300)
    assert mixing_entropy(emb, groups, k=30) > 0.5
    assert transfer_accuracy(emb[:300], types, emb[300:], types) > 0.95


def test_integration_scores_of_a_mixed_and_a_separated_space():
    from scmm_atlas.evaluate.integration import integration_scores

    rng = np.random.default_rng(0)
    types = np.tile(np.repeat(["t0", "t1", "t2"], 50), 2)
    is_query = np.repeat([False, True], 150)
    centres = {"t0": (0.0, 0.0), "t1": (20.0, 0.0), "t2": (0.0, 20.0)}
    mixed = np.array([centres[t] for t in types]) + rng.normal(size=(300, 2))
    good = integration_scores(mixed, is_query, types)
    assert good["entropy"] > 0.9 and good["entropy_max"] == pytest.approx(1.0)
    assert good["transfer_accuracy"] == 1.0 and good["ari"] > 0.9
    apart = integration_scores(mixed + is_query[:, None] * np.array([1000.0, 0.0]), is_query, types)
    assert apart["entropy"] == 0.0
    assert apart["transfer_accuracy"] == pytest.approx(1 / 3)  # every query cell's nearest reference cells are t1
