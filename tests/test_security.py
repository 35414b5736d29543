"""Security: a local Ray's dashboard and job server on loopback only, weights loaded as plain tensors,
and names that become paths (versions, results entries, workdirs) unable to escape their folder."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_planted_stores

from scmm_atlas.errors import InputError
from scmm_atlas.infer.trained import load_trained
from scmm_atlas.pipeline.stages import StageRecords
from scmm_atlas.store import StoreError, open_store
from scmm_atlas.store.results import ResultSpec, begin, open_results
from scmm_atlas.store.results.zarr_format import write_index
from scmm_atlas.train import state as ckpt

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, socket, urllib.error, urllib.request
    import psutil, ray
    from scmm_atlas.data.ray_session import ensure_ray
    ensure_ray(None, object_store_bytes=128 << 20)
    node_ip = ray.util.get_node_ip_address()
    host, port = ray._private.worker.get_dashboard_url().rsplit(":", 1)
    port = int(port)
    listening = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                        if c.status == "LISTEN" and c.laddr.port == port})
    try:  # without Ray's token: refused
        anonymous = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=10).status
    except urllib.error.HTTPError as exc:
        anonymous = exc.code
    from ray.job_submission import JobSubmissionClient
    jobs = len(JobSubmissionClient(f"http://127.0.0.1:{port}").list_jobs())  # with it: the job server answers
    reachable = True
    try:
        socket.create_connection((node_ip, port), timeout=2).close()
    except OSError:
        reachable = False
    print(json.dumps({"host": host, "listening": listening, "anonymous": anonymous, "jobs": jobs,
                      "node_ip": node_ip, "reachable_on_node_ip": reachable}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_a_local_ray_dashboard_and_job_server_listen_on_loopback_only(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SCMM_ATLAS_RAY_DASHBOARD"}  # the default: dashboard on
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["host"] == "127.0.0.1" and found["listening"] == ["127.0.0.1"], found  # dashboard + job API
    assert found["anonymous"] == 401 and found["jobs"] >= 1  # this driver is listed as a job
    if found["node_ip"] != "127.0.0.1":
        assert not found["reachable_on_node_ip"], found


def _torch_loads(root: Path) -> list[tuple[str, int, bool]]:
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((str(path.relative_to(REPO)), node.lineno, safe))
    return calls


def test_every_torch_load_uses_weights_only() -> None:
    calls = _torch_loads(REPO / "scmm_atlas")
    assert len(calls) >= 3  # checkpoints (2), a saved model (model/saved.py: inference and the pyfunc flavour)
    assert [c for c in calls if not c[2]] == []


class _Payload:
    """Unpickling this runs code: what a tampered checkpoint would carry."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_tampered_checkpoints_and_models_are_refused_without_running_code(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "state": {}, "payload": _Payload()}, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        ckpt.load(tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"model": {}, "features": {}}))
    torch.save({"w": _Payload()}, folder / "weights.pt")
    with pytest.raises(InputError, match=r"weights\.pt: weights: not plain tensors, refused"):
        load_trained(str(folder))
    assert not (tmp_path / "pwned").exists()


def test_names_that_become_paths_cannot_escape(tmp_path) -> None:
    store = str(make_planted_stores(tmp_path, n=120, backends=("zarr",))["zarr"])
    with open_store(store) as s:  # a tampered index naming a folder outside results/
        write_index(s, {"published": [{"entry": "../../escape", "version": "1", "n_cells": 1, "model_uri": "m",
                                       "time": "t", "pairs": [], "library_size": None}]})
        with pytest.raises(StoreError, match=re.escape("scmm_results/entry: '../../escape' is not a valid name")):
            open_results(s)
        write_index(s, {})
        spec = ResultSpec(version="../x", model_uri="m", latent_dim=2, modalities=["RNA"], pairs=[],
                          target_features={}, library_size=None)
        with pytest.raises(StoreError, match=r"version: '../x' is not a valid name"):
            begin(s, spec)  # an --version label becomes the entry's folder name
        assert os.listdir(Path(store) / "results") == ["zarr.json"]  # no entry folder was made
    with pytest.raises(StoreError, match=re.escape("'..' segments are not allowed")):
        StageRecords(str(tmp_path / "work" / ".." / ".." / "etc"))


LISTENERS = textwrap.dedent("""
    import json, os, time
    import grpc, psutil, ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    from scmm_atlas.data.ray_session import ensure_ray
    ensure_ray(None, object_store_bytes=128 << 20)
    time.sleep(3)  # agents and exporters come up after init returns
    procs = {p.pid: p for p in psutil.Process().children(recursive=True)} | {os.getpid(): psutil.Process()}
    found = []
    for c in psutil.net_connections("inet"):
        if c.status == "LISTEN" and c.pid in procs:
            p = procs[c.pid]
            what = "driver" if c.pid == os.getpid() else p.name()
            if what == "python":  # the dashboard head or the autoscaler monitor
                what = "monitor" if any("monitor.py" in a for a in p.cmdline()) else "dashboard"
            found.append([what, c.laddr.ip, c.laddr.port])
    gcs_port = int(ray._private.worker.global_worker.node.gcs_address.rsplit(":", 1)[1])
    off_loopback = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family == 2 and not a.address.startswith("127.")]
    code = None
    if off_loopback:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(f"{off_loopback[0]}:{gcs_port}"))
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
    print(json.dumps({"listening": found, "anonymous_gcs": code}))
    ray.shutdown()
""")
# What the README's "Network exposure" table lists off loopback (process -> fixed port, or None: random)
DOCUMENTED = {"gcs_server": None, "raylet": None, "driver": None, "ray::IDLE": None, "ray::DashboardAgent": None,
              "ray::RuntimeEnvAgent": None, "monitor": 44217, "dashboard": 44227}


@pytest.mark.slow
def test_a_local_ray_listens_off_loopback_only_where_the_readme_says() -> None:
    done = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    exposed = [(what, ip, port) for what, ip, port in found["listening"] if not ip.startswith("127.")]
    for what, ip, port in exposed:
        assert what in DOCUMENTED, f"{what} listens on {ip}:{port}: not in the README's table"
        assert DOCUMENTED[what] in (None, port), (what, ip, port)
    assert ("dashboard", "127.0.0.1", 8265) in [tuple(x) for x in found["listening"]]
    assert not any(what == "ray::DashboardAgent" and port not in (52365,) and ip == "0.0.0.0"
                   for what, ip, port in exposed), exposed  # the metrics agent's exporter is off
    readme = (REPO / "README.md").read_text()
    for what in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "44217", "44227"):
        assert what in readme
    if found["anonymous_gcs"] is not None:  # a machine with a non-loopback address: the token is required
        assert found["anonymous_gcs"] == "UNAUTHENTICATED", found
