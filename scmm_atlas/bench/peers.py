"""The peers: scvi-tools' totalVI and MultiVI trained on the same split, threads and device as our model,
and Seurat-style weighted nearest neighbours (muon's WNN).

Both scvi-tools runners train on all cells at once, with the held-out cells' second modality hidden as all zeros,
which each model treats as a missing measurement (scvi-tools' own recipe for mosaic data). This is transductive: the
held-out cells' RNA is seen during training, unlike a model that only encodes new cells afterwards; their second
modality never is. ``train_s`` times model set-up and training; predictions and embeddings are computed afterwards.
Everything is scvi-tools' default (including the KL warm-up and the 10 % validation split that early stopping
watches) except what the caller passes: ``max_epochs``, ``early_stopping`` and, for MultiVI, a wall-clock cap
(``max_minutes``: on SNARE it takes 13-35 s per epoch on 2 CPU cores, and its default learning rate of 1e-4
needs hundreds of epochs). scvi-tools is an optional ([bench]) dependency, imported lazily.
"""

from __future__ import annotations

import time

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

PAIRED, HELD_OUT = "paired", "held_out"


def _modality(x: sp.spmatrix | np.ndarray, names: list[str], obs: pd.DataFrame) -> ad.AnnData:
    x = x.astype(np.float32) if isinstance(x, np.ndarray) else sp.csr_matrix(x, dtype=np.float32)
    return ad.AnnData(x, obs=obs.copy(), var=pd.DataFrame(index=names))


def _stack_with_hidden(train: sp.spmatrix, n_test: int) -> sp.csr_matrix:
    """Training cells' counts, then all-zero rows for the held-out cells (scvi-tools reads them as missing)."""
    return sp.vstack([sp.csr_matrix(train), sp.csr_matrix((n_test, train.shape[1]))], format="csr")


def _obs(n_train: int, n_test: int) -> pd.DataFrame:
    split = np.repeat([PAIRED, HELD_OUT], [n_train, n_test])
    return pd.DataFrame({"split": pd.Categorical(split)}, index=[f"cell{i}" for i in range(n_train + n_test)])


def _prepare(seed: int, n_threads: int) -> None:
    import scvi

    scvi.settings.seed = seed
    torch.set_num_threads(n_threads)


def run_totalvi(rna_train: sp.spmatrix, adt_train: sp.spmatrix, rna_test: sp.spmatrix, *, protein_names: list[str],
                gene_names: list[str], max_epochs: int = 400, early_stopping: bool = True, batch_size: int = 256,
                n_samples: int = 25, seed: int = 0, n_threads: int = 2, accelerator: str = "cpu") -> dict:
    """Train totalVI on the training cells plus the held-out cells as a second batch whose proteins are all zeros.

    totalVI flags proteins that are all zero within a batch as missing (protein batch mask) and turns on its
    adversarial batch classifier, so the held-out cells are embedded from RNA alone; their proteins are imputed as
    the posterior mean of the protein counts (foreground + background, 25 samples), decoded as if they were in the
    training batch (scvi-tools' imputation recipe, ``transform_batch``). Returns ``embedding_all`` (latent
    means of the training cells, then the held-out ones), ``adt_pred_test``, ``train_s`` and ``epochs``.
    """
    import scvi

    _prepare(seed, n_threads)
    n_train, n_test = rna_train.shape[0], rna_test.shape[0]
    obs = _obs(n_train, n_test)
    mdata = md.MuData({
        "rna": _modality(sp.vstack([rna_train, rna_test]), list(gene_names), obs),
        # dense: with a sparse protein layer scvi-tools 1.4.2 builds its missing-protein mask as np.matrix and fails
        "protein": _modality(_stack_with_hidden(adt_train, n_test).toarray(), list(protein_names), obs),
    })
    start = time.perf_counter()
    scvi.model.TOTALVI.setup_mudata(mdata, batch_key="split",
                                    modalities={"rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"})
    model = scvi.model.TOTALVI(mdata)
    model.train(max_epochs=max_epochs, batch_size=batch_size, accelerator=accelerator, enable_progress_bar=False,
                early_stopping=early_stopping)
    train_s = time.perf_counter() - start
    test_idx = np.arange(n_train, n_train + n_test)
    _, adt_pred = model.get_normalized_expression(
        indices=test_idx, gene_list=[], n_samples=n_samples, include_protein_background=True, transform_batch=[PAIRED],
        return_mean=True, return_numpy=True)
    return {
        "embedding_all": model.get_latent_representation(),
        "adt_pred_test": np.asarray(adt_pred),
        "train_s": train_s,
        "epochs": len(model.history["elbo_train"]),
    }


