"""A protein modality predicted from another, as the report shows it: per-protein Pearson r of the
sampled cells that have the protein, its two figures and the median r."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..store import Store
from ..store.results import ResultsReader
from . import figures
from .metrics import columnwise_pearson, log_normalise
from .sampling import read_counts, read_obs


@dataclass
class Protein:
    """A protein modality predicted from another: its figures, summary number and per-protein table."""

    source: str
    target: str
    n_cells: int  # sampled cells that have the target
    figures: list[Path]
    numbers: dict[str, float]
    table: pd.DataFrame  # feature, pearson_r, observed_mean, predicted_mean; best predicted first


def predicted_protein(store: Store, reader: ResultsReader, rows: np.ndarray, clusters: np.ndarray, out: Path
                      ) -> Protein | None:
    """The first protein target the results predict, over the cells ``rows`` (Leiden ``clusters``);
    None when they predict no protein."""
    pairs = [(s, t) for s, t in reader.spec.pairs if store.kind(t) == "protein" if t in store.modalities]
    if not pairs:
        return None
    source, target = pairs[0]
    features = reader.spec.target_features[target]
    has = read_obs(store, rows, [f"has_{target}"])[f"has_{target}"].to_numpy(bool)
    observed = log_normalise(read_counts(store, target, rows, features))[has]
    predicted = log_normalise(reader.prediction(source, target, rows))[has]
    r = columnwise_pearson(observed, predicted)
    drawn = [figures.protein_clusters(observed, predicted, clusters[has], features, source, target, out),
             figures.protein_scatter(observed, predicted, r, features, source, target, out)]
    table = pd.DataFrame({"feature": features, "pearson_r": r, "observed_mean": observed.mean(0),
                          "predicted_mean": predicted.mean(0)})
    table = table.sort_values("pearson_r", ascending=False, na_position="last", kind="stable")
    return Protein(source, target, int(has.sum()), drawn,
                   {f"{target}_from_{source}_median_pearson": float(np.nanmedian(r))}, table.reset_index(drop=True))
