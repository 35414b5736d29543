"""``scmm-atlas report``: figures of a published results version, an HTML page, and the same figures
in the model's MLflow run.

- ``umap.png``: UMAP of the joint embedding, coloured by Leiden cluster and by label.
- ``programs_<MOD>.png``: per latent dim, the top program features' decoded means along the
  traversal (each feature scaled to its own range), rising features above falling ones.
- ``<T>_clusters.png`` / ``<T>_scatter.png`` (a protein modality predicted from another): observed vs
  predicted per Leiden cluster (heatmap, each protein z-scored across clusters) and per protein
  (scatter of log1p per-10k values, Pearson r in each title).
- ``markers.csv`` and a table on the page: the top differential features of each Leiden cluster
  and of the sub-clusters inside each labelled type (:mod:`.markers`), over the cells that have
  every modality, on the store's selected features.
- ``motifs.csv`` and a table on the page, when the version has a motif table (``infer --genome``):
  the JASPAR motifs enriched in each ATAC program direction's peaks (:mod:`..infer.motifs`).

At most ``max_cells`` cells (a seeded random sample) are drawn; the store is read a slice at a time
(:mod:`.sampling`). The figures are drawn by :mod:`.figures`, the page rendered by :mod:`.page` and the
files logged to MLflow by :mod:`.tracking`; this module puts them together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import Store, open_store
from ..store.results import ResultsReader, open_results
from . import figures
from .markers import markers
from .page import Page
from .protein import Protein, predicted_protein
from .sampling import read_counts, read_obs, sample_rows
from .tracking import find_run, log_artifacts

UNLABELLED = ("", "unknown", "nan")


def markers_of(store: Store, reader: ResultsReader, rows: np.ndarray, *, label_key: str = "cell_type",
               resolution: float = 1.0, sub_resolution: float = 0.3, top: int = 10, seed: int = 0) -> pd.DataFrame:
    """:func:`.markers.markers` of the published embedding for the cells ``rows`` that have every modality;
    sub-clusters inside each value of ``label_key`` except the unlabelled ones."""
    obs = read_obs(store, rows, [label_key, *(f"has_{m}" for m in store.modalities)])
    complete = np.logical_and.reduce([obs[f"has_{m}"].to_numpy(bool) for m in store.modalities])
    rows, labels = rows[complete], obs[label_key].astype(str).to_numpy()[complete]
    labels = np.where(np.isin(labels, UNLABELLED), "", labels)
    counts = {}
    for mod in store.modalities:
        names = list(store.feature_names(mod, "selected"))
        counts[mod] = (read_counts(store, mod, rows, names), names)
    table = markers(reader.embedding("joint", rows), counts, labels=labels if (labels != "").any() else None,
                    resolution=resolution, sub_resolution=sub_resolution, top=top, seed=seed)
    return table[~table["group"].astype(str).str.startswith("/")]  # the unlabelled cells' sub-clusters


def store_markers(store_uri: str, *, version: str | None = None, max_cells: int = 20_000, seed: int = 0,
                  **options: Any) -> pd.DataFrame:
    """``scmm-atlas query markers``: :func:`markers_of` for a seeded sample of at most ``max_cells`` cells."""
    with open_store(store_uri) as store:
        reader = open_results(store, version)
        return markers_of(store, reader, sample_rows(reader.n_obs, max_cells, seed), seed=seed, **options)


def report(store_uri: str, out_dir: str | Path, *, version: str | None = None, max_cells: int = 20_000,
           top: int = 5, seed: int = 0, tracking: str | None = None) -> dict[str, Any]:
    """Write the figures, tables and ``index.html`` into ``out_dir``; log them to the model's MLflow run
    when the published model came from MLflow. Returns paths and summary numbers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_store(store_uri) as store:
        reader = open_results(store, version)
        rows = sample_rows(reader.n_obs, max_cells, seed)
        obs = read_obs(store, rows, ["cell_type", "batch"])
        label = obs["cell_type"] if (obs["cell_type"].astype(str) != "").any() else obs["batch"]
        label = label.astype(str).rename("label" if label is obs["cell_type"] else "batch")
        clusters = figures.umap(reader.embedding("joint", rows), label, out / "umap.png", seed)
        drawn = [out / "umap.png", *figures.programs(reader, out, top)]
        protein = predicted_protein(store, reader, rows, clusters, out)
        numbers: dict[str, Any] = dict(protein.numbers) if protein else {}
        numbers.update({"cells_shown": len(rows), "leiden_clusters": len(np.unique(clusters))})
        table, motifs = markers_of(store, reader, rows, seed=seed), reader.table("motifs")
        page = Page(store_uri, store.backend, store.n_obs, reader.record, numbers, str(label.name), top, protein,
                    markers=table, motifs=motifs)
    page.figures = drawn + (protein.figures if protein else [])
    page.tables = _write_tables(out, table, motifs, protein)
    page.run = find_run(page.record, tracking)
    html_path = out / "index.html"
    html_path.write_text(page.html())
    if page.run is not None and not log_artifacts(page.run, [*page.figures, *page.tables, html_path]):
        page.run = None
        html_path.write_text(page.html())  # the page must not point at a run that lacks it
    return {"figures": [str(p) for p in page.figures], "html": str(html_path), "numbers": numbers,
            "tables": [str(p) for p in page.tables], "mlflow_run": page.run.run_id if page.run else None,
            "mlflow_url": page.run.links()[0] if page.run else None}


def _write_tables(out: Path, markers_table: pd.DataFrame, motifs: pd.DataFrame, protein: Protein | None
                  ) -> list[Path]:
    """The CSVs beside the page: markers always, motifs and per-protein correlations when there are any."""
    written = [out / "markers.csv"]
    markers_table.to_csv(written[-1], index=False)
    if "motif_id" in motifs:
        written.append(out / "motifs.csv")
        motifs.to_csv(written[-1], index=False)
    if protein is not None:
        written.append(out / f"{protein.target}_pearson.csv")
        protein.table.to_csv(written[-1], index=False)
    return written
