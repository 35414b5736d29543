"""Training and inference on a real multi-host Ray cluster (tests/clusterjobs.py), one cluster for the module:
DDP across hosts whose names resolve to loopback; an elastic run that loses its worker host and grows back
when it returns; the worker host's link cut for 30 s mid-training; a worker host killed during inference; a
fixed-size run the cluster has no room for; and the head killed mid-pipeline (last: the head comes back as
a new cluster).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import pytest
from clusterjobs import STORE, TRAIN, check_finished, hosts_up, job_cluster, produced, train, wait_epochs
from conftest import random_counts, write_h5ad

from scmm_atlas.bench.testcluster import TestCluster

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LONG = 14  # epochs of the unbroken and elastic runs: time for a killed host to come back and be used
UNBROKEN: dict[str, float] = {}  # the unbroken elastic run's final validation loss


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from job_cluster(tmp_path_factory)


def test_ddp_across_hosts_whose_names_resolve_to_loopback_needs_no_hand_set_variable(cluster) -> None:
    """The unbroken elastic run [1, 2]: one worker per host over gloo, registered through the MLflow server;
    submitted with this checkout as its working directory, as the README's `ray job submit --working-dir .`."""
    job = train(cluster, "unbroken", "distributed.num_workers=[1, 2]", epochs=LONG,
                runtime_env={"working_dir": str(REPO), "excludes": ["/.git/"]})
    got = check_finished(cluster, "unbroken", job, LONG)
    assert set(got["workers"]) == {2.0}, got["workers"]
    assert "127.0.1.1" not in job.logs  # gloo never bound what the host name resolves to
    UNBROKEN["val_loss"] = got["val_loss"][-1]


def test_an_elastic_run_goes_on_without_a_lost_host_and_grows_back_when_it_returns(cluster) -> None:
    # each minibatch slowed by 200 ms (the fault plan): Ray Train sees a returning host within ~60 s (its
    # autoscaling coordinator looks every 20 s), which must come before the run's end on any machine
    slow = {"env_vars": {"SCMM_ATLAS_FAULTS": "train_batch_ms=200"}}
    job = train(cluster, "elastic", "distributed.num_workers=[1, 2]", epochs=LONG, wait=False, runtime_env=slow)
    wait_epochs(cluster, "elastic", 2)
    cluster.kill_host("w1")  # every process of the worker host, mid-training
    wait_epochs(cluster, "elastic", 1, workers=1)  # an epoch on the head's worker alone
    cluster.restart_host("w1")  # joins again: the run grows back once Ray Train sees it
    job = cluster.wait_job(job.job_id, timeout_s=600)
    got = check_finished(cluster, "elastic", job, LONG)
    assert 1.0 in got["workers"] and got["workers"][-1] == 2.0, got["workers"]  # shrank, then grew back
    if "val_loss" in UNBROKEN:
        assert got["val_loss"][-1] == pytest.approx(UNBROKEN["val_loss"], rel=0.05)


def test_a_worker_hosts_link_cut_for_30_s_mid_training_and_the_run_finishes(cluster) -> None:
    job = train(cluster, "partition", "distributed.num_workers=[1, 2]", wait=False)
    wait_epochs(cluster, "partition", 2)
    w1 = cluster.host("w1").ip
    before = {n["node_id"] for n in cluster.alive_nodes() if n["node_ip"] == w1}
    cluster.cut_link("w1")
    time.sleep(30)
    cluster.restore_link("w1")
    job = cluster.wait_job(job.job_id, timeout_s=600)
    got = check_finished(cluster, "partition", job)
    declared_dead = any(n["node_id"] in before and n["state"] == "DEAD" for n in cluster.nodes())
    if declared_dead:  # Ray gave the host up (5 failed health checks): the run went on without its worker
        assert 1.0 in got["workers"], got["workers"]
    else:  # within Ray's health-check grace the collectives' TCP connections rode the cut out
        assert set(got["workers"]) == {2.0}, got["workers"]
        # the run stalled for the cut: in an epoch's collectives or at its checkpoint, between two epochs' logs
        assert max(b - a for a, b in itertools.pairwise(got["logged_s"])) > 25, got


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
    model = "models:/scmm-atlas/1"  # the first run's registered model
    infer = ["python", "-m", "scmm_atlas.cli", "infer", "--store", store, "--model", model, "--actors", "2",
             "--pairs", "RNA:ADT", "--no-progress"]
    slow = {"env_vars": {"SCMM_ATLAS_FAULTS": "infer_block_s=8"}}
    unbroken = cluster.submit([*infer, "--version", "unbroken"], timeout_s=400)
    assert unbroken.status == "SUCCEEDED", unbroken.logs[-3000:]
    job = cluster.submit([*infer, "--version", "broken"], runtime_env=slow, wait=False)
    time.sleep(15)  # actors started (~5 s), the first blocks under way on both hosts
    cluster.kill_host("w1")
    job = cluster.wait_job(job.job_id, timeout_s=400)
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    for run in (unbroken, job):  # on the job's cluster (RAY_ADDRESS), not a local Ray of the head's
        assert "Connecting to existing Ray cluster at address: " + cluster.ray_address in run.logs, run.logs[-3000:]
    cluster.restart_host("w1")
    versions = cluster.run("client", ["scmm-atlas", "query", "versions", "--store", store]).stdout
    assert "broken" in versions and "unbroken" in versions
    a = _embeddings(cluster, store, "unbroken", tmp_path / "a.parquet")
    b = _embeddings(cluster, store, "broken", tmp_path / "b.parquet")
    assert len(a) == len(b) == n and a == b