def run_multivi(rna_train: sp.spmatrix, atac_train: sp.spmatrix, rna_test: sp.spmatrix, *,
                batch_train: np.ndarray | None = None, batch_test: np.ndarray | None = None,
                gene_names: list[str] | None = None, region_names: list[str] | None = None,
                max_epochs: int = 500, early_stopping: bool = True, max_minutes: float | None = None,
                batch_size: int = 128, seed: int = 0, n_threads: int = 2, accelerator: str = "cpu") -> dict:
    """Train MultiVI on paired training cells plus the held-out cells as RNA-only cells (all-zero ATAC).

    MultiVI's mosaic handling: a cell whose ATAC row sums to zero gets its latent from the expression encoder alone
    and no accessibility loss (as would a training cell without ATAC counts; mouse_cortex_snare has none). As in the
    scvi-tools MultiVI tutorial, the modality (paired / RNA-only) is the batch key, which drives the adversarial
    mixing of the two; library pools (``batch_train``/``batch_test``) enter as a categorical covariate. Held-out
    accessibility is ``get_normalized_accessibility`` decoded as if the cells were paired (the ATAC decoder is never
    trained on the RNA-only batch), with region factors, without cell factors.
    Returns ``embedding_all`` (joint latent means of the training cells, then the held-out ones),
    ``atac_pred_test``, ``train_s`` and ``epochs``.
    """
    import scvi

    if (batch_train is None) != (batch_test is None):
        raise ValueError("give both batch_train and batch_test, or neither")
    _prepare(seed, n_threads)
    n_train, n_test = rna_train.shape[0], rna_test.shape[0]
    obs = _obs(n_train, n_test)
    covariates = None
    if batch_train is not None:
        obs["library"] = pd.Categorical(np.concatenate([np.asarray(batch_train), np.asarray(batch_test)]).astype(str))
        covariates = ["library"]
    genes = list(gene_names) if gene_names is not None else [f"gene{i}" for i in range(rna_train.shape[1])]
    regions = list(region_names) if region_names is not None else [f"region{i}" for i in range(atac_train.shape[1])]
    mdata = md.MuData({
        "rna": _modality(sp.vstack([rna_train, rna_test]), genes, obs),
        "atac": _modality(_stack_with_hidden(atac_train, n_test), regions, obs),
    })
    start = time.perf_counter()
    scvi.model.MULTIVI.setup_mudata(
        mdata, batch_key="split", categorical_covariate_keys=covariates,
        modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna", "categorical_covariate_keys": "rna"})
    model = scvi.model.MULTIVI(mdata)
    cap = {"max_time": {"minutes": max_minutes}} if max_minutes else {}
    model.train(max_epochs=max_epochs, batch_size=batch_size, accelerator=accelerator, enable_progress_bar=False,
                early_stopping=early_stopping, **cap)
    train_s = time.perf_counter() - start
    atac_pred = model.get_normalized_accessibility(
        indices=np.arange(n_train, n_train + n_test), transform_batch=PAIRED, normalize_regions=True,
        return_numpy=True)
    return {
        "embedding_all": model.get_latent_representation(),
        "atac_pred_test": np.asarray(atac_pred),
        "train_s": train_s,
        "epochs": len(model.history["elbo_train"]),
    }


def run_wnn(modalities: dict[str, tuple[sp.spmatrix, str]], *, n_neighbors: int = 20, n_pcs: int = 50,
            seed: int = 0) -> dict:
    """Seurat-style WNN (muon) on paired cells: ``modalities`` maps a name to (counts, kind), kind ``rna``,
    ``protein`` or ``atac``.

    Per modality, as in muon's and Seurat's tutorials: RNA log1p counts per 10k then PCA; proteins CLR
    then PCA (at most one component fewer than proteins); ATAC TF-IDF then LSI without its first
    component (it follows sequencing depth); each representation L2-normalised, then a
    ``n_neighbors`` graph per modality and muon's WNN graph. The per-modality graphs are converted to
    ``csr_matrix`` first: muon's WNN fails on scanpy's sparse arrays beyond ~4,000 cells. Returns
    ``distances`` (the WNN graph, cells x cells) and ``train_s``.
    """
    import muon as mu
    import scanpy as sc

    start = time.perf_counter()
    mods = {}
    for name, (counts, kind) in modalities.items():
        a = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32))
        if kind == "atac":
            mu.atac.pp.tfidf(a, scale_factor=1e4)
            mu.atac.tl.lsi(a, n_comps=n_pcs + 1)
            a.obsm["X_rep"] = a.obsm["X_lsi"][:, 1:]
        else:
            if kind == "protein":
                a.X = a.X.toarray()
                mu.prot.pp.clr(a)
            else:
                sc.pp.normalize_total(a, target_sum=1e4)
                sc.pp.log1p(a)
            n_comps = min(n_pcs, a.n_vars - 1, a.n_obs - 1)
            a.obsm["X_rep"] = sc.pp.pca(a.X, n_comps=n_comps, random_state=seed)
        a.obsm["X_rep"] = a.obsm["X_rep"] / np.maximum(np.linalg.norm(a.obsm["X_rep"], axis=1, keepdims=True), 1e-12)
        sc.pp.neighbors(a, n_neighbors=n_neighbors, use_rep="X_rep", transformer="sklearn", random_state=seed)
        for key in ("distances", "connectivities"):
            a.obsp[key] = sp.csr_matrix(a.obsp[key])
        mods[name] = a
    mdata = md.MuData(mods)
    mu.pp.neighbors(mdata, n_neighbors=n_neighbors, key_added="wnn", random_state=seed)
    return {"distances": sp.csr_matrix(mdata.obsp["wnn_distances"]), "train_s": time.perf_counter() - start}
