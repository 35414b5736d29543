"""``scmm-atlas bench quality``: atlas and faithful mode against totalVI / MultiVI and a kNN baseline.

Real data only. CITE-seq (``pbmc10k_cite``) and RNA+ATAC (``mouse_cortex_snare``) are ingested
into a temporary store (so the selected features are the store's), and every method gets the same
split: 10 % of cells held out (``default_rng(0).permutation``), the rest for training; our modes
early-stop on a validation tenth of the training cells. Reported: ARI / NMI of Leiden clusters of
the training cells' joint embedding against the labels ('unknown' left out), and per-feature
Pearson / Spearman of the held-out cells' target modality predicted from RNA alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..config import load_config
from ..evaluate.metrics import cluster_scores, feature_correlations, knn_regression, rna_pca
from ..model import MMVAE
from ..model.fit import CellData, fit
from ..store import open_store
from ..store.ingest import IngestOptions, ingest
from . import format_table
from .faithful import SHARED

DATA = SHARED / "data"
# Epoch caps that keep the whole bench near 20 minutes on 2 cores (early stopping may end sooner);
# faithful mode's warm-up reaches beta = 1 at epoch 26. `--epochs N` sets both.
ATLAS_EPOCHS, FAITHFUL_EPOCHS = 60, 30
SETS = {
    "cite": ("pbmc10k_cite", ["RNA=rna.h5ad", "ADT=protein.h5ad"], "ADT", "atlas_cite", None),
    "rna_atac": ("mouse_cortex_snare", ["RNA=rna.h5ad", "ATAC=atac.h5ad"], "ATAC", "atlas_rna_atac", "batch"),
}


def load_set(key: str, work: Path) -> tuple[dict[str, sp.csr_matrix], dict[str, list[str]], np.ndarray, np.ndarray]:
    """Selected features of each modality (counts and names), labels and batch codes, through our store."""
    folder, inputs, _, config, batch_key = SETS[key]
    uri = work / f"{folder}.zarr"
    cfg = load_config(config)
    ingest(str(uri), [f"{i.split('=')[0]}={DATA / folder / i.split('=')[1]}" for i in inputs],
           IngestOptions(label_key="cell_type", batch_key=batch_key, n_top_genes=cfg.features.n_top_genes,
                         progress=False))
    with open_store(uri) as store:
        counts = {m: store.read(m, 0, store.n_obs, features="selected").astype(np.float32) for m in store.modalities}
        names = {m: list(store.feature_names(m, "selected")) for m in store.modalities}
        obs = store.obs()
    batch = obs["batch"].astype("category").cat.codes.to_numpy()
    return counts, names, obs["cell_type"].to_numpy().astype(str), batch


def split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test): test is 10 % of cells; validation a tenth of the rest."""
    perm = np.random.default_rng(0).permutation(n)
    test, rest = np.sort(perm[: n // 10]), perm[n // 10 :]
    val = np.sort(rest[: len(rest) // 10])
    return np.sort(rest[len(rest) // 10 :]), val, test


def train_ours(counts: dict[str, sp.csr_matrix], batch: np.ndarray, train: np.ndarray, val: np.ndarray,
               config: str, *, epochs: int | None, seed: int = 0) -> tuple[MMVAE, float, int]:
    cfg = load_config(config)
    if epochs is not None:
        cfg.train.epochs = epochs
    cfg.train.seed = seed
    torch.manual_seed(seed)
    n_batches = int(batch.max()) + 1
    model = MMVAE(cfg.model.build({m: c.shape[1] for m, c in counts.items()}, n_batches=n_batches))
    data = CellData(counts, batch=batch)
    t0 = time.perf_counter()
    res = fit(model, data, train, val, cfg.train)
    return model.eval(), time.perf_counter() - t0, len(res.history)


@torch.no_grad()
def embed_and_predict(model: MMVAE, counts: dict[str, sp.csr_matrix], batch: np.ndarray, cells: np.ndarray,
                      test: np.ndarray, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Joint embedding of ``cells``; ``target`` of the ``test`` cells predicted from RNA alone as the
    posterior mean at 10,000 counts per cell (never the observed library of the target)."""
    def tensors(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {m: torch.from_numpy(c[idx].toarray()) for m, c in counts.items()}

    b = torch.from_numpy(batch.astype(np.int64))
    emb = np.concatenate([model.embed(tensors(ch), batch=b[ch]).numpy() for ch in np.array_split(cells, 8)])
    x = tensors(test)
    mask = {m: torch.full((len(test),), m == "RNA") for m in model.names}
    qz = model.encode(x, mask, b[test])
    dist = model.decode(qz["RNA"].loc, target, None, b[test])
    return emb, dist.mean.numpy()


def run_set(key: str, work: Path, *, epochs: int | None) -> list[dict]:
    folder, _, target, config, _ = SETS[key]
    counts, names, labels, batch = load_set(key, work)
    train, val, test = split(len(labels))
    fitted = np.sort(np.concatenate([train, val]))  # the 90 % every method trains on
    observed = counts[target][test].toarray()
    rows = []
    for system, cfg_name, cap in (("scmm-atlas atlas", config, ATLAS_EPOCHS),
                                  ("scmm-atlas faithful", "faithful_scmm", FAITHFUL_EPOCHS)):
        model, train_s, n_epochs = train_ours(counts, batch, train, val, cfg_name, epochs=epochs or cap)
        emb, pred = embed_and_predict(model, counts, batch, fitted, test, target)
        rows.append(_row(system, folder, emb, labels[fitted], pred, observed, train_s, epochs=n_epochs))
        print(f"  {system} on {folder}: {n_epochs} epochs in {train_s:.0f} s", flush=True)
    from .peers import run_multivi, run_totalvi

    rna = counts["RNA"]
    if target == "ADT":
        peer = run_totalvi(rna[fitted], counts["ADT"][fitted], rna[test], protein_names=names["ADT"],
                           gene_names=names["RNA"])
        name, pred = "totalVI", peer["adt_pred_test"]
    else:
        peer = run_multivi(rna[fitted], counts["ATAC"][fitted], rna[test], batch_train=batch[fitted],
                           batch_test=batch[test], gene_names=names["RNA"], region_names=names["ATAC"])
        name, pred = "MultiVI", peer["atac_pred_test"]
    rows.append(_row(name, folder, peer["embedding_train"], labels[fitted], pred, observed, peer["train_s"],
                     epochs=peer["epochs"]))
    print(f"  {name} on {folder}: {peer['train_s']:.0f} s", flush=True)
    t0 = time.perf_counter()
    knn_pred = knn_regression(rna[fitted], counts[target][fitted].toarray(), rna[test])
    rows.append(_row("knn", folder, rna_pca(rna[fitted]), labels[fitted], knn_pred, observed,
                     time.perf_counter() - t0))
    return rows


def _row(system: str, dataset: str, emb: np.ndarray, labels: np.ndarray, pred: np.ndarray, observed: np.ndarray,
         train_s: float, epochs: int | None = None) -> dict:
    clusters = cluster_scores(emb, labels)
    corr = feature_correlations(pred, observed)
    row = {"system": system, "dataset": dataset, "ari": clusters["ari"], "nmi": clusters["nmi"],
           "pearson": corr["pearson"], "spearman": corr["spearman"], "train_s": train_s}
    if epochs is not None:
        row["epochs"] = epochs
    return row


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for key in SETS:
            rows.extend(run_set(key, Path(tmp), epochs=getattr(args, "epochs", None)))
    print()
    print(format_table(rows, ["dataset", "system", "ari", "nmi", "pearson", "spearman", "train_s", "epochs"]))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ours = next(r for r in rows if r["dataset"] == dataset and r["system"] == "scmm-atlas atlas")
        peer = next(r for r in rows if r["dataset"] == dataset and r["system"] in ("totalVI", "MultiVI"))
        for key in ("ari", "nmi", "pearson", "spearman"):
            verdict = "met" if ours[key] >= peer[key] else "MISSED"
            print(f"target on {dataset}: atlas {key} {ours[key]:.3f} >= {peer['system']} {peer[key]:.3f}: {verdict}")
    return rows
