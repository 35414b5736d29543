"""``scmm-atlas bench scale``: training speed and memory as the store grows from 50,000 to 2,000,000 cells.

The same model (totalVI widths: 2 x 256 hidden, latent 20, batch 256; ``bench train``'s settings)
trained through ``scmm-atlas train`` (Ray Train, the feeder loader, MLflow on SQLite) from Zarr
stores of generated CITE-like cells: 4,000 genes (~8 % nonzero) + 100 proteins, 10 groups with
their own profiles. Data are generated and ingested in parts of ``PART_CELLS`` cells (h5ad files
written chunk by chunk, appended with ``ingest --append``, then deleted), never whole in memory.
One store holds 50,000 cells; a second grows to 500,000 and then to 2,000,000 (its training layout
extended after each growth, as ``scmm-atlas prepare`` does).

Per store, 1 and 2 Ray Train workers (2 torch threads in all). Each row is its own ``train`` run in
a fresh process: an epoch of up to ``STEPS`` steps warms up, then ``STEPS`` steps are measured (in
one epoch, or in several of a store too small for so many steps per epoch):
``cells_per_s``, ``loader_wait_frac`` (training thread waiting for a batch), ``train_thread_cpu_frac``
(the training thread's CPU time from the OS over the epoch's wall time, mean over workers),
``val_loss`` (after the last epoch) and ``peak_pss_mib`` (the whole process tree's PSS, sampled from the
parent: :mod:`.monitor`).

Then, on the 2M store: a loader-only pass of one epoch with 2 Ray Train workers checks that every
cell is read exactly once across ranks with equal batches per rank; and one full training epoch
with validation (``--no-full-epoch`` skips it), its wall time and validation loss beside the 50k
row's. ``--json FILE`` rows: ``scmm-atlas 1w 50000``, ..., ``scmm-atlas 2w 2000000``, and
``scmm-atlas 1w 2000000 full epoch``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import format_table, run_child
from .ingest import generate_h5ad
from .train import WIDTHS

SIZES = (50_000, 500_000, 2_000_000)
GENES, PROTEINS, GROUPS, RNA_DENSITY, ADT_DENSITY = 4_000, 100, 10, 0.08, 0.9
PART_CELLS = 250_000
STEPS = 300  # per epoch: epoch 1 warms up, epoch 2 is measured
TARGETS = {"speed": 0.9, "memory": 1.1, "wait": 0.05}


# -- data ------------------------------------------------------------------------------------------
def grow_store(store: Path, work: Path, have: int, upto: int) -> None:
    """Append generated cells ``[have, upto)`` to ``store`` (created when ``have`` is 0), a part at a time."""
    from ..data.prepare import prepare_layout
    from ..ingest.write import IngestOptions, ingest
    from ..store import open_store

    for start in range(have, upto, PART_CELLS):
        n = min(PART_CELLS, upto - start)
        paths = {mod: generate_h5ad(work / f"part_{mod}.h5ad", n, n_var, density=density, seed=start + i,
                                    n_labels=GROUPS, group_effect=0.5, structure_seed=i, first_cell=start)
                 for i, (mod, n_var, density) in enumerate((("RNA", GENES, RNA_DENSITY),
                                                            ("ADT", PROTEINS, ADT_DENSITY)))}
        ingest(str(store), [f"{m}={p}" for m, p in paths.items()],
               IngestOptions(append=start > 0, dataset=f"part{start // PART_CELLS}", n_top_genes=GENES,
                             progress=False))
        for p in paths.values():
            p.unlink()
    with open_store(store) as s:
        prepare_layout(s)


# -- the systems (each row in its own child process) -----------------------------------------------
def _train_row(spec: dict) -> dict:
    """One ``train`` run: an epoch of warm-up, then epochs of up to ``STEPS`` steps until ``STEPS`` are measured
    (a small store's epochs are shorter); the measured epochs' figures pooled by their wall time."""
    from ..config import load_config
    from ..data.layout import layout_uri, read_info
    from ..store.uri import parse_uri
    from ..train.driver import train

    workers, batch = spec["workers"], 256
    per_epoch = min(STEPS, read_info(layout_uri(parse_uri(spec["store"]))).n_cells("train") // workers // batch)
    epochs = 1 if spec.get("full_epoch") else 1 + -(-STEPS // per_epoch)
    config = load_config("atlas_cite", [*WIDTHS, f"train.epochs={epochs}", "train.warmup_epochs=1",
                                        f"distributed.num_workers={workers}",
                                        f"distributed.torch_threads={2 // workers}",
                                        f"distributed.max_steps_per_epoch={0 if spec.get('full_epoch') else STEPS}",
                                        f"distributed.storage_path={spec['workdir']}/ray"])
    result = train(config, spec["store"], run_name=f"scale-{os.getpid()}",
                   tracking=f"sqlite:///{spec['workdir']}/mlflow.db", progress=False)
    hist = result.history
    measured = hist if spec.get("full_epoch") else hist[1:]
    steps = [h["step"] - (hist[i - 1]["step"] if i else 0) for i, h in enumerate(hist)][len(hist) - len(measured):]
    seconds = [n * batch * workers / h["cells_per_s"] for n, h in zip(steps, measured, strict=True)]
    total = sum(seconds)
    return {"cells_per_s": sum(steps) * batch * workers / total,
            "loader_wait_frac": sum(h["data_wait_frac"] * t for h, t in zip(measured, seconds, strict=True)) / total,
            "train_thread_cpu_frac": sum(h["train_thread_cpu_frac"] * t
                                         for h, t in zip(measured, seconds, strict=True)) / total,
            "val_loss": hist[-1].get("val_loss"), "steps": sum(steps), "steps_total": hist[-1]["step"],
            "wall_s": result.wall_s}


def _count_worker(cfg: dict) -> None:
    import ray.train

    from ..data.loader import LoaderConfig, ShardLoader

    with ShardLoader.for_train_worker(cfg["store"], LoaderConfig(mode="layout", drop_last=True)) as loader:
        cells = [b.cells for b in loader.epoch(0)]
    rank = ray.train.get_context().get_world_rank()
    np.save(Path(cfg["out"], f"rank{rank}.npy"), np.concatenate(cells))
    Path(cfg["out"], f"rank{rank}.batches").write_text(str(len(cells)))


def _count_check(spec: dict) -> dict:
    """One epoch of the loader alone in 2 Ray Train workers: each cell once across ranks, equal batches."""
    from ray.train import RunConfig, ScalingConfig

    from ..data.layout import layout_uri, read_info
    from ..data.ray_session import ensure_ray
    from ..store.uri import parse_uri
    from ..train.driver import Trainer

    ensure_ray(None)
    out = Path(spec["workdir"], "counts")
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    Trainer(_count_worker, train_loop_config={"store": spec["store"], "out": str(out)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"count_{os.getpid()}", storage_path=str(Path(spec["workdir"], "ray")))
            ).fit()
    wall = time.perf_counter() - t0
    n_train = read_info(layout_uri(parse_uri(spec["store"]))).n_cells("train")
    seen = np.concatenate([np.load(out / f"rank{r}.npy") for r in range(2)])
    batches = [int((out / f"rank{r}.batches").read_text()) for r in range(2)]
    shutil.rmtree(out)
    unique = len(np.unique(seen))
    return {"train_cells": n_train, "cells_read": len(seen), "distinct": unique, "batches_per_rank": batches,
            "wall_s": wall, "ok": unique == len(seen) and batches[0] == batches[1]
            and n_train - len(seen) < 2 * 256 + 2}


def _child(spec: dict) -> dict:
    return _count_check(spec) if spec["system"] == "count" else _train_row(spec)


# -- the driver --------------------------------------------------------------------------------------
def _row(name: str, spec: dict) -> dict:
    return {"system": name, **run_child(name, "scmm_atlas.bench.scale", json.dumps({**spec, "system": name}))}


def _measure(store: Path, cells: int, work: Path, rows: list[dict]) -> None:
    for workers in (1, 2):
        name = f"scmm-atlas {workers}w {cells}"
        row = {"cells": cells, **_row(name, {"store": str(store), "workdir": str(work), "workers": workers})}
        rows.append(row)
        print(f"  {name}: {row['cells_per_s']:,.0f} cells/s, loader wait {100 * row['loader_wait_frac']:.1f} %, "
              f"training thread {100 * row['train_thread_cpu_frac']:.0f} % of a core, peak PSS "
              f"{row['peak_pss_mib']:,.0f} MiB, val loss {row['val_loss']:,.1f}", flush=True)


def run(args: argparse.Namespace) -> list[dict]:
    sizes = (max(1_000, args.cells // 40), args.cells // 4, args.cells) if args.cells else SIZES
    rows: list[dict] = []
    checks: dict = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        small, big = work / "small.zarr", work / "big.zarr"
        t0 = time.perf_counter()
        grow_store(small, work, 0, sizes[0])
        print(f"store of {sizes[0]:,} cells ({time.perf_counter() - t0:.0f} s)", flush=True)
        _measure(small, sizes[0], work, rows)
        have = 0
        for cells in sizes[1:]:
            t0 = time.perf_counter()
            grow_store(big, work, have, cells)
            have = cells
            print(f"store grown to {cells:,} cells ({time.perf_counter() - t0:.0f} s)", flush=True)
            _measure(big, cells, work, rows)
        checks = _row("count", {"store": str(big), "workdir": str(work)})
        print(f"  2 workers, one epoch of {have:,} cells: {checks['cells_read']:,} read, {checks['distinct']:,} "
              f"distinct, of {checks['train_cells']:,} training cells; batches per rank {checks['batches_per_rank']}"
              f": {'ok' if checks['ok'] else 'FAILED'}", flush=True)
        if not args.no_full_epoch:
            name = f"scmm-atlas 1w {have} full epoch"
            row = {"cells": have, **_row(name, {"store": str(big), "workdir": str(work), "workers": 1,
                                                 "full_epoch": True})}
            rows.append(row)
            print(f"  {name}: {row['wall_s']:,.0f} s, {row['cells_per_s']:,.0f} cells/s, val loss "
                  f"{row['val_loss']:,.1f}", flush=True)
    _report(rows, sizes, checks)
    return rows


def _report(rows: list[dict], sizes: tuple[int, ...], checks: dict) -> None:
    print()
    print(format_table(rows, ["system", "cells", "cells_per_s", "loader_wait_frac", "train_thread_cpu_frac",
                              "peak_pss_mib", "val_loss", "steps", "steps_total", "wall_s", "monitor_cpu_frac"]))
    print()
    by = {r["system"]: r for r in rows}
    for workers in (1, 2):
        lo, hi = by[f"scmm-atlas {workers}w {sizes[0]}"], by[f"scmm-atlas {workers}w {sizes[-1]}"]
        speed, memory = hi["cells_per_s"] / lo["cells_per_s"], hi["peak_pss_mib"] / lo["peak_pss_mib"]
        print(f"target {workers}w cells/s at {sizes[-1]:,} >= {TARGETS['speed']}x at {sizes[0]:,}: {speed:.2f}x "
              f"({'met' if speed >= TARGETS['speed'] else 'MISSED'}); peak PSS <= {TARGETS['memory']}x: "
              f"{memory:.2f}x ({'met' if memory <= TARGETS['memory'] else 'MISSED'})")
    waits = [r["loader_wait_frac"] for r in rows if "full epoch" not in r["system"]]
    print(f"target loader wait < 5 % in every row: max {100 * max(waits):.1f} % "
          f"({'met' if max(waits) < TARGETS['wait'] else 'MISSED'})")
    print(f"each cell once per epoch across 2 ranks at {sizes[-1]:,} cells: {'ok' if checks.get('ok') else 'FAILED'}")
    full = [r for r in rows if "full epoch" in r["system"]]
    if full:
        small = by[f"scmm-atlas 1w {sizes[0]}"]
        print(f"full epoch over {sizes[-1]:,} cells: {full[0]['wall_s']:,.0f} s, {full[0]['steps_total']:,} steps; "
              f"validation loss {full[0]['val_loss']:,.1f} (the {sizes[0]:,}-cell 1w row after "
              f"{small['steps_total']:,} steps: {small['val_loss']:,.1f})")


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
