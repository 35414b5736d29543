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

At most ``max_cells`` cells (a seeded random sample) are drawn; the store is read a slice at a time.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import Store, open_store
from ..store.base import HASH_CHUNK
from ..store.results import ResultsReader, open_results
from .markers import markers

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sample_rows(n: int, max_cells: int, seed: int = 0) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def read_obs(store: Store, rows: np.ndarray, columns: list[str]) -> pd.DataFrame:
    parts = []
    for start in range(0, store.n_obs, HASH_CHUNK):
        stop = min(store.n_obs, start + HASH_CHUNK)
        pick = rows[(rows >= start) & (rows < stop)]
        if len(pick):
            parts.append(store.obs_slice(start, stop, columns).iloc[pick - start])
    return pd.concat(parts, ignore_index=True)


def read_counts(store: Store, mod: str, rows: np.ndarray, features: list[str]) -> np.ndarray:
    cols = store.var(mod).index.get_indexer(pd.Index(features))
    out = np.zeros((len(rows), len(features)), dtype=np.float32)
    found = cols >= 0
    done = 0
    for start in range(0, store.n_obs, HASH_CHUNK):
        stop = min(store.n_obs, start + HASH_CHUNK)
        pick = rows[(rows >= start) & (rows < stop)]
        if len(pick):
            block = store.read(mod, start, stop, cols[found])[pick - start].toarray()
            out[done : done + len(pick), found] = block
            done += len(pick)
    return out


def _log_norm(x: np.ndarray) -> np.ndarray:
    total = x.sum(1, keepdims=True)
    return np.log1p(x / np.maximum(total, 1) * 1e4)


def _umap(emb: np.ndarray, labels: pd.Series, path: Path, seed: int) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(np.nan_to_num(emb).astype(np.float32))
    sc.pp.neighbors(adata, use_rep="X", n_neighbors=15, transformer="sklearn", random_state=seed)
    sc.tl.leiden(adata, resolution=1.0, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    sc.tl.umap(adata, random_state=seed)
    clusters = adata.obs["leiden"].astype(int).to_numpy()
    xy = adata.obsm["X_umap"]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, (title, values) in zip(axes, (("Leiden cluster", clusters), (labels.name, labels.to_numpy())),
                                   strict=True):
        cats = pd.Categorical(values)
        cmap = plt.get_cmap("tab20", max(len(cats.categories), 1))
        for i, cat in enumerate(cats.categories):
            sel = cats.codes == i
            ax.scatter(xy[sel, 0], xy[sel, 1], s=2, color=cmap(i), label=str(cat), rasterized=True)
            if len(cats.categories) <= 40:
                ax.annotate(str(cat), xy[sel].mean(0), fontsize=7, ha="center", weight="bold")
        ax.set_title(f"joint embedding, coloured by {title} ({len(cats.categories)})")
        ax.set_xticks([])
        ax.set_yticks([])
        if len(cats.categories) <= 20:
            ax.legend(markerscale=4, fontsize=6, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return clusters


def _programs(reader: ResultsReader, out: Path, top: int) -> list[Path]:
    curves = reader.traversals()
    if curves.empty:
        return []
    plt = _plt()
    paths = []
    for mod, cm in curves.groupby("modality"):
        dims = sorted(cm["dim"].unique())
        ncol = min(5, len(dims))
        nrow = -(-len(dims) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
        for ax, dim in zip(axes.ravel(), dims, strict=False):
            sub = cm[cm["dim"] == dim]
            feats = [f for d in ("up", "down") for f in
                     sub[sub.direction == d].drop_duplicates("feature")["feature"].tolist()[:top]]
            mat = sub.pivot_table(index="feature", columns="step", values="mean").reindex(feats)
            lo, hi = mat.min(1).to_numpy()[:, None], mat.max(1).to_numpy()[:, None]
            ax.imshow((mat.to_numpy() - lo) / np.maximum(hi - lo, 1e-12), aspect="auto", cmap="viridis",
                      vmin=0, vmax=1)
            ax.set_yticks(range(len(feats)), feats, fontsize=5)
            z = sub.drop_duplicates("step").sort_values("step")["z"].to_numpy()
            ax.set_xticks([0, len(z) - 1], [f"{z[0]:.1f}", f"{z[-1]:.1f}"], fontsize=6)
            ax.set_title(f"dim {dim}", fontsize=8)
        for ax in axes.ravel()[len(dims):]:
            ax.axis("off")
        fig.suptitle(f"{mod}: top program features along each latent traversal (rising, then falling; "
                     "each scaled to its range)", fontsize=9)
        fig.tight_layout()
        path = out / f"programs_{mod}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _protein(store: Store, reader: ResultsReader, rows: np.ndarray, clusters: np.ndarray, out: Path
             ) -> tuple[list[Path], dict[str, float]]:
    pairs = [(s, t) for s, t in reader.spec.pairs if store.kind(t) == "protein" if t in store.modalities]
    if not pairs:
        return [], {}
    source, target = pairs[0]
    features = reader.spec.target_features[target]
    has = read_obs(store, rows, [f"has_{target}"])[f"has_{target}"].to_numpy(bool)
    observed = _log_norm(read_counts(store, target, rows, features))[has]
    predicted = _log_norm(reader.prediction(source, target, rows))[has]
    cl = clusters[has]
    r = np.array([np.corrcoef(observed[:, j], predicted[:, j])[0, 1] if observed[:, j].std() > 0 else np.nan
                  for j in range(len(features))])
    plt = _plt()
    ids = np.unique(cl)
    means = [np.stack([m[cl == c].mean(0) for c in ids]) for m in (observed, predicted)]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.18 * len(features) * 2), 0.25 * len(ids) + 2.5))
    for ax, mat, title in zip(axes, means, ("observed", f"predicted from {source}"), strict=True):
        zs = (mat - mat.mean(0)) / np.maximum(mat.std(0), 1e-9)
        ax.imshow(zs, aspect="auto", cmap="RdBu_r", vmin=-2.5, vmax=2.5)
        ax.set_yticks(range(len(ids)), [f"cluster {c}" for c in ids], fontsize=6)
        ax.set_xticks(range(len(features)), features, rotation=90, fontsize=5)
        ax.set_title(f"{target} {title} (mean log1p per 10k, z-scored across clusters)", fontsize=8)
    fig.tight_layout()
    heat = out / f"{target}_clusters.png"
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    order = np.argsort(-observed.var(0))[:12]
    fig, axes = plt.subplots(3, 4, figsize=(12, 9), squeeze=False)
    for ax, j in zip(axes.ravel(), order, strict=False):
        ax.scatter(observed[:, j], predicted[:, j], s=1, alpha=0.3, rasterized=True)
        ax.set_title(f"{features[j]}  r = {r[j]:.2f}", fontsize=8)
        ax.set_xlabel("observed (log1p per 10k)", fontsize=7)
        ax.set_ylabel(f"predicted from {source}", fontsize=7)
    for ax in axes.ravel()[len(order):]:
        ax.axis("off")
    fig.tight_layout()
    scatter = out / f"{target}_scatter.png"
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    return [heat, scatter], {f"{target}_from_{source}_median_pearson": float(np.nanmedian(r))}


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


