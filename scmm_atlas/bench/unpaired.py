"""``scmm-atlas bench unpaired``: integrating unpaired scRNA-seq and scATAC-seq (scMM paper §3.3).

The paper integrates scRNA-seq with scATAC-seq turned into pseudo-RNA by the model (RNA decoded
from the ATAC expert) and finds it mixes the two better than ATAC gene activity does. Here, on
``mouse_cortex_snare`` (labels ``cell_type``, batches its 12 pools) and ``a549_scicar`` (labels
``dex_time_h``; binary ATAC):

1. cells are split by a stable hash of the barcode (:func:`third`) into paired, RNA-only and
   ATAC-only thirds, and ingested as a mosaic store (an RNA file without the ATAC-only cells, an
   ATAC file without the RNA-only ones; ingest matches barcodes);
2. ``atlas_rna_atac`` is trained in process on every cell of the store (presence masks from
   ``has_*``; a random tenth of the cells, never chosen by label, for early stopping);
3. the RNA-only + ATAC-only cells are placed in one space by each system and scored alike by
   :func:`~scmm_atlas.evaluate.integration.integration_scores` (mixing entropy of RNA vs ATAC cells,
   k = 50, over log 2; label transfer RNA-only -> ATAC-only by a 15-NN vote; ARI / NMI of Leiden
   clusters at the best-NMI resolution):

   (a) ``pseudo-RNA + harmony``: the RNA-only cells' RNA with the ATAC-only cells' pseudo-RNA, RNA
       decoded at the ATAC expert's location as one of two variants: ``mean``, the decoder's mean per
       10k, or ``sampled``, counts drawn from the decoder at library sizes drawn from the RNA-only
       cells (what the original code generated). The variant is chosen per model before any
       labelled cell is scored, on the paired (training) cells alone, without labels: each cell's
       real RNA integrated with the pseudo-RNA of its own ATAC, the variant with the higher
       :func:`~scmm_atlas.evaluate.integration.pair_recall` (how often a cell's two profiles are
       neighbours) wins; the other is scored too, as ``pseudo-RNA, other variant + harmony``;
   (b) ``gene activity + harmony``: the same RNA with the ATAC-only cells' gene activity (every peak,
       gene body + 2 kb upstream, :func:`~scmm_atlas.ingest.gene_activity.gene_activity`);
   (c) ``scmm-atlas joint``: the model's joint embedding, each cell by the expert it has.

   (a) and (b) share the genes (the model's RNA features in the gene table) and
   :func:`~scmm_atlas.evaluate.integration.harmony_embedding` (10k + log1p, scaling, 30 PCs,
   harmonypy's defaults on the modality, seed 0).

The target: on SNARE, (a) beats (b) on mixing entropy and on label-transfer accuracy. Training is
capped at ``MAX_EPOCHS`` (``--epochs`` overrides); ``--seeds N`` trains N models and adds their mean.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..config import load_config
from ..evaluate.integration import harmony_embedding, integration_scores, pair_recall
from ..infer.predict import infer_batch
from ..ingest.write import IngestOptions, ingest
from ..model import MMVAE
from ..model.fit import CellData, fit
from ..store import open_store
from . import format_table
from .faithful import SHARED
from .quality import summarise

DATA = SHARED / "data"
# dataset folder, label column, batch column, gene table
SETS = {
    "snare": ("mouse_cortex_snare", "cell_type", "batch", "mm10_genes.tsv.gz"),
    "a549": ("a549_scicar", "dex_time_h", None, "hg19_genes.tsv.gz"),
}
CONFIG = "atlas_rna_atac"
PAIRED, RNA_ONLY, ATAC_ONLY = 0, 1, 2
PSEUDO, GENE_ACTIVITY, JOINT = "pseudo-RNA + harmony", "gene activity + harmony", "scmm-atlas joint"
OTHER = "pseudo-RNA, other variant + harmony"
VARIANTS = ("mean", "sampled")  # of pseudo-RNA; ties in the choice go to the first
LIBRARY_SIZE = 1e4
INFER_CHUNK = 2048
MAX_EPOCHS = 100  # the bench's cap (time); early stopping ends both sets sooner (51 and 78 epochs, seed 0)
COLUMNS = ["dataset", "system", "variant", "pair_recall", "entropy", "entropy_max", "transfer_accuracy", "ari", "nmi",
           "n_paired", "n_rna_only", "n_atac_only", "genes", "train_s", "epochs", "ga_s"]


def third(barcode: str) -> int:
    """The third a barcode falls in (PAIRED, RNA_ONLY or ATAC_ONLY): blake2b of the barcode mod 3, so the
    split depends on nothing but the barcode (not the order, not the other cells, not the Python run)."""
    return int.from_bytes(hashlib.blake2b(str(barcode).encode(), digest_size=8).digest(), "little") % 3


def split_thirds(barcodes: Iterable[str]) -> np.ndarray:
    """:func:`third` of every barcode, as int8."""
    return np.array([third(b) for b in barcodes], dtype=np.int8)


def write_mosaic(rna_path: Path, atac_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Copies of a paired dataset's two files with the unpaired cells' other modality left out: RNA for
    the paired and RNA-only cells, ATAC for the paired and ATAC-only ones (same names, in ``out_dir``)."""
    import anndata as ad

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, drop in ((rna_path, ATAC_ONLY), (atac_path, RNA_ONLY)):
        adata = ad.read_h5ad(path)
        target = out_dir / Path(path).name
        adata[split_thirds(adata.obs_names) != drop].copy().write_h5ad(target)
        written.append(target)
    return written[0], written[1]


