"""``scmm-atlas bench cluster`` (scmm_atlas/bench/cluster.py): the projection to 8 nodes x 8 GPUs as pure
functions, and one tiny run of the bench on a test cluster of network namespaces (slow, root only)."""

from __future__ import annotations

import argparse
import itertools
import math

import pytest

from scmm_atlas.bench import BENCHES
from scmm_atlas.bench.cluster import (
    GPU_STEP_MS,
    compute_ms,
    efficiency,
    min_batch,
    project,
    ring_allreduce_ms,
    totalvi_fixed_frac,
)

GRAD_BYTES = 9_626_032  # the bench model's gradients (2,406,508 float32 parameters)


def test_the_bench_is_registered():
    assert BENCHES["cluster"] == "scmm_atlas.bench.cluster"


def test_ring_allreduce_is_bandwidth_plus_latency_per_bucket():
    assert ring_allreduce_ms(GRAD_BYTES, 1, 10, 0.2, 2) == 0.0  # nothing to reduce with
    # 2 hosts: each sends and receives the whole gradient once (2(p-1)/p = 1): 12.5 MB at 10 Gbit/s = 10 ms
    assert ring_allreduce_ms(12_500_000, 2, 10, 0.0, 1) == pytest.approx(10.0)
    # 8 nodes: 2 x 7/8 of the bytes, and 2 x 7 one-way latencies per bucket
    assert ring_allreduce_ms(12_500_000, 8, 10, 0.0, 1) == pytest.approx(17.5)
    assert ring_allreduce_ms(0, 8, 10, 0.2, 2) == pytest.approx(2 * 7 * 0.2 * 2)
    assert ring_allreduce_ms(GRAD_BYTES, 8, 25, 0.05, 2) < ring_allreduce_ms(GRAD_BYTES, 8, 10, 0.2, 2)


def test_compute_scales_with_the_batch_less_its_fixed_share():
    assert compute_ms(256, 11.6) == pytest.approx(11.6)
    assert compute_ms(512, 11.6) == pytest.approx(23.2)
    assert compute_ms(512, 10.0, fixed_frac=0.5) == pytest.approx(15.0)
    assert compute_ms(0, 10.0, fixed_frac=1.0) == compute_ms(4096, 10.0, fixed_frac=1.0) == 10.0


def test_efficiency_without_and_with_overlap():
    assert efficiency(10.0, 0.0, overlap=False) == 1.0
    assert efficiency(10.0, 10.0, overlap=False) == pytest.approx(0.5)
    # 2/3 of a 30 ms step is backward: 20 ms of communication hide completely, 26 ms leave 6 exposed
    assert efficiency(30.0, 20.0, overlap=True) == pytest.approx(1.0)
    assert efficiency(30.0, 26.0, overlap=True) == pytest.approx(30 / 36)
    assert efficiency(30.0, 26.0, overlap=True) > efficiency(30.0, 26.0, overlap=False)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("fixed_frac", [0.0, 0.5])
def test_efficiency_rises_with_the_batch(overlap, fixed_frac):
    comm = ring_allreduce_ms(GRAD_BYTES, 8, 10, 0.2, 2)
    effs = [efficiency(compute_ms(b, GPU_STEP_MS, fixed_frac=fixed_frac), comm, overlap=overlap)
            for b in (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)]
    assert all(b >= a for a, b in itertools.pairwise(effs))
    assert effs[0] < effs[-1]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("gbit,latency", [(10, 0.2), (25, 0.05)])
def test_the_smallest_batch_for_80_percent_is_where_the_formula_says(overlap, gbit, latency):
    comm = ring_allreduce_ms(GRAD_BYTES, 8, gbit, latency, 2)
    b = min_batch(comm, GPU_STEP_MS, overlap=overlap)
    eff = [efficiency(compute_ms(x, GPU_STEP_MS), comm, overlap=overlap) for x in (b - 1, b)]
    assert eff[0] < 0.8 <= eff[1]
    # compute >= k x comm: k = 0.8 / 0.2 = 4 without overlap; 0.8 / (0.2 + 0.8 x 2/3) with backward hiding it
    k = 4.0 if not overlap else 0.8 / (0.2 + 0.8 * 2 / 3)
    assert b == math.ceil(k * comm / GPU_STEP_MS * 256 - 1e-9)


def test_min_batch_with_a_fixed_share_and_when_no_batch_suffices():
    comm = 20.0
    b = min_batch(comm, 10.0, overlap=False, fixed_frac=0.5)
    assert efficiency(compute_ms(b, 10.0, fixed_frac=0.5), comm, overlap=False) >= 0.8
    assert efficiency(compute_ms(b - 1, 10.0, fixed_frac=0.5), comm, overlap=False) < 0.8
    assert b > min_batch(comm, 10.0, overlap=False)  # less compute per cell: a larger batch needed
    assert min_batch(comm, 10.0, overlap=False, fixed_frac=1.0) is None  # the step never grows
    assert min_batch(0.001, 10.0, overlap=True) == 1  # nothing to hide


