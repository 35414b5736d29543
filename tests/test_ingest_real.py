"""Real data in, read back with plain tiledbsoma / anndata (no project code), identical to the source."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma

from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.store import open_store


def _soma_counts(uri: Path, mod: str, n_obs: int, n_var: int) -> tuple[sp.csr_matrix, pd.Index, pd.Index]:
    with tiledbsoma.Experiment.open(str(uri)) as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "obs_id"]).concat().to_pandas()
        var = exp.ms[mod].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        tbl = exp.ms[mod].X["counts"].read().tables().concat()
    mat = sp.csr_matrix((tbl["soma_data"].to_numpy(), (tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy())),
                        shape=(n_obs, n_var))
    obs = obs.sort_values("soma_joinid")
    var = var.sort_values("soma_joinid")
    return mat, pd.Index(obs["obs_id"]), pd.Index(var["var_id"])


def _assert_same(source: ad.AnnData, counts: sp.spmatrix, barcodes: pd.Index, features: pd.Index) -> None:
    assert list(barcodes) == list(source.obs_names)
    assert list(features) == list(source.var_names)
    diff = sp.csr_matrix(counts, dtype=np.int64) - sp.csr_matrix(source.X, dtype=np.int64)
    assert diff.nnz == 0


@pytest.mark.parametrize("backend", ["soma", "zarr"])
def test_cite_seq_round_trip_with_plain_readers(data_dir: Path, tmp_path: Path, backend: str) -> None:
    src = data_dir / "pbmc10k_cite"
    uri = tmp_path / f"pbmc.{backend}"
    report = ingest(str(uri), [f"RNA={src / 'rna.h5ad'}", f"ADT={src / 'protein.h5ad'}"],
                    IngestOptions(backend=backend, label_key="cell_type", progress=False))
    assert report.n_total == 6855 and report.modalities == {"RNA": 6855, "ADT": 6855}
    for mod, fname in (("RNA", "rna.h5ad"), ("ADT", "protein.h5ad")):
        source = ad.read_h5ad(src / fname)
        if backend == "soma":
            counts, barcodes, features = _soma_counts(uri, mod, *source.shape)
        else:
            plain = ad.read_zarr(uri / "mod" / mod)
            counts, barcodes, features = plain.X, plain.obs_names, plain.var_names
            assert list(plain.obs["cell_type"]) == list(source.obs["cell_type"].astype(str))
        _assert_same(source, counts, barcodes, features)


def test_rna_atac_with_batches(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "mouse_cortex_snare"
    uri = tmp_path / "snare.soma"
    ingest(str(uri), [f"RNA={src / 'rna.h5ad'}", f"ATAC={src / 'atac.h5ad'}"],
           IngestOptions(batch_key="batch", label_key="cell_type", progress=False))
    atac = ad.read_h5ad(src / "atac.h5ad")
    counts, barcodes, features = _soma_counts(uri, "ATAC", *atac.shape)
    _assert_same(atac, counts, barcodes, features)
    with open_store(uri) as store:
        obs = store.obs()
        assert obs["batch"].nunique() == 12
        assert list(obs["batch"]) == list(atac.obs["batch"].astype(str))
        var = store.var("ATAC")
        totals = np.asarray(atac.X.sum(axis=0)).ravel()
        np.testing.assert_array_equal(var["selected"].to_numpy(), totals >= np.quantile(totals, 0.75))
        assert store.kind("ATAC") == "atac"


def test_h5mu_three_modalities_into_zarr(data_dir: Path, tmp_path: Path) -> None:
    path = data_dir / "eccite_pbmc500" / "eccite_pbmc_ctrl500.h5mu"
    uri = tmp_path / "eccite.zarr"
    report = ingest(str(uri), [str(path)], IngestOptions(progress=False))
    assert set(report.modalities) == {"RNA", "ADT", "HTO"}
    mdata = md.read_h5mu(path)
    for mod, name in (("RNA", "rna"), ("ADT", "protein"), ("HTO", "hto")):
        plain = ad.read_zarr(uri / "mod" / mod)
        _assert_same(mdata.mod[name], plain.X, plain.obs_names, plain.var_names)


def _write_10x(path: Path, rna: ad.AnnData, adt: ad.AnnData) -> None:
    """A Cell Ranger feature-barcode matrix (features x cells CSC) from two paired modalities."""
    x = sp.hstack([sp.csr_matrix(rna.X), sp.csr_matrix(adt.X)], format="csr").astype(np.int32)
    ids = [f"ENSG{i:06d}" for i in range(rna.n_vars)] + list(adt.var_names)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = x.data, x.indices, x.indptr
        g["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
        g["barcodes"] = np.array(rna.obs_names, dtype="S")
        feats = g.create_group("features")
        feats["id"] = np.array(ids, dtype="S")
        feats["name"] = np.array(list(rna.var_names) + list(adt.var_names), dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * rna.n_vars + ["Antibody Capture"] * adt.n_vars,
                                         dtype="S")


def test_10x_h5(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "pbmc10k_cite"
    rna, adt = ad.read_h5ad(src / "rna.h5ad")[:500], ad.read_h5ad(src / "protein.h5ad")[:500]
    _write_10x(tmp_path / "filtered_feature_bc_matrix.h5", rna, adt)
    uri = tmp_path / "tenx.soma"
    ingest(str(uri), [str(tmp_path / "filtered_feature_bc_matrix.h5")], IngestOptions(progress=False))
    with open_store(uri) as store:
        assert store.modalities == ["RNA", "ADT"]
        assert store.var("RNA")["feature_name"].tolist() == list(rna.var_names)
        np.testing.assert_array_equal(store.read("ADT", 0, 500).toarray(), adt.X.toarray())
        np.testing.assert_array_equal(store.read("RNA", 100, 200).toarray(), rna.X[100:200].toarray())
