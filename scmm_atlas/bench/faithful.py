"""``scmm-atlas bench faithful``: faithful mode against the original scMM's loss curves.

Generates the reference data with the generator in ``shared/reference/faithful`` (same seeds as
the reference runs), splits cells the original's way (``np.random.seed(1)``, 80 % train chosen
with ``np.random.choice``, the rest in ascending order as test), trains faithful mode for three
epochs at configs A, C and F and prints our per-epoch train/test loss beside the original's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp
import torch

from ..model import MMVAE, MMVAEConfig
from ..model.fit import CellData, evaluate, fit
from ..model.training import FitConfig, TrainingPlan
from . import format_table

SHARED = Path(os.environ.get("SCMM_ATLAS_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
GENERATOR = SHARED / "reference" / "faithful" / "gen_citeseq.py"
DATASETS = {"cite15k": (15000, 5000, 25), "cite50k": (50000, 4000, 100)}
# config: (dataset, batch, latent, RNA hidden, ADT hidden, reference train and test loss per epoch)
CONFIGS = {
    "A": ("cite15k", 32, 10, 100, 20, [6260.2, 4979.8, 4045.9], [5579.1, 4526.8, 3668.7]),
    "B": ("cite15k", 256, 10, 100, 20, [6915.6, 6599.3, 6325.9], [6939.4, 6619.7, 6372.3]),
    "C": ("cite15k", 256, 20, 256, 256, [6135.2, 4512.9, 3540.2], [5367.8, 4096.3, 3317.8]),
    "F": ("cite50k", 256, 20, 256, 256, [9692.5, 3051.1, 2310.8], [4756.5, 2446.7, 2215.1]),
}
ORIGINAL_CELLS_PER_S = {"A": 829, "B": 1350, "C": 1110, "F": 1275}


def load_reference_data(name: str, workdir: Path) -> dict[str, sp.csr_matrix]:
    """The generator's output (cached in ``workdir``) as cells x features CSR."""
    cells, genes, proteins = DATASETS[name]
    out = workdir / name
    if not (out / "CITE-seq" / "Protein_count.mtx").exists():
        if not GENERATOR.exists():
            raise FileNotFoundError(f"{GENERATOR}: the reference generator is not there (set SCMM_ATLAS_SHARED)")
        subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), "--cells", str(cells), "--genes",
                        str(genes), "--proteins", str(proteins), "--seed", "0"], check=True, capture_output=True)
    return {"RNA": sp.csr_matrix(scipy.io.mmread(out / "RNA-seq" / "RNA_count.mtx").T, dtype=np.float32),
            "ADT": sp.csr_matrix(scipy.io.mmread(out / "CITE-seq" / "Protein_count.mtx").T, dtype=np.float32)}


def original_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1)
    train = np.random.choice(a=n, size=int(np.round(n * 0.8)), replace=False)
    return train, np.delete(np.arange(n), train)


def faithful_config(n_genes: int, n_proteins: int, latent: int, rna_hidden: int, adt_hidden: int) -> MMVAEConfig:
    return MMVAEConfig(
        modalities={"RNA": {"n_features": n_genes, "likelihood": "nb", "hidden": rna_hidden, "n_layers": 2},
                    "ADT": {"n_features": n_proteins, "likelihood": "nb", "hidden": adt_hidden, "n_layers": 2}},
        latent_dim=latent, faithful=True, norm="batchnorm", learn_prior=True)


def run_config(name: str, data: dict[str, sp.csr_matrix], *, seed: int, epochs: int = 3) -> dict:
    _, batch, latent, rh, ah, _, _ = CONFIGS[name]
    torch.manual_seed(seed)
    model = MMVAE(faithful_config(data["RNA"].shape[1], data["ADT"].shape[1], latent, rh, ah))
    cells = CellData(data)
    train, test = original_split(cells.n)
    cfg = FitConfig(epochs=epochs, batch_size=batch, lr=1e-4, amsgrad=True, warmup_epochs=25, patience=10**9,
                    seed=seed, drop_last=True)
    test_losses: list[float] = []
    result = fit(model, cells, train, None, cfg, on_epoch=lambda rec: test_losses.append(
        evaluate(model, cells, test, beta=rec.beta, plan=TrainingPlan(cfg))))
    return {"train_loss": [r.train_loss for r in result.history], "test_loss": test_losses,
            "cells_per_s": float(np.median([r.cells_per_s for r in result.history]))}


def run(args: argparse.Namespace) -> list[dict]:
    configs = ["A", "C", "F"]
    seeds = list(range(getattr(args, "seeds", None) or 1))
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(args.workdir) / "faithful_data" if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache: dict[str, dict[str, sp.csr_matrix]] = {}
        for name in configs:
            dataset = CONFIGS[name][0]
            if dataset not in cache:
                t0 = time.perf_counter()
                cache[dataset] = load_reference_data(dataset, work)
                print(f"data {dataset}: {cache[dataset]['RNA'].shape[0]:,} cells in {time.perf_counter() - t0:.1f} s",
                      flush=True)
            runs = []
            for seed in seeds:
                runs.append(run_config(name, cache[dataset], seed=seed))
                print(f"  config {name} seed {seed}: train {_fmt(runs[-1]['train_loss'])}  test "
                      f"{_fmt(runs[-1]['test_loss'])}  {runs[-1]['cells_per_s']:,.0f} cells/s", flush=True)
            train = np.mean([r["train_loss"] for r in runs], axis=0).tolist()
            test = np.mean([r["test_loss"] for r in runs], axis=0).tolist()
            ref_train, ref_test = CONFIGS[name][5], CONFIGS[name][6]
            rows.append({"system": "scmm-atlas faithful", "config": name, "train_loss": train, "test_loss": test,
                         "cells_per_s": float(np.mean([r["cells_per_s"] for r in runs])), "seeds": len(seeds),
                         "original_train_loss": ref_train, "original_test_loss": ref_test,
                         "max_test_rel_diff": max(abs(a - b) / b for a, b in zip(test, ref_test, strict=True))})
    table = []
    for r in rows:
        for ep in range(3):
            table.append({"config": r["config"], "epoch": ep + 1, "ours train": r["train_loss"][ep],
                          "original train": r["original_train_loss"][ep], "ours test": r["test_loss"][ep],
                          "original test": r["original_test_loss"][ep],
                          "test diff %": 100 * (r["test_loss"][ep] / r["original_test_loss"][ep] - 1)})
    print()
    print(format_table(table, ["config", "epoch", "ours train", "original train", "ours test", "original test",
                               "test diff %"]))
    print()
    for r in rows:
        ok = r["max_test_rel_diff"] <= 0.05
        print(f"config {r['config']}: every test loss within 5 % of the original's (mean of {r['seeds']} seeds): "
              f"{'yes' if ok else 'NO'} (largest {100 * r['max_test_rel_diff']:.1f} %); "
              f"{r['cells_per_s']:,.0f} cells/s vs original {ORIGINAL_CELLS_PER_S[r['config']]:,}")
    return rows


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{v:,.1f}" for v in values)
