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

import datetime as dt
import html
import logging
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import Store, open_store
from ..store.base import HASH_CHUNK
from ..store.results import ResultsReader, open_results
from ..store.results_base import ResultRecord
from .markers import markers
from .metrics import columnwise_pearson, log_normalise

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


@dataclass
class Protein:
    """A protein modality predicted from another: its figures, summary number and per-protein table."""

    source: str
    target: str
    n_cells: int  # sampled cells that have the target
    figures: list[Path]
    numbers: dict[str, float]
    table: pd.DataFrame  # feature, pearson_r, observed_mean, predicted_mean; best predicted first


def _protein(store: Store, reader: ResultsReader, rows: np.ndarray, clusters: np.ndarray, out: Path
             ) -> Protein | None:
    pairs = [(s, t) for s, t in reader.spec.pairs if store.kind(t) == "protein" if t in store.modalities]
    if not pairs:
        return None
    source, target = pairs[0]
    features = reader.spec.target_features[target]
    has = read_obs(store, rows, [f"has_{target}"])[f"has_{target}"].to_numpy(bool)
    observed = log_normalise(read_counts(store, target, rows, features))[has]
    predicted = log_normalise(reader.prediction(source, target, rows))[has]
    r = columnwise_pearson(observed, predicted)
    figures = [_protein_clusters(observed, predicted, clusters[has], features, source, target, out),
               _protein_scatter(observed, predicted, r, features, source, target, out)]
    table = pd.DataFrame({"feature": features, "pearson_r": r, "observed_mean": observed.mean(0),
                          "predicted_mean": predicted.mean(0)})
    table = table.sort_values("pearson_r", ascending=False, na_position="last", kind="stable")
    return Protein(source, target, int(has.sum()), figures,
                   {f"{target}_from_{source}_median_pearson": float(np.nanmedian(r))}, table.reset_index(drop=True))


def _protein_clusters(observed: np.ndarray, predicted: np.ndarray, cl: np.ndarray, features: list[str],
                      source: str, target: str, out: Path) -> Path:
    """Observed vs predicted cluster means side by side: the same pattern means the prediction holds."""
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
    path = out / f"{target}_clusters.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _protein_scatter(observed: np.ndarray, predicted: np.ndarray, r: np.ndarray, features: list[str],
                     source: str, target: str, out: Path) -> Path:
    """Per cell, observed vs predicted for the 12 most variable proteins (where errors would show)."""
    plt = _plt()
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
    path = out / f"{target}_scatter.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        cells = [f"<b>{html.escape(str(m))}</b>: " + ", ".join(
            f"{html.escape(str(r.feature))} ({r.log2fc:+.1f})" for r in gm[gm["rank"] <= per_group].itertuples())
            for m, gm in g.groupby("modality", sort=False)]
        lines.append(f"<tr><td>{html.escape(str(group))}</td><td class='num'>{int(g['n_cells'].iloc[0]):,}</td>"
                     f"<td>{'<br>'.join(cells)}</td></tr>")
    return (f"<h2 id='markers'>markers of each {level}</h2><p class='note'>The top {per_group} differential "
            f"features of each {level} and modality against all other cells (Wilcoxon rank-sum), with their log2 "
            "fold change in brackets; computed over the sampled cells that have every modality. All of them, with "
            "p-values and the fractions of expressing cells, are in <a href='markers.csv'>markers.csv</a>.</p>"
            f"<table class='data'><tr><th>{level}</th><th>cells</th><th>top features (log2 fold change)</th></tr>"
            + "".join(lines) + "</table>")