class Mosaic:
    """One dataset as a mosaic store: its selected counts, presence masks, labels, batches and thirds."""

    def __init__(self, key: str, work: Path) -> None:
        folder, label_key, batch_key, genes_file = SETS[key]
        self.key, self.genes_path = key, DATA / "annotations" / genes_file
        rna, atac = write_mosaic(DATA / folder / "rna.h5ad", DATA / folder / "atac.h5ad", work / f"{key}-inputs")
        self.uri = str(work / f"{key}.zarr")
        ingest(self.uri, [f"RNA={rna}", f"ATAC={atac}"],
               IngestOptions(label_key=label_key, batch_key=batch_key, progress=False))
        with open_store(self.uri) as store:
            self.counts = {m: store.read(m, 0, store.n_obs, features="selected").astype(np.float32)
                           for m in store.modalities}
            self.rna_genes = list(store.feature_names("RNA", "selected"))
            obs = store.obs()
        self.obs_ids = obs.index
        self.mask = {m: obs[f"has_{m}"].to_numpy(bool) for m in self.counts}
        self.labels = obs["cell_type"].astype(str).to_numpy()
        self.batch = obs["batch"].astype("category").cat.codes.to_numpy().astype(np.int64)
        thirds = split_thirds(obs.index)
        self.rna_only = np.flatnonzero((thirds == RNA_ONLY) & self.mask["RNA"])
        self.atac_only = np.flatnonzero((thirds == ATAC_ONLY) & self.mask["ATAC"])
        if self.mask["ATAC"][self.rna_only].any() or self.mask["RNA"][self.atac_only].any():
            raise RuntimeError("the mosaic store pairs a cell that should be unpaired")
        self.n_paired = int((self.mask["RNA"] & self.mask["ATAC"]).sum())


