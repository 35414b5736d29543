"""What the cluster tests (test_cluster.py) use: a job cluster on network namespaces (bench/testcluster.py:
hosts on a bridge, host names resolving to loopback, a Ray head with its job server, S3 and an MLflow
server) with a small store on S3, the training job they submit, and the check of what a run produced.
One cluster serves the module's tests; each starts with both hosts up (hosts_up restarts one an earlier test lost).

Every run is a ``ray job submit`` of the user's entry point, as on a cluster; every test ends by
checking what was produced: the job's state, the MLflow run and registered versions, the epochs'
history (world size and cells per epoch) and the checkpoints on S3.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from conftest import random_counts, write_h5ad

from scmm_atlas.bench.testcluster import TestCluster, unavailable_reason

N_CELLS = 3000
STORE = "s3://atlas/cells.zarr"
TRAIN = ["train.warmup_epochs=1", "train.batch_size=64", "train.patience=20",
         "distributed.val_fraction=0.2", "distributed.loader.block_cells=256", "model.modalities.RNA.hidden=32",
         "model.modalities.ADT.hidden=32", "distributed.cpus_per_worker=1.5", "distributed.torch_threads=1",
         "distributed.storage_path=s3://atlas/ray", "distributed.resize_interval_s=5",
         "distributed.max_failures=4", "distributed.worker_wait_s=90"]


def job_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
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


def hosts_up(c: TestCluster) -> None:
    """Both hosts in the cluster, whatever an earlier test did to the worker host (a raylet that Ray
    declared dead across a cut exits: its host is restarted, as a node supervisor would; a host killed moments
    ago may still look alive to Ray)."""
    if c.host("w1").down or c.host("w1").ip not in {n["node_ip"] for n in c.alive_nodes()}:
        c.restart_host("w1")
    c.wait_nodes(alive=[c.head.ip, c.host("w1").ip])


def train(c: TestCluster, name: str, *extra: str, epochs: int = 6, wait: bool = True,
          runtime_env: dict | None = None):
    hosts_up(c)
    return c.submit(["python", "-m", "pipelines.train", "--store", STORE, "--name", name, "--no-progress",
                     f"train.epochs={epochs}", *TRAIN, *extra], wait=wait, timeout_s=600, runtime_env=runtime_env)


def produced(c: TestCluster, name: str) -> dict:
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
    history = sorted(client.get_metric_history(r.info.run_id, "val_loss"), key=lambda m: m.step)
    out["epochs"] = [m.step for m in history]
    out["logged_s"] = [m.timestamp / 1000 for m in history]  # when each epoch was logged
listed = boto3.client("s3").list_objects_v2(Bucket="atlas", Prefix="ray/{name}/checkpoint_")
out["checkpoints"] = sorted({{k["Key"].split("/")[2] for k in listed.get("Contents", [])}})
print(json.dumps(out))
"""
    return json.loads(c.python("client", code, timeout=120).strip().splitlines()[-1])


# The epochs a run has logged (those with a given world size, if one is given), from the MLflow server's REST API
# with the standard library only: polled every few seconds, where an `import mlflow` would cost seconds of CPU
# each time on a 2-core machine.
EPOCHS_LOGGED = """
import json, sys, urllib.error, urllib.parse, urllib.request
api, name, workers = sys.argv[1] + "/api/2.0/mlflow/", sys.argv[2], float(sys.argv[3])
def call(path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)
try:
    exp = call("experiments/get-by-name?experiment_name=scmm-atlas")["experiment"]["experiment_id"]
except urllib.error.HTTPError:  # no run logged yet
    print(0); sys.exit()
runs = call("runs/search", {"experiment_ids": [exp], "filter": f"attributes.run_name = '{name}'"}).get("runs", [])
history = call("metrics/get-history?" + urllib.parse.urlencode(
    {"run_id": runs[0]["info"]["run_id"], "metric_key": "workers"})).get("metrics", []) if runs else []
print(sum(workers == 0 or m["value"] == workers for m in history))
"""


def wait_epochs(c: TestCluster, name: str, epochs: int, *, workers: int = 0, timeout_s: float = 600) -> None:
    """Until the run has logged ``epochs`` epochs (a checkpoint is written with each), counting only those
    trained by ``workers`` workers where that is given."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if int(c.python("client", EPOCHS_LOGGED, c.mlflow_uri, name, str(workers), timeout=60).strip()) >= epochs:
            return
        time.sleep(3)
    raise AssertionError(f"{name}: fewer than {epochs} epochs{f' of {workers} workers' if workers else ''} "
                         f"after {timeout_s:.0f} s")


def check_finished(c: TestCluster, name: str, job, epochs: int = 6) -> dict:
    assert job.status == "SUCCEEDED", job.logs[-4000:]
    got = produced(c, name)
    assert got["runs"] == 1 and got["status"] == "FINISHED" and got["versions"] == 1, got
    # every epoch logged once: none restarted from 1, none lost or repeated around a lost host's checkpoint
    assert sorted(got["epochs"]) == list(range(1, epochs + 1)), got
    assert got["checkpoints"], got
    n_train = max(got["cells"])
    # each epoch reads every training cell once at any world size: only the last round's remainder is dropped
    assert all(n_train - cells < 2 * 64 for cells in got["cells"]), got["cells"]
    return got