def _motifs_html(table: pd.DataFrame, top: int = 3, q: float = 0.05) -> str:
    """Per ATAC program direction, its ``top`` motifs of q < ``q``, after a sentence on the test."""
    found = table[(table["q"] < q) & (table["rank"] <= top)]
    lines = [f"<tr><td>{html.escape(str(mod))}</td><td class='num'>{dim}</td><td>{html.escape(str(d))}</td><td>"
             + "; ".join(f"{html.escape(str(r.motif_name))} ({html.escape(str(r.motif_id))}, {r.fg_hits}/{r.fg_n} "
                         f"vs {r.bg_hits}/{r.bg_n} peaks, OR {r.odds_ratio:.1f}, q {r.q:.1e})"
                         for r in g.itertuples()) + "</td></tr>"
             for (mod, dim, d), g in found.groupby(["modality", "dim", "direction"], sort=True)]
    release = ", ".join(sorted(set(table["release"].astype(str)))) or "JASPAR"
    n_dirs = table.groupby(["modality", "dim", "direction"]).ngroups
    about = (f"<p class='note'>JASPAR motifs ({html.escape(release)} CORE vertebrates) present in each program "
             "direction's top ATAC peaks (a site on either strand of score p-value below that set at inference, "
             "1e-4 by default) against background peaks of the same GC content: one-sided Fisher's exact test, "
             "Benjamini-Hochberg across the motifs of each direction. "
             f"The top {top} with q &lt; {q} are shown: {len(lines)} of {n_dirs} program directions have any; "
             "all motifs in <a href='motifs.csv'>motifs.csv</a>.</p>")
    rows = "".join(lines) or "<tr><td colspan='4'>none</td></tr>"
    return (f"<h2 id='motifs'>motifs of the ATAC programs</h2>{about}<table class='data'><tr><th>modality</th>"
            f"<th>dim</th><th>direction</th><th>top motifs</th></tr>{rows}</table>")


@dataclass
class MlflowRun:
    """The MLflow run a published model came from, where the report's files are logged."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str

    def links(self) -> tuple[str | None, str | None]:
        """The run's page, and for a store without a server the command that serves it: a local
        (SQLite or file) store is read by ``mlflow ui``, which listens on 127.0.0.1:5000."""
        path = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.tracking_uri.startswith(("http://", "https://")):
            return f"{self.tracking_uri.rstrip('/')}/{path}", None
        local = re.match(r"^(sqlite|file):|^[^:]*$", self.tracking_uri)  # a plain path is a file store
        if local and not self.tracking_uri.startswith("databricks"):
            return f"http://127.0.0.1:5000/{path}", f"mlflow ui --backend-store-uri {shlex.quote(self.tracking_uri)}"
        return None, None  # e.g. databricks: the run id is all we can say


def _find_run(record: ResultRecord, tracking: str | None) -> MlflowRun | None:
    """The run of ``record``'s model (``runs:/`` or ``models:/``), found before the page is written
    so that the page can link to it; None for a model folder or a run MLflow does not know."""
    uri = record.model_uri
    if not uri.startswith(("models:/", "runs:/")):
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking)
    try:
        if uri.startswith("runs:/"):
            run_id = uri.split("/")[1]
        else:
            name = uri[len("models:/"):].split("@")[0].split("/")[0]
            run_id = client.get_model_version(name, record.version).run_id
        experiment = client.get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException as exc:
        log.warning("report not logged to MLflow (%s)", str(exc).splitlines()[0])
        return None
    return MlflowRun(client, run_id, str(experiment), str(client.tracking_uri))


def _log_artifacts(run: MlflowRun, paths: list[Path]) -> bool:
    import mlflow

    try:
        for p in paths:
            run.client.log_artifact(run.run_id, str(p), artifact_path="report")
    except mlflow.exceptions.MlflowException as exc:
        log.warning("report not logged to MLflow (%s)", str(exc).splitlines()[0])
        return False
    return True


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
        clusters = _umap(reader.embedding("joint", rows), label, out / "umap.png", seed)
        figures = [out / "umap.png", *_programs(reader, out, top)]
        protein = _protein(store, reader, rows, clusters, out)
        numbers: dict[str, Any] = dict(protein.numbers) if protein else {}
        numbers.update({"cells_shown": len(rows), "leiden_clusters": len(np.unique(clusters))})
        page = Page(store_uri, store.backend, store.n_obs, reader.record, numbers, str(label.name), top, protein)
        table = markers_of(store, reader, rows, seed=seed)
        motifs = reader.table("motifs")
    page.figures = figures + (protein.figures if protein else [])
    page.tables = _write_tables(out, table, motifs, protein)
    page.extra = (_markers_html(table) if len(table) else "") + (_motifs_html(motifs) if "motif_id" in motifs else "")
    page.run = _find_run(page.record, tracking)
    html_path = out / "index.html"
    html_path.write_text(page.html())
    if page.run is not None and not _log_artifacts(page.run, [*page.figures, *page.tables, html_path]):
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


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:1150px;
margin:2em auto;padding:0 1.2em}
h1{margin-bottom:.1em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub,.note,figcaption,.details{color:#555}.details{font-size:13px;word-break:break-all}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:90%}
table.data{border-collapse:collapse;margin:.6em 0;font-size:14px}
table.data th,table.data td{border:1px solid #d6d6d6;padding:.25em .6em;text-align:left;vertical-align:top}
table.data th{background:#f2f4f7}table.data tr:nth-child(even) td{background:#fafafa}
table.data .num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1.2em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:14px;max-width:900px;margin-top:.4em}
"""


