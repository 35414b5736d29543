"""The multi-host test cluster (scmm_atlas/bench/testcluster.py), with real components: network
namespaces on a bridge, a Ray head and worker, a job submitted through the job server, moto S3 and
an MLflow server. One cluster serves the whole module (~20 s to start on 2 cores); the last test
shuts it down and checks that nothing is left."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from scmm_atlas.bench.testcluster import (
    ETC_NETNS,
    RAY_TMP,
    STATE_DIR,
    ClusterError,
    TestCluster,
    cleanup_stale,
    ns_pids,
    unavailable_reason,
)

REASON = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

# a TCP sink: accepts connections, reads each to its end, answers "ok"
SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    with conn:
        while conn.recv(1 << 16):
            pass
        conn.sendall(b"ok")
"""
# sends argv[3] bytes to the sink, prints the seconds until its answer
SEND = """
import socket, sys, time
t0 = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    s.sendall(bytes(int(sys.argv[3])))
    s.shutdown(socket.SHUT_WR)
    assert s.recv(2) == b"ok"
print(time.monotonic() - t0)
"""
# a Ray job: one task pinned to each alive node says where it ran
WHERE_JOB = """
import json, socket, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init()
@ray.remote(num_cpus=1)
def where():
    name = socket.gethostname()
    return {"ip": ray.util.get_node_ip_address(), "host": name, "resolves": socket.gethostbyname(name)}
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print("WHERE " + json.dumps(ray.get([where.options(scheduling_strategy=On(n, soft=False)).remote() for n in nodes])))
"""
IDENTITY = """
import json, socket
name = socket.gethostname()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect(("192.0.2.99", 9))  # no packet: the route picks the source address
print(json.dumps({"host": name, "resolves": socket.gethostbyname(name), "source": udp.getsockname()[0]}))
"""
S3_MLFLOW = """
import json, boto3, mlflow
s3 = boto3.client("s3")
s3.create_bucket(Bucket="probe")
s3.put_object(Bucket="probe", Key="k", Body=b"cluster bytes")
got = s3.get_object(Bucket="probe", Key="k")["Body"].read().decode()
mlflow.set_experiment("testcluster")
with mlflow.start_run() as run:
    mlflow.log_metric("loss", 0.25)
    mlflow.log_text("hello", "notes/hello.txt")
metric = mlflow.tracking.MlflowClient().get_run(run.info.run_id).data.metrics["loss"]
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
print(json.dumps({"got": got, "metric": metric, "artifact_uri": run.info.artifact_uri, "keys": keys}))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> TestCluster:
    c = TestCluster(tmp_path_factory.mktemp("cluster"), hosts=2)
    c.start()
    print(f"test cluster started in {c.timings['start']:.1f} s (Ray up at {c.timings['ray']:.1f} s)")
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def bare(cluster) -> str:
    """A host that runs nothing of the cluster's (links are cut and shaped on it, not on Ray's)."""
    return cluster.add_host("bare").name


def _sink(cluster: TestCluster, host: str, port: int) -> None:
    ip = cluster.hosts[host].ip
    cluster.popen(host, [cluster.interpreter, "-c", SINK, ip, str(port)])
    cluster.wait_ready("client", [{"name": f"sink on {host}", "tcp": [ip, port]}], timeout_s=30)


def test_hosts_have_their_own_address_and_a_name_that_resolves_to_loopback(cluster):
    ips = {name: h.ip for name, h in cluster.hosts.items()}
    assert len(set(ips.values())) == len(ips)
    for name in ("head", "w1", "client"):
        seen = json.loads(cluster.python(name, IDENTITY))
        assert seen["host"] == name
        assert seen["resolves"].startswith("127.")  # the stock Debian /etc/hosts trap
        assert seen["source"] == ips[name]  # what Ray and torch take for "my address"
    _sink(cluster, "client", 7001)
    assert cluster.reachable("head", ips["client"], 7001)
    assert cluster.reachable("w1", ips["client"], 7001)
    assert not cluster.reachable("w1", ips["client"], 7002)  # nobody listens: refused


def test_ray_sees_each_node_at_its_address_and_runs_a_job_on_both(cluster):
    nodes = cluster.alive_nodes()
    assert sorted(n["node_ip"] for n in nodes) == sorted([cluster.head.ip, cluster.hosts["w1"].ip])
    assert [n["node_ip"] for n in nodes if n["is_head_node"]] == [cluster.head.ip]

    result = cluster.submit(["python", "-c", WHERE_JOB], timeout_s=180)
    assert result.status == "SUCCEEDED", result.logs
    line = next(x for x in result.logs.splitlines() if x.startswith("WHERE "))
    where = sorted(json.loads(line[len("WHERE "):]), key=lambda w: w["host"])
    assert [(w["host"], w["ip"]) for w in where] == [("head", cluster.head.ip), ("w1", cluster.hosts["w1"].ip)]
    assert all(w["resolves"].startswith("127.") for w in where)
    assert cluster.job_status(result.job_id) == "SUCCEEDED"


def test_a_failing_job_reports_failed_with_its_output_and_a_job_can_be_stopped(cluster):
    code = "import os, sys; print('about to fail', os.environ['SCMM_PROBE']); sys.exit(3)"
    result = cluster.submit(["python", "-c", code], runtime_env={"env_vars": {"SCMM_PROBE": "xyz"}}, timeout_s=120)
    assert result.status == "FAILED"
    assert "about to fail xyz" in cluster.job_logs(result.job_id)

    sleeper = cluster.submit(["python", "-c", "import time; time.sleep(600)"], wait=False)
    assert sleeper.status in ("PENDING", "RUNNING")
    cluster.stop_job(sleeper.job_id)
    assert cluster.wait_job(sleeper.job_id, timeout_s=60).status == "STOPPED"


def test_s3_and_mlflow_serve_a_host_and_artifacts_land_in_s3(cluster):
    out = json.loads(cluster.python("w1", S3_MLFLOW, timeout=180).strip().splitlines()[-1])
    assert out["got"] == "cluster bytes"
    assert out["metric"] == 0.25
    assert out["artifact_uri"].startswith("mlflow-artifacts:")  # proxied by the server: clients need no S3
    assert any(k.startswith("artifacts/") and k.endswith("notes/hello.txt") for k in out["keys"]), out["keys"]


def test_a_killed_worker_is_seen_dead_and_restarts(cluster):
    w1 = cluster.hosts["w1"]
    cluster.kill_host("w1")
    assert ns_pids([w1.ns]) == {w1.ns: []}
    dead_after = cluster.wait_nodes(alive=[cluster.head.ip], dead=[w1.ip], timeout_s=90)
    print(f"the head saw w1 dead after {dead_after:.1f} s")
    cluster.restart_host("w1")
    cluster.wait_nodes(alive=[cluster.head.ip, w1.ip], timeout_s=60)
    nodes = cluster.nodes()
    assert sorted(n["state"] for n in nodes if n["node_ip"] == w1.ip) == ["ALIVE", "DEAD"]


def test_a_restarted_head_is_a_new_cluster_that_the_workers_join(cluster):
    head, w1 = cluster.head, cluster.hosts["w1"]
    cluster.kill_host("head")
    assert not cluster.reachable("client", head.ip, 6379, timeout_s=1)
    cluster.restart_host("head")
    cluster.wait_nodes(alive=[head.ip, w1.ip], timeout_s=60)
    assert sorted((n["node_ip"], n["state"]) for n in cluster.nodes()) == [(head.ip, "ALIVE"), (w1.ip, "ALIVE")]


def test_a_wait_that_times_out_names_what_did_not_come_up(cluster, tmp_path):
    log = tmp_path / "thing.log"
    log.write_text("first line\nthe reason it failed\n")
    with pytest.raises(ClusterError, match=r"(?s)nothing on 7999.*ConnectionRefused.*the reason it failed"):
        cluster.wait_ready("client", [{"name": "nothing on 7999", "tcp": [cluster.head.ip, 7999]}], timeout_s=1,
                           logs=[log])


def test_a_cut_link_partitions_the_host_until_restored(cluster, bare):
    ip = cluster.hosts[bare].ip
    _sink(cluster, bare, 7003)
    cluster.cut_link(bare)
    try:
        t0 = time.monotonic()
        assert not cluster.reachable("client", ip, 7003, timeout_s=2)
        assert time.monotonic() - t0 > 1.5  # a timeout (no answer at all), not a refusal
        assert not cluster.reachable(bare, cluster.hosts["svc"].ip, 9000, timeout_s=1)
    finally:
        cluster.restore_link(bare)
    assert cluster.reachable("client", ip, 7003, timeout_s=5)


def test_set_link_limits_the_rate_and_clear_link_lifts_it(cluster, bare):
    ip = cluster.hosts[bare].ip
    _sink(cluster, bare, 7004)
    send = [cluster.interpreter, "-c", SEND, ip, "7004", str(2_500_000)]  # 20 Mbit: 1 s at 20mbit
    cluster.set_link(bare, rate="20mbit")
    try:
        shaped = float(cluster.run("client", send).stdout)
    finally:
        cluster.clear_link(bare)
    free = float(cluster.run("client", send).stdout)
    assert shaped > 0.8, shaped
    assert free < shaped / 2, (free, shaped)
    if cluster.netem_available():
        cluster.set_link(bare, rate=None, delay_ms=50)
        cluster.clear_link(bare)
    else:
        with pytest.raises(ClusterError, match="sch_netem"):
            cluster.set_link(bare, delay_ms=1)


def test_cleanup_stale_removes_a_crashed_runs_namespaces_only(cluster):
    cid = secrets.token_hex(3)
    ns = f"scmm-{cid}-x"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (STATE_DIR / f"{cid}.json").write_text(json.dumps({"pid": dead.pid, "start": "0", "subnet": 0}))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    (ETC_NETNS / ns).mkdir(parents=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])
    deadline = time.monotonic() + 10
    while not ns_pids([ns])[ns] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ns_pids([ns])[ns] == [orphan.pid]

    assert cleanup_stale() == [ns]
    assert orphan.wait(timeout=10) == -9
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not (ETC_NETNS / ns).exists() and not (STATE_DIR / f"{cid}.json").exists()
    assert all(pids for pids in ns_pids([cluster.head.ns, cluster.hosts["svc"].ns]).values())  # ours: untouched


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def test_shutdown_leaves_no_namespace_and_no_process(cluster):
    namespaces = [h.ns for h in cluster.hosts.values()] + [cluster.switch_ns]
    before = {p: st for ps in ns_pids(namespaces).values() for p in ps if (st := _stat(p))}
    assert len(before) > 20  # Ray's daemons, moto, MLflow, the sinks

    t0 = time.monotonic()
    cluster.shutdown()
    print(f"shutdown took {time.monotonic() - t0:.1f} s")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert cluster.prefix not in listed
    assert not list(ETC_NETNS.glob(f"{cluster.prefix}*"))
    assert not (RAY_TMP / f"scmm-{cluster.id}").exists()
    assert not (STATE_DIR / f"{cluster.id}.json").exists()
    survivors = {p: st for p, (_, start) in before.items() if (st := _stat(p)) and st[1] == start and st[0] != "Z"}
    assert survivors == {}
    assert os.path.exists(cluster.root / "logs" / "head.ray.log")  # the logs stay for whoever debugs