def train(data: Mosaic, *, epochs: int | None, seed: int) -> tuple[MMVAE, float, int]:
    """``CONFIG`` fitted on every cell with its presence masks; a random tenth early-stops it."""
    cfg = load_config(CONFIG)
    cfg.train.epochs = epochs if epochs is not None else min(cfg.train.epochs, MAX_EPOCHS)
    cfg.train.seed = seed
    torch.manual_seed(seed)
    model = MMVAE(cfg.model.build({m: c.shape[1] for m, c in data.counts.items()},
                                  n_batches=int(data.batch.max()) + 1))
    n = len(data.labels)
    perm = np.random.default_rng(seed).permutation(n)
    val, fitted = np.sort(perm[: n // 10]), np.sort(perm[n // 10 :])
    t0 = time.perf_counter()
    res = fit(model, CellData(data.counts, mask=data.mask, batch=data.batch), fitted, val, cfg.train)
    return model.eval(), time.perf_counter() - t0, len(res.history)


def _chunks(data: Mosaic, cells: np.ndarray) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor],
                                                                 dict[str, torch.Tensor], torch.Tensor]]:
    """``cells`` in pieces of at most ``INFER_CHUNK``: (positions in ``cells``, counts, masks, batch codes)."""
    for part in np.array_split(np.arange(len(cells)), max(1, -(-len(cells) // INFER_CHUNK))):
        chunk = cells[part]
        yield (part, {m: torch.from_numpy(c[chunk].toarray()) for m, c in data.counts.items()},
               {m: torch.from_numpy(v[chunk]) for m, v in data.mask.items()}, torch.from_numpy(data.batch[chunk]))


def infer_cells(model: MMVAE, data: Mosaic, cells: np.ndarray, *, pseudo_rna: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The joint embedding of ``cells`` from the modalities they have and, if asked, their RNA inferred
    from ATAC at ``LIBRARY_SIZE`` counts (the RNA decoder's mean at the ATAC expert's location)."""
    pairs = [("ATAC", "RNA")] if pseudo_rna else []
    joint, pred = [], []
    for _, x, mask, batch in _chunks(data, cells):
        out = infer_batch(model, x, mask=mask, batch=batch, pairs=pairs, library_size=LIBRARY_SIZE)
        joint.append(out.joint)
        pred.extend(out.predictions.values())
    return np.concatenate(joint), np.concatenate(pred) if pred else None


@torch.no_grad()
def sample_pseudo_rna(model: MMVAE, data: Mosaic, cells: np.ndarray, *, seed: int) -> np.ndarray:
    """RNA counts drawn from the RNA decoder at the ATAC expert's location, each cell at a library size
    drawn from the RNA-only cells' totals: pseudo-RNA with the depth and count noise of the RNA it is
    integrated with (as the original scMM code generated it, by sampling), unlike the smooth mean."""
    totals = np.asarray(data.counts["RNA"][data.rna_only].sum(axis=1), dtype=np.float32).ravel()
    library = np.random.default_rng(seed).choice(totals, len(cells))[:, None]
    torch.manual_seed(seed)
    model.eval()
    out = []
    for part, x, mask, batch in _chunks(data, cells):
        qz = model.encode(x, mask, batch)
        out.append(model.decode(qz["ATAC"].loc, "RNA", torch.from_numpy(library[part]), batch).sample().numpy())
    return np.concatenate(out)


def pseudo_rna(model: MMVAE, data: Mosaic, cells: np.ndarray, variant: str, *, seed: int) -> np.ndarray:
    """RNA inferred from the ATAC of ``cells`` as ``variant`` (:data:`VARIANTS`)."""
    if variant == "mean":
        return infer_cells(model, data, cells, pseudo_rna=True)[1]
    return sample_pseudo_rna(model, data, cells, seed=seed)


def choose_variant(model: MMVAE, data: Mosaic, col: np.ndarray, *, seed: int) -> tuple[str, dict[str, float]]:
    """The pseudo-RNA variant to integrate, chosen on the paired cells without labels: each one's real
    RNA (on the genes ``col``) and the pseudo-RNA of its own ATAC through :func:`harmony_embedding`; the
    higher :func:`pair_recall` wins. Returns the variant and every variant's recall."""
    paired = np.flatnonzero(data.mask["RNA"] & data.mask["ATAC"])
    real = data.counts["RNA"][paired][:, col]
    recall = {v: pair_recall(harmony_embedding([real, pseudo_rna(model, data, paired, v, seed=seed)[:, col]]),
                             len(paired)) for v in VARIANTS}
    return max(VARIANTS, key=recall.__getitem__), recall


def shared_genes(data: Mosaic) -> list[str]:
    """The model's RNA features that the gene table has (model order): the genes of both (a) and (b)."""
    from ..ingest.gene_activity import read_gene_table

    table = set(read_gene_table(data.genes_path)["gene_name"])
    return [g for g in data.rna_genes if g in table]


def activity(data: Mosaic, genes: list[str], cells: np.ndarray, work: Path) -> sp.csr_matrix:
    """Gene activity of ``cells`` over ``genes`` from every ATAC peak of the mosaic store."""
    from ..ingest.gene_activity import gene_activity

    out = str(work / f"{data.key}-ga.zarr")
    gene_activity(data.uri, data.genes_path, out, modality="ATAC", genes=genes, progress=False)
    with open_store(out) as ga:
        if not ga.obs().index.equals(data.obs_ids):
            raise RuntimeError("the gene-activity store's cells differ from the mosaic store's")
        cols = ga.feature_names("GA").get_indexer(genes)
        if (cols < 0).any():
            raise RuntimeError(f"gene activity lacks {int((cols < 0).sum())} of the requested genes")
        return ga.read("GA", 0, ga.n_obs)[cells][:, cols]


def run_dataset(key: str, work: Path, *, seeds: int, epochs: int | None) -> list[dict]:
    """The three systems' rows on one dataset (the model-based ones once per seed, and their mean)."""
    data = Mosaic(key, work)
    genes = shared_genes(data)
    col = pd.Index(data.rna_genes).get_indexer(genes)
    cells = np.concatenate([data.rna_only, data.atac_only])
    is_atac = np.repeat([False, True], [len(data.rna_only), len(data.atac_only)])
    labels = data.labels[cells]
    rna = data.counts["RNA"][data.rna_only][:, col]
    info = {"dataset": key, "n_paired": data.n_paired, "n_rna_only": len(data.rna_only),
            "n_atac_only": len(data.atac_only), "genes": len(genes)}
    t0 = time.perf_counter()
    ga = activity(data, genes, data.atac_only, work)
    ga_s = time.perf_counter() - t0
    rows = [{"system": GENE_ACTIVITY, **info, **integration_scores(harmony_embedding([rna, ga]), is_atac, labels),
             "ga_s": ga_s}]
    for seed in range(seeds):
        model, train_s, n_epochs = train(data, epochs=epochs, seed=seed)
        print(f"  scmm-atlas seed {seed} on {key}: {n_epochs} epochs in {train_s:.0f} s", flush=True)
        joint_rna, _ = infer_cells(model, data, data.rna_only)
        joint_atac, _ = infer_cells(model, data, data.atac_only)
        fitted = {"seed": seed, "train_s": train_s, "epochs": n_epochs}
        chosen, recall = choose_variant(model, data, col, seed=seed)
        print("  pseudo-RNA on the paired cells, pair recall: "
              + ", ".join(f"{v} {r:.3f}" for v, r in recall.items()) + f" -> {chosen}", flush=True)
        for variant in sorted(VARIANTS, key=lambda v: v != chosen):
            pseudo = pseudo_rna(model, data, data.atac_only, variant, seed=seed)[:, col]
            rows.append({"system": PSEUDO if variant == chosen else OTHER, "variant": variant,
                         "pair_recall": recall[variant], **info, **fitted,
                         **integration_scores(harmony_embedding([rna, pseudo]), is_atac, labels)})
        rows.append({"system": JOINT, **info, **fitted,
                     **integration_scores(np.vstack([joint_rna, joint_atac]), is_atac, labels)})
    if seeds > 1:
        rows += [summarise(rows, system) for system in (PSEUDO, OTHER, JOINT)]
    return rows


def compare(rows: list[dict], system: str) -> str | None:
    """Whether ``system`` beats gene activity on SNARE on entropy and on transfer accuracy (of the rows
    shown: the seeds' mean when there are several)."""
    def get(name: str) -> dict | None:
        shown = [r for r in rows if r["dataset"] == "snare" and r["system"].startswith(name)]
        return shown[0] if shown else None

    ours, ga = get(system), get(GENE_ACTIVITY)
    if ours is None or ga is None:
        return None
    met = all(ours[k] > ga[k] for k in ("entropy", "transfer_accuracy"))
    return (f"{system} vs {GENE_ACTIVITY} on snare: entropy {ours['entropy']:.3f} vs {ga['entropy']:.3f}, "
            f"transfer accuracy {ours['transfer_accuracy']:.3f} vs {ga['transfer_accuracy']:.3f}, both must be higher: "
            f"{'met' if met else 'MISSED'}")


def run(args: argparse.Namespace) -> list[dict]:
    keys = (getattr(args, "datasets", None) or ",".join(SETS)).split(",")
    if unknown := set(keys) - set(SETS):
        raise ValueError(f"--datasets: unknown {sorted(unknown)} (known: {', '.join(SETS)})")
    seeds = getattr(args, "seeds", None) or 1
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=getattr(args, "workdir", None)) as tmp:
        for key in keys:
            rows.extend(run_dataset(key, Path(tmp), seeds=seeds, epochs=getattr(args, "epochs", None)))
    print()
    shown = [r for r in rows if seeds == 1 or "seed" not in r]
    print(format_table(shown, [c for c in COLUMNS if any(c in r for r in shown)]))
    if (line := compare(shown, PSEUDO)) is not None:
        print(f"\ntarget: {line}")
        print(f"also (not the target): {compare(shown, OTHER)}")
    return rows
