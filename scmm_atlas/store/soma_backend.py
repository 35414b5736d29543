"""TileDB-SOMA backend: one Experiment, a Measurement per modality, X layer ``counts``.

Counts are written in TileDB global order (cells ascending, features ascending within a cell):
``soma_dim_1`` gets one tile spanning all features, so global order is row-major and each chunk
is written without a sort. A plain ``tiledbsoma.Experiment.open`` reads everything back.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma
import tiledbsoma.io

from ..errors import StoreError
from .base import Store, StoreInfo, StoreWriter, csr_to_coo_rows, obs_dtypes
from .uri import StoreURI, filesystem, tiledb_config

META_KEY = "scmm_atlas"
X_LAYER = "counts"
_ARROW = {"str": pa.large_string(), "bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64()}


def context() -> soma.SOMATileDBContext:
    return soma.SOMATileDBContext(tiledb_config=tiledb_config())


def _schema(dtypes: Mapping[str, str]) -> pa.Schema:
    return pa.schema([pa.field(name, _ARROW[dtype]) for name, dtype in dtypes.items()])


def _var_dtypes(var: pd.DataFrame) -> dict[str, str]:
    out = {}
    for col in var.columns:
        kind = var[col].dtype.kind
        out[col] = {"b": "bool", "i": "int64", "u": "int64", "f": "float64"}.get(kind, "str")
    return out


def _table(df: pd.DataFrame, dtypes: Mapping[str, str], joinid_start: int) -> pa.Table:
    cols = {"soma_joinid": pa.array(np.arange(joinid_start, joinid_start + len(df), dtype=np.int64))}
    for name, dtype in dtypes.items():
        values = df[name].to_numpy()
        cols[name] = pa.array(values.astype(str) if dtype == "str" else values, type=_ARROW[dtype])
    return pa.table(cols)


def is_soma(uri: StoreURI) -> bool:
    try:
        return soma.Experiment.exists(uri.uri, context=context())
    except soma.SOMAError:
        return False


class SomaStore(Store):
    backend = "soma"

    def __init__(self, uri: StoreURI) -> None:
        self._ctx = context()
        try:
            self._exp = soma.Experiment.open(uri.uri, context=self._ctx)
        except (soma.DoesNotExistError, soma.SOMAError) as exc:
            raise StoreError(uri, "uri", f"not a TileDB-SOMA experiment ({exc})") from None
        if META_KEY not in self._exp.metadata:
            self._exp.close()
            raise StoreError(uri, "metadata", "a SOMA experiment, but not an scmm-atlas store")
        super().__init__(uri, StoreInfo.from_json(json.loads(self._exp.metadata[META_KEY])))
        self._x: dict[str, soma.SparseNDArray] = {}

    def close(self) -> None:
        for arr in self._x.values():
            arr.close()
        self._x.clear()
        self._exp.close()

    def _counts(self, mod: str) -> soma.SparseNDArray:
        if mod not in self._x:
            self._x[mod] = self._exp.ms[mod].X[X_LAYER]
        return self._x[mod]

    def obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        names = ["obs_id", *(columns if columns is not None else self.obs_columns)]
        df = self._exp.obs.read(column_names=names).concat().to_pandas()
        return df.iloc[: self.n_obs].set_index("obs_id")

    def _read_obs_slice(self, start: int, stop: int, columns: list[str]) -> pd.DataFrame:
        if stop <= start:
            return pd.DataFrame({c: [] for c in columns})
        tbl = self._exp.obs.read(coords=(slice(start, stop - 1),), column_names=["soma_joinid", *columns]).concat()
        df = tbl.to_pandas().sort_values("soma_joinid")
        return df[columns].reset_index(drop=True)

    def _read_var(self, mod: str) -> pd.DataFrame:
        df = self._exp.ms[mod].var.read().concat().to_pandas()
        return df.sort_values("soma_joinid").drop(columns="soma_joinid").reset_index(drop=True)

    def _read_counts(self, mod: str, start: int, stop: int) -> sp.csr_matrix:
        n_var = len(self.var(mod))
        if stop <= start:
            return sp.csr_matrix((0, n_var), dtype=np.int32)
        # "auto" order: asking TileDB for row-major costs a sort ~20x slower than the read itself.
        tbl = self._counts(mod).read(coords=(slice(start, stop - 1),)).tables().concat()
        rows = tbl.column("soma_dim_0").to_numpy() - start
        cols = tbl.column("soma_dim_1").to_numpy().astype(np.int32)
        data = tbl.column("soma_data").to_numpy()
        shape = (stop - start, n_var)
        if len(rows) and (np.diff(rows) < 0).any():
            mat = sp.coo_matrix((data, (rows, cols)), shape=shape).tocsr()
            mat.sort_indices()
            return mat
        indptr = np.searchsorted(rows, np.arange(stop - start + 1)).astype(np.int64)
        return sp.csr_matrix((data, cols, indptr), shape=shape)

    def write_var_stats(self, mod: str, stats: pd.DataFrame) -> None:
        var = self._read_var(mod)
        for col in stats.columns:
            var[col] = stats[col].to_numpy()
        with soma.DataFrame.open(self._exp.ms[mod].var.uri, "w", context=self._ctx) as df:
            df.write(_table(var, _var_dtypes(var), 0))
        self._var_cache.pop(mod, None)

    def save_info(self) -> None:
        with soma.Experiment.open(self.uri.uri, "w", context=self._ctx) as exp:
            exp.metadata[META_KEY] = json.dumps(self.info.to_json())

    @property
    def results_uri(self) -> str:
        return self._exp["results"].uri

    def appender(self, n_new: int) -> StoreWriter:
        new_n = self.n_obs + n_new
        nvars = {mod: len(self.var(mod)) for mod in self.modalities}
        # An append killed before it could take its writes back (SIGKILL, storage down) left them
        # after the last commit (the experiment's metadata write): drop them before writing those rows.
        committed = self.info.cells_committed_ms or _last_commit_ms(self.uri)
        _drop_writes_since(self.uri, self.modalities, committed + 1, tables=("obs", "X"))
        since_ms = time.time_ns() // 1_000_000
        try:
            tiledbsoma.io.resize_experiment(self.uri.uri, nobs=new_n, nvars=nvars, context=self._ctx)
            return _SomaWriter(self.uri, self.info, base=self.n_obs, since_ms=since_ms)
        except BaseException:
            _drop_writes_since(self.uri, self.modalities, since_ms)
            raise


class _SomaWriter(StoreWriter):
    def __init__(self, uri: StoreURI, info: StoreInfo, *, base: int, since_ms: int | None = None) -> None:
        self.uri, self.info, self.base, self.since_ms = uri, info, base, since_ms
        self._ctx = context()
        self._exp = soma.Experiment.open(uri.uri, "w", context=self._ctx)
        self._dtypes = obs_dtypes(info.modalities)
        self._written = 0

    def write(self, offset: int, obs: pd.DataFrame, counts: Mapping[str, sp.csr_matrix]) -> None:
        start = self.base + offset
        self._exp.obs.write(_table(obs, self._dtypes, start))
        for mod, mat in counts.items():
            if mat.nnz == 0:
                continue
            rows, cols, data = csr_to_coo_rows(mat, start)
            tbl = pa.table({"soma_dim_0": rows, "soma_dim_1": cols, "soma_data": data.astype(np.int32)})
            # Already in global order (see module docstring): skip TileDB's sort.
            self._exp.ms[mod].X[X_LAYER].write(tbl, platform_config={"tiledb": {"write": {"sort_coords": False}}})
        self._written = offset + len(obs)

    def commit(self) -> None:
        self.info.n_obs = self.base + self._written
        self.info.cells_committed_ms = time.time_ns() // 1_000_000
        self._exp.metadata[META_KEY] = json.dumps(self.info.to_json())
        self._exp.close()

    def abort(self) -> None:
        """An append that failed takes its writes back: left in place, its cells (beyond the committed
        count, so invisible now) would reappear inside the next append's rows."""
        with contextlib.suppress(Exception):  # the failure that brought us here is what gets reported
            self._exp.close()
        if self.since_ms is not None:
            _drop_writes_since(self.uri, self.info.modalities, self.since_ms)


