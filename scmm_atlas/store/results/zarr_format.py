"""Results on a Zarr store: ``results/<entry>/`` holds AnnData groups that plain readers open.

- ``cells``: obs (index ``obs_id``), ``obsm/X_scmm`` (joint) and ``obsm/X_scmm_<MOD>``.
- ``pred_<T>_from_<S>``: ``X`` dense [cells, T's features], var index ``var_id``.
- ``programs``, ``traversals``: AnnData-encoded dataframes.
The index of published entries is the ``scmm_results`` attribute of ``results``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr
import zarr.codecs

from ...errors import StoreError
from ..base import Store
from ..uri import zarr_store
from .spec import INDEX_KEY, JOINT, ResultSpec, ResultsReader, ResultsWriter, pair_name, sorted_rows

if TYPE_CHECKING:  # annotations only
    from .spec import ResultRecord

SPEC_KEY = "scmm_result_spec"
# results are written once per block and read often: a fast codec (zstd took ~1 s per 16k cells of
# 4,000 predicted genes, most of an actor's time)
CODEC = zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")
_ENC = {"encoding-version": "0.2.0"}
_DICT = {"encoding-type": "dict", "encoding-version": "0.1.0"}
ID_CHUNK = 1 << 16


def _results(store: Store, *, writable: bool) -> zarr.Group:
    root = zarr.open_group(zarr_store(store.uri, read_only=not writable), mode="r" if not writable else "r+")
    return root["results"] if "results" in root else root.create_group("results")


def obsm_key(key: str) -> str:
    return "X_scmm" if key == JOINT else f"X_scmm_{key}"


def _frame(parent: zarr.Group, name: str, index: str, n: int) -> zarr.Array:
    g = parent.create_group(name, attributes={"_index": index, "column-order": [], "encoding-type": "dataframe",
                                              **_ENC})
    return g.create_array(index, shape=(n,), dtype=str, chunks=(ID_CHUNK,),  # the entry may grow (extend)
                          attributes={"encoding-type": "string-array", **_ENC})


def _anndata(parent: zarr.Group, name: str, n_obs: int, var_ids: list[str]) -> tuple[zarr.Group, zarr.Array]:
    g = parent.create_group(name, attributes={"encoding-type": "anndata", "encoding-version": "0.1.0"})
    ids = _frame(g, "obs", "obs_id", n_obs)
    _frame(g, "var", "var_id", len(var_ids))[:] = np.asarray(var_ids, dtype=str)
    for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        g.create_group(key, attributes=_DICT)
    return g, ids


def create_entry(store: Store, spec: ResultSpec) -> ZarrResultsWriter:
    results = _results(store, writable=True)
    g = results.create_group(spec.entry, attributes={SPEC_KEY: spec.to_json()})
    n, rows = spec.n_obs, spec.chunk_rows
    cells, ids = _anndata(g, "cells", n, [])
    id_arrays = [ids]
    for key in [JOINT, *spec.modalities]:
        d = spec.width(key)
        cells["obsm"].create_array(obsm_key(key), shape=(n, d), dtype="float32", chunks=(rows, d), compressors=CODEC,
                                   fill_value=np.nan, attributes={"encoding-type": "array", **_ENC})
    for source, target in spec.pairs:
        feats = spec.target_features[target]
        pg, pids = _anndata(g, f"pred_{pair_name(source, target)}", n, feats)
        id_arrays.append(pids)
        pg.create_array("X", shape=(n, len(feats)), dtype="float32", chunks=(rows, len(feats)), fill_value=np.nan,
                        compressors=CODEC, attributes={"encoding-type": "array", **_ENC})
    _write_ids(store, id_arrays, 0, n)
    return ZarrResultsWriter(store, spec, g)


def _write_ids(store: Store, arrays: list[zarr.Array], lo: int, hi: int) -> None:
    """The cell ids of rows ``lo .. hi``, read once a slice at a time (never all in memory)."""
    for start in range(lo, hi, ID_CHUNK):
        stop = min(hi, start + ID_CHUNK)
        values = store.obs_slice(start, stop, ["obs_id"])["obs_id"].to_numpy(dtype=str)
        for arr in arrays:
            arr[start:stop] = values


def extend_entry(store: Store, entry: str, old: int, n: int) -> ZarrResultsWriter:
    """Grow a published entry's per-cell arrays to ``n`` rows (a shape update: rows below ``old``
    are not touched, except that zarr rewrites the chunk they share with row ``old``, with the
    same values, atomically). Plain readers of the entry (``anndata.read_zarr``) see the new rows
    as they are written; readers through the index see them once they are published."""
    g = _entry(store, entry, writable=True)
    spec = ResultSpec.from_json(g.attrs[SPEC_KEY])
    groups = [g["cells"], *(g[f"pred_{pair_name(*p)}"] for p in spec.pairs)]
    ids = [grp["obs"]["obs_id"] for grp in groups]
    arrays = [*ids, *(g["cells"]["obsm"][obsm_key(k)] for k in [JOINT, *spec.modalities]),
              *(g[f"pred_{pair_name(*p)}"]["X"] for p in spec.pairs)]
    for arr in arrays:
        if arr.shape[0] < n:  # never shrink: a run that saw more cells may be extending it too
            arr.resize((n, *arr.shape[1:]))
    _write_ids(store, ids, old, n)
    spec.n_obs, spec.row_start = max(n, spec.n_obs), old
    g.attrs[SPEC_KEY] = spec.to_json()
    return ZarrResultsWriter(store, spec, g)


def open_entry(store: Store, entry: str) -> ZarrResultsWriter:
    g = _entry(store, entry, writable=True)
    return ZarrResultsWriter(store, ResultSpec.from_json(g.attrs[SPEC_KEY]), g)


def _entry(store: Store, entry: str, *, writable: bool) -> zarr.Group:
    results = _results(store, writable=writable)
    if entry not in results:
        raise StoreError(store.uri, f"results/{entry}", "no such results entry")
    return results[entry]


def read_index(store: Store) -> dict[str, Any]:
    root = zarr.open_group(zarr_store(store.uri, read_only=True), mode="r")
    if "results" not in root:
        return {}
    raw = root["results"].attrs.get(INDEX_KEY)
    return json.loads(raw) if isinstance(raw, str) else dict(raw or {})


def write_index(store: Store, index: Mapping[str, Any]) -> None:
    _results(store, writable=True).attrs[INDEX_KEY] = json.dumps(index)  # one zarr.json write


def list_entries(store: Store) -> list[str]:
    return sorted(_results(store, writable=False).group_keys())


def remove_entry(store: Store, entry: str) -> None:
    del _results(store, writable=True)[entry]


class ZarrResultsWriter(ResultsWriter):
    def __init__(self, store: Store, spec: ResultSpec, group: zarr.Group) -> None:
        super().__init__(store, spec)
        self.group = group

    def write_cells(self, start: int, joint: np.ndarray, per_modality: Mapping[str, np.ndarray],
                    predictions: Mapping[tuple[str, str], np.ndarray]) -> None:
        n = len(joint)
        self.check_block(start, n)
        obsm = self.group["cells"]["obsm"]
        obsm[obsm_key(JOINT)][start : start + n] = joint
        for m, emb in per_modality.items():
            obsm[obsm_key(m)][start : start + n] = emb
        for pair, values in predictions.items():
            self.group[f"pred_{pair_name(*pair)}"]["X"][start : start + n] = values

    def write_table(self, name: str, table: pd.DataFrame) -> None:
        ad.io.write_elem(self.group, name, table.reset_index(drop=True))

    def _link(self) -> None:
        pass  # the index alone names the entry


def open_reader(store: Store, record: ResultRecord) -> ZarrReader:
    g = _entry(store, record.entry, writable=False)
    return ZarrReader(store, record, ResultSpec.from_json(g.attrs[SPEC_KEY]), g)


class ZarrReader(ResultsReader):
    def __init__(self, store: Store, record: ResultRecord, spec: ResultSpec, group: zarr.Group) -> None:
        super().__init__(store, record, spec)
        self.group = group

    def _rows(self, arr: zarr.Array, rows: np.ndarray | None) -> np.ndarray:
        if rows is None:
            return arr[: self.n_obs]
        return arr.get_orthogonal_selection((sorted_rows(rows, self.n_obs), slice(None)))

    def embedding(self, key: str = JOINT, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_key(key)
        return self._rows(self.group["cells"]["obsm"][obsm_key(key)], rows)

    def prediction(self, source: str, target: str, rows: np.ndarray | None = None) -> np.ndarray:
        self.check_pair(source, target)
        return self._rows(self.group[f"pred_{pair_name(source, target)}"]["X"], rows)

    def table(self, name: str) -> pd.DataFrame:
        if name not in self.group:
            return pd.DataFrame()
        return ad.io.read_elem(self.group[name])
