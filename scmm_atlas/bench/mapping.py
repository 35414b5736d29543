"""``scmm-atlas bench mapping``: proteins of an RNA-only query predicted through a paired reference (paper §3.2).

The workflow is the one a user runs: the demo pipeline trains on the reference (10x PBMC 10k CITE-seq,
RNA + 14 proteins; ingest, statistics, Ray Train, MLflow champion, inference) with ``atlas_cite``'s own
training defaults (up to 200 epochs, early stopping on the reference's validation cells: trained to
convergence as totalVI is, not the demo's 40-epoch cap); then the user's commands, each in its own
process: the query's RNA alone (ECCITE-seq PBMC, 500 cells) is appended with ``ingest --append
--feature-map RNA=intersect --dataset eccite_pbmc500 --prefix-barcodes``, ``reprocess`` maps it with the
champion, and ``query predictions --where dataset=eccite_pbmc500`` reads its predicted proteins (per 10k
counts of the reference's panel).

Beside it, on the same genes (the store's selected ones, the query's zero where it lacks a gene):
- ``knn``: the reference's RNA PCA (log1p CP10k), the query projected, mean of 15 neighbours' proteins;
- ``totalVI``: trained on the reference plus the query as a second batch whose proteins are all missing.

Scored against the query's measured ADT on the proteins both panels have (:data:`MATCH`): log1p(CP10k) of each
side's own panel, per-protein Pearson / Spearman and the z-scored SSE (:func:`~..evaluate.metrics.panel_correlations`).
Also listed: per Leiden cluster of the query (our embedding), the predicted proteins the query never measured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..evaluate.metrics import knn_regression, log_normalise, panel_correlations
from ..store import open_store
from . import format_table
from .quality import DATA, TOTALVI_MAX_EPOCHS

REFERENCE, QUERY = "pbmc10k_cite", "eccite_pbmc500"
# reference (TotalSeq-B) name -> query (ECCITE-seq) name, for the antibodies both panels target. The query has
# two anti-PD-1 antibodies ('PD-1 (CD279)' and 'PD1 (CD279)'): the one spelled as the reference's is used.
MATCH = {
    "CD127": "IL7Ralpha (CD127)", "CD14": "CD14", "CD16": "CD16", "CD19": "CD19", "CD3": "CD3",
    "CD45RA": "CD45RA", "CD45RO": "CD45RO", "CD4": "CD4", "CD56": "CD56", "CD8a": "CD8", "PD-1": "PD-1 (CD279)",
}
COLUMNS = ["system", "pearson", "spearman", "sse", "n_proteins", "seconds", "epochs"]


def _cli(*argv: str) -> None:
    """One of the user's commands, run as the user runs it: ``scmm-atlas ...`` in its own process."""
    if subprocess.run([sys.executable, "-m", "scmm_atlas.cli", *argv], check=False).returncode != 0:
        raise RuntimeError(f"scmm-atlas {' '.join(argv[:2])} failed")


def _reference(work: Path) -> tuple[str, str, str, float, int]:
    """The demo pipeline on the reference, report off and without the demo's epoch cap (``atlas_cite``'s
    defaults): (store, tracking URI, model name, seconds, epochs trained)."""
    import ray

    from ..pipeline.config import load_pipeline
    from ..pipeline.runner import run_pipeline

    cfg = load_pipeline("pbmc_demo", store=str(work / "atlas.soma"), tracking_uri=f"sqlite:///{work}/mlflow.db",
                        data=str(DATA), workdir=str(work / "runs"))
    cfg = replace(cfg, train=replace(cfg.train, overrides=[]), report=replace(cfg.report, enabled=False))
    t0 = time.perf_counter()
    try:
        result = run_pipeline(cfg, progress=False)
    finally:
        ray.shutdown()
    return cfg.store, result.tracking_uri, result.trained.model_name, time.perf_counter() - t0, result.trained.epochs