def _markers_html(table: pd.DataFrame, per_group: int = 4) -> str:
    """Sub-clusters (else clusters): per group and modality, its top features with log2 fold changes."""
    level = "subcluster" if (table["level"] == "subcluster").any() else "cluster"
    lines = []
    for group, g in table[table["level"] == level].groupby("group", sort=True):
        cells = [f"{html.escape(str(m))}: " + ", ".join(
            f"{html.escape(str(r.feature))} ({r.log2fc:+.1f})" for r in gm[gm["rank"] <= per_group].itertuples())
            for m, gm in g.groupby("modality", sort=False)]
        lines.append(f"<tr><td>{html.escape(str(group))}</td><td>{int(g['n_cells'].iloc[0])}</td>"
                     f"<td>{'<br>'.join(cells)}</td></tr>")
    return (f"<h2>markers of each {level} (Wilcoxon, top {per_group}, log2 fold change; all in markers.csv)</h2>"
            f"<table border='1' cellpadding='3'><tr><th>{level}</th><th>cells</th><th>top features</th></tr>"
            + "".join(lines) + "</table>")


def _motifs_html(table: pd.DataFrame, top: int = 3, q: float = 0.05) -> str:
    """Per ATAC program direction, its ``top`` motifs of q < ``q``, after a sentence on the test."""
    found = table[(table["q"] < q) & (table["rank"] <= top)]
    lines = [f"<tr><td>{html.escape(str(mod))}</td><td>{dim}</td><td>{html.escape(str(d))}</td><td>"
             + "; ".join(f"{html.escape(str(r.motif_name))} ({html.escape(str(r.motif_id))}, {r.fg_hits}/{r.fg_n} "
                         f"vs {r.bg_hits}/{r.bg_n} peaks, OR {r.odds_ratio:.1f}, q {r.q:.1e})"
                         for r in g.itertuples()) + "</td></tr>"
             for (mod, dim, d), g in found.groupby(["modality", "dim", "direction"], sort=True)]
    release = ", ".join(sorted(set(table["release"].astype(str)))) or "JASPAR"
    n_dirs = table.groupby(["modality", "dim", "direction"]).ngroups
    about = (f"<p>JASPAR motifs ({html.escape(release)} CORE vertebrates) present in each program direction's top "
             "ATAC peaks (a site on either strand of score p-value below that set at inference, 1e-4 by default) "
             "against background peaks of the same GC content: one-sided Fisher's exact test, Benjamini-Hochberg "
             "across the motifs of each direction. "
             f"The top {top} with q &lt; {q} are shown: {len(lines)} of {n_dirs} program directions have any; "
             "all motifs in motifs.csv.</p>")
    rows = "".join(lines) or "<tr><td colspan='4'>none</td></tr>"
    return (f"<h2>motifs of the ATAC programs</h2>{about}<table border='1' cellpadding='3'><tr><th>modality</th>"
            f"<th>dim</th><th>direction</th><th>top motifs</th></tr>{rows}</table>")


