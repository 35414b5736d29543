"""The store interface: both backends, mosaic data, appends, feature maps, the read API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import random_counts, tree_digest, write_h5ad

from scmm_atlas.errors import InputError, StoreError
from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.store import open_store, parse_uri


@pytest.fixture(params=["soma", "zarr"])
def backend(request) -> str:
    return request.param


def test_both_backends_read_the_same(tmp_path: Path, pair) -> None:
    rna, adt = pair
    stores = {}
    for b in ("soma", "zarr"):
        uri = tmp_path / f"s.{b}"
        ingest(str(uri), [f"RNA={rna}", f"ADT={adt}"], IngestOptions(batch_key="batch", n_top_genes=10,
                                                                     progress=False))
        stores[b] = open_store(uri)
    soma, zarr = stores["soma"], stores["zarr"]
    assert soma.n_obs == zarr.n_obs == 60 and soma.modalities == zarr.modalities == ["RNA", "ADT"]
    assert list(soma.feature_names("RNA")) == list(zarr.feature_names("RNA")) == [f"g{j}" for j in range(30)]
    assert soma.obs().equals(zarr.obs())
    for mod in ("RNA", "ADT"):
        for a, b in ((0, 60), (7, 33), (59, 60), (5, 5)):
            assert (soma.read(mod, a, b) != zarr.read(mod, a, b)).nnz == 0
        sel = soma.read(mod, 0, 60, features="selected")
        assert sel.shape[1] == (10 if mod == "RNA" else 5)
        assert (sel != zarr.read(mod, 0, 60, features="selected")).nnz == 0
    assert set(soma.obs()["batch"]) == {"b1", "b2"}
    with pytest.raises(IndexError):
        soma.read("RNA", 50, 61)
    with pytest.raises(StoreError, match="no modality 'ATAC'"):
        zarr.read("ATAC", 0, 1)
    for s in stores.values():
        s.close()


def test_mosaic_cells_keep_presence_and_alignment(tmp_path: Path, backend: str) -> None:
    rna_x = random_counts(50, 20, 1)
    adt_x = random_counts(50, 4, 2)
    # ADT: a shuffled subset of 30 cells plus 5 cells that have no RNA.
    rng = np.random.default_rng(0)
    adt_cells = rng.permutation(50)[:30]
    adt_names = [f"c{i}" for i in adt_cells] + [f"x{i}" for i in range(5)]
    adt_extra = random_counts(5, 4, 3)
    rna = write_h5ad(tmp_path / "rna.h5ad", rna_x)
    adt = write_h5ad(tmp_path / "adt.h5ad", sp.vstack([adt_x[adt_cells], adt_extra]), obs_names=adt_names,
                     var_names=[f"p{j}" for j in range(4)])
    uri = tmp_path / f"mosaic.{backend}"
    report = ingest(str(uri), [f"RNA={rna}", f"ADT={adt}"], IngestOptions(progress=False))
    assert report.modalities == {"RNA": 50, "ADT": 35}
    with open_store(uri) as store:
        obs = store.obs()
        assert list(obs.index[:50]) == [f"c{i}" for i in range(50)]
        assert list(obs.index[50:]) == [f"x{i}" for i in range(5)]
        has_adt = obs["has_ADT"].to_numpy()
        assert has_adt[adt_cells].all() and has_adt.sum() == 35 and not obs["has_RNA"][50:].any()
        got_adt = store.read("ADT", 0, 55).toarray()
        np.testing.assert_array_equal(got_adt[adt_cells], adt_x[adt_cells].toarray())
        np.testing.assert_array_equal(got_adt[50:], adt_extra.toarray())
        assert (got_adt[~has_adt] == 0).all()  # no fake values for missing cells
        np.testing.assert_array_equal(store.read("RNA", 0, 50).toarray(), rna_x.toarray())
        np.testing.assert_array_equal(obs["total_counts_ADT"].to_numpy(), got_adt.sum(axis=1))


def test_append_adds_cells_without_touching_existing(tmp_path: Path, backend: str) -> None:
    a_rna = write_h5ad(tmp_path / "a_rna.h5ad", random_counts(40, 20, 1))
    a_adt = write_h5ad(tmp_path / "a_adt.h5ad", random_counts(40, 4, 2), var_names=list("wxyz"))
    uri = tmp_path / f"grow.{backend}"
    ingest(str(uri), [f"RNA={a_rna}", f"ADT={a_adt}"], IngestOptions(dataset="A", n_top_genes=5, progress=False))
    with open_store(uri) as store:
        old_rna, old_obs = store.read("RNA", 0, 40), store.obs()
        old_var = store.var("RNA").copy()
    files_before = tree_digest(uri)
    # B: same features in another order, barcodes that collide with A's.
    b_rna_x = random_counts(25, 20, 5)
    perm = np.random.default_rng(1).permutation(20)
    b_rna = write_h5ad(tmp_path / "b_rna.h5ad", b_rna_x[:, perm], var_names=[f"g{j}" for j in perm])
    b_adt = write_h5ad(tmp_path / "b_adt.h5ad", random_counts(25, 4, 6), var_names=list("wxyz"))
    ingest(str(uri), [f"RNA={b_rna}", f"ADT={b_adt}"],
           IngestOptions(append=True, dataset="B", prefix_barcodes=True, progress=False))
    with open_store(uri) as store:
        assert store.n_obs == 65
        assert (store.read("RNA", 0, 40) != old_rna).nnz == 0
        np.testing.assert_array_equal(store.read("RNA", 40, 65).toarray(), b_rna_x.toarray())
        obs = store.obs()
        assert obs.iloc[:40].equals(old_obs)
        assert list(obs.index[40:43]) == ["B:c0", "B:c1", "B:c2"]
        assert set(obs["dataset"]) == {"A", "B"}
        assert store.var("RNA").equals(old_var)  # statistics only recomputed when asked
        assert store.info.stats_n_obs == 40
    if backend == "soma":  # TileDB writes new fragments: every file of the old store is still there
        after = tree_digest(uri)
        kept = {k for k in files_before if "__fragments" in k}
        assert kept and all(after.get(k) == files_before[k] for k in kept)
    ingest(str(uri), [f"RNA={b_rna}"], IngestOptions(append=True, dataset="C", prefix_barcodes=True,
                                                     stats=True, n_top_genes=5, progress=False))
    with open_store(uri) as store:
        assert store.n_obs == 90 and store.info.stats_n_obs == 90
        assert not store.obs()["has_ADT"][65:].any()
        full = store.read("RNA", 0, 90).toarray()
        np.testing.assert_allclose(store.var("RNA")["mean"], full[store.obs()["has_RNA"]].mean(axis=0))


def test_feature_map_options(tmp_path: Path) -> None:
    rna = write_h5ad(tmp_path / "rna.h5ad", random_counts(30, 6, 1))
    uri = tmp_path / "fm.zarr"
    ingest(str(uri), [f"RNA={rna}"], IngestOptions(progress=False))
    other_x = random_counts(10, 4, 2)
    other = write_h5ad(tmp_path / "other.h5ad", other_x, var_names=["g1", "g3", "new", "ENS5"])
    with pytest.raises(InputError, match="feature space differs"):
        ingest(str(uri), [f"RNA={other}"], IngestOptions(append=True, dataset="o", prefix_barcodes=True,
                                                         progress=False))
    mapping = tmp_path / "map.tsv"
    mapping.write_text("ENS5\tg5\nnew\tg0\n")
    ingest(str(uri), [f"RNA={other}"], IngestOptions(append=True, dataset="o", prefix_barcodes=True,
                                                     feature_maps={"RNA": str(mapping)}, progress=False))
    ingest(str(uri), [f"RNA={other}"], IngestOptions(append=True, dataset="p", prefix_barcodes=True,
                                                     feature_maps={"RNA": "intersect"}, progress=False))
    with open_store(uri) as store:
        dense = other_x.toarray()
        by_map = store.read("RNA", 30, 40).toarray()
        np.testing.assert_array_equal(by_map[:, [5, 0]], dense[:, [3, 2]])
        assert (by_map[:, [1, 2, 3, 4]] == 0).all()
        by_name = store.read("RNA", 40, 50).toarray()
        np.testing.assert_array_equal(by_name[:, [1, 3]], dense[:, [0, 1]])
        assert (by_name[:, [0, 2, 4, 5]] == 0).all()


def test_selected_features_need_stats(tmp_path: Path, pair) -> None:
    rna, adt = pair
    uri = tmp_path / "nostats.soma"
    ingest(str(uri), [f"RNA={rna}", f"ADT={adt}"], IngestOptions(stats=False, progress=False))
    with open_store(uri) as store, pytest.raises(StoreError, match="scmm-atlas stats"):
        store.read("RNA", 0, 5, features="selected")


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "ftp://host/x", "s3://bucket", "s3://b/../x", ""])
def test_uri_validation(bad: str) -> None:
    with pytest.raises(StoreError):
        parse_uri(bad)


def test_uri_normalisation(tmp_path: Path) -> None:
    assert parse_uri("s3://bucket/atlas/").uri == "s3://bucket/atlas"
    assert parse_uri(f"file://{tmp_path}/x").uri == str(tmp_path / "x")


def test_s3_store_both_backends(tmp_path: Path, pair, s3_bucket: str, monkeypatch) -> None:
    import s3fs

    rna, adt = pair
    sized: list[str] = []  # objects whose size s3fs asked for (a HEAD each)
    size = s3fs.S3FileSystem._size

    async def counted(self, path):
        sized.append(path)
        return await size(self, path)
    for b in ("soma", "zarr"):
        uri = f"s3://{s3_bucket}/atlas.{b}"
        ingest(uri, [f"RNA={rna}", f"ADT={adt}"], IngestOptions(backend=b, n_top_genes=10, progress=False))
        with open_store(uri) as store:
            assert store.backend == b and store.n_obs == 60
            import anndata as ad

            np.testing.assert_array_equal(store.read("ADT", 0, 60).toarray(), ad.read_h5ad(adt).X.toarray())
            assert int(store.var("RNA")["selected"].sum()) == 10
            with monkeypatch.context() as patched:
                patched.setattr(s3fs.S3FileSystem, "_size", counted)
                assert store.read("RNA", 0, 60).shape[0] == 60
            if b == "zarr":  # each chunk read is one GET, not a HEAD (its size) and then a GET
                assert sized == []
        with pytest.raises(StoreError, match="already exists"):
            ingest(uri, [f"RNA={rna}"], IngestOptions(progress=False))
    with pytest.raises(StoreError, match="no store here"):
        open_store(f"s3://{s3_bucket}/nothing")


@pytest.mark.parametrize(("where", "ending"), [("local", "abort"), ("s3", "abort"), ("local", "killed")])
@pytest.mark.slow
def test_a_failed_soma_append_takes_its_writes_back(tmp_path: Path, pair, where: str, ending: str, request) -> None:
    """An append that fails after writing cells (a failed disk or object store) leaves no fragment
    behind, and one killed before it could clean up has its writes dropped by the next append:
    otherwise its cells, beyond the committed count, would reappear inside the next append's rows."""
    import pandas as pd

    rna, adt = pair
    uri = str(tmp_path / "a.soma") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/a.soma"
    ingest(uri, [f"RNA={rna}", f"ADT={adt}"], IngestOptions(backend="soma", stats=False, progress=False))
    from scmm_atlas.store.uri import filesystem

    fs, root = filesystem(uri)
    files = sorted(fs.find(root))
    with open_store(uri, writable=True) as store:
        writer = store.appender(40)
        obs = pd.DataFrame({"obs_id": [f"dead{i}" for i in range(40)], "dataset": "x", "batch": "b", "cell_type": "",
                            "has_RNA": True, "total_counts_RNA": 1, "n_features_RNA": 1, "has_ADT": True,
                            "total_counts_ADT": 1, "n_features_ADT": 1})
        writer.write(0, obs, {"RNA": sp.csr_matrix(random_counts(40, 30, 9), dtype=np.int32),
                              "ADT": sp.csr_matrix(random_counts(40, 5, 9), dtype=np.int32)})
        if ending == "abort":
            writer.abort()
        else:  # as if SIGKILLed: nothing taken back
            writer._exp.close()
    if ending == "abort":
        assert sorted(fs.find(root)) == files  # every file the attempt added is gone
    small = write_h5ad(tmp_path / "small.h5ad", random_counts(5, 30, 11), obs_names=[f"s{i}" for i in range(5)])
    ingest(uri, [f"RNA={small}"], IngestOptions(append=True, stats=False, progress=False))
    with open_store(uri) as store:
        assert store.n_obs == 65 and list(store.obs_slice(60, 65, ["obs_id"])["obs_id"]) == [f"s{i}" for i in range(5)]
        import anndata as ad

        np.testing.assert_array_equal(store.read("RNA", 60, 65).toarray(), ad.read_h5ad(small).X.toarray())
        assert store.read("ADT", 60, 65).nnz == 0  # none of the dead attempt's proteins in these rows