def _map_query(store: str, tracking: str, model: str, work: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Append the query's RNA, map it, read its predicted proteins and embedding (the README's commands)."""
    where = f"dataset={QUERY}"
    _cli("ingest", "--store", store, "--append", "--dataset", QUERY, "--prefix-barcodes", "--feature-map",
         "RNA=intersect", "--no-progress", f"RNA={DATA / QUERY / 'rna.h5ad'}")
    _cli("reprocess", "--store", store, "--model", model, "--tracking-uri", tracking, "--no-progress")
    pred, emb = work / "predicted.parquet", work / "embedding.parquet"
    _cli("query", "predictions", "--store", store, "--target", "ADT", "--source", "RNA", "--where", where,
         "--out", str(pred))
    _cli("query", "embeddings", "--store", store, "--where", where, "--out", str(emb))
    return pd.read_parquet(pred), pd.read_parquet(emb)


def _counts(store_uri: str) -> dict[str, object]:
    """The reference's and query's RNA on the store's selected genes, the reference's proteins, the names."""
    with open_store(store_uri) as store:
        obs = store.obs(["dataset"])
        rna = store.read("RNA", 0, store.n_obs, features="selected")
        adt = store.read("ADT", 0, store.n_obs, features="selected")
        genes = [str(g) for g in store.feature_names("RNA", "selected")]
        proteins = [str(p) for p in store.feature_names("ADT", "selected")]
    query = (obs["dataset"].astype(str) == QUERY).to_numpy()
    return {"ref_rna": rna[~query], "ref_adt": adt[~query], "query_rna": rna[query], "genes": genes,
            "proteins": proteins, "query_ids": obs.index.astype(str).to_numpy()[query]}


def _observed(ids: np.ndarray) -> tuple[sp.csr_matrix, list[str]]:
    """The query's measured ADT for the store's query cells (ids ``<dataset>:<barcode>``), in their order."""
    adt = ad.read_h5ad(DATA / QUERY / "protein.h5ad")
    barcodes = [i.split(":", 1)[1] if i.startswith(f"{QUERY}:") else i for i in ids]
    return sp.csr_matrix(adt[barcodes].X), [str(v) for v in adt.var_names]


def _totalvi(c: dict) -> tuple[np.ndarray, float, int]:
    from .peers import run_totalvi

    peer = run_totalvi(c["ref_rna"], c["ref_adt"], c["query_rna"], protein_names=c["proteins"],
                       gene_names=c["genes"], max_epochs=TOTALVI_MAX_EPOCHS, early_stopping=True)
    print(f"  totalVI: {peer['epochs']} epochs in {peer['train_s']:.0f} s", flush=True)
    return peer["adt_pred_test"], peer["train_s"], peer["epochs"]


def unmeasured_by_cluster(embedding: np.ndarray, predicted: pd.DataFrame, observed: sp.spmatrix,
                          observed_names: list[str], *, top: int = 3, resolution: float = 0.8) -> pd.DataFrame:
    """Per Leiden cluster of the query's embedding: its most over-expressed measured proteins (what the cluster
    is) and the predicted proteins the query never measured, ranked by the cluster mean's z-score across
    the query's cells (log1p CP10k of the predicted panel)."""
    import scanpy as sc

    a = ad.AnnData(np.asarray(embedding, dtype=np.float32))
    sc.pp.neighbors(a, n_neighbors=15, use_rep="X", random_state=0)
    sc.tl.leiden(a, resolution=resolution, flavor="igraph", n_iterations=2, random_state=0)
    clusters = a.obs["leiden"].astype(int).to_numpy()
    unmeasured = [p for p in predicted.columns if p not in MATCH]
    logp, logo = log_normalise(predicted.to_numpy(float)), log_normalise(observed)

    def zscores(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return (x[rows].mean(0) - x.mean(0)) / np.maximum(x.std(0), 1e-9)

    out = []
    for k in np.unique(clusters):
        rows = clusters == k
        zo, zp = zscores(logo, rows), zscores(logp, rows)
        measured = [observed_names[i] for i in np.argsort(-zo)[:top]]
        ranked = sorted(((zp[list(predicted.columns).index(p)], p) for p in unmeasured), reverse=True)
        out.append({"cluster": int(k), "cells": int(rows.sum()), "measured_high": ", ".join(measured),
                    "predicted_unmeasured": ", ".join(f"{p} ({z:+.1f})" for z, p in ranked[:top])})
    return pd.DataFrame(out)


def run(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        store, tracking, model, ours_s, ours_epochs = _reference(work)
        print(f"  scmm-atlas: reference pipeline (ingest, stats, train, infer) in {ours_s:.0f} s", flush=True)
        predicted, embedding = _map_query(store, tracking, model, work)
        c = _counts(store)
        if list(predicted.index) != list(c["query_ids"]):
            raise RuntimeError("query predictions are not in the store's order of the query's cells")
        observed, names = _observed(c["query_ids"])
        t0 = time.perf_counter()
        knn = knn_regression(c["ref_rna"], c["ref_adt"], c["query_rna"])
        knn_s = time.perf_counter() - t0
        totalvi, totalvi_s, totalvi_epochs = _totalvi(c)
    rows = []
    for system, pred, seconds, epochs in (("scmm-atlas", predicted.to_numpy(), ours_s, ours_epochs),
                                          ("knn", knn, knn_s, None), ("totalVI", totalvi, totalvi_s, totalvi_epochs)):
        scores = panel_correlations(pred, c["proteins"], observed, names, MATCH)
        per = scores.pop("per_protein")
        rows.append({"system": system, **scores, "seconds": seconds, **({"epochs": epochs} if epochs else {}),
                     **{f"pearson_{p}": v for p, v in per.items()}})
    print(f"\nquery {QUERY}: {len(c['query_ids'])} cells, RNA alone; {len(c['genes'])} reference genes "
          f"({int((c['query_rna'].getnnz(axis=0) > 0).sum())} detected in the query); proteins scored: "
          + ", ".join(f"{a}={b}" if a != b else a for a, b in MATCH.items()))
    print(format_table(rows, COLUMNS))
    print("\nper-protein Pearson:")
    print(format_table([{"system": r["system"], **{p: r[f"pearson_{p}"] for p in MATCH}} for r in rows],
                       ["system", *MATCH]))
    print("\npredicted proteins the query did not measure, per query cluster (z-score of the cluster mean):")
    print(unmeasured_by_cluster(embedding.to_numpy(), predicted, observed, names).to_string(index=False))
    ours = rows[0]["pearson"]
    for peer in rows[1:]:
        verdict = "met" if ours >= peer["pearson"] else "MISSED"
        print(f"target: mean Pearson {ours:.3f} >= {peer['system']} {peer['pearson']:.3f}: {verdict}")
    return rows
