"""The numbers a finished pipeline prints: what the store holds and how good the published results are.

- how well the joint embedding keeps the store's ``cell_type`` labels (:mod:`.embedding`: NMI / ARI at
  the best resolution and at the label count, silhouette, cLISI, isolated labels, 15-NN accuracy and
  their bio-conservation aggregate; iLISI and the batch aggregate without kBET where there are batches);
- cross-modal prediction quality on the **held-out** cells (the training layout's validation split,
  which the model never trained on): per-feature Pearson r of log-normalised observed vs predicted
  counts, over the cells that have the target modality;
- the top features of the programs of the three latent dims with the strongest programs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.layout import is_validation, layout_uri, read_info
from ..store import StoreError, open_store
from ..store.results import open_results
from .embedding import embedding_scores
from .metrics import feature_correlations
from .sampling import read_counts, read_obs, sample_rows


@dataclass
class Summary:
    n_cells: int
    modalities: dict[str, int]  # cells that have each modality
    version: str
    clustering: dict[str, Any] | None  # embedding_scores + n_labels (None: the store has no labels)
    heldout: dict[str, dict[str, float]]  # "ADT_from_RNA" -> mean / median Pearson, cells
    programs: pd.DataFrame = field(default_factory=pd.DataFrame)  # dim, modality, direction, features

    def save(self, path: Path) -> None:
        """As JSON (written whole, then renamed: a reader never sees half of it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**asdict(self), "programs": self.programs.to_dict(orient="records")}
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(record, default=lambda x: x.item()))  # numpy scalars as numbers
        part.replace(path)

    @classmethod
    def load(cls, path: Path) -> Summary:
        record = json.loads(path.read_text())
        return cls(**{**record, "programs": pd.DataFrame(record["programs"],
                                                         columns=["dim", "modality", "direction", "features"])})

    def lines(self) -> list[str]:
        out = [f"cells: {self.n_cells:,}; modalities: " + ", ".join(f"{m} ({n:,} cells)"
                                                                    for m, n in self.modalities.items())]
        if self.clustering:
            c = self.clustering
            out.append(f"joint embedding vs cell_type labels ({c['n_labels']} labels): ARI {c['ari']:.3f}, NMI "
                       f"{c['nmi']:.3f} at the best-NMI resolution ({c['ari_k']:.3f} / {c['nmi_k']:.3f} at the label "
                       f"count); silhouette {c['silhouette']:.3f}, cLISI {c['clisi']:.3f}, isolated labels "
                       f"{c['isolated_asw']:.3f} (F1 {c['isolated_f1']:.3f}), 15-NN accuracy {c['knn_acc']:.3f}; "
                       f"bio-conservation {c['bio']:.3f}"
                       + (f"; batch mixing {c['batch']:.3f} (iLISI {c['ilisi']:.3f})" if "batch" in c else ""))
        for pair, v in self.heldout.items():
            target, _, source = pair.partition("_from_")
            out.append(f"{source} -> {target} on {v['cells']:,} held-out cells: mean Pearson r {v['mean_pearson']:.3f} "
                       f"(median over {v['features']} features {v['median_pearson']:.3f})")
        for dim, rows in self.programs.groupby("dim", sort=False):
            parts = [f"{r.modality} {r.direction}: {', '.join(r.features)}" for r in rows.itertuples()]
            out.append(f"program of dim {dim}: " + "; ".join(parts))
        return out


def _top_programs(table: pd.DataFrame, n_dims: int, top: int) -> pd.DataFrame:
    if table.empty:
        return pd.DataFrame(columns=["dim", "modality", "direction", "features"])
    lead = table[table["rank"] <= top]
    strength = lead.assign(a=lead["rho"].abs()).groupby("dim")["a"].mean().sort_values(ascending=False)
    rows = []
    for dim in strength.index[:n_dims]:
        for (mod, direction), g in lead[lead["dim"] == dim].groupby(["modality", "direction"], sort=False):
            rows.append({"dim": int(dim), "modality": mod, "direction": direction,
                         "features": list(g.sort_values("rank")["feature"].astype(str))})
    return pd.DataFrame(rows)


def summarise(store_uri: str, *, version: str | None = None, max_cells: int = 20_000, max_heldout: int = 5_000,
              n_dims: int = 3, top: int = 3, seed: int = 0) -> Summary:
    """Summarise the published results ``version`` (default: the latest) of ``store_uri``."""
    with open_store(store_uri) as store:
        reader = open_results(store, version)
        n = reader.n_obs
        has = read_obs(store, np.arange(n), [f"has_{m}" for m in store.modalities])
        modalities = {m: int(has[f"has_{m}"].sum()) for m in store.modalities}
        clustering = None
        rows = sample_rows(n, max_cells, seed)
        obs = read_obs(store, rows, ["cell_type", "batch"])
        labels = obs["cell_type"].astype(str).to_numpy()
        known = ~np.isin(labels, ["", "unknown", "nan"])
        if known.sum() > 10 and len(np.unique(labels[known])) > 1:
            emb = reader.embedding("joint", rows[known])
            scores = embedding_scores(emb, labels[known], batch=obs["batch"].astype(str).to_numpy()[known],
                                      seed=seed, kbet=False)
            clustering = {**scores, "n_labels": len(np.unique(labels[known]))}
        layout = read_info(layout_uri(store.uri))
        if layout is None:
            raise StoreError(store.uri, "layout", "no training layout: the held-out cells are unknown (train first)")
        held = np.flatnonzero(is_validation(store.obs_id_hashes()[:n], layout.val_fraction))
        held = held if len(held) <= max_heldout else np.sort(np.random.default_rng(seed).choice(held, max_heldout,
                                                                                                 replace=False))
        heldout = {}
        for source, target in reader.spec.pairs:
            both = held[has[f"has_{source}"].to_numpy()[held] & has[f"has_{target}"].to_numpy()[held]]
            if len(both) < 3:
                continue
            features = reader.spec.target_features[target]
            corr = feature_correlations(reader.prediction(source, target, both),
                                        read_counts(store, target, both, features))
            r = corr["pearson_per_feature"]
            heldout[f"{target}_from_{source}"] = {"mean_pearson": corr["pearson"],
                                                  "median_pearson": float(np.nanmedian(r)),
                                                  "features": int(np.isfinite(r).sum()), "cells": len(both)}
        programs = _top_programs(reader.programs(), n_dims, top)
    return Summary(n_cells=n, modalities=modalities, version=reader.spec.version, clustering=clustering,
                   heldout=heldout, programs=programs)