def test_a_fixed_size_run_without_room_for_its_workers_fails_with_one_line(cluster) -> None:
    job = train(cluster, "too-big", "distributed.num_workers=3", "distributed.worker_wait_s=5")  # 2 hosts up
    assert job.status == "FAILED"
    errors = [line for line in job.logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, job.logs[-3000:]
    assert "distributed.num_workers: 3 workers of 1.5 CPUs could not be placed within 5 s" in errors[0]
    assert "room for 2" in errors[0] and "num_workers=[min, max]" in errors[0]
    assert produced(cluster, "too-big")["versions"] == 0


def test_the_head_killed_mid_pipeline_then_the_same_job_resubmitted_resumes(cluster, tmp_path: Path) -> None:
    """A new head, the same ``pipelines.run``: finished stages skipped, training continued from its S3 checkpoint,
    one MLflow run and one registered version for it."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "store": STORE, "workdir": "s3://atlas/pipeline", "stats": {"n_top_genes": 50},
        "train": {"config": "atlas_cite", "num_workers": [1, 2],
                  "overrides": [o for o in TRAIN if not o.startswith("distributed.storage_path")]
                  + ["train.epochs=5", "distributed.checkpoint_every_steps=5"]},
        "infer": {"pairs": ["RNA:ADT"]}, "report": {"enabled": False}}))  # its own tests: test_report.py
    argv = ["python", "-m", "pipelines.run", "--config", str(config), "--no-progress"]
    hosts_up(cluster)
    cluster.submit(argv, wait=False)
    deadline = time.monotonic() + 600
    name = None
    while time.monotonic() < deadline and name is None:
        listed = cluster.python("client", "import boto3, json; print(json.dumps([k['Key'] for k in boto3.client('s3')"
                                ".list_objects_v2(Bucket='atlas', Prefix='pipeline/ray/').get('Contents', [])]))")
        found = [k for k in json.loads(listed) if "/checkpoint_" in k]
        name = found[0].split("/")[2] if found else None
        time.sleep(2)
    assert name is not None, "no training checkpoint of the pipeline within 600 s"
    wait_epochs(cluster, name, 2)  # then killed in epoch 3, a few steps past its last checkpoint
    cluster.kill_host("head")
    cluster.restart_host("head")  # a new cluster: its workers join the new head
    again = cluster.submit(argv, timeout_s=900)
    assert again.status == "SUCCEEDED", again.logs[-4000:]
    assert "[stats] skipped" in again.logs and "resuming training run" in again.logs
    restored = re.search(r"restored from \S+: (\d+) epochs done, step (\d+)", again.logs)
    assert restored and int(restored[1]) >= 2 and int(restored[2]) > 0, again.logs[-4000:]  # where it stopped
    got = produced(cluster, name)
    assert got["runs"] == 1 and got["versions"] == 1 and got["status"] == "FINISHED", got
    assert sorted(got["epochs"]) == list(range(1, 6)), got  # each once: not restarted from 1
