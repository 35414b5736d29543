"""``scmm-atlas bench cluster``: what DDP's gradient all-reduce costs a training step across hosts.

On a :class:`~.testcluster.TestCluster` (2 Ray hosts, each a network namespace with 2 logical CPUs,
joined by veth links through a bridge), one ``ray job`` submitted from the client host runs a
``TorchTrainer`` of 2 workers, one per host (1.5 CPUs each: two cannot share a host; 1 torch thread;
gloo on the interface of each host's Ray address, as training sets it up), DDP over the bench model
(``bench step``'s and ``bench train``'s: 4,000 genes + 100 proteins, 2 x 256 hidden, latent 20,
batch 256 per worker). The job goes through one phase per system; before each, rank 0 says it is
ready (a file on the disk the hosts share) and the bench shapes the links:

- ``1 host``: rank 0 steps alone, without DDP (what one worker runs); rank 1 waits;
- ``2 hosts``: both, gloo over the hosts' links, unshaped;
- ``2 hosts 10gbit`` and ``2 hosts 25gbit``: each host's link rate-limited (``tbf``) both ways.
  The issue's one-way delays (0.2 and 0.05 ms) are emulated with ``netem`` where the kernel has it
  (half on each host's link: a packet crosses two); otherwise only the rate is, and the delay's
  cost is modelled (``allreduce_ms_modelled``).

Each worker draws one dense synthetic batch once (the loader is not measured here: ``bench loader``,
``bench train``) and times ``--steps`` rounds after a warm-up, each round (interleaved, so that load
from outside hits all three alike):

- a DDP step: forward, backward (DDP all-reduces its gradient buckets during backward), Adam;
- the same step under ``no_sync()``: the compute without communication;
- the all-reduce alone: ``dist.all_reduce`` of tensors of DDP's bucket sizes (after its rebuild),
  after a barrier.

Per system: ``step_ms`` (DDP, the slower rank), ``nosync_ms``, ``allreduce_ms_per_step``,
``grad_mb_per_step`` (all gradients, MiB), ``comm_frac`` = (DDP - no-sync) / DDP (what communication
adds to a step), ``overlap`` = 1 - (DDP - no-sync) / all-reduce alone (how much of it DDP's bucketed
overlap hides), ``cells_per_s`` = hosts x batch / DDP step. Medians over the rounds.

All "hosts" share this machine's cores: the 2-host rows' compute competes for the same CPUs, so
their cells/s against the 1-host row is not a scaling measurement. The communication times are what
this bench measures. Then :func:`project` carries the gradient size and DDP's bucket count to 8
nodes x 8 GPUs (a model, not a measurement).

Needs root on Linux (network namespaces). ``--json FILE`` rows: the four systems, then one
``projection ...`` row per inter-node link.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import format_table

GENES, PROTEINS, BATCH, STEPS, WARMUP = 4_000, 100, 256, 30, 5
CPUS_PER_HOST, CPUS_PER_WORKER = 2, 1.5  # 2 workers of 1.5 CPUs cannot share a host: one lands on each
# (name, hosts, rate, one-way host-to-host delay the issue asked for, ms)
SYSTEMS = (("1 host", 1, None, 0.0), ("2 hosts", 2, None, 0.0),
           ("2 hosts 10gbit", 2, "10gbit", 0.2), ("2 hosts 25gbit", 2, "25gbit", 0.05))
# the projection: 8 nodes x 8 GPUs, inter-node links (Gbit/s, one-way latency ms)
NODES, GPUS_PER_NODE, LINKS = 8, 8, ((10.0, 0.2), (25.0, 0.05))
# README "Training at scale": one worker of the bench model on an H100, 22,125 cells/s at batch 256
# (../shared/reference/GPU_ANCHORS.md has peers only, nothing of ours)
GPU_CELLS_PER_S, GPU_REF_BATCH = 22_125, 256
GPU_STEP_MS = 1e3 * GPU_REF_BATCH / GPU_CELLS_PER_S
# GPU_ANCHORS.md, totalVI on the H100: 8,136 cells/s at batch 256, 24,242 at 1,024: an affine step time
# t(b) = a + c b through both says what share of a batch-256 step a GPU spends whatever the batch
TOTALVI_H100 = ((256, 8_136), (1_024, 24_242))
BACKWARD_FRAC, TARGET_EFFICIENCY = 2 / 3, 0.8
MARK = "SCMM_BENCH_CLUSTER "  # the driver's result line in the job's logs


# ---- the projection (pure)


def ring_allreduce_ms(grad_bytes: float, participants: int, link_gbit: float, latency_ms: float,
                      buckets: int) -> float:
    """A ring all-reduce of ``grad_bytes`` over ``participants`` links of ``link_gbit``: each sends and
    receives 2(p-1)/p of the bytes, and each bucket pays 2(p-1) messages of one-way latency."""
    p = participants
    if p <= 1:
        return 0.0
    return 2 * (p - 1) / p * grad_bytes * 8 / (link_gbit * 1e9) * 1e3 + 2 * (p - 1) * latency_ms * buckets


def compute_ms(batch: float, gpu_step_ms: float, *, ref_batch: int = GPU_REF_BATCH, fixed_frac: float = 0.0) -> float:
    """A GPU's step time at ``batch``: ``gpu_step_ms`` at ``ref_batch``, of which ``fixed_frac`` does not
    depend on the batch (0: proportional to the batch)."""
    return gpu_step_ms * (fixed_frac + (1 - fixed_frac) * batch / ref_batch)


def efficiency(compute: float, comm: float, *, overlap: bool, backward_frac: float = BACKWARD_FRAC) -> float:
    """Scaling efficiency: compute / (compute + the communication a step waits for). With ``overlap``,
    communication hides under backward (``backward_frac`` of the step) and only the rest is waited for."""
    exposed = max(0.0, comm - backward_frac * compute) if overlap else comm
    return compute / (compute + exposed) if compute + exposed > 0 else 1.0


def min_batch(comm: float, gpu_step_ms: float, *, overlap: bool, target: float = TARGET_EFFICIENCY,
              ref_batch: int = GPU_REF_BATCH, fixed_frac: float = 0.0, backward_frac: float = BACKWARD_FRAC,
              limit: int = 1 << 24) -> int | None:
    """The smallest per-GPU batch whose efficiency is >= ``target`` (None if none up to ``limit``).
    Efficiency rises with the compute, so the bound is compute >= k x comm, k = t/(1-t) without overlap
    and t/(1 - t + t f) with it (f the backward's share); that compute's batch, rounded up, checked."""
    k = target / (1 - target) if not overlap else target / (1 - target + target * backward_frac)
    per_batch = gpu_step_ms * (1 - fixed_frac) / ref_batch
    need = k * comm - gpu_step_ms * fixed_frac
    if need <= 0:
        b = 1
    elif per_batch <= 0:
        return None
    else:
        b = max(1, math.ceil(need / per_batch))

    def ok(batch: int) -> bool:
        c = compute_ms(batch, gpu_step_ms, ref_batch=ref_batch, fixed_frac=fixed_frac)
        return efficiency(c, comm, overlap=overlap, backward_frac=backward_frac) >= target

    while b > 1 and ok(b - 1):  # float rounding at the boundary
        b -= 1
    while not ok(b):
        b += 1
        if b > limit:
            return None
    return b


def project(*, gpu_step_ms: float, grad_bytes: float, buckets: int, link_gbit: float, latency_ms: float,
            nodes: int = NODES, gpus_per_node: int = GPUS_PER_NODE, batch: int = GPU_REF_BATCH,
            ref_batch: int = GPU_REF_BATCH, fixed_frac: float = 0.0, target: float = TARGET_EFFICIENCY,
            backward_frac: float = BACKWARD_FRAC) -> dict[str, Any]:
    """DDP on ``nodes`` x ``gpus_per_node`` GPUs, each at ``gpu_step_ms`` per step of ``ref_batch`` cells:
    gradients reduced within a node over NVLink (neglected: ~0.04 ms for 10 MB) and across nodes by a
    ring over the nodes' ``link_gbit`` links (:func:`ring_allreduce_ms`, one link per node carrying the
    whole gradient). Efficiency at ``batch``, without overlap and with communication hidden under
    backward, and the smallest per-GPU batch that keeps each >= ``target``."""
    comm = ring_allreduce_ms(grad_bytes, nodes, link_gbit, latency_ms, buckets)
    comp = compute_ms(batch, gpu_step_ms, ref_batch=ref_batch, fixed_frac=fixed_frac)
    kw = {"target": target, "ref_batch": ref_batch, "fixed_frac": fixed_frac, "backward_frac": backward_frac}
    eff, eff_ov = efficiency(comp, comm, overlap=False), efficiency(comp, comm, overlap=True,
                                                                       backward_frac=backward_frac)
    gpus = nodes * gpus_per_node
    return {"nodes": nodes, "gpus": gpus, "link_gbit": link_gbit, "latency_ms": latency_ms, "batch": batch,
            "gpu_step_ms": comp, "allreduce_ms_per_step": comm, "grad_mb_per_step": grad_bytes / 2**20,
            "buckets": buckets, "comm_frac": comm / (comp + comm),
            "hides_under_backward": comm <= backward_frac * comp,
            "efficiency": eff, "efficiency_overlap": eff_ov,
            "cells_per_s": gpus * batch / (comp + comm) * 1e3,
            "cells_per_s_overlap": gpus * batch / (comp + max(0.0, comm - backward_frac * comp)) * 1e3,
            "min_batch_eff80": min_batch(comm, gpu_step_ms, overlap=False, **kw),
            "min_batch_eff80_overlap": min_batch(comm, gpu_step_ms, overlap=True, **kw)}


def totalvi_fixed_frac(anchors: tuple[tuple[int, int], tuple[int, int]] = TOTALVI_H100,
                       ref_batch: int = GPU_REF_BATCH) -> float:
    """The share of a ``ref_batch`` step that an affine fit t(b) = a + c b through two (batch, cells/s)
    anchors puts in ``a``."""
    (b1, r1), (b2, r2) = anchors
    t1, t2 = b1 / r1, b2 / r2
    c = (t2 - t1) / (b2 - b1)
    a = t1 - c * b1
    return a / (a + c * ref_batch)


# ---- in the cluster: the driver (on the head, under `ray job submit`) and the Ray Train workers


def _wait_for(path: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"no {path} after {timeout_s:.0f} s")
        time.sleep(0.05)


def _worker(spec: dict) -> None:
    """Both workers, through every phase: rank 0 says a phase is ready (a file in ``spec["sync"]``, on the
    disk the test cluster's hosts share), the bench shapes the links and answers, then they measure."""
    import socket

    import ray.train
    import ray.train.torch
    import ray.util
    import torch
    import torch.distributed as dist

    from ..model import moe_elbo
    from ..model.training import adam
    from .step import atlas_model, synthetic_batch

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    sync = Path(spec["sync"])

    class Loss(torch.nn.Module):  # one forward per step, as the training loop's LossModule
        def __init__(self) -> None:
            super().__init__()
            self.model = atlas_model(spec["genes"], spec["proteins"])

        def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
            return moe_elbo(self.model, x, beta=1.0).loss

    torch.manual_seed(0)
    wrapped = ray.train.torch.prepare_model(Loss())  # DDP with its default buckets (25 MiB cap): world > 1
    if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError(f"expected DDP over {world} workers, got {type(wrapped).__name__}")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = adam(params, lr=1e-4)
    x = synthetic_batch(spec["batch"], spec["genes"], spec["proteins"], seed=rank)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)

    def step(module: torch.nn.Module, sync_grads: bool = True) -> float:
        t0 = time.perf_counter()
        with contextlib.nullcontext() if sync_grads else wrapped.no_sync():
            (module(x) / spec["batch"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    buffers: list[torch.Tensor] = []

    def allreduce() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for b in buffers:
            dist.all_reduce(b)
        return time.perf_counter() - t0

    bucket_bytes: list[int] = []
    phases = []
    for i, name in enumerate(spec["phases"]):
        if rank == 0:
            Path(sync, f"ready-{i}").write_text(name)
            _wait_for(sync / f"go-{i}", 300)
        dist.barrier()
        times: dict[str, list[float]] = {"step": [], "nosync": [], "allreduce": []}
        wall0, cpu0 = time.perf_counter(), time.process_time()
        # rank 0 alone, without DDP (what prepare_model gives one worker); rank 1 waits. First of the phases:
        # DDP's gradient hooks stay idle until a forward through DDP has armed them
        if name == "1 host":
            if rank == 0:
                for j in range(spec["warmup"] + spec["steps"]):
                    dt = step(wrapped.module)
                    if j >= spec["warmup"]:
                        times["step"].append(dt)
        else:
            for j in range(spec["warmup"] + spec["steps"]):
                if not bucket_bytes and j == spec["warmup"]:  # DDP rebuilt its buckets in its 2nd step
                    logged = wrapped._get_ddp_logging_data()  # private, stable since torch 1.9
                    sizes = str(logged.get("rebuilt_bucket_sizes") or logged.get("bucket_sizes") or "")
                    bucket_bytes = [int(s) for s in sizes.split(",") if s.strip()] or [grad_bytes]
                    buffers = [torch.zeros(n // 4) for n in bucket_bytes]
                got = (step(wrapped), step(wrapped, sync_grads=False), allreduce() if buffers else 0.0)
                if j >= spec["warmup"]:
                    for k, v in zip(times, got, strict=True):
                        times[k].append(v)
        wall = time.perf_counter() - wall0
        mine = {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                "cpu_frac": (time.process_time() - cpu0) / wall,
                **{k: 1e3 * statistics.median(v) for k, v in times.items() if v}}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        active = [r for r in everyone if "step" in r]
        phases.append({
            "name": name, "ranks": active, "wall_s": wall,
            "step_ms": max(r["step"] for r in active),  # DDP ranks wait for each other: the slower rank's
            "nosync_ms": max(r.get("nosync", r["step"]) for r in active),
            # after a barrier each: the rank that waited least timed the transfer itself
            "allreduce_ms": min(r["allreduce"] for r in active) if name != "1 host" else 0.0})
    metrics = {"phases": phases, "world": world, "grad_bytes": grad_bytes, "bucket_bytes": bucket_bytes,
               "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}
    with tempfile.TemporaryDirectory() as d:  # Ray Train keeps the metrics of a report with a checkpoint
        Path(d, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report({"phases": len(phases)},
                         checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def _driver(spec: dict) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..data.ray_session import ensure_ray

    ensure_ray(os.environ.get("RAY_ADDRESS") or "auto")  # as training joins a cluster: DDP on each host's interface
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _worker, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": CPUS_PER_WORKER},
                                     placement_strategy="SPREAD"),
        run_config=RunConfig(name=f"bench_cluster_{os.getpid()}", storage_path=spec["storage"],
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        metrics = json.loads(Path(d, "metrics.json").read_text())
    metrics["fit_s"] = time.perf_counter() - t0
    return metrics


# ---- the bench (root namespace): the cluster, one job, the links shaped between its phases


def _shape(cluster: Any, rate: str | None, delay_ms: float) -> float:
    """Every Ray host's link at ``rate`` (None: unshaped), with the delay where netem exists; returns the
    one-way host-to-host delay emulated (a packet crosses two host links: half on each)."""
    emulate = bool(rate and delay_ms and cluster.netem_available())
    for h in ("head", "w1"):
        cluster.clear_link(h)
        if rate:
            cluster.set_link(h, rate=rate, delay_ms=delay_ms / 2 if emulate else None)
    return delay_ms if emulate else 0.0


def _measure(cluster: Any, spec: dict, systems: list[tuple[str, int, str | None, float]]) -> tuple[dict, dict]:
    """Submit the job; shape the links as each phase asks; its metrics and, per system, the link set-up,
    the 1-minute load average and the bench's own CPU use while it waited (CPUs per wall second)."""
    sync = Path(spec["sync"])
    job = cluster.submit(["python", "-m", __name__, "--driver", json.dumps(spec)], wait=False)
    setup: dict[str, dict] = {}
    t0, cpu0 = time.perf_counter(), _own_cpu()
    for i, (name, hosts, rate, delay) in enumerate(systems):
        last_check = time.monotonic()
        while not (sync / f"ready-{i}").exists():
            time.sleep(0.1)
            if time.monotonic() - last_check > 15:  # a job that died never asks
                last_check = time.monotonic()
                if (status := cluster.job_status(job.job_id)) not in ("PENDING", "RUNNING"):
                    raise RuntimeError(f"bench job {status}:\n{cluster.job_logs(job.job_id)[-4000:]}")
        setup[name] = {"delay_ms_emulated": _shape(cluster, rate, delay), "load_1m": os.getloadavg()[0]}
        (sync / f"go-{i}").write_text("")
        print(f"  {name}: measuring ({rate or ('unshaped' if hosts > 1 else 'one worker alone')})", flush=True)
    result = cluster.wait_job(job.job_id, timeout_s=600)
    monitor = (_own_cpu() - cpu0) / (time.perf_counter() - t0)
    _shape(cluster, None, 0.0)
    lines = [ln for ln in result.logs.splitlines() if ln.startswith(MARK)]
    if result.status != "SUCCEEDED" or not lines:
        raise RuntimeError(f"bench job {result.status}:\n{result.logs[-4000:]}")
    metrics = json.loads(lines[-1][len(MARK):])
    metrics["job_s"], metrics["monitor_cpu_frac"] = time.perf_counter() - t0, monitor
    return metrics, setup


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children (the probes, `ray job submit`)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _rows(metrics: dict, setup: dict, systems: list[tuple[str, int, str | None, float]], batch: int) -> list[dict]:
    from .testcluster import _rate_bits

    buckets, grad_bytes = len(metrics["bucket_bytes"]), metrics["grad_bytes"]
    phases = {p["name"]: p for p in metrics["phases"]}
    rows = []
    for name, hosts, rate, delay in systems:
        ph, emulated = phases[name], setup[name]["delay_ms_emulated"]
        step, nosync, ar = ph["step_ms"], ph["nosync_ms"], ph["allreduce_ms"]
        added = step - nosync
        hosts_seen = sorted(r["host"] for r in ph["ranks"])
        if len(set(hosts_seen)) != hosts:
            raise RuntimeError(f"{name}: workers on {hosts_seen}, wanted one on each of {hosts} hosts")
        rows.append({
            "system": name, "hosts": hosts, "workers_on": ",".join(hosts_seen),
            "link": "-" if hosts == 1 else "veth, unshaped" if not rate else f"{rate} netem" if emulated
            else f"{rate} tbf",
            "batch": batch, "step_ms": step, "nosync_ms": nosync, "cells_per_s": hosts * batch / step * 1e3,
            "allreduce_ms_per_step": ar,
            "allreduce_gbit_effective": 2 * (hosts - 1) / hosts * grad_bytes * 8 / (ar * 1e6) if ar > 0 else None,
            "delay_ms_target": delay, "delay_ms_emulated": emulated,
            "allreduce_ms_modelled": ar + (2 * (hosts - 1) * (delay - emulated) * buckets if hosts > 1 else 0.0),
            "allreduce_ms_formula": ring_allreduce_ms(grad_bytes, hosts, _rate_bits(rate) / 1e9, delay, buckets)
            if rate else None,
            "grad_mb_per_step": grad_bytes / 2**20, "buckets": buckets if hosts > 1 else 0,
            "bucket_mb": "+".join(f"{b / 2**20:.2f}" for b in metrics["bucket_bytes"]) if hosts > 1 else "-",
            "comm_frac": added / step if hosts > 1 else 0.0,
            "overlap": 1 - added / ar if hosts > 1 and ar > 0 else None,
            "worker_cpu_frac": statistics.mean(r["cpu_frac"] for r in ph["ranks"]), "phase_s": ph["wall_s"],
            "load_1m": setup[name]["load_1m"], "gloo_ifname": metrics.get("gloo_ifname"),
            "monitor_cpu_frac": metrics["monitor_cpu_frac"]})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    from .testcluster import TestCluster, unavailable_reason

    if (reason := unavailable_reason()) is not None:
        raise SystemExit(f"bench cluster {reason}")
    steps = getattr(args, "steps", None) or STEPS
    batch = getattr(args, "batch", None) or BATCH
    gpu_step_ms = getattr(args, "gpu_step_ms", None) or GPU_STEP_MS
    genes = getattr(args, "genes", None) or GENES
    warmup = max(2, getattr(args, "warmup", None) or WARMUP)  # DDP's buckets are known after its 2nd step
    only = getattr(args, "cluster_systems", None)  # tests: some of SYSTEMS' names
    systems = [s for s in SYSTEMS if only is None or s[0] in only]
    print(f"2 Ray hosts (network namespaces) x {CPUS_PER_HOST} logical CPUs on this machine's {os.cpu_count()}; "
          f"2 Ray Train workers, one per host ({CPUS_PER_WORKER} CPUs, 1 torch thread each, gloo; for '1 host' "
          f"one of them steps alone, without DDP); model: {genes:,} genes + {PROTEINS} proteins, 2 x 256 hidden, "
          f"latent 20; batch {batch} per worker, {steps} rounds after {warmup} warm-up per system; synthetic dense "
          f"counts drawn once per worker (the loader is not measured); load average before start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    with (tempfile.TemporaryDirectory(prefix="scmm-bench-cluster-", dir=getattr(args, "workdir", None)) as tmp,
          TestCluster(Path(tmp), hosts=2, cpus_per_host=CPUS_PER_HOST) as cluster):
        netem = cluster.netem_available()
        print(f"test cluster up in {cluster.timings['start']:.0f} s; sch_netem "
              f"{'available: delays emulated' if netem else 'missing: rates emulated (tbf), delays modelled'}",
              flush=True)
        spec = {"genes": genes, "proteins": PROTEINS, "batch": batch, "steps": steps, "warmup": warmup,
                "storage": str(Path(tmp, "ray")), "sync": str(Path(tmp, "sync")), "phases": [s[0] for s in systems]}
        Path(spec["sync"]).mkdir()
        metrics, setup = _measure(cluster, spec, systems)
    wall = time.perf_counter() - t0
    rows = _rows(metrics, setup, systems, batch)
    rows += _projection(rows, gpu_step_ms)
    print(f"job {metrics['job_s']:.0f} s (Ray Train fit {metrics['fit_s']:.0f} s)")
    _report(rows, wall, gpu_step_ms)
    return rows


def _projection(rows: list[dict], gpu_step_ms: float) -> list[dict]:
    ref = next(r for r in rows if r["hosts"] > 1) if any(r["hosts"] > 1 for r in rows) else rows[0]
    grad_bytes, buckets = ref["grad_mb_per_step"] * 2**20, max(ref["buckets"], 1)
    out = []
    for gbit, lat in LINKS:
        p = project(gpu_step_ms=gpu_step_ms, grad_bytes=grad_bytes, buckets=buckets, link_gbit=gbit, latency_ms=lat)
        p1024 = project(gpu_step_ms=gpu_step_ms, grad_bytes=grad_bytes, buckets=buckets, link_gbit=gbit,
                        latency_ms=lat, batch=1024)
        flat = project(gpu_step_ms=gpu_step_ms, grad_bytes=grad_bytes, buckets=buckets, link_gbit=gbit,
                       latency_ms=lat, fixed_frac=totalvi_fixed_frac())
        out.append({"system": f"projection {NODES}x{GPUS_PER_NODE} GPUs {gbit:g}gbit+{lat:g}ms",
                    "hosts": NODES, **p, "efficiency_b1024": p1024["efficiency"],
                    "efficiency_overlap_b1024": p1024["efficiency_overlap"],
                    "min_batch_eff80_totalvi_shape": flat["min_batch_eff80"],
                    "min_batch_eff80_overlap_totalvi_shape": flat["min_batch_eff80_overlap"]})
    return out


def _report(rows: list[dict], wall: float, gpu_step_ms: float) -> None:
    measured = [r for r in rows if not r["system"].startswith("projection")]
    proj = [r for r in rows if r["system"].startswith("projection")]
    print()
    print(format_table(measured, ["system", "link", "step_ms", "nosync_ms", "cells_per_s", "allreduce_ms_per_step",
                                  "allreduce_gbit_effective", "allreduce_ms_modelled", "allreduce_ms_formula",
                                  "grad_mb_per_step", "buckets", "comm_frac", "overlap", "load_1m"]))
    print(f"\nwall time {wall:.0f} s (cluster start, 1 job of {len(measured)} phases, shutdown); medians over rounds; "
          f"the bench's own CPU while it waited (file polls, job-server probes, tc): "
          f"{measured[0]['monitor_cpu_frac']:.4f} CPUs.")
    print("MEASURED (one worker per namespace host, on this machine): step_ms (DDP: forward + backward with its "
          "bucketed all-reduce + Adam; the slower rank), nosync_ms (the same under no_sync(): no communication), "
          "allreduce_ms_per_step (dist.all_reduce of tensors of DDP's bucket sizes alone, after a barrier), "
          "allreduce_gbit_effective (2(p-1)/p x gradient bits / that time), comm_frac = (step - nosync) / step, "
          "overlap = 1 - (step - nosync) / allreduce (the share DDP hides; noisy, as step - nosync is a difference "
          "of two medians). Link rates are real (tbf on each host's link, both ways).")
    if any(r["delay_ms_target"] and not r["delay_ms_emulated"] for r in measured):
        print("MODELLED: allreduce_ms_modelled = the measured all-reduce + 2(p-1) x one-way delay x DDP buckets "
              "(p = 2 hosts) for the delay this kernel cannot emulate (no sch_netem; delay_ms_emulated 0): "
              + ", ".join(f"{r['delay_ms_target']:g} ms ({r['system']})" for r in measured if r["delay_ms_target"])
              + ". allreduce_ms_formula = the ring formula at the row's link rate and delay (what a link-bound "
              "all-reduce would take), beside the measurement.")
    two = [r for r in measured if r["hosts"] > 1]
    free = next((r for r in two if r["link"] == "veth, unshaped"), None)
    if two:
        shaped = [r for r in two if r is not free]
        binds = [r["system"] for r in shaped if free and _rate_gbit(r) < free["allreduce_gbit_effective"]]
        spread = max((100 * abs(r["allreduce_ms_per_step"] / free["allreduce_ms_per_step"] - 1) for r in shaped
                      if free), default=0.0)
        hidden = statistics.mean(r["overlap"] or 0 for r in two)
        added = statistics.mean(r["step_ms"] - r["nosync_ms"] for r in two)
        bare = statistics.mean(r["allreduce_ms_per_step"] for r in two)
        print(f"FINDING: DDP all-reduces {two[0]['grad_mb_per_step']:.2f} MiB in {two[0]['buckets']} buckets "
              f"({two[0]['bucket_mb']} MiB) per step; "
              + (f"unshaped it takes {free['allreduce_ms_per_step']:.1f} ms ({free['allreduce_gbit_effective']:.1f} "
                 f"Gbit/s effective: gloo and the veth pair run on the same 2 cores), so "
                 + (f"the {', '.join(binds)} cap binds; " if binds else
                    f"the {' and '.join(r['link'].split()[0] for r in shaped)} caps do not bind here (the shaped "
                    f"rows' all-reduce within {spread:.0f} % of it); ") if free else "")
              + f"communication adds {100 * statistics.mean(r['comm_frac'] for r in two):.0f} % to a step on "
              + (f"average, and DDP hides {100 * hidden:.0f} % of the bare all-reduce under backward." if hidden >= 0.1
                 else f"average: {added:.1f} ms against {bare:.1f} ms for the bare all-reduce, so DDP hides none of "
                 "it (on CPU, its bucket copies and gloo's reduction compete with backward for the same cores)."))
    print(f"CAVEAT: the machine has {os.cpu_count()} logical CPUs shared by both hosts (and Ray's, S3's and "
          "MLflow's daemons, and whatever else runs: load_1m is the 1-minute load average at each phase's start): "
          "the 2-host rows' compute competes for the same cores, so cells_per_s of 2 hosts vs 1 host is not a "
          "scaling measurement; the communication times are what this bench measures.")
    print(f"\nPROJECTION (modelled, not measured): {NODES} nodes x {GPUS_PER_NODE} GPUs, one GPU step "
          f"{gpu_step_ms:.1f} ms at batch {GPU_REF_BATCH} (README: one H100, {GPU_CELLS_PER_S:,} cells/s; "
          "GPU_ANCHORS.md has no figure of ours), the measured gradient size and DDP bucket count; within a node "
          "NVLink (neglected), across nodes a ring over one link per node: 2(p-1)/p x bytes / bandwidth + 2(p-1) x "
          "one-way latency per bucket, p = nodes. GPU compute proportional to the batch; backward = 2/3 of a step.")
    shown = [{**r, "hides_under_backward": "yes" if r["hides_under_backward"] else "no"} for r in proj]
    print(format_table(shown, ["system", "batch", "gpu_step_ms", "allreduce_ms_per_step", "comm_frac",
                               "hides_under_backward", "efficiency", "efficiency_overlap", "cells_per_s",
                               "cells_per_s_overlap", "efficiency_b1024", "min_batch_eff80",
                               "min_batch_eff80_overlap"]))
    phi = totalvi_fixed_frac()
    print("efficiency: without overlap; _overlap: all-reduce hidden under backward (only the excess waited for); "
          "comm_frac: the all-reduce's share of a step without overlap. min_batch_eff80: the smallest per-GPU batch "
          "with efficiency >= 0.8, with a step time proportional to the batch. A GPU's step is partly fixed cost: "
          f"if ours scaled like totalVI's on the H100 ({100 * phi:.0f} % of a batch-{GPU_REF_BATCH} step fixed, "
          "GPU_ANCHORS.md, batch 256 -> 1,024), it would take " + "; ".join(
              f"{r['link_gbit']:g} Gbit/s: {_n(r['min_batch_eff80_totalvi_shape'])} without overlap, "
              f"{_n(r['min_batch_eff80_overlap_totalvi_shape'])} with" for r in proj) + ".")


def _rate_gbit(row: dict) -> float:
    from .testcluster import _rate_bits

    return _rate_bits(row["link"].split()[0]) / 1e9


def _n(b: int | None) -> str:
    return "none" if b is None else "any" if b == 1 else f"{b:,}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scmm_atlas.bench.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"timed rounds per system (default {STEPS})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"cells per worker and step (default {BATCH})")
    parser.add_argument("--gpu-step-ms", type=float, default=GPU_STEP_MS,
                        help=f"one GPU's step at batch {GPU_REF_BATCH}, for the projection (default {GPU_STEP_MS:.1f})")
    parser.add_argument("--genes", type=int, default=GENES, help=f"genes of the model (default {GENES})")
    parser.add_argument("--json", metavar="FILE", help="also write {'rows': [...]} to FILE")
    parser.add_argument("--workdir", metavar="DIR", help="where the test cluster's files go (default: a temp dir)")
    parser.add_argument("--driver", help=argparse.SUPPRESS)  # internal: the job's entry point in the cluster
    ns = parser.parse_args(argv)
    if ns.driver:
        print(MARK + json.dumps(_driver(json.loads(ns.driver)), default=str), flush=True)
        return
    from . import run_bench

    ns.name = "cluster"
    run_bench(ns)


if __name__ == "__main__":
    main(sys.argv[1:])
