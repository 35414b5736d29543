"""Training on a real multi-host Ray cluster (tests/clusterjobs.py): DDP across hosts whose names resolve
to loopback, and an elastic run that loses its worker host and grows back when it returns.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from clusterjobs import check_finished, job_cluster, train, wait_epochs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LONG = 12  # epochs of the unbroken and elastic runs: time for a killed host to come back and be used
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
    job = train(cluster, "elastic", "distributed.num_workers=[1, 2]", epochs=LONG, wait=False)
    wait_epochs(cluster, "elastic", 2)
    cluster.kill_host("w1")  # every process of the worker host, mid-training
    wait_epochs(cluster, "elastic", 3)  # an epoch on the head's worker alone
    cluster.restart_host("w1")  # joins again: the run grows back at its next resize check (5 s)
    job = cluster.wait_job(job.job_id, timeout_s=600)
    got = check_finished(cluster, "elastic", job, LONG)
    assert 1.0 in got["workers"] and got["workers"][-1] == 2.0, got["workers"]  # shrank, then grew back
    if "val_loss" in UNBROKEN:
        assert got["val_loss"][-1] == pytest.approx(UNBROKEN["val_loss"], rel=0.05)
