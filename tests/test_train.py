"""Training on Ray Train: DDP workers, MLflow (SQLite) tracking and registry, checkpoints, faults, resume."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import FAST_TRAIN, make_planted_stores

from scmm_atlas.config import load_config
from scmm_atlas.data.layout import layout_uri, read_info
from scmm_atlas.store import StoreError, open_store
from scmm_atlas.train.driver import train

FAST = FAST_TRAIN



@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_planted_stores(tmp_path_factory.mktemp("train"), backends=("zarr",))["zarr"]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _config(tmp: Path, *extra: str, workers: int = 2):
    return load_config("atlas_cite", [*FAST, f"distributed.num_workers={workers}",
                                      f"distributed.storage_path={tmp / 'ray'}", *extra])


@pytest.fixture(scope="module")
def baseline(store, tracking, tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("baseline")
    return train(_config(tmp), str(store), run_name="base", tracking=tracking, progress=False), tmp


@pytest.mark.slow
def test_two_workers_train_log_every_epoch_and_register_a_loadable_model(baseline, tracking) -> None:
    result, _ = baseline
    assert result.epochs == 3 and result.model_version == "1" and result.champion
    client = mlflow.MlflowClient(tracking)
    run = client.get_run(result.run_id)
    assert run.data.params["model.latent_dim"] == "20" and run.data.params["distributed.num_workers"] == "2"
    assert run.data.params["global_batch"] == "128"
    for key in ("train_loss", "val_loss", "kl", "recon_RNA", "recon_ADT", "cells_per_s", "data_wait_frac", "beta"):
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2, 3], key
    losses = [m.value for m in client.get_metric_history(result.run_id, "train_loss")]
    assert losses[-1] < losses[0]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "loss_curve.png", "features_RNA.txt", "features_ADT.txt"} <= artifacts
    assert str(client.get_model_version_by_alias("scmm-atlas", "champion").version) == "1"
    model = mlflow.pyfunc.load_model("models:/scmm-atlas@champion")
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/scmm-atlas@champion")).read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "scmm-atlas", "torch", "numpy"}, requirements
    rng = np.random.default_rng(0)
    counts = {"RNA": rng.poisson(2, (7, 20)).astype(np.float32), "ADT": rng.poisson(5, (7, 4)).astype(np.float32)}
    emb = model.predict(counts)
    assert emb.shape == (7, 20) and np.isfinite(emb).all()
    rna_only = model.predict({"RNA": counts["RNA"]})
    assert rna_only.shape == (7, 20) and not np.allclose(rna_only, emb)


@pytest.mark.slow
def test_the_champion_alias_moves_only_to_a_better_model(baseline, store, tracking) -> None:
    _, tmp = baseline
    worse = train(_config(tmp, "train.lr=0", "train.epochs=2"), str(store), run_name="frozen",
                  tracking=tracking, progress=False)
    assert worse.model_version == "2" and not worse.champion
    assert str(mlflow.MlflowClient(tracking).get_model_version_by_alias("scmm-atlas", "champion").version) == "1"


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(baseline, store, tracking) -> None:
    _, tmp = baseline
    first = train(_config(tmp, "train.epochs=1", "distributed.grad_accum=2", "distributed.checkpoint_every_steps=2",
                          workers=1), str(store), run_name="resumable", tracking=tracking, progress=False)
    assert first.epochs == 1
    n_train = read_info(layout_uri(open_store(store).uri)).n_cells("train")
    assert first.history[0]["step"] == n_train // 64 // 2  # two micro-batches per optimizer step
    kept = [p for p in (tmp / "ray" / "resumable").glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == 2  # mid-epoch ones too, kept to the last 2
    more = train(_config(tmp, "train.epochs=2", workers=1), str(store), run_name="resumable", resume=True,
                 tracking=tracking, progress=False)
    assert more.run_id == first.run_id and [h["epoch"] for h in more.history] == [1, 2]
    with pytest.raises(StoreError, match="no run to resume"):
        train(_config(tmp, workers=1), str(store), run_name="never-ran", resume=True, tracking=tracking)
    with pytest.raises(StoreError, match="a run with this name exists"):
        train(_config(tmp, workers=1), str(store), run_name="resumable", tracking=tracking)


def test_a_trainer_keeps_rays_placement_group_cleaner_only_where_the_state_api_is_served(ray_session,
                                                                                       monkeypatch) -> None:
    """Without a dashboard the cleaner's state queries hang 10 s each and a run ended ~18 s after its last
    epoch, with one Ray's default stands; Ray's datasets callback (an actor at every worker-group start)
    only where the run has Ray Datasets."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from scmm_atlas.train.driver import Trainer

    def kept(kind: type, **datasets) -> int:
        trainer = Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1), datasets=datasets or None)
        return sum(isinstance(cb, kind) for cb in trainer._create_default_callbacks())

    assert ray._private.worker.get_dashboard_url() == ""  # the tests' shared Ray runs no dashboard
    assert kept(PlacementGroupCleanerCallback) == 0
    assert kept(DatasetsCallback) == 0 and kept(DatasetsCallback, train=ray.data.range(3)) == 1
    monkeypatch.setattr(ray._private.worker, "get_dashboard_url", lambda: "127.0.0.1:8265")
    assert kept(PlacementGroupCleanerCallback) == 1