_TIMESTAMPED = re.compile(r"__(\d+)_(\d+)_[0-9a-f]{32}")


def _last_commit_ms(uri: StoreURI) -> int:
    """When the experiment's metadata was last written: at or after the last commit of cells (for
    stores from before :attr:`StoreInfo.cells_committed_ms`)."""
    return max(end for _, _, end in _stamped(uri.child("__meta")))


def _stamped(folder: str) -> list[tuple[str, int, int]]:
    """(path, first, last timestamp in ms) of the TileDB entries in ``folder`` named ``__<t1>_<t2>_<uuid>...``."""
    fs, root = filesystem(folder)
    try:
        paths = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return [(path, int(m[1]), int(m[2])) for path in paths
            if (m := _TIMESTAMPED.match(path.rstrip("/").rsplit("/", 1)[-1]))]


def _drop_writes_since(uri: StoreURI, modalities: Sequence[str], since_ms: int,
                       tables: Sequence[str] = ("obs", "var", "X")) -> None:
    """Delete what writers opened at or after ``since_ms`` added to the obs and var tables and the
    counts (fragments, their commit markers, metadata and schema changes such as a resize). Appends hold
    the store's ingest lease, so nobody else wrote there since."""
    arrays = [uri.child("obs")] if "obs" in tables else []
    arrays += [uri.child(f"ms/{mod}/{name}") for mod in modalities for name in ("var", f"X/{X_LAYER}")
               if name.split("/")[0] in tables]
    for array in arrays:
        fs, _ = filesystem(array)
        for sub in ("__commits", "__fragments", "__meta", "__schema"):  # the commit marker first
            for path, first, _ in _stamped(f"{array}/{sub}"):
                if first >= since_ms:
                    fs.rm(path, recursive=True)


def create(uri: StoreURI, info: StoreInfo, vars_: Mapping[str, pd.DataFrame], n_obs: int) -> StoreWriter:
    """Create an empty experiment sized for ``n_obs`` cells; the writer fills it."""
    ctx = context()
    obs_types = obs_dtypes(info.modalities)
    with soma.Experiment.create(uri.uri, context=ctx) as exp:
        exp.add_new_dataframe("obs", schema=_schema(obs_types), index_column_names=["soma_joinid"],
                              domain=[(0, max(n_obs, 1) - 1)])
        ms = exp.add_new_collection("ms")
        for mod in info.modalities:
            var = vars_[mod]
            meas = ms.add_new_collection(mod, soma.Measurement)
            with meas.add_new_dataframe("var", schema=_schema(_var_dtypes(var)), index_column_names=["soma_joinid"],
                                        domain=[(0, len(var) - 1)]) as vdf:
                vdf.write(_table(var, _var_dtypes(var), 0))
            x = meas.add_new_collection("X")
            tile = {"tiledb": {"create": {"dims": {"soma_dim_1": {"tile": len(var)}}}}}
            x.add_new_sparse_ndarray(X_LAYER, type=pa.int32(), shape=(max(n_obs, 1), len(var)),
                                     platform_config=tile).close()
        exp.add_new_collection("results").close()
        exp.metadata[META_KEY] = json.dumps(info.to_json())
    return _SomaWriter(uri, info, base=0)
