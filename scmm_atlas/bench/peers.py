"""The scvi-tools peers (totalVI, MultiVI) trained on the same split, threads and device as our model.

Both runners train on all cells at once, with the held-out cells' second modality hidden as all zeros, which each
model treats as a missing measurement (scvi-tools' own recipe for mosaic data). This is transductive: the held-out
cells' RNA is seen during training, unlike a model that only encodes new cells afterwards; their second modality
never is. ``train_s`` times model set-up and training; predictions and embeddings are computed afterwards.

Epoch caps, so that each peer trains in about 3-4 minutes on 2 CPU cores on the full datasets (measured on the
scmm-atlas dev machine, whose speed varied about 2x between runs): totalVI 50 epochs on pbmc10k_cite (2.8-5 s per
epoch; scvi-tools' default would be 400), MultiVI 10 epochs on mouse_cortex_snare (13-35 s per epoch, dominated by
the 25,734-region encoders and decoder; default 500). Everything else is scvi-tools' default, including the KL
warm-up, which therefore does not finish within the cap (totalVI: 0.75 x n_cells steps, about 230 epochs here;
MultiVI: 50 epochs). At these caps MultiVI is far from converged (its default learning rate is 1e-4); pass a larger
``max_epochs`` where more compute is available. scvi-tools is an optional ([bench]) dependency, imported lazily.
"""

from __future__ import annotations

import time

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

TOTALVI_EPOCHS = 50
MULTIVI_EPOCHS = 10
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
                gene_names: list[str], max_epochs: int = TOTALVI_EPOCHS, batch_size: int = 256, n_samples: int = 25,
                seed: int = 0, n_threads: int = 2, accelerator: str = "cpu") -> dict:
    """Train totalVI on the training cells plus the held-out cells as a second batch whose proteins are all zeros.

    totalVI flags proteins that are all zero within a batch as missing (protein batch mask) and turns on its
    adversarial batch classifier, so the held-out cells are embedded from RNA alone; their proteins are imputed as
    the posterior mean of the protein counts (foreground + background, 25 samples), decoded as if they were in the
    training batch (scvi-tools' imputation recipe, ``transform_batch``). Returns ``embedding_train`` (latent
    means of the training cells), ``adt_pred_test``, ``train_s`` and ``epochs`` (trained, after early stopping).
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
    model.train(max_epochs=max_epochs, batch_size=batch_size, accelerator=accelerator, enable_progress_bar=False)
    train_s = time.perf_counter() - start
    test_idx = np.arange(n_train, n_train + n_test)
    _, adt_pred = model.get_normalized_expression(
        indices=test_idx, gene_list=[], n_samples=n_samples, include_protein_background=True, transform_batch=[PAIRED],
        return_mean=True, return_numpy=True)
    return {
        "embedding_train": model.get_latent_representation(indices=np.arange(n_train)),
        "adt_pred_test": np.asarray(adt_pred),
        "train_s": train_s,
        "epochs": len(model.history["elbo_train"]),
    }


def run_multivi(rna_train: sp.spmatrix, atac_train: sp.spmatrix, rna_test: sp.spmatrix, *,
                batch_train: np.ndarray | None = None, batch_test: np.ndarray | None = None,
                gene_names: list[str] | None = None, region_names: list[str] | None = None,
                max_epochs: int = MULTIVI_EPOCHS, batch_size: int = 128, seed: int = 0, n_threads: int = 2,
                accelerator: str = "cpu") -> dict:
    """Train MultiVI on paired training cells plus the held-out cells as RNA-only cells (all-zero ATAC).

    MultiVI's mosaic handling: a cell whose ATAC row sums to zero gets its latent from the expression encoder alone
    and no accessibility loss (as would a training cell without ATAC counts; mouse_cortex_snare has none). As in the
    scvi-tools MultiVI tutorial, the modality (paired / RNA-only) is the batch key, which drives the adversarial
    mixing of the two; library pools (``batch_train``/``batch_test``) enter as a categorical covariate. Held-out
    accessibility is ``get_normalized_accessibility`` decoded as if the cells were paired (the ATAC decoder is never
    trained on the RNA-only batch), with region factors, without cell factors.
    Returns ``embedding_train`` (joint latent means), ``atac_pred_test``, ``train_s`` and ``epochs``.
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
    model.train(max_epochs=max_epochs, batch_size=batch_size, accelerator=accelerator, enable_progress_bar=False)
    train_s = time.perf_counter() - start
    atac_pred = model.get_normalized_accessibility(
        indices=np.arange(n_train, n_train + n_test), transform_batch=PAIRED, normalize_regions=True,
        return_numpy=True)
    return {
        "embedding_train": model.get_latent_representation(indices=np.arange(n_train)),
        "atac_pred_test": np.asarray(atac_pred),
        "train_s": train_s,
        "epochs": len(model.history["elbo_train"]),
    }
