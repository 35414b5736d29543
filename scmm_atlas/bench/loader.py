"""``scmm-atlas bench loader``: our loader (feeder actors) beside tiledbsoma-ml, scDataset and an in-memory CSR.

One generated dataset (default 200,000 cells x 2,000 genes, ~8 % nonzero) with cells stored sorted
by a 20-type label, as atlases are laid out, so that sequential reads are unmixed. It is ingested
into a TileDB-SOMA and a Zarr store and their training layouts are prepared (timed apart). Every
system then runs in its own subprocess and yields minibatches of 256 cells as dense float32 torch
tensors:

- ``scmm-atlas <backend> <N>w``: :class:`~scmm_atlas.data.loader.ShardLoader` inside N Ray Train
  workers (a local Ray with 2 CPUs and a 512 MiB object store), epoch after epoch;
- ``tiledbsoma-ml``: ``ExperimentDataset`` (shuffle on, batch 256) on the SOMA store, in-process;
- ``scdataset``: ``scDataset`` with block shuffling on the h5ad opened backed;
- ``in-memory csr``: the whole CSR in memory, random rows gathered and densified (the upper bound).

Per system: cells/s (median of 3 windows of ``WINDOW_S`` after ``WARMUP_S`` of warm-up; for N
workers the windows' rates are summed over workers), batch mixing (mean Shannon entropy of the
label within a batch, bits; uniform random ~ log2(20) = 4.32 minus small-sample bias ~ 3.92), peak
PSS summed over the process tree (Ray's raylet, GCS and workers included; :mod:`.monitor`), and the
time from asking for the first batch to having it (Ray already up, the loader warmed up).
``loader_mib`` is the peak minus the peak before the loader was created (Ray, its Train workers and
torch for ours; the interpreter and imports for the peers); ``loader_mib_per_worker`` divides it by
the Train workers, each of which has a loader of its own (its feeder actor and its buffers): the
512 MiB target is for one loader. Every system runs with
``MALLOC_ARENA_MAX=2`` (glibc's per-thread arenas otherwise keep ~300 MB of freed blocks in a
threaded loader). ``--no-scaling`` skips the second run at 10x the cells (2,000,000 by default: the
loader's memory must not grow with the cell count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..data.ray_session import LOCAL_SYSTEM_CONFIG
from . import format_table, run_child
from .ingest import DEFAULT_CELLS, DEFAULT_GENES, generate_h5ad
from .monitor import mark

BATCH = 256
WARMUP_S, WINDOW_S, WINDOWS = 4.0, 5.0, 3
N_LABELS = 20
OURS = ("scmm-atlas soma 1w", "scmm-atlas soma 2w", "scmm-atlas zarr 1w", "scmm-atlas zarr 2w")
PEERS = ("tiledbsoma-ml", "scdataset", "in-memory csr")
TARGETS = {"cells_per_s": 150_000, "mixing_bits": 3.85, "loader_mib": 512, "first_batch_s": 1.0, "vs_soma_ml": 4.0}
SCALING = 10


# -- measuring (runs in the child) ----------------------------------------------------------------
def batch_entropy(labels: np.ndarray) -> float:
    """Shannon entropy (bits) of the labels of one batch."""
    p = np.bincount(labels, minlength=N_LABELS) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def measure(stream: Iterator[np.ndarray], *, start: float, warmup_s: float = WARMUP_S, window_s: float = WINDOW_S,
            windows: int = WINDOWS) -> dict:
    """Consume ``stream`` (each item: the label codes of one dense batch) through warm-up and the windows."""
    first = warm_until = window = None
    rates: list[float] = []
    entropies: list[float] = []
    for labels in stream:
        now = time.perf_counter()
        if first is None:
            first, warm_until = now - start, now + warmup_s
        if now < warm_until:
            continue
        if window is None:  # a window opens when a batch arrives; the batches after it are counted
            window = [0, now]
            continue
        window[0] += len(labels)
        entropies.append(batch_entropy(labels))
        if now - window[1] >= window_s:
            rates.append(window[0] / (now - window[1]))
            if len(rates) == windows:
                break
            window = [0, now]
    return {"rates": rates, "mixing_bits": float(np.mean(entropies)), "first_batch_s": first}


def _repeat(make: Callable[[int], Iterator[np.ndarray]]) -> Iterator[np.ndarray]:
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


# -- the systems (each in its own child process) ---------------------------------------------------
def _ours(spec: dict) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig

    from ..train.driver import Trainer

    ray.init(address="local", num_cpus=2, object_store_memory=512 << 20, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", _system_config=LOCAL_SYSTEM_CONFIG)
    out = Path(spec["workdir"], "worker_results")
    out.mkdir(exist_ok=True)
    trainer = Trainer(
        _train_worker, train_loop_config={**spec, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=spec["workers"], use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"bench_loader_{os.getpid()}", storage_path=str(Path(spec["workdir"], "ray"))))
    trainer.fit()
    ray.shutdown()
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    for p in out.glob("rank*.json"):
        p.unlink()
    return {"rates": [sum(r) for r in zip(*(p["rates"] for p in parts), strict=True)],
            "mixing_bits": float(np.mean([p["mixing_bits"] for p in parts])),
            "first_batch_s": max(p["first_batch_s"] for p in parts),
            "warm_up_s": max(p["warm_up_s"] for p in parts)}


def _train_worker(cfg: dict) -> None:
    import ray.train
    import torch

    from ..data.loader import LoaderConfig, ShardLoader

    torch.set_num_threads(1)
    labels = np.load(cfg["labels"])
    _mark_when_all_ranks_are_up()
    loader = ShardLoader.for_train_worker(cfg["store"], LoaderConfig(**{"mode": "layout", "batch_size": BATCH,
                                                                         **cfg.get("loader", {})}))
    warm_s = loader.warm_up()
    stream = (labels[b.cells] for b in _repeat(loader.epoch))
    result = {**measure(stream, start=time.perf_counter()), "warm_up_s": warm_s}
    rank = ray.train.get_context().get_world_rank()
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps(result))


def _mark_when_all_ranks_are_up() -> None:
    """Rank 0 marks the loaders' start once every Train worker (with torch) is up, before any loader exists."""
    import ray.train
    import torch.distributed as dist

    dist.barrier()
    if ray.train.get_context().get_world_rank() == 0:
        mark()
    dist.barrier()