def report(store_uri: str, out_dir: str | Path, *, version: str | None = None, max_cells: int = 20_000,
           top: int = 5, seed: int = 0, tracking: str | None = None) -> dict[str, Any]:
    """Write the figures and ``index.html`` into ``out_dir``; log them to the model's MLflow run when
    the published model came from MLflow. Returns paths and summary numbers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_store(store_uri) as store:
        reader = open_results(store, version)
        rows = sample_rows(reader.n_obs, max_cells, seed)
        obs = read_obs(store, rows, ["cell_type", "batch"])
        label = obs["cell_type"] if (obs["cell_type"].astype(str) != "").any() else obs["batch"]
        label = label.astype(str).rename("label" if label is obs["cell_type"] else "batch")
        clusters = _umap(reader.embedding("joint", rows), label, out / "umap.png", seed)
        figures = [out / "umap.png", *_programs(reader, out, top)]
        protein, numbers = _protein(store, reader, rows, clusters, out)
        figures += protein
        numbers.update({"cells_shown": len(rows), "leiden_clusters": len(np.unique(clusters))})
        table = markers_of(store, reader, rows, seed=seed)
        motifs = reader.table("motifs")
        record = reader.record
    table.to_csv(out / "markers.csv", index=False)
    tables = [out / "markers.csv"]
    extra = _markers_html(table) if len(table) else ""
    if "motif_id" in motifs:
        motifs.to_csv(out / "motifs.csv", index=False)
        tables.append(out / "motifs.csv")
        extra += _motifs_html(motifs)
    page = out / "index.html"
    page.write_text(_html(store_uri, record, figures, numbers, extra))
    run_id = _log_to_mlflow(record, [*figures, *tables, page], tracking)
    return {"figures": [str(p) for p in figures], "html": str(page), "numbers": numbers, "mlflow_run": run_id}


def _html(store_uri: str, record: dict, figures: list[Path], numbers: dict, extra: str = "") -> str:
    items = "\n".join(f'<h2>{html.escape(p.stem)}</h2><img src="{html.escape(p.name)}" style="max-width:100%">'
                      for p in figures)
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in
                    {**{k: record[k] for k in ("version", "model_uri", "time", "n_cells")}, **numbers}.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>scmm-atlas report</title></head><body>"
            f"<h1>scmm-atlas results of {html.escape(store_uri)}</h1><ul>{facts}</ul>{items}{extra}</body></html>\n")


def _log_to_mlflow(record: dict, paths: list[Path], tracking: str | None) -> str | None:
    uri = record.get("model_uri", "")
    if not uri.startswith(("models:/", "runs:/")):
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking)
    try:
        if uri.startswith("runs:/"):
            run_id = uri.split("/")[1]
        else:
            name = uri[len("models:/"):].split("@")[0].split("/")[0]
            run_id = client.get_model_version(name, record["version"]).run_id
        for p in paths:
            client.log_artifact(run_id, str(p), artifact_path="report")
    except mlflow.exceptions.MlflowException as exc:
        log.warning("report not logged to MLflow (%s)", str(exc).splitlines()[0])
        return None
    return run_id
