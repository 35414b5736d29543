"""``scmm-atlas bench sweep``: settings of the atlas model chosen on validation cells only.

Each variant (``key=value`` overrides of the dataset's atlas config; ``--grid FILE`` gives a YAML
``{cite: {name: [overrides]}, rna_atac: {...}}``, else ``GRID``) is trained with seed 0 on the
training cells of :func:`.quality.split`, early-stopping on the validation cells, and scored on the
**validation cells** only (the held-out tenth is never looked at): the embedding of those cells by
:mod:`~scmm_atlas.evaluate.embedding` (without kBET), and their second modality predicted from RNA.
The variant with the highest bio-conservation aggregate wins; ``bench quality`` then reports the
defaults on the held-out cells with three seeds. ``--jobs N`` trains N variants at once, each with
1/N of the threads.
"""

from __future__ import annotations

import argparse
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml

from . import format_table
from .quality import SETS, Dataset, embed_and_predict, prediction_scores, score, train_ours

GRID: dict[str, dict[str, list[str]]] = {
    key: {
        "defaults": [],
        "kl0.5": ["train.kl_weight=0.5"],
        "kl0.25": ["train.kl_weight=0.25"],
        "kl0.1": ["train.kl_weight=0.1"],
        "kl0.25_concat": ["train.kl_weight=0.25", "model.embedding=concat"],
        "kl0.25_mopoe": ["train.kl_weight=0.25", "model.joint=mopoe"],
        "kl0.25_" + extra.split(".")[2] + "_" + extra.split("=")[1]: ["train.kl_weight=0.25", extra],
    }
    for key, extra in (("cite", "model.modalities.ADT.likelihood=nb_mixture"),
                       ("rna_atac", "model.modalities.ATAC.likelihood=poisson"))
}


def _variant(data: Dataset, name: str, overrides: list[str], epochs: int | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    model, train_s, n_epochs = train_ours(data, overrides, epochs=epochs)
    emb, pred = embed_and_predict(model, data, data.val, data.val)
    return {"system": name, "dataset": data.name, "overrides": " ".join(overrides) or "-",
            **score(data, data.val, embedding=emb),
            **prediction_scores(data.target, pred, data.counts[data.target][data.val]),
            "train_s": train_s, "epochs": n_epochs}


def run(args: argparse.Namespace) -> list[dict]:
    grid = yaml.safe_load(Path(args.grid).read_text()) if getattr(args, "grid", None) else GRID
    jobs = max(1, getattr(args, "jobs", None) or 1)
    threads = max(1, torch.get_num_threads() // jobs)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for key, variants in grid.items():
            if key not in SETS:
                raise ValueError(f"{args.grid}: unknown data set {key!r} (known: {sorted(SETS)})")
            data = Dataset(key, Path(tmp))
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_variant, data, name, list(o), getattr(args, "epochs", None), threads)
                           for name, o in variants.items()]
                for future in futures:
                    rows.append(future.result())
                    r = rows[-1]
                    print(f"  {r['system']} on {r['dataset']}: bio {r['bio']:.3f}, {r['epochs']} epochs in "
                          f"{r['train_s']:.0f} s", flush=True)
    print()
    columns = ["dataset", "system", "bio", "nmi", "ari", "silhouette", "clisi", "isolated_asw", "isolated_f1",
               "knn_acc", "nmi_fine", "batch", "pearson", "auroc", "auprc", "epochs", "train_s"]
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)]))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        best = max((r for r in rows if r["dataset"] == dataset), key=lambda r: r["bio"])
        print(f"chosen on {dataset}'s validation cells: {best['system']} ({best['overrides']}), bio {best['bio']:.3f}")
    return rows