def _soma_ml(spec: dict) -> dict:
    import tiledbsoma
    import torch
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    labels = np.load(spec["labels"])
    mark()
    start = time.perf_counter()
    with tiledbsoma.Experiment.open(spec["store"]) as exp, exp.axis_query("RNA") as query:
        ds = ExperimentDataset(query, layer_name="counts", batch_size=BATCH, shuffle=True, seed=0,
                               obs_column_names=["soma_joinid"])
        loader = experiment_dataloader(ds)

        def epoch(e: int) -> Iterator[np.ndarray]:
            ds.set_epoch(e)
            for x, obs in loader:
                torch.as_tensor(x, dtype=torch.float32)
                yield labels[obs["soma_joinid"].to_numpy()]

        return measure(_repeat(epoch), start=start)


def _scdataset(spec: dict) -> dict:
    import anndata as ad
    import torch
    from scdataset import scDataset
    from scdataset.strategy import BlockShuffling

    labels = np.load(spec["labels"])
    mark()
    start = time.perf_counter()
    adata = ad.read_h5ad(spec["h5ad"], backed="r")
    ds = scDataset(np.arange(adata.n_obs), BlockShuffling(block_size=8), batch_size=BATCH, fetch_factor=32,
                   fetch_callback=lambda _, idx: (adata.X[idx], idx),
                   batch_callback=lambda f, i: (f[0][i], f[1][i]), seed=0)

    def epoch(_: int) -> Iterator[np.ndarray]:
        for x, idx in ds:
            torch.from_numpy(x.toarray())
            yield labels[idx]

    return measure(_repeat(epoch), start=start)


def _in_memory(spec: dict) -> dict:
    import anndata as ad
    import h5py
    import torch

    labels = np.load(spec["labels"])
    mark()
    with h5py.File(spec["h5ad"], "r") as f:
        x = ad.io.read_elem(f["X"])
    x = sp.csr_matrix((x.data, x.indices, x.indptr.astype(x.indices.dtype)), shape=x.shape)  # one index dtype:
    # else scipy converts the whole matrix's indptr on every row gather
    start = time.perf_counter()

    def epoch(e: int) -> Iterator[np.ndarray]:
        order = np.random.default_rng(e).permutation(x.shape[0])
        for i in range(0, len(order) - BATCH + 1, BATCH):
            rows = order[i : i + BATCH]
            torch.from_numpy(x[rows].toarray())
            yield labels[rows]

    return measure(_repeat(epoch), start=start)


def _child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    run = {"tiledbsoma-ml": _soma_ml, "scdataset": _scdataset, "in-memory csr": _in_memory}.get(spec["system"], _ours)
    return run(spec)


