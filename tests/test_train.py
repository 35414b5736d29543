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
from scmm_atlas.train.run import train

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
def test_a_worker_that_fails_once_is_restarted_from_the_last_checkpoint(baseline, store, tracking,
                                                                        monkeypatch) -> None:
    base, tmp = baseline
    steps_per_epoch = base.history[0]["step"]
    monkeypatch.setenv("SCMM_ATLAS_FAULTS", f"train_step={steps_per_epoch + 2}")
    faulty = train(_config(tmp, "distributed.max_failures=1"),
                   str(store), run_name="faulty", tracking=tracking, progress=False)
    assert (tmp / "ray" / "faulty" / "fault_injected").exists()
    assert [h["epoch"] for h in faulty.history] == [1, 2, 3]  # continued, not restarted from epoch 1
    steps = [m.step for m in mlflow.MlflowClient(tracking).get_metric_history(faulty.run_id, "val_loss")]
    assert steps == [1, 2, 3]
    assert abs(faulty.best_val - base.best_val) <= 0.02 * abs(base.best_val)


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_training_entry_point(store, tmp_path, monkeypatch) -> None:
    import os
    import secrets
    import subprocess
    import sys
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    repo = Path(__file__).resolve().parents[1]
    gcs, dash, agent, agent_grpc, metrics, runtime_env, client_port = (_free_port() for _ in range(7))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # the job server stays authenticated
    for key, value in auth.items():
        monkeypatch.setenv(key, value)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
                             # every port of its own: the session's Ray already holds the default ones
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                             f"--ray-client-server-port={client_port}",
                             "--object-store-memory=200000000", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **auth,  # the job's `python` is this environment's
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        client, error = None, None
        for _ in range(90):
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}",
                                             headers={"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"})
                break
            except Exception as exc:  # the dashboard is not up yet
                error = exc
                time.sleep(1)
        assert client is not None, f"the Ray head's job server did not come up: {error}"
        tracking = f"sqlite:///{tmp_path / 'job.db'}"
        job = None
        for _ in range(60):  # the head's job agent comes up a little after its HTTP server
            try:
                job = client.submit_job(
                    entrypoint=(f"python -m scmm_atlas.jobs.train --store {store} --name job1 "
                                f"--tracking-uri {tracking} --no-progress {' '.join(FAST)} train.epochs=1 "
                                "distributed.num_workers=1 "
                                f"distributed.storage_path={tmp_path / 'ray'} distributed.model_name=job-model"),
                    runtime_env={"working_dir": str(repo),
                                 "excludes": ["/.venv/", "/runs/", "/tests/", "/.git/", "*.egg-info"]})
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc):
                    raise
                time.sleep(1)
        assert job is not None, "the Ray head never accepted the job"
        deadline = time.time() + 300
        while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
        assert "registered job-model version 1 (champion)" in logs
    finally:
        head.terminate()
        head.wait(timeout=60)
    runs = mlflow.MlflowClient(tracking).search_runs(
        [mlflow.MlflowClient(tracking).get_experiment_by_name("scmm-atlas").experiment_id])
    assert [r.info.run_name for r in runs] == ["job1"] and runs[0].info.status == "FINISHED"
