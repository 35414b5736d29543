"""Training on a real multi-host Ray cluster that loses hosts (bench/testcluster.py: network namespaces
on a bridge, host names resolving to loopback, a Ray head with its job server, S3 and an MLflow server).

Every run is a ``ray job submit`` of the user's entry point, as on a cluster; every test ends by
checking what was produced: the job's state, the MLflow run and registered versions, the epochs'
history (world size and cells per epoch) and the checkpoints on S3.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import random_counts, write_h5ad

from scmm_atlas.bench.testcluster import TestCluster, unavailable_reason

pytestmark = pytest.mark.slow
N_CELLS = 3000
STORE = "s3://atlas/cells.zarr"
TRAIN = ["train.warmup_epochs=1", "train.batch_size=64", "train.patience=20",
         "distributed.val_fraction=0.2", "distributed.loader.block_cells=256", "model.modalities.RNA.hidden=32",
         "model.modalities.ADT.hidden=32", "distributed.cpus_per_worker=1.5", "distributed.torch_threads=1",
         "distributed.storage_path=s3://atlas/ray", "distributed.resize_interval_s=5",
         "distributed.max_failures=4", "distributed.worker_wait_s=90"]
LONG = 14  # epochs of the unbroken and elastic runs: time for a killed host to come back and be used
UNBROKEN: dict[str, float] = {}  # the unbroken elastic run's final validation loss


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and one worker host (2 CPUs each: one training worker per host), a small store on S3."""
    if (why := unavailable_reason()) is not None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("cluster")
    write_h5ad(root / "rna.h5ad", random_counts(N_CELLS, 60, 1), obs={"donor": [f"b{i % 3}" for i in range(N_CELLS)]})
    write_h5ad(root / "adt.h5ad", random_counts(N_CELLS, 8, 2), var_names=[f"p{j}" for j in range(8)])
    with TestCluster(root, hosts=2) as c:
        c.python("client", "import boto3; boto3.client('s3').create_bucket(Bucket='atlas')")
        c.run("client", ["scmm-atlas", "ingest", "--store", STORE, f"RNA={root / 'rna.h5ad'}",
                         f"ADT={root / 'adt.h5ad'}", "--batch-key", "donor", "--no-progress"], timeout=300)
        c.run("client", ["scmm-atlas", "prepare", "--store", STORE, "--val-fraction", "0.2", "--no-progress"],
              timeout=300)
        yield c


def _hosts_up(c: TestCluster) -> None:
    """Both hosts in the cluster, whatever an earlier test did to the worker host (a raylet that Ray
    declared dead across a cut exits: its host is restarted, as a node supervisor would)."""
    if c.host("w1").ip not in {n["node_ip"] for n in c.alive_nodes()}:
        c.restart_host("w1")
    c.wait_nodes(alive=[c.head.ip, c.host("w1").ip])


def _train(c: TestCluster, name: str, *extra: str, epochs: int = 8, wait: bool = True):
    _hosts_up(c)
    return c.submit(["python", "-m", "scmm_atlas.jobs.train", "--store", STORE, "--name", name, "--no-progress",
                     f"train.epochs={epochs}", *TRAIN, *extra], wait=wait, timeout_s=600)


def _produced(c: TestCluster, name: str) -> dict:
    """The MLflow run of training run ``name`` (status, its metrics per epoch), the versions registered from it,
    and the checkpoints on S3."""
    code = f"""
import json, boto3, mlflow
client = mlflow.MlflowClient()
exp = client.get_experiment_by_name("scmm-atlas")
runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = '{name}'") if exp else []
out = {{"runs": len(runs), "versions": 0}}
if runs:
    r = runs[0]
    out["status"] = r.info.status
    out["versions"] = len(client.search_model_versions(f"run_id='{{r.info.run_id}}'"))
    for key in ("workers", "cells", "val_loss", "step", "cells_per_s"):
        out[key] = [m.value for m in sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)]
    out["epochs"] = [m.step for m in sorted(client.get_metric_history(r.info.run_id, "val_loss"), key=lambda m: m.step)]
listed = boto3.client("s3").list_objects_v2(Bucket="atlas", Prefix="ray/{name}/checkpoint_")
out["checkpoints"] = sorted({{k["Key"].split("/")[2] for k in listed.get("Contents", [])}})
print(json.dumps(out))
"""
    return json.loads(c.python("client", code, timeout=120).strip().splitlines()[-1])


