"""The inference stage end to end on real stores and a real local Ray: results written, published
atomically, read back by plain readers (no project code) and by the query API."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from scmm_atlas import results
from scmm_atlas.infer.predict import default_pairs, infer_batch
from scmm_atlas.infer.stage import InferConfig, infer
from scmm_atlas.infer.trained import TrainedModel, load_trained
from scmm_atlas.model import MMVAE, MMVAEConfig
from scmm_atlas.store import open_store
from scmm_atlas.store.results import index, open_results

SMALL = InferConfig(block_cells=256, batch_size=100, actors=2, cpus_per_actor=0.5, top_n=3, executor="ray")


def _trained(store_uri, version: str = "1", seed: int = 0, **options) -> TrainedModel:
    with open_store(store_uri) as store:
        features = {m: [str(f) for f in store.feature_names(m, "selected")] for m in store.modalities}
    torch.manual_seed(seed)
    mods = {m: {"n_features": len(f), "hidden": 8, "n_layers": 1} for m, f in features.items()}
    config = MMVAEConfig(modalities=mods, latent_dim=3, n_batches=3, **options)
    model = MMVAE(config)
    return TrainedModel(config=config, state={k: v.clone() for k, v in model.state_dict().items()}, features=features,
                        batches=["b0", "b1", "b2"], version=version, uri=f"test://{version}")


def _expected(store_uri, trained: TrainedModel):
    """The same outputs computed directly on the whole store, in memory."""
    with open_store(store_uri) as store:
        x, mask = {}, {}
        for m, names in trained.features.items():
            cols = store.var(m).index.get_indexer(names)
            x[m] = torch.from_numpy(store.read(m, 0, store.n_obs, cols).toarray().astype(np.float32))
            mask[m] = torch.from_numpy(store.obs_slice(0, store.n_obs, [f"has_{m}"])[f"has_{m}"].to_numpy(bool))
            mask[m] &= x[m].sum(1) > 0
        codes = store.obs_slice(0, store.n_obs, ["batch"])["batch"].map({"b0": 0, "b1": 1, "b2": 2}).to_numpy()
    return infer_batch(trained.build(), x, mask=mask, batch=torch.as_tensor(codes),
                       pairs=default_pairs(list(trained.features)), library_size=1e4)


@pytest.mark.parametrize(("backend", "options", "executor"),
                         [("zarr", {"joint": "mopoe", "embedding": "concat"}, "local"), ("soma", {}, "ray")])
def test_infer_writes_and_publishes_readable_results(ray_session, planted_stores, backend, options, executor,
                                                     tmp_path) -> None:
    uri = str(planted_stores[backend])
    trained = _trained(uri, **options)
    out = infer(uri, trained, config=InferConfig(**{**SMALL.__dict__, "executor": executor}), progress=False)
    assert out.cells == 1000 and out.record.version == "1"
    want = _expected(uri, trained)
    with open_store(uri) as store:
        reader = open_results(store)
        np.testing.assert_allclose(reader.embedding("joint"), want.joint, rtol=1e-5, atol=1e-6)
        assert reader.embedding("joint").shape == (1000, 6 if options else 3)  # concat: both experts side by side
        ada = reader.embedding("ADT")
        assert ada.shape == (1000, 3)
        assert np.isnan(ada[900:]).all() and not np.isnan(ada[:900]).any()  # the last 100 cells lack ADT
        pred = reader.prediction("RNA", "ADT")
        np.testing.assert_allclose(pred, want.predictions[("RNA", "ADT")], rtol=1e-4)
        assert not np.isnan(pred[900:]).any()  # RNA-only cells get protein estimates
        table = reader.programs()
        assert set(table.modality) == {"RNA", "ADT"} and (table["rank"] <= 3).all()
        entry = out.record.entry

    # plain readers: no project code
    if backend == "zarr":
        cells = ad.read_zarr(f"{uri}/results/{entry}/cells")
        np.testing.assert_allclose(cells.obsm["X_scmm"], want.joint, rtol=1e-5, atol=1e-6)
        assert cells.obs_names[0] == "c0" and cells.n_obs == 1000
        adt = ad.read_zarr(f"{uri}/results/{entry}/pred_ADT_from_RNA")
        assert list(adt.var_names) == trained.features["ADT"]
        np.testing.assert_allclose(adt.X, want.predictions[("RNA", "ADT")], rtol=1e-4)
        programs = ad.io.read_elem(__import__("zarr").open_group(f"{uri}/results/{entry}", mode="r")["programs"])
        assert len(programs) == len(table)
    else:
        import tiledbsoma
        import tiledbsoma.io

        with tiledbsoma.Experiment.open(uri) as exp:
            rna = tiledbsoma.io.to_anndata(exp, measurement_name="RNA", X_layer_name="counts")
            np.testing.assert_allclose(rna.obsm["scmm_v1"], want.joint, rtol=1e-5, atol=1e-6)
            adt = tiledbsoma.io.to_anndata(exp, measurement_name="ADT", X_layer_name="scmm_v1_from_RNA")
            np.testing.assert_allclose(adt.X, want.predictions[("RNA", "ADT")], rtol=1e-4)

    # the query API
    with results.open(uri) as res:
        b1 = res.embeddings(where={"batch": ["b1"]})
        assert len(b1) == 333 and list(b1.index[:2]) == ["c1", "c4"]
        np.testing.assert_allclose(b1.to_numpy(), want.joint[1::3], rtol=1e-5, atol=1e-6)
        p = res.predictions("ADT", ids=["c950", "c3"])
        assert list(p.index) == ["c3", "c950"] and list(p.columns) == trained.features["ADT"]
        assert len(res.programs(dim=0, modality="ADT", direction="up")) <= 3
        with pytest.raises(Exception, match="no column 'tissue'"):
            res.cells(where={"tissue": ["x"]})
        # for scanpy: the selected cells' obs, embeddings and predictions, through an h5ad and back
        res.to_anndata(where={"batch": ["b1"]}).write_h5ad(tmp_path / "b1.h5ad")
        adata = ad.read_h5ad(tmp_path / "b1.h5ad")
        assert adata.n_obs == 333 and list(adata.obs_names[:2]) == ["c1", "c4"] and set(adata.obs["batch"]) == {"b1"}
        np.testing.assert_allclose(adata.obsm["X_scmm"], want.joint[1::3], rtol=1e-5, atol=1e-6)
        adt = adata.obsm["ADT_from_RNA"]
        assert list(adt.columns) == trained.features["ADT"] and list(adt.index) == list(adata.obs_names)
        np.testing.assert_allclose(adt.to_numpy(), want.predictions[("RNA", "ADT")][1::3], rtol=1e-4)
        assert {"X_scmm_RNA", "X_scmm_ADT"} <= set(adata.obsm) and adata.uns["scmm_atlas"]["version"] == res.version
        assert res.to_anndata(ids=["c950", "c3"]).obs_names.tolist() == ["c3", "c950"]


def test_the_index_holds_typed_records_and_refuses_one_of_another_shape(planted_stores, tmp_path) -> None:
    """Index records are ResultRecords (plain JSON in the store); a hand-edited or foreign record is
    a one-line StoreError naming the index, not a KeyError somewhere downstream."""
    import shutil

    from scmm_atlas.errors import StoreError
    from scmm_atlas.store.results import zarr_format
    from scmm_atlas.store.results.spec import ResultRecord

    uri = str(tmp_path / "copy.zarr")
    shutil.copytree(planted_stores["zarr"], uri)
    record = ResultRecord(entry="v1-0123abcd", version="1", model_uri="models:/m/1", time="2026-01-02T03:04:05+00:00",
                          n_cells=1000, pairs=(("RNA", "ADT"),), library_size=None)
    with open_store(uri, writable=True) as store:
        zarr_format.write_index(store, {"published": [record.to_json()]})
        assert index(store) == [record] and record.to_json()["pairs"] == [["RNA", "ADT"]]
        zarr_format.write_index(store, {"published": [{"entry": "v1-0123abcd", "version": "1"}]})
        with pytest.raises(StoreError, match=r"scmm_results/published: a record of another shape \(KeyError"):
            index(store)


@pytest.mark.slow
def test_killed_inference_keeps_the_previous_version_and_rerun_completes(ray_session, tmp_path) -> None:
    from conftest import make_planted_stores

    uri = str(make_planted_stores(tmp_path, backends=("zarr",))["zarr"])
    first = infer(uri, _trained(uri, "1"), config=SMALL, progress=False)
    with open_store(uri) as store:
        before = open_results(store).embedding("joint")
    v2 = _trained(uri, "2", seed=1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SCMM_ATLAS_FAULTS", "infer_block=2")
        for executor in ("ray", "local"):
            with pytest.raises(Exception, match="injected inference fault at block 2"):
                infer(uri, v2, config=InferConfig(**{**SMALL.__dict__, "executor": executor}), progress=False)
    with open_store(uri) as store:
        assert [e.version for e in index(store)] == ["1"]  # the half-written v2 is not visible
        reader = open_results(store)
        assert reader.record.entry == first.record.entry
        np.testing.assert_array_equal(reader.embedding("joint"), before)
        with pytest.raises(Exception, match="no published results for version '2'"):
            open_results(store, "2")
    rerun = infer(uri, v2, config=SMALL, progress=False)
    (tmp_path / "clean").mkdir()
    clean_uri = str(make_planted_stores(tmp_path / "clean", backends=("zarr",))["zarr"])
    clean = infer(clean_uri, v2, config=SMALL, progress=False)
    with open_store(uri) as store, open_store(clean_uri) as ref:
        assert [e.version for e in index(store)] == ["1", "2"]
        got, want = open_results(store, "2"), open_results(ref, "2")
        np.testing.assert_array_equal(got.embedding("joint"), want.embedding("joint"))
        np.testing.assert_array_equal(got.prediction("ADT", "RNA"), want.prediction("ADT", "RNA"))
        np.testing.assert_array_equal(open_results(store, "1").embedding("joint"), before)
        import zarr

        entries = sorted(zarr.open_group(f"{uri}/results", mode="r").group_keys())
        assert entries == sorted([first.record.entry, rerun.record.entry])  # the dead attempt is gone
    assert clean.cells == rerun.cells == 1000


@pytest.mark.slow
def test_model_from_the_registry(tmp_path, planted_stores) -> None:
    import mlflow

    from scmm_atlas.train.tracking import log_model

    uri = str(planted_stores["zarr"])
    trained = _trained(uri)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient(tracking)
    run = client.create_run(client.create_experiment("infer-test", artifact_location=str(tmp_path / "art")))
    torch.save(trained.state, tmp_path / "best_model.pt")
    version, champion = log_model(run.info.run_id, weights=tmp_path / "best_model.pt", model_config=trained.config,
                                  features=trained.features, batches=trained.batches, model_name="infer-test",
                                  val_loss=1.0)
    assert champion
    loaded = load_trained("models:/infer-test@champion", tracking=tracking)
    assert loaded.version == version and loaded.features == trained.features
    for k, v in trained.state.items():
        torch.testing.assert_close(loaded.state[k], v)
    with pytest.raises(Exception, match="no such registered model or alias"):
        load_trained("models:/infer-test@nope", tracking=tracking)


@pytest.mark.slow
def test_s3_store_infer_and_query(ray_session, tmp_path, s3_bucket) -> None:
    """Results on an S3 store (moto server): written by the actors, published, queried."""
    from conftest import make_planted_stores

    from scmm_atlas.ingest.write import IngestOptions, ingest

    local = make_planted_stores(tmp_path, n=300, backends=("zarr",))
    uri = f"s3://{s3_bucket}/cells.zarr"
    ingest(uri, [f"RNA={tmp_path / 'rna.h5ad'}", f"ADT={tmp_path / 'adt.h5ad'}"],
           IngestOptions(batch_key="donor", progress=False))
    trained = _trained(uri)
    infer(uri, trained, config=SMALL, progress=False)
    infer(str(local["zarr"]), trained, config=SMALL, progress=False)
    with results.open(uri) as remote, results.open(str(local["zarr"])) as here:
        np.testing.assert_array_equal(remote.embeddings(where={"batch": ["b0"]}).to_numpy(),
                                      here.embeddings(where={"batch": ["b0"]}).to_numpy())
        assert list(remote.predictions("ADT", ids=["c5"]).index) == ["c5"]
        assert (remote.programs()["model_version"] == "1").all()
