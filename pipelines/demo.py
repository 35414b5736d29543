"""The demo (README command 1): the pipeline on the bundled real data, with local defaults.

What exists so far: ingest of real CITE-seq (into TileDB-SOMA) and SNARE-seq RNA+ATAC (into Zarr),
feature statistics and selection, and a summary of each store. Later stages (train, infer, report)
join here as they land. Run: ``python -m pipelines.demo`` or ``scmm-atlas demo``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from scmm_atlas.store import open_store
from scmm_atlas.store.ingest import IngestOptions, ingest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

DATASETS = [
    # (store name, inputs relative to the data folder, options)
    ("pbmc10k_cite.soma", ["RNA=pbmc10k_cite/rna.h5ad", "ADT=pbmc10k_cite/protein.h5ad"],
     {"label_key": "cell_type"}),
    ("mouse_cortex_snare.zarr", ["RNA=mouse_cortex_snare/rna.h5ad", "ATAC=mouse_cortex_snare/atac.h5ad"],
     {"label_key": "cell_type", "batch_key": "batch"}),
]


def _data_dir(data: str | os.PathLike[str] | None) -> Path:
    path = Path(data or os.environ.get("SCMM_ATLAS_DATA", DEFAULT_DATA)).expanduser().resolve()
    if not (path / "pbmc10k_cite" / "rna.h5ad").exists():
        raise SystemExit(f"error: {path}: data: the real datasets are not here (pass --data or set SCMM_ATLAS_DATA)")
    return path


def run_demo(data: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] = "runs/demo") -> list[Path]:
    """Recreate ``out`` and build one store per bundled dataset; print what was built."""
    data_dir = _data_dir(data)
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    stores = []
    t_all = time.perf_counter()
    for name, inputs, opts in DATASETS:
        uri = out_dir / name
        t0 = time.perf_counter()
        report = ingest(str(uri), [i.split("=")[0] + "=" + str(data_dir / i.split("=")[1]) for i in inputs],
                        IngestOptions(**opts))
        print(f"\n== {name}: {report.n_new:,} cells ingested and feature statistics computed "
              f"in {time.perf_counter() - t0:.1f} s")
        with open_store(uri) as store:
            print(store.summary())
        stores.append(uri)
    print(f"\ndemo finished in {time.perf_counter() - t_all:.1f} s; stores under {out_dir}")
    print(f"inspect one with: scmm-atlas info --store {stores[0]}")
    return stores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", help="the real datasets (default: ../shared/data beside the repo)")
    parser.add_argument("--out", default="runs/demo", help="output folder (recreated)")
    ns = parser.parse_args()
    run_demo(ns.data, ns.out)
