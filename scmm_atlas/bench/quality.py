"""``scmm-atlas bench quality``: the atlas defaults against totalVI / MultiVI, WNN and an RNA-PCA kNN.

Real data only. CITE-seq (``pbmc10k_cite``) and RNA+ATAC (``mouse_cortex_snare``; ``a549_scicar``,
labelled by hours of dexamethasone, without targets) are ingested
into a temporary store (so the selected features are the store's), and every method gets the same
split: 10 % of cells held out (``default_rng(0).permutation``), the rest for training; ours
early-stops on a validation tenth of the training cells and is trained with ``--seeds`` seeds
(default 3; mean ± sd). Reported per method:

- the embedding of **every** cell (ours never trained on the held-out ones; the scvi-tools peers
  see their RNA while training) scored by :mod:`~scmm_atlas.evaluate.embedding` against
  ``cell_type`` ('unknown' left out; SNARE's 12 pools as batches), plus NMI against
  ``cell_type_fine`` where the data has it (``nmi_fine``), batch mixing without kBET (too slow
  here); WNN gives a graph of the labelled cells, scored by its neighbours (no silhouettes, so
  compare it on ``bio_graph``);
- the held-out cells' second modality predicted from their RNA alone: proteins by per-protein
  Pearson / Spearman on log1p(CP10k); ATAC by per-region AUROC and per-cell AUPRC of open peaks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..config import load_config, read_section
from ..evaluate.embedding import best_nmi_ari, embedding_scores, graph_scores
from ..evaluate.metrics import feature_correlations, knn_regression, open_region_scores, rna_pca
from ..ingest.stats import compute_stats
from ..ingest.write import IngestOptions, ingest
from ..model import MMVAE
from ..model.fit import CellData, fit
from ..pipeline.config import StatsSection
from ..store import open_store
from . import format_table
from .faithful import SHARED

DATA = SHARED / "data"
# dataset folder, inputs, target modality, config, batch column, fine label column
SETS = {
    "cite": ("pbmc10k_cite", ["RNA=rna.h5ad", "ADT=protein.h5ad"], "ADT", "atlas_cite", None, None),
    "rna_atac": ("mouse_cortex_snare", ["RNA=rna.h5ad", "ATAC=atac.h5ad"], "ATAC", "atlas_rna_atac", "batch",
                 "cell_type_fine"),
    # no target here: reported so that a change that helps SNARE and hurts another RNA+ATAC set is seen
    "a549": ("a549_scicar", ["RNA=rna.h5ad", "ATAC=atac.h5ad"], "ATAC", "atlas_rna_atac", None, None),
}
KINDS = {"RNA": "rna", "ADT": "protein", "ATAC": "atac"}
TOTALVI_MAX_EPOCHS = 400  # scvi-tools' default for this data size; early stopping ends it sooner
MULTIVI_MAX_EPOCHS = 500  # scvi-tools' default
MULTIVI_MAX_MINUTES = 12  # MultiVI's cap on 2 CPU cores (13-35 s per epoch on SNARE)


class Dataset:
    """One set's selected counts, labels and batches (through our store), and the split."""

    def __init__(self, key: str, work: Path, *, stats: dict[str, str] | None = None) -> None:
        """``stats``: ``compute_stats`` options (``atac_quantile``, ``n_top_genes``) in place of the
        ingest defaults, as ``stats.KEY=VALUE`` in a pipeline config."""
        folder, inputs, self.target, self.config, batch_key, fine_key = SETS[key]
        self.name = folder
        uri = work / f"{folder}{''.join(f'-{k}{v}' for k, v in sorted((stats or {}).items()))}.zarr"
        ingest(str(uri), [f"{i.split('=')[0]}={DATA / folder / i.split('=')[1]}" for i in inputs],
               IngestOptions(label_key="cell_type", batch_key=batch_key, progress=False))  # the ingest defaults
        if stats:  # checked and typed as a pipeline config's stats section is
            chosen = read_section(StatsSection, stats, "sweep grid", "stats")
            with open_store(uri, writable=True) as store:
                compute_stats(store, n_top_genes=chosen.n_top_genes, atac_quantile=chosen.atac_quantile)
        with open_store(uri) as store:
            self.counts = {m: store.read(m, 0, store.n_obs, features="selected").astype(np.float32)
                           for m in store.modalities}
            self.names = {m: list(store.feature_names(m, "selected")) for m in store.modalities}
            obs = store.obs()
        self.labels = obs["cell_type"].to_numpy().astype(str)
        self.batch = obs["batch"].astype("category").cat.codes.to_numpy()
        self.batch_labels = obs["batch"].astype(str).to_numpy() if batch_key else None
        self.fine = None
        if fine_key:
            import anndata as ad

            src = ad.read_h5ad(DATA / folder / inputs[0].split("=")[1], backed="r")
            self.fine = src.obs[fine_key].astype(str).reindex(obs.index).to_numpy()
        self.train, self.val, self.test = split(len(self.labels))


