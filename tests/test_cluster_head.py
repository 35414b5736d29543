"""A multi-host Ray cluster whose head is killed mid-pipeline, and a fixed-size run it has no room for
(tests/clusterjobs.py).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from clusterjobs import STORE, TRAIN, hosts_up, job_cluster, produced, train, wait_epochs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from job_cluster(tmp_path_factory)


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
    assert sorted(got["epochs"]) == list(range(1, 9)), got  # each once: not restarted from 1


def test_a_fixed_size_run_without_room_for_its_workers_fails_with_one_line(cluster) -> None:
    job = train(cluster, "too-big", "distributed.num_workers=3", "distributed.worker_wait_s=15")  # 2 hosts up
    assert job.status == "FAILED"
    errors = [line for line in job.logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, job.logs[-3000:]
    assert "distributed.num_workers: 3 workers of 1.5 CPUs could not be placed within 15 s" in errors[0]
    assert "room for 2" in errors[0] and "num_workers=[min, max]" in errors[0]
    assert produced(cluster, "too-big")["versions"] == 0
