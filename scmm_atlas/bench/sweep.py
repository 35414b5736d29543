"""``scmm-atlas bench sweep``: settings of the atlas model chosen on validation cells only.

Each variant (``key=value`` overrides of the dataset's atlas config, and ``stats.atac_quantile`` /
``stats.n_top_genes`` for the feature selection; ``--grid FILE`` gives a YAML
``{cite: {name: [overrides]}, rna_atac: {...}}``, else ``GRID``) is trained with seeds
``0 .. --seeds - 1`` (default 1) on the training cells of :func:`.quality.split`, early-stopping on
the validation cells, and scored on the **validation cells** only (the held-out tenth is never
looked at): the embedding of those cells by :mod:`~scmm_atlas.evaluate.embedding` (without kBET),
and their second modality predicted from RNA.

The rule that picks the winner was fixed before any result was seen: the highest ``select``, the
mean of the bio-conservation aggregate and the prediction's skill (Pearson for proteins; 2 AUROC - 1
for peaks, so that 0 is chance for both), averaged over the seeds. Where the winner's lead is
smaller than the larger of the two seed sds, the sweep says so: rerun those variants with more
seeds. ``bench quality`` then reports the defaults on the held-out cells with three seeds.
``--jobs N`` trains N runs at once, each with 1/N of the threads.
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
from .quality import SETS, Dataset, embed_and_predict, prediction_scores, score, summarise, train_ours

GRID: dict[str, dict[str, list[str]]] = {
    key: {
        "defaults": [],
        "kl0.5": ["train.kl_weight=0.5"],
        "kl0.1": ["train.kl_weight=0.1"],
        "concat": ["model.embedding=concat"],
        "mopoe": ["model.joint=mopoe"],
        "latent32": ["model.latent_dim=32"],
        extra.split(".")[2] + "_" + extra.split("=")[1]: [extra],
    }
    for key, extra in (("cite", "model.modalities.ADT.likelihood=nb_mixture"),
                       ("rna_atac", "model.modalities.ATAC.likelihood=poisson"))
}


def skill(row: dict) -> float:
    """The prediction's skill on a common scale (0: chance, 1: perfect)."""
    return row["pearson"] if "pearson" in row else 2 * row["auroc"] - 1


def _stats(overrides: list[str]) -> dict[str, str]:
    """The ``stats.KEY=VALUE`` overrides (feature selection, :class:`.quality.Dataset`), sorted by key."""
    pairs = (o.removeprefix("stats.").split("=", 1) for o in overrides if o.startswith("stats."))
    return dict(sorted((k, v) for k, v in pairs))


def _variant(data: Dataset, name: str, overrides: list[str], seed: int, epochs: int | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    model, train_s, n_epochs = train_ours(data, overrides, epochs=epochs, seed=seed)
    emb, pred = embed_and_predict(model, data, data.val, data.val)
    row = {"system": name, "dataset": data.name, "seed": seed, **score(data, data.val, embedding=emb),
           **prediction_scores(data.target, pred, data.counts[data.target][data.val]),
           "train_s": train_s, "epochs": float(n_epochs)}
    return {**row, "select": (row["bio"] + skill(row)) / 2}


def choose(rows: list[dict]) -> str:
    """The selection rule (module doc) over one dataset's per-variant means, as a line to print."""
    ranked = sorted(rows, key=lambda r: r["select"], reverse=True)
    best = ranked[0]
    line = (f"chosen on {best['dataset']}'s validation cells: {best['system']} ({best['overrides']}), "
            f"select {best['select']:.3f} (bio {best['bio']:.3f}, skill {skill(best):.3f})")
    if len(ranked) > 1:
        second = ranked[1]
        lead, noise = best["select"] - second["select"], max(best["select_sd"], second["select_sd"])
        line += f"; lead over {second['system']} {lead:.3f}"
        if lead <= noise:
            line += f", within the seeds' sd {noise:.3f}: rerun both with more --seeds"
    if len({_stats(r["overrides"].split()).get("atac_quantile") for r in rows}) > 1:
        line += "; peaks differ between variants, so AUROC is over other peaks: compare those on bio"
    return line


def run(args: argparse.Namespace) -> list[dict]:
    grid = yaml.safe_load(Path(args.grid).read_text()) if getattr(args, "grid", None) else GRID
    jobs = max(1, getattr(args, "jobs", None) or 1)
    seeds = max(1, getattr(args, "seeds", None) or 1)
    threads = max(1, torch.get_num_threads() // jobs)
    rows: list[dict] = []
    lines = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for key, variants in grid.items():
            if key not in SETS:
                raise ValueError(f"{args.grid}: unknown data set {key!r} (known: {sorted(SETS)})")
            selection = {name: tuple(_stats(o).items()) for name, o in variants.items()}
            datasets = {k: Dataset(key, Path(tmp), stats=dict(k)) for k in dict.fromkeys(selection.values())}
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                futures = {name: [pool.submit(_variant, datasets[selection[name]], name,
                                              [x for x in o if not x.startswith("stats.")], seed,
                                              getattr(args, "epochs", None), threads) for seed in range(seeds)]
                           for name, o in variants.items()}
                means = []
                for name, runs in futures.items():
                    seeded = [f.result() for f in runs]
                    for r in seeded:
                        print(f"  {name} seed {r['seed']} on {r['dataset']}: bio {r['bio']:.3f}, skill "
                              f"{skill(r):.3f}, {r['epochs']:.0f} epochs in {r['train_s']:.0f} s", flush=True)
                    means.append({**summarise(seeded, name), "system": name,
                                  "overrides": " ".join(variants[name]) or "-"})
            rows.extend(means)
            lines.append(choose(means))
    print()
    columns = ["dataset", "system", "select", "select_sd", "bio", "bio_sd", "nmi", "ari", "silhouette", "clisi",
               "isolated_asw", "isolated_f1", "knn_acc", "nmi_fine", "batch", "pearson", "auroc", "auprc", "epochs",
               "train_s"]
    print(format_table(rows, [c for c in columns if any(c in r for r in rows)]))
    print("\n".join(["", *lines]))
    return rows