def split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test): test is 10 % of cells; validation a tenth of the rest."""
    perm = np.random.default_rng(0).permutation(n)
    test, rest = np.sort(perm[: n // 10]), perm[n // 10 :]
    val = np.sort(rest[: len(rest) // 10])
    return np.sort(rest[len(rest) // 10 :]), val, test


def train_ours(data: Dataset, overrides: list[str] | tuple[str, ...] = (), *, epochs: int | None = None,
               seed: int = 0) -> tuple[MMVAE, float, int]:
    cfg = load_config(data.config, list(overrides))
    if epochs is not None:
        cfg.train.epochs = epochs
    cfg.train.seed = seed
    torch.manual_seed(seed)
    model = MMVAE(cfg.model.build({m: c.shape[1] for m, c in data.counts.items()},
                                  n_batches=int(data.batch.max()) + 1))
    t0 = time.perf_counter()
    res = fit(model, CellData(data.counts, batch=data.batch), data.train, data.val, cfg.train)
    return model.eval(), time.perf_counter() - t0, len(res.history)


@torch.no_grad()
def embed_and_predict(model: MMVAE, data: Dataset, cells: np.ndarray, targets: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Joint embedding of ``cells``; the target modality of ``targets`` predicted from RNA alone as the
    posterior mean at 10,000 counts per cell (never the observed library of the target)."""
    def tensors(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {m: torch.from_numpy(c[idx].toarray()) for m, c in data.counts.items()}

    b = torch.from_numpy(data.batch.astype(np.int64))
    emb = np.concatenate([model.embed(tensors(ch), batch=b[ch]).numpy()
                          for ch in np.array_split(cells, max(1, len(cells) // 2048))])
    x = tensors(targets)
    mask = {m: torch.full((len(targets),), m == "RNA") for m in model.names}
    qz = model.encode(x, mask, b[targets])
    return emb, model.decode(qz["RNA"].loc, data.target, None, b[targets]).mean.numpy()


def prediction_scores(target: str, pred: np.ndarray, observed: sp.spmatrix) -> dict[str, float]:
    if target == "ATAC":
        scores = open_region_scores(pred, observed)
        return {"auroc": scores["auroc"], "auprc": scores["auprc"]}
    corr = feature_correlations(pred, observed)
    return {"pearson": corr["pearson"], "spearman": corr["spearman"]}


def score(data: Dataset, cells: np.ndarray, *, embedding: np.ndarray | None = None, graph: sp.spmatrix | None = None,
          kbet: bool = False) -> dict[str, float]:
    """Metrics of the embedding (or neighbour graph) of ``cells`` against the labels and batches, and
    ``nmi_fine`` (best-resolution NMI against the fine labels) where the data has them. kBET is off by
    default: scib-metrics' per-label kBET took over 6 minutes per embedding on SNARE's 10k cells and
    12 pools on 2 cores; iLISI, graph connectivity and BRAS measure the mixing."""
    batch = data.batch_labels[cells] if data.batch_labels is not None else None
    if embedding is not None:
        out = embedding_scores(embedding, data.labels[cells], batch=batch, kbet=kbet)
        if data.fine is not None:
            out["nmi_fine"] = best_nmi_ari(embedding, data.fine[cells])["nmi"]
    else:
        out = graph_scores(graph, data.labels[cells], batch=batch)
        if data.fine is not None:
            out["nmi_fine"] = graph_scores(graph, data.fine[cells])["nmi"]
    return out


def _ours(data: Dataset, seeds: int, epochs: int | None) -> list[dict]:
    every = np.arange(len(data.labels))
    observed = data.counts[data.target][data.test]
    rows = []
    for seed in range(seeds):
        model, train_s, n_epochs = train_ours(data, epochs=epochs, seed=seed)
        emb, pred = embed_and_predict(model, data, every, data.test)
        rows.append({"system": "scmm-atlas", "dataset": data.name, "seed": seed, **score(data, every, embedding=emb),
                     **prediction_scores(data.target, pred, observed), "train_s": train_s, "epochs": n_epochs})
        print(f"  scmm-atlas seed {seed} on {data.name}: {n_epochs} epochs in {train_s:.0f} s", flush=True)
    return rows


def _scvi_peer(data: Dataset) -> list[dict]:
    """totalVI (CITE-seq) or MultiVI (RNA+ATAC), trained on the 90 % plus the held-out cells' RNA."""
    from .peers import run_multivi, run_totalvi

    fitted = np.sort(np.concatenate([data.train, data.val]))  # the 90 % every method trains on
    rna = data.counts["RNA"]
    back = np.argsort(np.concatenate([fitted, data.test]))  # the peers' order: training cells, then held-out
    if data.target == "ADT":
        peer = run_totalvi(rna[fitted], data.counts["ADT"][fitted], rna[data.test], protein_names=data.names["ADT"],
                           gene_names=data.names["RNA"], max_epochs=TOTALVI_MAX_EPOCHS, early_stopping=True)
        name, pred = "totalVI", peer["adt_pred_test"]
    else:
        peer = run_multivi(rna[fitted], data.counts["ATAC"][fitted], rna[data.test], batch_train=data.batch[fitted],
                           batch_test=data.batch[data.test], gene_names=data.names["RNA"],
                           region_names=data.names["ATAC"], max_epochs=MULTIVI_MAX_EPOCHS, early_stopping=True,
                           max_minutes=MULTIVI_MAX_MINUTES)
        name, pred = "MultiVI", peer["atac_pred_test"]
    every = np.arange(len(data.labels))
    print(f"  {name} on {data.name}: {peer['epochs']} epochs in {peer['train_s']:.0f} s", flush=True)
    return [{"system": name, "dataset": data.name, **score(data, every, embedding=peer["embedding_all"][back]),
             **prediction_scores(data.target, pred, data.counts[data.target][data.test]),
             "train_s": peer["train_s"], "epochs": peer["epochs"]}]


def _wnn(data: Dataset) -> list[dict]:
    """WNN's graph of the labelled cells (the embeddings' metrics also use only their neighbours among
    labelled cells; cutting unlabelled cells out of a graph afterwards would leave rows too short)."""
    from .peers import run_wnn

    labelled = np.flatnonzero(data.labels != "unknown")
    wnn = run_wnn({m: (c[labelled], KINDS[m]) for m, c in data.counts.items()})
    return [{"system": "WNN", "dataset": data.name, **score(data, labelled, graph=wnn["distances"]),
             "train_s": wnn["train_s"]}]


def _knn(data: Dataset) -> list[dict]:
    fitted = np.sort(np.concatenate([data.train, data.val]))
    rna = data.counts["RNA"]
    t0 = time.perf_counter()
    pred = knn_regression(rna[fitted], data.counts[data.target][fitted].toarray(), rna[data.test])
    return [{"system": "knn", "dataset": data.name, **score(data, np.arange(len(data.labels)), embedding=rna_pca(rna)),
             **prediction_scores(data.target, pred, data.counts[data.target][data.test]),
             "train_s": time.perf_counter() - t0}]


def summarise(rows: list[dict], system: str) -> dict:
    """Mean and sd over the seeds of ``system``'s rows (numbers only)."""
    mine = [r for r in rows if r["system"] == system]
    out = {"system": f"{system} (mean of {len(mine)})", "dataset": mine[0]["dataset"]}
    for key, value in mine[0].items():
        if isinstance(value, float) and key != "seed":
            values = np.array([r[key] for r in mine], dtype=float)
            out[key], out[f"{key}_sd"] = float(values.mean()), float(values.std(ddof=1)) if len(mine) > 1 else 0.0
    return out


SYSTEMS = {"scmm-atlas": None, "scvi": _scvi_peer, "wnn": _wnn, "knn": _knn}
COLUMNS = ["dataset", "system", "bio", "bio_graph", "nmi", "ari", "nmi_k", "ari_k", "silhouette", "clisi",
           "isolated_asw", "isolated_f1", "knn_acc", "nmi_fine", "batch", "ilisi", "kbet", "pearson", "spearman",
           "auroc", "auprc", "train_s", "epochs"]


# dataset -> (metric, the floor it must reach) and (metric, peer it must beat, by more than our seeds' sd?)
FLOORS = {"pbmc10k_cite": [("bio", 0.82), ("pearson", 0.86)],
          "mouse_cortex_snare": [("bio", 0.62), ("nmi", 0.60), ("ari", 0.45), ("auroc", 0.65)]}
PEERS = {"pbmc10k_cite": [("bio", "totalVI", False), ("isolated_asw", "totalVI", False),
                          ("isolated_f1", "totalVI", False)],
         "mouse_cortex_snare": [(key, peer, True) for key in ("bio", "nmi", "ari")
                                for peer in ("knn", "WNN", "MultiVI")]}


def _targets(rows: list[dict]) -> list[str]:
    """One line per target of the issue: met or MISSED. WNN has no silhouettes, so its ``bio`` is
    compared on ``bio_graph``; "by more than one sd" means by more than our seeds' sd."""
    def get(dataset: str, system: str) -> dict | None:
        return next((r for r in rows if r["dataset"] == dataset and r["system"].startswith(system)), None)

    lines = []
    for dataset in FLOORS:
        ours = get(dataset, "scmm-atlas (mean")
        if ours is None:
            continue
        for key, floor in FLOORS[dataset]:
            verdict = "met" if ours[key] >= floor else "MISSED"
            lines.append(f"target on {dataset}: {key} {ours[key]:.3f} ± {ours[key + '_sd']:.3f} >= {floor:.2f}: "
                         f"{verdict}")
        for key, peer, by_sd in PEERS[dataset]:
            key = "bio_graph" if peer == "WNN" and key == "bio" else key
            other = get(dataset, peer)
            if other is None:
                continue
            margin = ours[key + "_sd"] if by_sd else 0.0
            ok = ours[key] - other[key] > margin if by_sd else ours[key] >= other[key]
            verdict = "met" if ok else "MISSED"
            need = f" by more than {margin:.3f}" if by_sd else ""
            lines.append(f"target on {dataset}: {key} {ours[key]:.3f} ± {ours[key + '_sd']:.3f} above {peer} "
                         f"{other[key]:.3f}{need}: {verdict}")
    return lines


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    seeds = getattr(args, "seeds", None) or 3
    systems = (getattr(args, "systems", None) or ",".join(SYSTEMS)).split(",")
    if unknown := set(systems) - set(SYSTEMS):
        raise ValueError(f"--systems: unknown {sorted(unknown)} (known: {', '.join(SYSTEMS)})")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for key in SETS:
            data = Dataset(key, Path(tmp))
            if "scmm-atlas" in systems:
                seeded = _ours(data, seeds, getattr(args, "epochs", None))
                rows.extend([*seeded, summarise(seeded, "scmm-atlas")])
            for name in systems:
                if name != "scmm-atlas":
                    rows.extend(SYSTEMS[name](data))
    print()
    shown = [r for r in rows if "seed" not in r]
    print(format_table(shown, [c for c in COLUMNS if any(c in r for r in shown)]))
    print("\n".join(["", *_targets(rows)]))
    return rows
