"""``scmm-atlas bench infer``: batch inference throughput including writes, and program time.

Data: the CITE-like set of ``bench train`` (50,000 cells x 4,000 genes + 100 proteins), in a Zarr
store. The model has ``bench train``'s widths (weights at their initialisation: the work per cell
does not depend on their values). Each system runs in its own process, 2 torch threads in all.

- ``scmm-atlas``: ``scmm-atlas infer`` with its default outputs on one machine (worker threads,
  embeddings and the proteins predicted from RNA written to the store and published); ``programs_s``: the
  pseudocell programs of a model with 20 latent dims and ``PROGRAM_FEATURES`` RNA features
  (traversals, Spearman, ranking).
- ``scmm-atlas +RNA``: the same with RNA predicted from the proteins as well (4,000 genes per cell).
- ``totalVI``: scvi-tools' ``get_latent_representation`` on the counts in memory (no writes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from . import format_table, run_child
from .train import CELLS, GENES

PROGRAM_FEATURES = 100_000
TARGET_CELLS_PER_S, TARGET_PROGRAMS_S = 20_000, 60.0


def _model(features: dict[str, list[str]]):
    import torch

    from ..infer.trained import TrainedModel
    from ..model import MMVAE, MMVAEConfig

    torch.manual_seed(0)
    mods = {m: {"n_features": len(f), "likelihood": "nb_disp", "hidden": 256, "n_layers": 2}
            for m, f in features.items()}
    config = MMVAEConfig(modalities=mods, latent_dim=20, norm="layernorm", n_batches=1)
    return TrainedModel(config=config, state=MMVAE(config).state_dict(), features=features, batches=["0"],
                        version="1", uri="bench")


def _ours(spec: dict) -> dict:
    from ..infer.programs import programs
    from ..infer.stage import InferConfig, infer
    from ..store import open_store

    with open_store(spec["store"]) as store:
        features = {m: [str(f) for f in store.feature_names(m, "selected")] for m in store.modalities}
    pairs = (("RNA", "ADT"), ("ADT", "RNA")) if spec["system"] == "scmm-atlas +RNA" else None
    result = infer(spec["store"], _model(features), config=InferConfig(programs=False, pairs=pairs), progress=False)
    if pairs is not None:
        return {"cells_per_s": result.cells_per_s, "programs_s": None}
    big = _model({"RNA": [f"g{i}" for i in range(PROGRAM_FEATURES)], "ADT": features["ADT"]}).build()
    t0 = time.perf_counter()
    table = programs(big, {"RNA": [f"g{i}" for i in range(PROGRAM_FEATURES)], "ADT": features["ADT"]}).table
    return {"cells_per_s": result.cells_per_s, "programs_s": time.perf_counter() - t0, "program_rows": len(table)}


def _totalvi(spec: dict) -> dict:
    import anndata as ad
    import mudata as md
    import scvi
    import torch

    torch.set_num_threads(2)
    mods = {m: ad.read_h5ad(spec[m]) for m in ("RNA", "ADT")}
    mods["ADT"].X = mods["ADT"].X.toarray()
    mdata = md.MuData({"rna": mods["RNA"], "protein": mods["ADT"]})
    scvi.model.TOTALVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "protein_layer": "protein"})
    model = scvi.model.TOTALVI(mdata)
    model.is_trained_ = True  # throughput does not depend on the weights (as for ours)
    t0 = time.perf_counter()
    model.get_latent_representation(batch_size=4096)
    return {"cells_per_s": mdata.n_obs / (time.perf_counter() - t0), "programs_s": None}


def _child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(2)
    return (_totalvi if spec["system"] == "totalVI" else _ours)(spec)


def run(args: argparse.Namespace) -> list[dict]:
    from .train import _generate

    cells, genes = args.cells or CELLS, args.genes or GENES
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        data = _generate(Path(tmp), cells, genes)
        print(f"generated and ingested {cells:,} cells x {genes:,} genes ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        spec = {k: str(v) for k, v in data.items()}
        for system in ("scmm-atlas", "scmm-atlas +RNA", "totalVI"):
            row = {"system": system, "cells": cells,
                   **run_child(system, "scmm_atlas.bench.infer", json.dumps({**spec, "system": system}))}
            rows.append(row)
            print(f"  {system}: {row['cells_per_s']:,.0f} cells/s, peak {row['peak_pss_mib']:,.0f} MiB", flush=True)
    print()
    print(format_table(rows, ["system", "cells", "cells_per_s", "programs_s", "peak_pss_mib", "monitor_cpu_frac"]))
    ours = rows[0]
    print(f"\ntarget >= {TARGET_CELLS_PER_S:,} cells/s including writes (default outputs): "
          f"{ours['cells_per_s']:,.0f} ({'met' if ours['cells_per_s'] >= TARGET_CELLS_PER_S else 'MISSED'}); "
          f"with RNA from ADT: {rows[1]['cells_per_s']:,.0f}; totalVI's latent (no writes): "
          f"{rows[2]['cells_per_s']:,.0f}")
    print(f"target programs (20 dims x {PROGRAM_FEATURES:,} features) <= {TARGET_PROGRAMS_S:.0f} s: "
          f"{ours['programs_s']:.1f} s ({'met' if ours['programs_s'] <= TARGET_PROGRAMS_S else 'MISSED'})")
    return rows


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
