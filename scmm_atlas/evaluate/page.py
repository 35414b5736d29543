"""``index.html`` of a report, rendered from ``templates/report.html.j2`` with autoescape: labels, feature
names and URIs read from a store go into the template as plain data and Jinja escapes each of them, so
that no value can inject markup (and none depends on a hand-placed escape)."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from ..store.results.spec import ResultRecord
from .protein import Protein
from .tracking import MlflowRun


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
    """A publication time to the minute; an unreadable one as it is."""
    try:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M %Z").strip()
    except (TypeError, ValueError):
        return str(iso)


@functools.cache
def _templates() -> jinja2.Environment:
    """The package's templates, escaped on output and strict: a misspelt name fails, it does not vanish."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("scmm_atlas.evaluate", "templates"),
                             autoescape=jinja2.select_autoescape(("html", "j2"), default=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(fmt=_fmt, when=_when)
    return env


def _markers(table: pd.DataFrame, per_group: int = 4) -> dict[str, Any]:
    """Sub-clusters (else clusters): per group and modality, its top features with log2 fold changes."""
    level = "subcluster" if (table["level"] == "subcluster").any() else "cluster"
    groups = [{"group": group, "n_cells": int(g["n_cells"].iloc[0]),
               "modalities": [(m, gm[gm["rank"] <= per_group].to_dict("records"))
                              for m, gm in g.groupby("modality", sort=False)]}
              for group, g in table[table["level"] == level].groupby("group", sort=True)]
    return {"level": level, "groups": groups, "per_group": per_group}


def _motifs(table: pd.DataFrame, top: int = 3, q: float = 0.05) -> dict[str, Any]:
    """Per ATAC program direction, its ``top`` motifs of q < ``q``; the JASPAR release and the count of
    directions for the sentence on the test."""
    keys = ["modality", "dim", "direction"]
    found = table[(table["q"] < q) & (table["rank"] <= top)]
    rows = [{"modality": mod, "dim": dim, "direction": d, "motifs": g.to_dict("records")}
            for (mod, dim, d), g in found.groupby(keys, sort=True)]
    release = ", ".join(sorted(set(table["release"].astype(str)))) or "JASPAR"
    return {"rows": rows, "release": release, "n_dirs": table.groupby(keys).ngroups, "top": top, "q": q}


def motifs_html(table: pd.DataFrame, top: int = 3, q: float = 0.05) -> str:
    """The page's motif section alone (its heading, the sentence on the test and the table)."""
    return str(_templates().get_template("tables.html.j2").module.motifs(**_motifs(table, top, q)))


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
    markers: pd.DataFrame | None = None  # :func:`.report.markers_of`; None or empty: no section
    motifs: pd.DataFrame | None = None  # the version's motif table; none without a ``motif_id`` column
    run: MlflowRun | None = None

    def html(self) -> str:
        p = self.protein
        run_url, serve = self.run.links() if self.run is not None else (None, None)
        return _templates().get_template("report.html.j2").render(
            name=store_name(self.store_uri), store_uri=self.store_uri, backend=self.backend,
            store_cells=self.store_cells, record=self.record, numbers=self.numbers, label=self.label, top=self.top,
            figures=self.figures, run=self.run, run_url=run_url, serve=serve, protein=p,
            protein_rows=p.table.to_dict("records") if p else [],
            no_r=int(p.table["pearson_r"].isna().sum()) if p else 0,
            median_r=self.numbers[f"{p.target}_from_{p.source}_median_pearson"] if p else None,
            markers=_markers(self.markers) if self.markers is not None and len(self.markers) else None,
            motifs=_motifs(self.motifs) if self.motifs is not None and "motif_id" in self.motifs else None)
