"""A multi-host test cluster on one Linux machine (root): Ray head and workers, S3, MLflow.

Each host is a network namespace with its own IPv4 address on a private /24, joined by a bridge that
lives in a dedicated "switch" namespace, so no packet can leave the machine: the root namespace has
no interface on the cluster's network. Every host has a default route through its link, so code that
finds "its" address by UDP-connecting to a public IP (Ray, PyTorch, gloo) gets the host's address,
and a packet really sent there dies in the switch. Each process also runs in its own UTS namespace
named after its host, whose name resolves to 127.0.1.1 through the host's ``/etc/hosts`` (as on
stock Debian images): the condition under which naive multi-host code binds to loopback.

Hosts: ``svc`` runs a moto S3 server and ``mlflow server`` (SQLite runs, artifacts proxied to the
moto bucket ``mlflow``); ``head`` runs the Ray head with its dashboard and job server; ``w1``, ``w2``
... run Ray workers; ``client`` runs nothing and is where jobs are submitted from. The Ray cluster
uses token authentication (a token file under ``root``, ``RAY_AUTH_MODE=token``). Hosts' processes
see a clean environment: the venv's ``bin`` first on PATH, the cluster's S3/MLflow variables, the
token, and whatever ``env`` the cluster or the call adds; nothing from the caller's environment.
The calling process stays in the root namespace and cannot reach any cluster address: it acts
through processes in hosts (:meth:`TestCluster.run`, :meth:`~TestCluster.python`, the probes at the
bottom of this file, which use the standard library only so that each starts in ~0.1 s).
:meth:`TestCluster.start` takes ~17-22 s on 2 cores (head + 1 worker): mostly Ray's dashboard
processes and the imports of moto and MLflow, all started at once.

Hosts stop by namespace: every process in it gets SIGTERM, then SIGKILL (no ``ray stop``, which
would kill every Ray on the machine). :func:`cleanup_stale` removes what a crashed run left behind
(namespaces whose owner process is gone). This kernel may lack ``sch_netem``: :meth:`set_link`
then limits rate with ``tbf`` and cannot add delay.

    python -m scmm_atlas.bench.testcluster up /tmp/cluster --hosts 3   # until Ctrl-C
    python -m scmm_atlas.bench.testcluster cleanup                     # stale namespaces
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

MODULE = "scmm_atlas.bench.testcluster"  # run in hosts for its probes (also when this file is __main__)
PREFIX = "scmm-"  # every namespace this module makes is scmm-<6 hex>-<host>
NS_RE = re.compile(r"^scmm-([0-9a-f]{6})-[a-z0-9-]+$")
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
STATE_DIR = Path("/run/scmm-testcluster")  # owner records: which live process owns which cluster
# Ray's own idle overheads, off where every host shares the same few cores: the log monitor's scan of its
# log folder every 0.1 s (every 0.5 s then, Ray's back-off above 1,000 files) and Ray Train's per-run
# preemption watcher (a process per run, for cloud spot-instance notices; none come here).
QUIET_RAY = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
RAY_TMP = Path("/tmp")  # Ray's temp dirs: short, for its Unix sockets' 107-byte path limit
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
S3_PORT, MLFLOW_PORT, GCS_PORT, DASHBOARD_PORT = 9000, 5000, 6379, 8265
HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,12}$")  # the switch's end of a link is v-<name>: 15 bytes at most
UTS_WRAPPER = 'hostname "$0" && exec "$@"'
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """Something of the test cluster did not come up or could not be changed (the message says what)."""


@dataclass
class Host:
    """One "machine": a network namespace with one link to the switch."""

    name: str
    ns: str
    ip: str
    veth: str  # the switch's end of the link: cut_link sets it down
    role: str = ""  # svc, client, head, worker, or "" for a bare host
    ray_tmp: Path | None = None
    down: bool = False  # killed (kill_host) and not started again: Ray may not have noticed yet


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: str
    logs: str


def unavailable_reason() -> str | None:
    """Why a test cluster cannot run here (not root on Linux, no working ``ip netns``), or None. The other
    tools (unshare, tc, hostname) come with every Debian system that has iproute2."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (network namespaces)"
    if shutil.which("ip", path=SYSTEM_PATH) is None:
        return "needs `ip netns` (iproute2)"
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, env={"PATH": SYSTEM_PATH})
    return None if done.returncode == 0 else f"`ip netns` does not work: {done.stderr.strip()}"


