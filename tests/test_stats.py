"""Feature statistics (dask, out of core) and selection against scanpy / numpy on real data."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scmm_atlas.ingest import stats
from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.store import open_store


@pytest.fixture(scope="module")
def pbmc_store(data_dir: Path, tmp_path_factory) -> Path:
    src = data_dir / "pbmc10k_cite"
    uri = tmp_path_factory.mktemp("stats") / "pbmc.zarr"
    ingest(str(uri), [f"RNA={src / 'rna.h5ad'}", f"ADT={src / 'protein.h5ad'}"],
           IngestOptions(n_top_genes=2000, progress=False))
    return uri


def test_hvg_matches_scanpy_seurat_v3(pbmc_store: Path, data_dir: Path) -> None:
    import scanpy as sc

    rna = ad.read_h5ad(data_dir / "pbmc10k_cite" / "rna.h5ad")
    sc.pp.highly_variable_genes(rna, flavor="seurat_v3", n_top_genes=2000)
    with open_store(pbmc_store) as store:
        var = store.var("RNA")
    np.testing.assert_allclose(var["variances_norm"], rna.var["variances_norm"], rtol=1e-6)
    np.testing.assert_array_equal(var["selected"].to_numpy(), rna.var["highly_variable"].to_numpy())
    assert int(var["selected"].sum()) == 2000


def test_moments_match_numpy_with_small_blocks(pbmc_store: Path, data_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(stats, "BLOCK_NNZ", 5_000)  # many dask blocks, same answer
    adt = ad.read_h5ad(data_dir / "pbmc10k_cite" / "protein.h5ad").X.toarray().astype(np.float64)
    with open_store(pbmc_store, writable=True) as store:
        assert len(stats._blocks(store, "ADT", np.ones(store.n_obs, bool))) > 3
        out = stats.compute_stats(store, n_top_genes=2000)["ADT"]
    np.testing.assert_allclose(out["mean"], adt.mean(axis=0))
    np.testing.assert_allclose(out["variance"], adt.var(axis=0, ddof=1))
    np.testing.assert_array_equal(out["n_cells"], (adt > 0).sum(axis=0))
    assert out["selected"].all()  # all proteins


def test_library_sizes_recorded(pbmc_store: Path, data_dir: Path) -> None:
    rna = ad.read_h5ad(data_dir / "pbmc10k_cite" / "rna.h5ad")
    with open_store(pbmc_store) as store:
        obs = store.obs()
    np.testing.assert_array_equal(obs["total_counts_RNA"], np.asarray(rna.X.sum(axis=1)).ravel())
    np.testing.assert_array_equal(obs["n_features_RNA"], np.diff(rna.X.indptr))


def test_small_valid_data_selects_genes_with_a_wider_trend(data_dir: Path, tmp_path: Path) -> None:
    """100 cells with the full gene list: Seurat's loess (span 0.3) is singular there; ingest must not fail."""
    src = data_dir / "eccite_pbmc500"
    for name in ("rna", "protein"):
        ad.read_h5ad(src / f"{name}.h5ad")[:100].copy().write_h5ad(tmp_path / f"{name}.h5ad")
    uri = tmp_path / "small.zarr"
    ingest(str(uri), [f"RNA={tmp_path / 'rna.h5ad'}", f"ADT={tmp_path / 'protein.h5ad'}"],
           IngestOptions(progress=False))
    with open_store(uri) as store:
        selection = store.info.selection["RNA"]
        assert selection["n_selected"] == 5000
        assert "loess span 0.6" in selection["method"] or "loess span 1.0" in selection["method"]
        assert np.isfinite(store.var("RNA")["variances_norm"]).all()


def test_variance_trend_falls_back_to_a_quadratic() -> None:
    log_mean = np.repeat([-2.0, -1.5], 50)  # two distinct means: every loess span is singular
    log_var = log_mean * 1.1 + np.tile([0.0, 0.01], 50)
    fitted, how = stats.variance_trend(log_mean, log_var)
    assert how.startswith("quadratic trend (loess failed")
    np.testing.assert_allclose(fitted, log_mean * 1.1 + 0.005, atol=1e-6)