def test_projection_to_8_nodes():
    slow = project(gpu_step_ms=GPU_STEP_MS, grad_bytes=GRAD_BYTES, buckets=2, link_gbit=10, latency_ms=0.2)
    fast = project(gpu_step_ms=GPU_STEP_MS, grad_bytes=GRAD_BYTES, buckets=2, link_gbit=25, latency_ms=0.05)
    assert slow["gpus"] == 64 and slow["grad_mb_per_step"] == pytest.approx(GRAD_BYTES / 2**20)
    assert slow["allreduce_ms_per_step"] == pytest.approx(ring_allreduce_ms(GRAD_BYTES, 8, 10, 0.2, 2))
    for p in (slow, fast):
        assert 0 < p["efficiency"] <= p["efficiency_overlap"] <= 1
        assert p["comm_frac"] == pytest.approx(1 - p["efficiency"])
        assert p["hides_under_backward"] == (p["allreduce_ms_per_step"] <= 2 / 3 * p["gpu_step_ms"])
        assert p["cells_per_s"] == pytest.approx(64 * 256 / (p["gpu_step_ms"] + p["allreduce_ms_per_step"]) * 1e3)
        assert p["min_batch_eff80_overlap"] <= p["min_batch_eff80"]
        at = project(gpu_step_ms=GPU_STEP_MS, grad_bytes=GRAD_BYTES, buckets=2, link_gbit=p["link_gbit"],
                     latency_ms=p["latency_ms"], batch=p["min_batch_eff80"])
        assert at["efficiency"] >= 0.8
    assert fast["min_batch_eff80"] < slow["min_batch_eff80"]
    assert fast["efficiency"] > slow["efficiency"]
    more = project(gpu_step_ms=GPU_STEP_MS, grad_bytes=GRAD_BYTES, buckets=2, link_gbit=10, latency_ms=0.2, nodes=16)
    assert more["allreduce_ms_per_step"] > slow["allreduce_ms_per_step"]


def test_the_fixed_share_of_an_affine_step():
    def rate(b):  # t(b) = 8 ms + 0.01 ms per cell: 8 of 10.56 ms fixed at 256
        return b / (8.0 + 0.01 * b)

    assert totalvi_fixed_frac(((256, rate(256)), (1024, rate(1024)))) == pytest.approx(8 / 10.56)
    assert 0 < totalvi_fixed_frac() < 1  # GPU_ANCHORS.md's totalVI on the H100


@pytest.mark.slow
def test_bench_runs_on_a_test_cluster(tmp_path):
    from scmm_atlas.bench.cluster import run
    from scmm_atlas.bench.step import atlas_model
    from scmm_atlas.bench.testcluster import unavailable_reason

    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    systems = ["1 host", "2 hosts", "2 hosts 10gbit"]
    args = argparse.Namespace(steps=3, batch=32, warmup=2, cluster_systems=systems, gpu_step_ms=None, genes=None,
                              workdir=str(tmp_path), json=None)
    rows = run(args)
    measured = {r["system"]: r for r in rows if not r["system"].startswith("projection")}
    assert list(measured) == systems
    params = sum(p.numel() for p in atlas_model().parameters() if p.requires_grad)
    for r in measured.values():
        for key in ("system", "hosts", "cells_per_s", "allreduce_ms_per_step", "grad_mb_per_step", "comm_frac",
                    "step_ms", "nosync_ms", "link", "batch", "delay_ms_target", "delay_ms_emulated",
                    "allreduce_ms_modelled"):
            assert key in r, key
        assert r["step_ms"] > 0 and r["nosync_ms"] > 0 and r["cells_per_s"] > 0
        assert r["grad_mb_per_step"] == pytest.approx(params * 4 / 2**20)
        assert r["gloo_ifname"] == "eth0"  # the host's link, never loopback
    one, two, shaped = measured["1 host"], measured["2 hosts"], measured["2 hosts 10gbit"]
    assert one["allreduce_ms_per_step"] == 0 and one["comm_frac"] == 0 and one["hosts"] == 1
    assert two["allreduce_ms_per_step"] > 0 and two["buckets"] >= 1 and two["workers_on"] == "head,w1"
    assert shaped["allreduce_ms_per_step"] > 0 and shaped["link"].startswith("10gbit")
    assert shaped["delay_ms_target"] == 0.2
    if shaped["delay_ms_emulated"] == 0:  # no sch_netem: the delay's cost is added by the model
        assert shaped["allreduce_ms_modelled"] == pytest.approx(
            shaped["allreduce_ms_per_step"] + 2 * 0.2 * shaped["buckets"])
    proj = [r for r in rows if r["system"].startswith("projection")]
    assert len(proj) == 2 and all(r["min_batch_eff80"] >= r["min_batch_eff80_overlap"] >= 1 for r in proj)
    assert all(0 <= r["monitor_cpu_frac"] < 0.05 for r in measured.values())
