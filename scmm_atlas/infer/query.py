"""Reading published results for a cell filter: the API behind ``scmm-atlas query``.

>>> from scmm_atlas import results
>>> res = results.open("atlas.zarr")                      # the latest published version
>>> res.embeddings(where={"cell_type": ["B cell"]})        # DataFrame: obs_id x latent dims
>>> res.predictions("ADT", source="RNA", ids=["AAAC-1"])   # predicted proteins, per 10k counts
>>> res.programs(dim=3, modality="ADT")                    # the dim's top features
>>> res.motifs(dim=3, direction="up")                     # JASPAR motifs enriched in its ATAC peaks
>>> adata = res.to_anndata(where={"batch": ["donor1"]})    # for scanpy: obsm["X_scmm"], predictions in obsm

Cells are selected out of core: the filter reads only the obs columns it names, a slice at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import StoreError
from ..store import Store, open_store
from ..store.base import HASH_CHUNK
from ..store.results import index, open_results
from ..store.results.spec import JOINT


class Results:
    """One published version of a store's results (default: the latest)."""

    def __init__(self, store_uri: str, version: str | None = None) -> None:
        self.store: Store = open_store(store_uri)
        self.reader = open_results(self.store, version)
        self.version = self.reader.spec.version

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def versions(self) -> pd.DataFrame:
        return pd.DataFrame([r.to_json() for r in index(self.store)])

    def cells(self, *, where: Mapping[str, Sequence[str]] | None = None, ids: Sequence[str] | None = None
              ) -> np.ndarray:
        """Store rows of the cells whose obs columns take the given values and whose id is in ``ids``
        (among the cells this version covers: cells appended since have no results until reprocessed)."""
        where = dict(where or {})
        unknown = set(where) - set(self.store.obs_columns)
        if unknown:
            raise StoreError(self.store.uri, "obs", f"no column {sorted(unknown)[0]!r} (columns: "
                             f"{', '.join(self.store.obs_columns)})")
        columns = list(where) + (["obs_id"] if ids is not None else [])
        n = self.reader.n_obs
        if not columns:
            return np.arange(n)
        wanted = {c: set(map(str, v)) for c, v in where.items()}
        id_set = set(map(str, ids)) if ids is not None else None
        rows = []
        for start in range(0, n, HASH_CHUNK):
            obs = self.store.obs_slice(start, min(n, start + HASH_CHUNK), columns)
            keep = np.ones(len(obs), dtype=bool)
            for c, values in wanted.items():
                keep &= obs[c].astype(str).isin(values).to_numpy()
            if id_set is not None:
                keep &= obs["obs_id"].astype(str).isin(id_set).to_numpy()
            rows.append(np.flatnonzero(keep) + start)
        return np.concatenate(rows) if rows else np.zeros(0, np.int64)

    def _ids(self, rows: np.ndarray) -> pd.Index:
        return self._obs(rows, []).index.rename("obs_id")

    def embeddings(self, key: str = JOINT, *, where: Mapping[str, Sequence[str]] | None = None,
                   ids: Sequence[str] | None = None, dim: int | None = None) -> pd.DataFrame:
        """Cells x latent dims (``key``: ``joint`` or a modality's own embedding)."""
        rows = self.cells(where=where, ids=ids)
        values = self.reader.embedding(key, rows)
        frame = pd.DataFrame(values, index=self._ids(rows), columns=[f"z{i}" for i in range(values.shape[1])])
        if dim is not None:
            if not 0 <= dim < values.shape[1]:
                raise ValueError(f"dim must be within 0..{values.shape[1] - 1}, got {dim}")
            frame = frame[[f"z{dim}"]]
        return frame

    def predictions(self, target: str, *, source: str | None = None, where: Mapping[str, Sequence[str]] | None = None,
                    ids: Sequence[str] | None = None, features: Sequence[str] | None = None) -> pd.DataFrame:
        """Cells x ``target``'s features predicted from ``source`` (default: the first source published)."""
        pairs = [p for p in self.reader.spec.pairs if p[1] == target]
        if not pairs:
            raise StoreError(self.store.uri, "pairs", f"version {self.version} predicts no {target}")
        source = source or pairs[0][0]
        rows = self.cells(where=where, ids=ids)
        names = pd.Index(self.reader.spec.target_features[target])
        frame = pd.DataFrame(self.reader.prediction(source, target, rows), index=self._ids(rows), columns=names)
        if features is not None:
            missing = [f for f in features if f not in names]
            if missing:
                raise StoreError(self.store.uri, f"{target}/features", f"not predicted: {', '.join(missing[:5])}")
            frame = frame[list(features)]
        return frame

    def to_anndata(self, *, where: Mapping[str, Sequence[str]] | None = None, ids: Sequence[str] | None = None):
        """The selected cells as an AnnData for scanpy: every obs column, the joint embedding in
        ``obsm["X_scmm"]`` (each modality's own in ``obsm["X_scmm_<MOD>"]``), each prediction as a
        cells x features DataFrame in ``obsm["<TARGET>_from_<SOURCE>"]``, and the version in
        ``uns["scmm_atlas"]``. ``X`` has no columns: the counts stay in the store. Held in memory:
        select with ``where`` / ``ids`` on an atlas."""
        import anndata as ad

        rows = self.cells(where=where, ids=ids)
        obs = self._obs(rows, self.store.obs_columns)
        obsm: dict[str, object] = {"X_scmm": self.reader.embedding(JOINT, rows)}
        for mod in self.reader.spec.modalities:
            obsm[f"X_scmm_{mod}"] = self.reader.embedding(mod, rows)
        for source, target in self.reader.spec.pairs:
            names = pd.Index(self.reader.spec.target_features[target])
            obsm[f"{target}_from_{source}"] = pd.DataFrame(self.reader.prediction(source, target, rows),
                                                           index=obs.index, columns=names)
        record = self.reader.record
        uns = {"scmm_atlas": {"store": str(self.store.uri.uri), "version": self.version, "entry": record.entry,
                              "model_uri": record.model_uri}}
        return ad.AnnData(np.zeros((len(rows), 0), dtype=np.float32), obs=obs, obsm=obsm, uns=uns)

    def _obs(self, rows: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
        """The obs ``columns`` of ``rows`` (sorted store rows), indexed by obs_id; read one slice of the
        store at a time, only the slices that hold selected rows."""
        columns = ["obs_id", *columns]
        parts = []
        for start in np.unique(rows // HASH_CHUNK) * HASH_CHUNK:
            inside = rows[np.searchsorted(rows, start):np.searchsorted(rows, start + HASH_CHUNK)]
            stop = min(self.reader.n_obs, int(start) + HASH_CHUNK)
            parts.append(self.store.obs_slice(int(start), stop, columns).iloc[inside - start])
        frame = pd.concat(parts) if parts else pd.DataFrame(columns=columns)
        return frame.set_index(pd.Index(frame["obs_id"].astype(str), name=None)).drop(columns="obs_id")

    def programs(self, *, dim: int | None = None, modality: str | None = None, direction: str | None = None
                 ) -> pd.DataFrame:
        return _select(self.reader.programs(), dim=dim, modality=modality, direction=direction)

    def motifs(self, *, dim: int | None = None, modality: str | None = None, direction: str | None = None
               ) -> pd.DataFrame:
        """The JASPAR motifs enriched in the ATAC programs' peaks (:mod:`.motifs`), ranked by p within
        each program direction; written by ``infer`` given a genome FASTA."""
        table = self.reader.table("motifs")
        if "motif_id" not in table:
            raise StoreError(self.store.uri, "motifs", f"version {self.version} has no motif table: run "
                             "`scmm-atlas infer` with --genome FASTA (the genome of the ATAC peaks)")
        return _select(table, dim=dim, modality=modality, direction=direction)


def _select(table: pd.DataFrame, **values: object) -> pd.DataFrame:
    """The rows whose columns take the given values (None: any)."""
    for col, value in values.items():
        if value is not None and not table.empty:
            table = table[table[col] == value]
    return table.reset_index(drop=True)


def open(store_uri: str, version: str | None = None) -> Results:
    """Open the results of ``store_uri`` (a path or ``s3://`` URI) at ``version`` (default: latest)."""
    return Results(store_uri, version)
