"""``scmm-atlas bench ingest``: our ingest (SOMA and Zarr) beside ``tiledbsoma.io.from_h5ad``.

Generates an h5ad (default 200,000 cells x 2,000 genes, ~8 % nonzero, NB-like float32 counts)
streamed to disk, then ingests it with each system in its own subprocess: wall time of the
ingest call and the process's peak RSS. Our ingest is timed without feature statistics (from_h5ad
computes none); their time is reported separately as ``stats_s``. A second run at twice the cells
checks that our peak memory does not grow with the cell count.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from . import format_table, run_child

DEFAULT_CELLS, DEFAULT_GENES, DENSITY = 200_000, 2_000, 0.08
OURS = ("scmm-atlas soma", "scmm-atlas zarr")
PEER = "tiledbsoma.io.from_h5ad"


def generate_h5ad(path: Path, n_cells: int, n_genes: int, *, density: float = DENSITY, seed: int = 0,
                  chunk: int = 20_000, n_labels: int = 20, group_effect: float = 0.0, structure_seed: int = 0,
                  first_cell: int = 0) -> Path:
    """Write a CSR h5ad chunk by chunk (memory bounded by ``chunk`` cells), cells sorted by ``n_labels``
    labels (``cell_type``), named ``cell<first_cell + i>``.

    ``group_effect`` > 0 gives each label its own expression profile (per-gene log-normal factors of
    that SD, drawn from ``structure_seed``, so that files written with other ``seed``s, e.g. parts of
    one dataset, share the profiles); 0: counts do not depend on the label."""
    structure = np.random.default_rng(structure_seed)
    gene_mean = structure.lognormal(0.0, 0.7, n_genes)
    detect = np.clip(density * n_genes * gene_mean / gene_mean.sum(), 0, 1)  # per-gene detection rate
    factor = structure.lognormal(0.0, group_effect, (n_labels, n_genes)) if group_effect else np.ones((1, n_genes))
    labels = np.repeat(np.arange(n_labels), -(-n_cells // n_labels))[:n_cells]
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = x.create_dataset("data", (0,), dtype="float32", maxshape=(None,), chunks=(1 << 18,))
        indices = x.create_dataset("indices", (0,), dtype="int32", maxshape=(None,), chunks=(1 << 18,))
        indptr = x.create_dataset("indptr", (n_cells + 1,), dtype="int64")
        nnz = 0
        indptr[0] = 0
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            group = labels[start : start + n] if group_effect else np.zeros(n, dtype=int)
            rate = np.clip(detect * factor[group], 0, 1).astype(np.float32)
            rows, cols = np.nonzero(rng.random((n, n_genes), dtype=np.float32) < rate)
            k = np.bincount(rows, minlength=n)
            idx = cols.astype(np.int32)
            mean = gene_mean[idx] * factor[group[rows], idx]
            vals = (1 + rng.negative_binomial(2, 2 / (2 + 3 * mean))).astype(np.float32)
            data.resize((nnz + len(idx),))
            indices.resize((nnz + len(idx),))
            data[nnz:] = vals
            indices[nnz:] = idx
            indptr[start + 1 : start + n + 1] = nnz + np.cumsum(k)
            nnz += len(idx)
        obs = pd.DataFrame({"cell_type": pd.Categorical(labels.astype(str))},
                           index=pd.Index([f"cell{first_cell + i}" for i in range(n_cells)]))
        var = pd.DataFrame(index=pd.Index([f"gene{i}" for i in range(n_genes)]))
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, key, {})
    return path


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec,
    so a child would report its parent's RSS at fork time if that was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(system: str, h5ad: str, out: str) -> dict:
    """Run one system in this process and report its own wall time and peak RSS."""
    t0 = time.perf_counter()
    stats_s = float("nan")
    if system == PEER:
        import tiledbsoma.io

        tiledbsoma.io.from_h5ad(out, h5ad, "RNA")
        wall = time.perf_counter() - t0
    else:
        from ..ingest.stats import compute_stats
        from ..ingest.write import IngestOptions, ingest
        from ..store import open_store

        backend = system.rsplit(" ", 1)[1]
        ingest(out, [f"RNA={h5ad}"], IngestOptions(backend=backend, stats=False, progress=False))
        wall = time.perf_counter() - t0
    peak = peak_rss_mib()  # the ingest's own peak
    if system != PEER:
        t1 = time.perf_counter()
        with open_store(out, writable=True) as store:
            compute_stats(store, n_top_genes=1000)
        stats_s = time.perf_counter() - t1
    return {"wall_s": wall, "peak_rss_mib": peak, "stats_s": stats_s}


def _run_system(system: str, h5ad: Path, out: Path, cells: int) -> dict:
    result = run_child(system, "scmm_atlas.bench.ingest", "--worker", system, str(h5ad), str(out))
    return {"system": system, "cells": cells, **result}


def run(args: argparse.Namespace) -> list[dict]:
    cells = args.cells or DEFAULT_CELLS
    genes = args.genes or DEFAULT_GENES
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        sizes = [cells] if args.no_scaling else [cells, 2 * cells]
        rows: list[dict] = []
        for n in sizes:
            h5ad = work / f"bench_{n}.h5ad"
            t0 = time.perf_counter()
            generate_h5ad(h5ad, n, genes)
            print(f"generated {h5ad.name}: {n:,} cells x {genes:,} genes in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            systems = (*OURS, PEER) if n == cells else OURS
            for system in systems:
                out = work / f"{system.replace(' ', '_').replace('.', '_')}_{n}.{system.rsplit(' ', 1)[-1]}"
                rows.append(_run_system(system, h5ad, out, n))
                print(f"  {system}: {rows[-1]['wall_s']:.1f} s, {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
            h5ad.unlink()
    peer = next(r for r in rows if r["system"] == PEER)
    for r in rows:
        r["time_vs_from_h5ad"] = r["wall_s"] / peer["wall_s"]
        base = next((b for b in rows if b["system"] == r["system"] and b["cells"] == cells), r)
        r["rss_vs_base"] = r["peak_rss_mib"] / base["peak_rss_mib"]
    print()
    print(format_table(rows, ["system", "cells", "wall_s", "peak_rss_mib", "time_vs_from_h5ad", "rss_vs_base",
                              "stats_s"]))
    soma_row = next(r for r in rows if r["system"] == OURS[0] and r["cells"] == cells)
    print(f"\ntarget: scmm-atlas soma <= 0.5x from_h5ad time: {soma_row['time_vs_from_h5ad']:.2f}x "
          f"({'met' if soma_row['time_vs_from_h5ad'] <= 0.5 else 'MISSED'})")
    for r in rows:
        if r["cells"] != cells:
            ok = r["rss_vs_base"] < 1.10
            print(f"target: {r['system']} peak RSS growth at 2x cells < 10 %: {100 * (r['rss_vs_base'] - 1):+.1f} % "
                  f"({'met' if ok else 'MISSED'})")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("h5ad")
    parser.add_argument("out")
    ns = parser.parse_args()
    print(json.dumps(_worker(ns.worker, ns.h5ad, ns.out)))