def _wait_epochs(c: TestCluster, name: str, epochs: int, timeout_s: float = 300) -> None:
    """Until the run has logged ``epochs`` epochs (a checkpoint is written with each)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = _produced(c, name)
        if len(got.get("epochs", [])) >= epochs:
            return
        time.sleep(2)
    raise AssertionError(f"{name}: fewer than {epochs} epochs after {timeout_s:.0f} s")


def _check_finished(c: TestCluster, name: str, job, epochs: int = 8) -> dict:
    assert job.status == "SUCCEEDED", job.logs[-4000:]
    got = _produced(c, name)
    assert got["runs"] == 1 and got["status"] == "FINISHED" and got["versions"] == 1, got
    # every epoch logged once: none restarted from 1, none lost or repeated around a lost host's checkpoint
    assert sorted(got["epochs"]) == list(range(1, epochs + 1)), got
    assert got["checkpoints"], got
    n_train = max(got["cells"])
    # each epoch reads every training cell once at any world size: only the last round's remainder is dropped
    assert all(n_train - cells < 2 * 64 for cells in got["cells"]), got["cells"]
    return got


def test_ddp_across_hosts_whose_names_resolve_to_loopback_needs_no_hand_set_variable(cluster) -> None:
    """The unbroken elastic run [1, 2]: one worker per host over gloo, registered through the MLflow server."""
    job = _train(cluster, "unbroken", "distributed.num_workers=[1, 2]", epochs=LONG)
    got = _check_finished(cluster, "unbroken", job, LONG)
    assert set(got["workers"]) == {2.0}, got["workers"]
    assert "127.0.1.1" not in job.logs  # gloo never bound what the host name resolves to
    UNBROKEN["val_loss"] = got["val_loss"][-1]


def test_an_elastic_run_goes_on_without_a_lost_host_and_grows_back_when_it_returns(cluster) -> None:
    job = _train(cluster, "elastic", "distributed.num_workers=[1, 2]", epochs=LONG, wait=False)
    _wait_epochs(cluster, "elastic", 2)
    cluster.kill_host("w1")  # every process of the worker host, mid-training
    _wait_epochs(cluster, "elastic", 4)  # on the head's worker alone
    cluster.restart_host("w1")  # joins again: the run grows back at its next resize check (5 s)
    job = cluster.wait_job(job.job_id, timeout_s=600)
    got = _check_finished(cluster, "elastic", job, LONG)
    assert 1.0 in got["workers"] and got["workers"][-1] == 2.0, got["workers"]  # shrank, then grew back
    if "val_loss" in UNBROKEN:
        assert got["val_loss"][-1] == pytest.approx(UNBROKEN["val_loss"], rel=0.05)


def test_a_worker_hosts_link_cut_for_30_s_mid_training_and_the_run_finishes(cluster) -> None:
    job = _train(cluster, "partition", "distributed.num_workers=[1, 2]", wait=False)
    _wait_epochs(cluster, "partition", 2)
    w1 = cluster.host("w1").ip
    before = {n["node_id"] for n in cluster.alive_nodes() if n["node_ip"] == w1}
    cluster.cut_link("w1")
    time.sleep(30)
    cluster.restore_link("w1")
    job = cluster.wait_job(job.job_id, timeout_s=600)
    got = _check_finished(cluster, "partition", job)
    declared_dead = any(n["node_id"] in before and n["state"] == "DEAD" for n in cluster.nodes())
    if declared_dead:  # Ray gave the host up (5 failed health checks): the run went on without its worker
        assert 1.0 in got["workers"], got["workers"]
    else:  # within Ray's health-check grace the collectives' TCP connections rode the cut out
        assert set(got["workers"]) == {2.0}, got["workers"]
        assert min(got["cells_per_s"]) < max(got["cells"]) / 20, got  # one epoch stalled for the cut


def test_a_fixed_size_run_without_room_for_its_workers_fails_with_one_line(cluster) -> None:
    job = _train(cluster, "too-big", "distributed.num_workers=3", "distributed.worker_wait_s=15")  # 2 hosts up
    assert job.status == "FAILED"
    errors = [line for line in job.logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, job.logs[-3000:]
    assert "distributed.num_workers: 3 workers of 1.5 CPUs could not be placed within 15 s" in errors[0]
    assert "room for 2" in errors[0] and "num_workers=[min, max]" in errors[0]
    assert _produced(cluster, "too-big")["versions"] == 0


def test_the_head_killed_mid_pipeline_then_the_same_job_resubmitted_resumes(cluster, tmp_path: Path) -> None:
    """A new head, the same ``jobs.run``: finished stages skipped, training continued from its S3 checkpoint,
    one MLflow run and one registered version for it."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "store": STORE, "workdir": "s3://atlas/pipeline", "stats": {"n_top_genes": 50},
        "train": {"config": "atlas_cite", "num_workers": [1, 2],
                  "overrides": [o for o in TRAIN if not o.startswith("distributed.storage_path")]
                  + ["train.epochs=8", "distributed.checkpoint_every_steps=5"]},
        "infer": {"pairs": ["RNA:ADT"]}, "report": {"out": str(tmp_path / "report")}}))
    argv = ["python", "-m", "scmm_atlas.jobs.run", "--config", str(config), "--no-progress"]
    _hosts_up(cluster)
    cluster.submit(argv, wait=False)
    deadline = time.monotonic() + 300
    name = None
    while time.monotonic() < deadline and name is None:
        listed = cluster.python("client", "import boto3, json; print(json.dumps([k['Key'] for k in boto3.client('s3')"
                                ".list_objects_v2(Bucket='atlas', Prefix='pipeline/ray/').get('Contents', [])]))")
        found = [k for k in json.loads(listed) if "/checkpoint_" in k]
        name = found[0].split("/")[2] if found else None
        time.sleep(2)
    assert name is not None, "no training checkpoint of the pipeline within 300 s"
    _wait_epochs(cluster, name, 2)  # then killed in epoch 3, a few steps past its last checkpoint
    cluster.kill_host("head")
    cluster.restart_host("head")  # a new cluster: its workers join the new head
    again = cluster.submit(argv, timeout_s=900)
    assert again.status == "SUCCEEDED", again.logs[-4000:]
    assert "[stats] skipped" in again.logs and "resuming training run" in again.logs
    restored = re.search(r"restored from \S+: (\d+) epochs done, step (\d+)", again.logs)
    assert restored and int(restored[1]) >= 2 and int(restored[2]) > 0, again.logs[-4000:]  # where it stopped
    got = _produced(cluster, name)
    assert got["runs"] == 1 and got["versions"] == 1 and got["status"] == "FINISHED", got
    assert sorted(got["epochs"]) == list(range(1, 9)), got  # each once: not restarted from 1