def _fmt(value: Any, digits: int = 3) -> str:
    """Numbers as people read them: 6,855 cells, r 0.915; NaN as a dash."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def store_name(uri: str) -> str:
    """The last part of a store's URI (``runs/demo/pbmc10k_cite.soma`` -> ``pbmc10k_cite.soma``)."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _when(iso: str) -> str:
    try:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M %Z").strip()
    except (TypeError, ValueError):
        return str(iso)


@dataclass
class Page:
    """What ``index.html`` shows; :meth:`html` writes it (plain HTML, inline CSS: it works offline)."""

    store_uri: str
    backend: str
    store_cells: int
    record: ResultRecord
    numbers: dict[str, Any]
    label: str  # what the UMAP's right panel is coloured by: "label" or "batch"
    top: int
    protein: Protein | None
    figures: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    extra: str = ""
    run: MlflowRun | None = None

    def html(self) -> str:
        name = html.escape(store_name(self.store_uri))
        version = html.escape(self.record.version)
        body = [f"<h1>{name}</h1><p class='sub'>scmm-atlas report of results version <b>{version}</b></p>",
                self._details(), self._summary(), self._mlflow(), "<h2 id='figures'>figures</h2>",
                *map(self._figure, self.figures), self._protein_table(), self.extra]
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{name} · results {version} · scmm-atlas report</title><style>{CSS}</style></head>"
                f"<body>{''.join(body)}</body></html>\n")

    def _details(self) -> str:
        r = self.record
        facts = [f"Store <code>{html.escape(self.store_uri)}</code> ({html.escape(self.backend)}, "
                 f"{_fmt(self.store_cells)} cells).",
                 f"Results version {html.escape(r.version)} published {html.escape(_when(r.time))}",
                 f"for {_fmt(r.n_cells)} cells by model <code>{html.escape(r.model_uri)}"
                 "</code>."]
        return f"<p class='details'>{' '.join(facts)}</p>"

    def _summary(self) -> str:
        n = self.numbers
        rows = [("cells shown", f"{_fmt(n['cells_shown'])} of {_fmt(self.record.n_cells)}",
                 "a seeded random sample; every figure and table below is over these cells"),
                ("Leiden clusters", _fmt(n["leiden_clusters"]), "of the joint embedding, resolution 1.0")]
        if self.protein is not None:
            p = self.protein
            key = f"{p.target}_from_{p.source}_median_pearson"
            rows.append((f"{p.target} predicted from {p.source}", f"median r = {_fmt(n[key])}",
                         f"median over {_fmt(len(p.table))} proteins of the Pearson r between observed and "
                         f"predicted (log1p per 10k) across the {_fmt(p.n_cells)} cells that have {p.target}"))
        body = "".join(f"<tr><th>{html.escape(k)}</th><td class='num'>{html.escape(v)}</td><td>{html.escape(why)}"
                       "</td></tr>" for k, v, why in rows)
        return f"<h2 id='summary'>at a glance</h2><table class='data'>{body}</table>"

    def _mlflow(self) -> str:
        if self.run is None:
            return ("<h2 id='mlflow'>MLflow</h2><p class='note'>The model is not an MLflow model (or its run was "
                    "not found): nothing was logged to MLflow.</p>")
        url, command = self.run.links()
        run_id = html.escape(self.run.run_id)
        where = (f"<a href='{html.escape(url)}'>run {run_id}</a>" if url else f"run <code>{run_id}</code>")
        serve = (f" The tracking store <code>{html.escape(self.run.tracking_uri)}</code> is local: open it with "
                 f"<code>{html.escape(command)}</code>, then follow the link.") if command else ""
        return (f"<h2 id='mlflow'>MLflow</h2><p>The figures, tables and this page are logged under <code>report/"
                f"</code> in the model's {where} (experiment {html.escape(self.run.experiment_id)}).{serve}</p>")

    def _figure(self, path: Path) -> str:
        src = html.escape(path.name)
        return (f"<figure id='{html.escape(path.stem)}'><img src=\"{src}\" alt=\"{html.escape(path.stem)}\">"
                f"<figcaption><b>{src}</b>. {self.caption(path)}</figcaption></figure>")

    def caption(self, path: Path) -> str:
        """What a figure shows and how to read it, by its file name (see the module docstring)."""
        n, name = _fmt(self.numbers["cells_shown"]), path.stem
        if name == "umap":
            by = "cell-type label" if self.label == "label" else "batch (the store has no cell-type labels)"
            return (f"UMAP of the joint embedding of {n} cells, coloured by Leiden cluster (left) and by {by} "
                    "(right); cluster numbers and labels sit at each group's centre. Nearby cells have similar "
                    "embeddings; a cluster of one colour on the right is one cell type (or one batch: with batches, "
                    "mixed colours inside a cluster mean the batch effect was removed). Distances between far-apart "
                    "groups mean little in a UMAP.")
        if name.startswith("programs_"):
            mod = html.escape(name[len("programs_"):])
            return (f"What each latent dimension encodes in {mod}: one panel per dimension. Moving that dimension "
                    "alone from low to high (x axis, z at both ends) while holding the others, each row is a "
                    f"feature's decoded mean: the top {self.top} rising features above the top {self.top} falling "
                    "ones, each scaled to its own range (dark = its lowest, yellow = its highest). A row that "
                    "turns yellow to the right rises with the dimension.")
        p = self.protein
        if p is not None and name == f"{p.target}_clusters":
            return (f"{html.escape(p.target)} per Leiden cluster, observed (left) and predicted from "
                    f"{html.escape(p.source)} (right): each cluster's mean log1p count per 10k over its "
                    f"{_fmt(p.n_cells)} cells with {html.escape(p.target)}, each protein z-scored across clusters "
                    "(red above its average, blue below). Where the prediction works, both sides show the same "
                    "pattern.")
        if p is not None and name == f"{p.target}_scatter":
            return (f"Observed (x) vs predicted from {html.escape(p.source)} (y) for the {min(12, len(p.table))} "
                    f"{html.escape(p.target)} features that vary most across cells, one dot per cell with "
                    f"{html.escape(p.target)} (log1p per 10k), Pearson r in each title. A tight rising cloud is a "
                    "good prediction; the axes' scales may differ (the prediction is a decoded mean). Every "
                    "protein's r is in the table below.")
        return ""

    def _protein_table(self) -> str:
        """Per protein, how well it is predicted: best first, the ones r is undefined for last."""
        p = self.protein
        if p is None:
            return ""
        t = html.escape(p.target)
        rows = "".join(f"<tr><td class='num'>{i}</td><td>{html.escape(str(r.feature))}</td><td class='num'>"
                       f"{_fmt(r.pearson_r)}</td><td class='num'>{_fmt(r.observed_mean, 2)}</td><td class='num'>"
                       f"{_fmt(r.predicted_mean, 2)}</td></tr>" for i, r in enumerate(p.table.itertuples(), 1))
        undefined = int(p.table["pearson_r"].isna().sum())
        note = (f" {undefined} protein{'s' if undefined > 1 else ''} with no variation in the observed counts "
                "have no r (–).") if undefined else ""
        return (f"<h2 id='per-protein'>{t} predicted from {html.escape(p.source)}, per protein</h2>"
                f"<p class='note'>Pearson r between observed and predicted {t} (log1p per 10k) across the "
                f"{_fmt(p.n_cells)} sampled cells that have {t}, highest first; the means are over the same cells."
                f"{note} Also in <a href='{t}_pearson.csv'>{t}_pearson.csv</a>.</p>"
                f"<table class='data' id='per-protein-table'><tr><th class='num'>#</th><th>protein</th>"
                f"<th class='num'>Pearson r</th><th class='num'>observed mean</th><th class='num'>predicted mean"
                f"</th></tr>{rows}</table>")