def _sh(argv: Sequence[str], *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A system command in the root namespace (ip, tc), its failure a ClusterError with its stderr."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env={"PATH": SYSTEM_PATH})
    if check and done.returncode != 0:
        raise ClusterError(f"`{shlex.join(argv)}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done


def _ns_key(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(NETNS_DIR / ns)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _proc_ns_key(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:  # gone, or a zombie
        return None
    return st.st_dev, st.st_ino


def ns_pids(namespaces: Iterable[str]) -> dict[str, list[int]]:
    """The processes in each named network namespace (what ``ip netns pids`` reads), in one pass over /proc."""
    keys = {k: ns for ns in namespaces if (k := _ns_key(ns)) is not None}
    out: dict[str, list[int]] = {ns: [] for ns in keys.values()}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (key := _proc_ns_key(int(entry.name))) in keys:
            out[keys[key]].append(int(entry.name))
    return out


def _signal_in_ns(pid: int, key: tuple[int, int], sig: int) -> None:
    """Signal ``pid`` only if it is (still) in the namespace: a pidfd pins the process, so a pid reused
    by a process outside between the scan and the signal is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _proc_ns_key(pid) == key:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def kill_namespaces(namespaces: Iterable[str], *, grace_s: float = 1.0, timeout_s: float = 15.0) -> None:
    """End every process in the namespaces: SIGTERM (none if ``grace_s`` is 0), SIGKILL after ``grace_s``;
    processes started meanwhile are signalled too. Fails naming the survivors after ``timeout_s`` more.
    The grace is short: the raylet, GCS and runtime-env agent drain for many seconds after a SIGTERM,
    and a test cluster has nothing to save."""
    keys = {ns: k for ns in namespaces if (k := _ns_key(ns)) is not None}
    start, termed = time.monotonic(), set()
    while True:
        alive = {ns: pids for ns, pids in ns_pids(keys).items() if pids}
        if not alive:
            return
        elapsed = time.monotonic() - start
        if elapsed > grace_s + timeout_s:
            raise ClusterError(f"processes survive SIGKILL in {alive}")
        for ns, pids in alive.items():
            for pid in pids:
                if elapsed >= grace_s:
                    _signal_in_ns(pid, keys[ns], signal.SIGKILL)
                elif pid not in termed:
                    _signal_in_ns(pid, keys[ns], signal.SIGTERM)
                    termed.add(pid)
        time.sleep(0.05)


def _delete_namespaces(namespaces: Iterable[str]) -> None:
    for ns in namespaces:
        if (NETNS_DIR / ns).exists():
            _sh(["ip", "netns", "delete", ns])
        shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def _start_time(pid: int) -> str | None:
    """The running process's start time in clock ticks (with the pid, it names one process for good);
    None if it is gone or a zombie (killed, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _owners() -> dict[str, dict[str, Any]]:
    """Cluster id -> owner record, for the clusters whose owner process is alive."""
    out = {}
    for path in STATE_DIR.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(path.read_text())
            if _start_time(rec["pid"]) == rec["start"]:
                out[path.stem] = rec
    return out


def cleanup_stale() -> list[str]:
    """Remove what crashed runs left: namespaces ``scmm-<id>-*`` (and their processes, /etc/netns
    folders, Ray temp dirs, owner records) of every cluster whose owner process is gone. Live
    clusters, also other processes', are left alone. Returns the namespaces removed."""
    live = _owners()
    listed = _sh(["ip", "netns", "list"]).stdout.split() + [p.name for p in ETC_NETNS.glob(f"{PREFIX}*")]
    ours = {n: m.group(1) for n in listed if (m := NS_RE.match(n))}
    stale = sorted(n for n, cid in ours.items() if cid not in live)
    kill_namespaces(stale, grace_s=0)
    _delete_namespaces(stale)
    for cid in ({ours[n] for n in stale} | {p.stem for p in STATE_DIR.glob("*.json")}) - set(live):
        shutil.rmtree(RAY_TMP / f"{PREFIX}{cid}", ignore_errors=True)
        (STATE_DIR / f"{cid}.json").unlink(missing_ok=True)
    return stale


def _rate_bits(rate: str) -> int:
    """'10gbit' -> 10_000_000_000 (tc's decimal units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)bit", rate.strip().lower())
    if not m:
        raise ValueError(f"rate must look like 100mbit or 10gbit, got {rate!r}")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"--- {path}: (none)"
    return f"--- {path} (last {len(text)} lines):\n" + "\n".join(text)


class TestCluster:
    """N hosts on one bridge: ``svc`` (S3, MLflow), ``client``, ``head`` and ``hosts - 1`` Ray workers.

    ``root`` holds the logs (``root/logs``), the MLflow database and the Ray token; Ray's own temp
    dirs are under /tmp/scmm-<id>/ (Unix socket paths must be short) and go at shutdown. Use it as
    a context manager, or call :meth:`start` and :meth:`shutdown` (also registered with atexit)."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, *, hosts: int = 2, cpus_per_host: int = 2, head_cpus: int | None = None,
                 object_store_mb: int = 300, python: str = sys.executable, env: dict[str, str] | None = None,
                 start_timeout_s: float = 180) -> None:
        if hosts < 1:
            raise ValueError("hosts counts the Ray nodes (head included): at least 1")
        self.root = Path(root).resolve()
        self.n_ray_hosts, self.cpus, self.object_store_mb = hosts, cpus_per_host, object_store_mb
        self.head_cpus = cpus_per_host if head_cpus is None else head_cpus
        self.bin = Path(python).parent
        self.interpreter, self.start_timeout_s = python, start_timeout_s
        self.id = secrets.token_hex(3)
        self.prefix = f"{PREFIX}{self.id}-"
        self.switch_ns = f"{self.prefix}sw"
        self.subnet = self._pick_subnet()
        self.token_path = self.root / "ray-auth-token"
        self.hosts: dict[str, Host] = {}
        self.timings: dict[str, float] = {}
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._next_ip = 10
        self._netem: bool | None = None
        self._claimed = False
        self.env = self._cluster_env() | (env or {})

    def _pick_subnet(self) -> int:
        """X of 10.213.X.0/24, unused by the live clusters (theirs are isolated anyway: this keeps logs clear)."""
        used = {rec.get("subnet") for rec in _owners().values()}
        return random.choice([x for x in range(1, 255) if x not in used] or [1])

    def _addr(self, last: int) -> str:
        return f"10.213.{self.subnet}.{last}"

    def _cluster_env(self) -> dict[str, str]:
        s3 = f"http://{self._addr(2)}:{S3_PORT}"
        return {"AWS_ACCESS_KEY_ID": "scmm-cluster-key", "AWS_SECRET_ACCESS_KEY": f"scmm-cluster-{self.id}",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3,
                "MLFLOW_TRACKING_URI": f"http://{self._addr(2)}:{MLFLOW_PORT}",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0", **QUIET_RAY}

    # ---- endpoints

    @property
    def head(self) -> Host:
        return self.hosts["head"]

    @property
    def s3_endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def ray_address(self) -> str:
        """The GCS address workers and drivers join (``ray.init(address=...)`` from a Ray host)."""
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and job server (``ray job submit --address``, the state API)."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def worker_names(self) -> list[str]:
        return [f"w{i}" for i in range(1, self.n_ray_hosts)]

    # ---- lifecycle

    def start(self) -> TestCluster:
        """Namespaces and bridge, then the services, the Ray head and the workers at once; returns once
        every node is alive and S3, MLflow and the job server answer (``timings`` says how long)."""
        t0 = time.monotonic()
        cleanup_stale()
        self._claim()
        try:
            self._make_switch()
            for name in ("svc", "client", "head", *self.worker_names):
                self.add_host(name)
            self.hosts["client"].role = "client"
            self._start_services()
            self._start_ray("head", self.worker_names)
            self.wait_nodes(alive=[self.hosts[n].ip for n in ("head", *self.worker_names)], timeout_s=60)
            self.timings["ray"] = time.monotonic() - t0
            self._wait_services()
        except BaseException:
            self.shutdown()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def _claim(self) -> None:
        """The owner record (so that cleanup_stale spares this live cluster), the token, atexit."""
        for folder in (STATE_DIR, self.root / "logs", RAY_TMP / f"{PREFIX}{self.id}"):
            folder.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / f"{self.id}.json").write_text(json.dumps(
            {"pid": os.getpid(), "start": _start_time(os.getpid()), "subnet": self.subnet, "root": str(self.root)}))
        self.token_path.unlink(missing_ok=True)  # a new token, readable by root only
        self.token_path.touch(mode=0o600)
        self.token_path.write_text(secrets.token_hex(32))
        self._claimed = True
        atexit.register(self.shutdown)

    def shutdown(self) -> None:
        """Kill every process of every namespace of this cluster, delete the namespaces, their
        /etc/netns folders and Ray's temp dirs. Idempotent."""
        if not self._claimed:
            return
        namespaces = [*(h.ns for h in self.hosts.values()), self.switch_ns]
        kill_namespaces(namespaces)  # if this fails, all stays claimed: atexit or cleanup_stale tries again
        self._reap()
        _delete_namespaces(namespaces)
        shutil.rmtree(RAY_TMP / f"{PREFIX}{self.id}", ignore_errors=True)
        (STATE_DIR / f"{self.id}.json").unlink(missing_ok=True)
        atexit.unregister(self.shutdown)
        self._claimed = False
        self.hosts.clear()

    def _reap(self, host: str | None = None) -> None:
        """Wait for our own children (services, popen) that are gone: no zombie stays behind."""
        keep = []
        for name, proc in self._procs:
            if host is None or name == host:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            if proc.returncode is None:
                keep.append((name, proc))
        self._procs = keep

    def __enter__(self) -> TestCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    # ---- hosts and links

    def _make_switch(self) -> None:
        ns = self.switch_ns
        _sh(["ip", "netns", "add", ns])
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                    ["addr", "add", f"{self._addr(1)}/24", "dev", "br0"], ["link", "set", "br0", "up"]):
            _sh(["ip", "-n", ns, *cmd])

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge with its own address, host name, /etc/hosts and resolv.conf
        (a local resolver that answers "refused" at once: no DNS timeouts). Runs nothing."""
        if not HOST_RE.match(name) or name in self.hosts or name == "sw":  # sw: the switch's namespace
            raise ValueError(f"host name {name!r} is taken, reserved, or not [a-z][a-z0-9-]{{0,12}}")
        fixed = {"svc": 2, "client": 3}
        last = fixed.get(name) or self._next_ip
        self._next_ip += name not in fixed
        host = self.hosts[name] = Host(name, f"{self.prefix}{name}", self._addr(last), f"v-{name}")  # shutdown's
        etc = ETC_NETNS / host.ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n\n"
                                   "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        _sh(["ip", "netns", "add", host.ns])
        _sh(["ip", "-n", self.switch_ns, "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
             "netns", host.ns])
        _sh(["ip", "-n", self.switch_ns, "link", "set", host.veth, "master", "br0", "up"])
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{host.ip}/24", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["route", "add", "default", "via", self._addr(1)]):
            _sh(["ip", "-n", host.ns, *cmd])
        return host

    def host(self, ref: str | Host) -> Host:
        name = ref.name if isinstance(ref, Host) else ref
        if name not in self.hosts:
            raise KeyError(f"no host {name!r} (hosts: {sorted(self.hosts)})")
        return self.hosts[name]

    def cut_link(self, name: str) -> None:
        """Unplug the host's cable: its switch port goes down (the host keeps running)."""
        _sh(["ip", "-n", self.switch_ns, "link", "set", self.host(name).veth, "down"])

    def restore_link(self, name: str) -> None:
        _sh(["ip", "-n", self.switch_ns, "link", "set", self.host(name).veth, "up"])

    def netem_available(self) -> bool:
        """Whether the kernel has sch_netem (delay emulation); tried once on the switch's loopback."""
        if self._netem is None:
            added = _sh(["tc", "-n", self.switch_ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                        check=False)
            self._netem = added.returncode == 0
            if self._netem:
                _sh(["tc", "-n", self.switch_ns, "qdisc", "del", "dev", "lo", "root"])
        return self._netem

    def set_link(self, name: str, rate: str | None = "10gbit", delay_ms: float | None = None) -> None:
        """Shape the host's link both ways: ``rate`` (tbf, or netem's rate with a delay) and ``delay_ms``
        added in each direction (the round trip gains twice that). Delay needs sch_netem, which some
        kernels (this project's Firecracker VMs) lack: then a delay is a ClusterError, a rate works."""
        if rate is None and delay_ms is None:
            raise ValueError("give a rate, a delay or both")
        if delay_ms is not None:
            if not self.netem_available():
                raise ClusterError("this kernel has no sch_netem: a link delay cannot be emulated (rate can)")
            qdisc = ["netem", "delay", f"{delay_ms}ms", *(["rate", rate] if rate else [])]
        else:
            assert rate is not None
            burst = max(_rate_bits(rate) // 8 // 100, 16 * 1024)  # 10 ms of traffic
            qdisc = ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
        host = self.host(name)
        for ns, dev in ((host.ns, "eth0"), (self.switch_ns, host.veth)):
            _sh(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *qdisc])

    def clear_link(self, name: str) -> None:
        """Undo set_link (nothing to do on a link never shaped)."""
        host = self.host(name)
        for ns, dev in ((host.ns, "eth0"), (self.switch_ns, host.veth)):
            shown = _sh(["tc", "-n", ns, "qdisc", "show", "dev", dev, "root"]).stdout.split()
            if "tbf" in shown or "netem" in shown:
                _sh(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"])

    # ---- running things in a host

    def command(self, host: str | Host, argv: Sequence[str | Path]) -> list[str]:
        """``argv`` as run in the host: its network namespace (and /etc/hosts), its own host name."""
        h = self.host(host)
        return ["ip", "netns", "exec", h.ns, "unshare", "--uts", "sh", "-c", UTS_WRAPPER, h.name, *map(str, argv)]

    def host_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """What every process in a host sees: a clean environment, the cluster's variables, ``env``."""
        return {"PATH": f"{self.bin}:{SYSTEM_PATH}", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
                **self.env, **(env or {})}

    def run(self, host: str | Host, argv: Sequence[str | Path], *, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run to the end in the host (output captured as text); ``check`` raises with the output's tail."""
        done = subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout,
                              env=self.host_env(env), cwd=self.root, input=input)
        if check and done.returncode != 0:
            raise ClusterError(f"{shlex.join(map(str, argv))} on {self.host(host).name} failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done

    def python(self, host: str | Host, code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> str:
        """Run Python ``code`` (the venv's interpreter) in the host; its stdout."""
        return self.run(host, [self.interpreter, "-c", code, *args], env=env, timeout=timeout).stdout

    def popen(self, host: str | Host, argv: Sequence[str | Path], *, env: dict[str, str] | None = None,
              log: Path | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start in the host (stdout and stderr to ``log`` if given); killed with the host."""
        out = open(log, "ab") if log else None  # noqa: SIM115 (the child keeps its own copy)
        try:
            proc = subprocess.Popen(self.command(host, argv), env=self.host_env(env), cwd=self.root,
                                    stdout=kwargs.pop("stdout", out), stderr=kwargs.pop("stderr", out), **kwargs)
        finally:
            if out:
                out.close()
        self._procs.append((self.host(host).name, proc))
        return proc

    def _probe(self, host: str, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One of this module's probes (bottom of the file) run in the host: its JSON answer."""
        done = self.run(host, [self.interpreter, "-m", MODULE, "probe", op, json.dumps(args)], check=False,
                        timeout=timeout + 30)
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise ClusterError(f"probe {op} on {host} failed ({done.returncode}): {done.stderr[-3000:]}") from None

    def reachable(self, src: str, ip: str, port: int, timeout_s: float = 2.0) -> bool:
        """Whether a TCP connection from host ``src`` to ``ip:port`` is accepted within ``timeout_s``."""
        return bool(self._probe(src, "connect", {"ip": ip, "port": port, "timeout": timeout_s}, timeout_s)["ok"])

    def wait_ready(self, host: str, checks: list[dict[str, Any]], *, timeout_s: float,
                   logs: Iterable[Path] = ()) -> None:
        """Poll ``checks`` (probe "wait": {"name", "url" | "tcp", ...}) from the host until all pass;
        fail naming what did not come up, with the tails of ``logs``."""
        answer = self._probe(host, "wait", {"checks": checks, "timeout": timeout_s}, timeout_s)
        if answer["missing"]:
            raise ClusterError(f"not up after {timeout_s:.0f} s: {answer['missing']}\n"
                               + "\n".join(_tail(p) for p in logs))

    # ---- services

    def _start_services(self) -> None:
        svc = self.hosts["svc"]
        self.popen(svc, [self.interpreter, "-m", "moto.server", "-H", svc.ip, "-p", str(S3_PORT)],
                   log=self.root / "logs" / "svc.moto.log")
        self.popen(svc, [self.bin / "mlflow", "server", "--host", svc.ip, "--port", str(MLFLOW_PORT),
                         "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                         "--artifacts-destination", "s3://mlflow/artifacts", "--serve-artifacts",
                         "--allowed-hosts", f"{svc.ip}:{MLFLOW_PORT},localhost:*,127.0.0.1:*"],
                   # no job runner: its consumer processes (MLflow's GenAI jobs, unused here) cost CPU
                   env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log=self.root / "logs" / "svc.mlflow.log")
        svc.role, svc.down = "svc", False

    def _wait_services(self) -> None:
        """S3 answers and has the MLflow bucket (an unsigned PUT: moto checks no signature), MLflow is healthy."""
        checks = [{"name": "moto S3 bucket mlflow", "url": f"{self.s3_endpoint}/mlflow", "method": "PUT"},
                  {"name": "mlflow server", "url": f"{self.mlflow_uri}/health"}]
        self.wait_ready("svc", checks, timeout_s=self.start_timeout_s,
                        logs=[self.root / "logs" / "svc.moto.log", self.root / "logs" / "svc.mlflow.log"])

    # ---- Ray

    def _ray_logs(self, host: Host) -> list[Path]:
        logs = self.root / "logs"
        session = (host.ray_tmp or Path("/nonexistent")) / "session_latest" / "logs"
        return [logs / f"{host.name}.ray.log", session / "raylet.out", session / "gcs_server.out",
                session / "dashboard.log"]

    def _ray_launch(self, name: str, head: bool) -> subprocess.Popen[bytes]:
        """``ray start`` in the host, not waited for. No --block: it exits once the node is up (the
        readiness signal) and its daemons stay in the namespace, which is how they are stopped. A
        worker may be launched with its head: it retries the GCS for up to 60 s."""
        host = self.host(name)
        host.ray_tmp = RAY_TMP / f"{PREFIX}{self.id}" / name
        argv = [self.bin / "ray", "start", f"--node-ip-address={host.ip}",
                f"--num-cpus={self.head_cpus if head else self.cpus}",
                f"--object-store-memory={self.object_store_mb << 20}", f"--temp-dir={host.ray_tmp}",
                "--disable-usage-stats"]
        argv += (["--head", f"--port={GCS_PORT}", f"--dashboard-host={host.ip}", f"--dashboard-port={DASHBOARD_PORT}",
                  "--include-dashboard=true"] if head else [f"--address={self.ray_address}"])
        host.role, host.down = "head" if head else "worker", False
        return self.popen(host, argv, env={"RAY_gcs_server_port_wait_time_s": "60"},
                          log=self.root / "logs" / f"{name}.ray.log")

    def _ray_started(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Wait for a launched ``ray start``; fail with its log and the node's Ray logs."""
        try:
            rc: int | None = proc.wait(timeout=self.start_timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        self._procs = [(n, p) for n, p in self._procs if p is not proc or rc is None]
        if rc != 0:
            host = self.host(name)
            raise ClusterError(f"`ray start` on {name} ({host.ip}) {'timed out' if rc is None else f'exited {rc}'}\n"
                               + "\n".join(_tail(p) for p in self._ray_logs(host)))

    def _start_ray(self, head: str | None, workers: Sequence[str]) -> None:
        """The head (if given) and the workers at once; returns when all started and the job server answers."""
        procs = [(n, self._ray_launch(n, n == head)) for n in ([head] if head else []) + list(workers)]
        for name, proc in procs:
            self._ray_started(name, proc)
        if head:
            self.wait_ready("client", [{"name": f"Ray job server on {head}", "auth": True,
                                        "url": f"{self.dashboard_url}/api/version"}],
                            timeout_s=self.start_timeout_s, logs=self._ray_logs(self.host(head)))

    def start_head(self, name: str) -> None:
        """A Ray head on the host (GCS, dashboard and job server on its address); returns once the job
        server answers an authenticated request from the client host."""
        self._start_ray(name, [])

    def start_worker(self, name: str) -> None:
        """A Ray worker node on the host, joined to the head."""
        self._start_ray(None, [name])

    def kill_host(self, name: str) -> None:
        """The machine dies: SIGKILL to everything in its namespace (the kernel closes its sockets, so
        peers see resets; cut_link first for a machine that vanishes silently). The namespace stays."""
        kill_namespaces([self.host(name).ns], grace_s=0)
        self.host(name).down = True
        self._reap(name)

    def restart_host(self, name: str) -> None:
        """Start the host's services again after kill_host: a worker joins the head; a head is a new
        cluster (no GCS fault tolerance), so every worker's Ray is restarted to join it; svc starts a
        fresh S3 (moto keeps its data in memory: it is gone) and MLflow (its SQLite runs survive)."""
        host = self.host(name)
        self.kill_host(name)
        if host.role == "worker":
            self.start_worker(name)
        elif host.role == "head":
            workers = [h.name for h in self.hosts.values() if h.role == "worker"]
            for w in workers:
                self.kill_host(w)
            self._start_ray(name, workers)
        elif host.role == "svc":
            self._start_services()
            self._wait_services()
        else:
            raise ClusterError(f"{name} runs nothing to restart")

    def nodes(self) -> list[dict[str, Any]]:
        """Ray's nodes as the head's GCS sees them (the state API, from the client host), dead ones too."""
        return self._probe("client", "nodes", {"url": self.dashboard_url}, 60)["nodes"]

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n["state"] == "ALIVE"]

    def wait_nodes(self, *, alive: Iterable[str] = (), dead: Iterable[str] = (), timeout_s: float = 60) -> float:
        """Wait until a node of each IP in ``alive`` is alive and none of ``dead`` is; the seconds it took."""
        args = {"url": self.dashboard_url, "alive": list(alive), "dead": list(dead), "timeout": timeout_s}
        answer = self._probe("client", "wait_nodes", args, timeout_s)
        if not answer["ok"]:
            raise ClusterError(f"Ray nodes not as expected after {timeout_s:.0f} s (alive {args['alive']}, dead "
                               f"{args['dead']}): {answer['nodes']}")
        return answer["elapsed"]

    # ---- jobs

    def submit(self, entrypoint: Sequence[str], *, runtime_env: dict[str, Any] | None = None, wait: bool = True,
               timeout_s: float = 300, host: str = "client") -> JobResult:
        """``ray job submit`` from ``host`` to the head's job server; with ``wait``, returns when the job
        has ended (its status and logs; a job still running after ``timeout_s`` is a ClusterError)."""
        job_id = f"scmm-{secrets.token_hex(6)}"
        argv = [self.bin / "ray", "job", "submit", f"--address={self.dashboard_url}", f"--submission-id={job_id}",
                "--no-wait", *(["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []), "--",
                *entrypoint]
        self.run(host, argv, timeout=120)
        if not wait:
            return JobResult(job_id, self.job_status(job_id), "")
        return self.wait_job(job_id, timeout_s=timeout_s)

    def _job(self, op: str, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
        return self._probe("client", "job", {"url": self.dashboard_url, "op": op, "id": job_id,
                                             "timeout": timeout_s}, timeout_s)

    def job_status(self, job_id: str) -> str:
        return self._job("status", job_id)["status"]

    def job_logs(self, job_id: str) -> str:
        return self._job("logs", job_id)["logs"]

    def stop_job(self, job_id: str) -> None:
        self._job("stop", job_id)

    def wait_job(self, job_id: str, *, timeout_s: float = 300) -> JobResult:
        answer = self._job("wait", job_id, timeout_s)
        if answer["status"] not in TERMINAL_JOB_STATES:
            raise ClusterError(f"job {job_id} still {answer['status']} after {timeout_s:.0f} s:\n"
                               f"{answer['logs'][-3000:]}")
        return JobResult(job_id, answer["status"], answer["logs"])


# ---- probes: run inside a host by TestCluster._probe (`python -m ... probe OP JSON`), answer one JSON line.
# Standard library only (the job server's and the state API's REST routes): each starts in ~0.1 s, not the
# seconds an `import ray` takes on a busy 2-core machine.


def _http(url: str, *, method: str = "GET", auth: bool = False, timeout: float = 5) -> Any:
    """The JSON body of a 2xx answer (None if not JSON); raises otherwise. ``auth`` sends the Ray token."""
    headers = {}
    if auth:
        headers["Authorization"] = "Bearer " + Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    req = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    with contextlib.suppress(ValueError):
        return json.loads(body)
    return None


def _probe_wait(args: dict[str, Any]) -> dict[str, Any]:
    import socket

    missing = {c["name"]: "not tried" for c in args["checks"]}
    end = time.monotonic() + args["timeout"]
    while missing and time.monotonic() < end:
        for check in args["checks"]:
            if check["name"] in missing:
                try:
                    if "tcp" in check:
                        socket.create_connection(tuple(check["tcp"]), timeout=1).close()
                    else:
                        _http(check["url"], method=check.get("method", "GET"), auth=check.get("auth", False))
                    del missing[check["name"]]
                except OSError as exc:  # URLError and HTTPError are OSErrors
                    missing[check["name"]] = repr(exc)
        time.sleep(0.2 if missing else 0)
    return {"missing": missing}


def _probe_connect(args: dict[str, Any]) -> dict[str, Any]:
    import socket

    t0 = time.monotonic()
    try:
        socket.create_connection((args["ip"], args["port"]), timeout=args["timeout"]).close()
    except OSError as exc:
        return {"ok": False, "error": repr(exc), "elapsed": time.monotonic() - t0}
    return {"ok": True, "error": "", "elapsed": time.monotonic() - t0}


def _list_nodes(url: str) -> list[dict[str, Any]]:
    return _http(f"{url}/api/v0/nodes?limit=10000&detail=0", auth=True, timeout=10)["data"]["result"]["result"]


def _probe_nodes(args: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": _list_nodes(args["url"])}


def _probe_wait_nodes(args: dict[str, Any]) -> dict[str, Any]:
    t0, nodes = time.monotonic(), []
    while time.monotonic() - t0 < args["timeout"]:
        try:
            nodes = _list_nodes(args["url"])
        except (OSError, KeyError, TypeError) as exc:  # the head not (yet, or no longer) answering: keep polling
            nodes = [{"error": repr(exc)}]
        up = {n.get("node_ip") for n in nodes if n.get("state") == "ALIVE"}
        if set(args["alive"]) <= up and not set(args["dead"]) & up:
            return {"ok": True, "elapsed": time.monotonic() - t0, "nodes": nodes}
        time.sleep(0.5)
    return {"ok": False, "elapsed": time.monotonic() - t0, "nodes": nodes}


def _probe_job(args: dict[str, Any]) -> dict[str, Any]:
    job = f"{args['url']}/api/jobs/{args['id']}"
    if args["op"] == "stop":
        return {"stopped": _http(f"{job}/stop", method="POST", auth=True)["stopped"]}
    end = time.monotonic() + (args["timeout"] if args["op"] == "wait" else 0)
    status = _http(job, auth=True)["status"]
    while status not in TERMINAL_JOB_STATES and time.monotonic() < end:
        time.sleep(0.5)
        status = _http(job, auth=True)["status"]
    logs = _http(f"{job}/logs", auth=True)["logs"] if args["op"] in ("logs", "wait") else ""
    return {"status": status, "logs": logs}


PROBES = {"wait": _probe_wait, "connect": _probe_connect, "nodes": _probe_nodes, "wait_nodes": _probe_wait_nodes,
          "job": _probe_job}


def _up(root: Path, hosts: int) -> None:
    """Start a cluster, print how to reach it, keep it until Ctrl-C."""
    cluster = TestCluster(root, hosts=hosts)
    try:
        cluster.start()
        print(f"started in {cluster.timings['start']:.1f} s; hosts:")
        for h in cluster.hosts.values():
            print(f"  {h.name:8s} {h.ip:15s} {h.role:7s} ip netns exec {h.ns} bash")
        print(f"S3 {cluster.s3_endpoint}  MLflow {cluster.mlflow_uri}  Ray {cluster.ray_address}  "
              f"jobs {cluster.dashboard_url}  token {cluster.token_path}\nCtrl-C stops it.", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up half-way
        cluster.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scmm_atlas.bench.testcluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster and keep it until Ctrl-C")
    up.add_argument("root", type=Path)
    up.add_argument("--hosts", type=int, default=2, help="Ray nodes, the head included")
    sub.add_parser("cleanup", help="remove the namespaces of crashed runs")
    probe = sub.add_parser("probe", help="(internal) a check run inside a host")
    probe.add_argument("op", choices=sorted(PROBES))
    probe.add_argument("args")
    ns = parser.parse_args(argv)
    if ns.cmd == "probe":
        print(json.dumps(PROBES[ns.op](json.loads(ns.args)), default=str))
    elif ns.cmd == "up":
        _up(ns.root, ns.hosts)
    else:
        print("\n".join(cleanup_stale()) or "nothing stale")


if __name__ == "__main__":
    main()