def _embeddings(c: TestCluster, store: str, version: str, out: Path) -> list:
    c.run("client", ["scmm-atlas", "query", "embeddings", "--store", store, "--version", version, "--out", out],
          timeout=300)
    import pandas as pd

    frame = pd.read_parquet(out)
    return frame.sort_index().round(5).to_numpy().tolist()


def test_a_worker_host_killed_during_inference_leaves_a_complete_version_equal_to_an_unbroken_one(
        cluster, tmp_path: Path) -> None:
    """Ray Data actors on both hosts, each block slowed to 8 s (the fault plan) so that the kill lands mid-run:
    the lost host's actor restarts on the head and redoes its block; nothing is published half."""
    store = "s3://atlas/infer.zarr"
    n = 5 * 4096  # five blocks of the results' chunk size
    write_h5ad(tmp_path / "rna.h5ad", random_counts(n, 60, 1), obs={"donor": [f"b{i % 3}" for i in range(n)]})
    write_h5ad(tmp_path / "adt.h5ad", random_counts(n, 8, 2), var_names=[f"p{j}" for j in range(8)])
    cluster.run("client", ["scmm-atlas", "ingest", "--store", store, f"RNA={tmp_path / 'rna.h5ad'}",
                           f"ADT={tmp_path / 'adt.h5ad'}", "--batch-key", "donor", "--no-progress"], timeout=300)
    model = "models:/scmm-atlas/1"  # the first test's registered model
    infer = ["python", "-m", "scmm_atlas.cli", "infer", "--store", store, "--model", model, "--actors", "2",
             "--pairs", "RNA:ADT", "--no-progress"]
    slow = {"env_vars": {"SCMM_ATLAS_FAULTS": "infer_block_s=8"}}
    unbroken = cluster.submit([*infer, "--version", "unbroken"], runtime_env=slow, timeout_s=400)
    assert unbroken.status == "SUCCEEDED", unbroken.logs[-3000:]
    job = cluster.submit([*infer, "--version", "broken"], runtime_env=slow, wait=False)
    time.sleep(15)  # actors started (~5 s), the first blocks under way on both hosts
    cluster.kill_host("w1")
    job = cluster.wait_job(job.job_id, timeout_s=400)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    cluster.restart_host("w1")
    versions = cluster.run("client", ["scmm-atlas", "query", "versions", "--store", store]).stdout
    assert "broken" in versions and "unbroken" in versions
    a = _embeddings(cluster, store, "unbroken", tmp_path / "a.parquet")
    b = _embeddings(cluster, store, "broken", tmp_path / "b.parquet")
    assert len(a) == len(b) == n and a == b
