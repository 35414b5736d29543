"""The feature selection's defaults: the single source for ingest, ``scmm-atlas stats``, pipeline configs
and :func:`.stats.compute_stats`. A module of its own so that the CLI and ingest can read them without
importing dask (which :mod:`.stats` needs and imports at load)."""

from __future__ import annotations

N_TOP_GENES = 5000  # RNA: highly variable genes kept (Seurat v3)
ATAC_QUANTILE = 0.75  # ATAC: peaks whose total counts reach this quantile are kept