# -- the driver --------------------------------------------------------------------------------
def _prepare(work: Path, cells: int, genes: int, backends: tuple[str, ...]) -> dict:
    from ..data.prepare import prepare_layout
    from ..ingest.write import IngestOptions, ingest
    from ..store import open_store

    h5ad = work / f"cells_{cells}.h5ad"
    t0 = time.perf_counter()
    generate_h5ad(h5ad, cells, genes)
    print(f"generated {h5ad.name}: {cells:,} cells x {genes:,} genes, sorted by {N_LABELS} labels "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    out = {"h5ad": str(h5ad), "labels": str(work / f"labels_{cells}.npy")}
    for backend in backends:
        store = work / f"cells_{cells}.{backend}"
        t0 = time.perf_counter()
        ingest(str(store), [f"RNA={h5ad}"], IngestOptions(backend=backend, label_key="cell_type",
                                                          n_top_genes=genes, progress=False))
        t1 = time.perf_counter()
        with open_store(store) as s:
            prepare_layout(s, val_fraction=0.0)  # every cell streams
            if not Path(out["labels"]).exists():
                np.save(out["labels"], s.obs(["cell_type"])["cell_type"].astype(int).to_numpy())
        print(f"  {backend} store: ingest {t1 - t0:.1f} s, training layout {time.perf_counter() - t1:.1f} s",
              flush=True)
        out[backend] = str(store)
    return out


def _run_system(system: str, data: dict, work: Path, cells: int) -> dict:
    backend = system.split()[1] if system in OURS else "soma"
    spec = {"system": system, "store": data.get(backend), "h5ad": data["h5ad"], "labels": data["labels"],
            "workdir": str(work), "workers": int(system[-2]) if system in OURS else 1}
    env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}  # every system alike
    result = run_child(system, "scmm_atlas.bench.loader", json.dumps(spec), env=env)
    loader_mib = result["peak_pss_mib"] - result["base_pss_mib"]
    row = {"system": system, "cells": cells, "cells_per_s": statistics.median(result["rates"]),
           "mixing_bits": result["mixing_bits"], "peak_pss_mib": result["peak_pss_mib"], "loader_mib": loader_mib,
           "loader_mib_per_worker": loader_mib / spec["workers"], "first_batch_s": result["first_batch_s"],
           "warm_up_s": result.get("warm_up_s"), "monitor_cpu_frac": result["monitor_cpu_frac"]}
    print(f"  {system}: {row['cells_per_s']:,.0f} cells/s (windows {', '.join(f'{r:,.0f}' for r in result['rates'])})"
          f", {row['mixing_bits']:.2f} bits, peak {row['peak_pss_mib']:,.0f} MiB (loader {row['loader_mib']:,.0f}), "
          f"first batch {row['first_batch_s']:.2f} s",
          flush=True)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    cells = args.cells or DEFAULT_CELLS
    genes = args.genes or DEFAULT_GENES
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        data = _prepare(work, cells, genes, ("soma", "zarr"))
        for system in (*OURS, *PEERS):
            rows.append(_run_system(system, data, work, cells))
        if not args.no_scaling:
            for path in (data["h5ad"], data["soma"], data["zarr"]):
                subprocess.run(["rm", "-rf", path], check=True)
            big = _prepare(work, SCALING * cells, genes, ("zarr",))
            rows.append(_run_system("scmm-atlas zarr 1w", big, work, SCALING * cells))
    _report(rows, cells)
    return rows


def _report(rows: list[dict], cells: int) -> None:
    print()
    print(format_table(rows, ["system", "cells", "cells_per_s", "mixing_bits", "peak_pss_mib", "loader_mib",
                              "loader_mib_per_worker", "first_batch_s", "warm_up_s", "monitor_cpu_frac"]))
    base = {r["system"]: r for r in rows if r["cells"] == cells}
    soma_ml = base["tiledbsoma-ml"]["cells_per_s"]
    print()
    for r in (base[s] for s in OURS):
        checks = [("cells/s", r["cells_per_s"], ">=", TARGETS["cells_per_s"]),
                  ("mixing bits", r["mixing_bits"], ">=", TARGETS["mixing_bits"]),
                  ("loader MiB per worker", r["loader_mib_per_worker"], "<=", TARGETS["loader_mib"]),
                  ("first batch s", r["first_batch_s"], "<=", TARGETS["first_batch_s"]),
                  ("x tiledbsoma-ml", r["cells_per_s"] / soma_ml, ">=", TARGETS["vs_soma_ml"])]
        text = "; ".join(f"{name} {value:,.2f} {op} {target:,}: {'met' if _ok(value, op, target) else 'MISSED'}"
                         for name, value, op, target in checks)
        print(f"target {r['system']}: {text}")
    for r in rows:
        if r["cells"] != cells:
            small = base[r["system"]]
            growth = r["peak_pss_mib"] / small["peak_pss_mib"] - 1
            print(f"target {r['system']} peak memory growth {cells:,} -> {r['cells']:,} cells < 10 %: "
                  f"{100 * growth:+.1f} % ({'met' if growth < 0.10 else 'MISSED'}); loader MiB "
                  f"{small['loader_mib']:,.0f} -> {r['loader_mib']:,.0f} (<= {TARGETS['loader_mib']}: "
                  f"{'met' if r['loader_mib'] <= TARGETS['loader_mib'] else 'MISSED'})")


def _ok(value: float, op: str, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
