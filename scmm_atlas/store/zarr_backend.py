"""Zarr (format 3) backend: each modality is an AnnData-zarr group that plain ``anndata.read_zarr``
opens (``mod/<MOD>``: X as CSR, obs, var), all in the same cell order, plus the shared ``obs`` at the
root. CSR arrays use chunks of 2**20 values so that reading many contiguous cells touches few
chunks. The root attribute ``scmm_atlas.n_obs`` is the commit point: cells past it are not there yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.storage

from ..errors import StoreError
from .base import Store, StoreInfo, StoreWriter, obs_dtypes
from .uri import StoreURI, zarr_store

META_KEY = "scmm_atlas"
VALUE_CHUNK = 1 << 20
FRAME_CHUNK = 1 << 16
_ZDTYPE = {"str": str, "bool": bool, "int64": "int64", "float64": "float64"}
_ENC = {"encoding-version": "0.2.0"}


def is_zarr(uri: StoreURI) -> bool:
    try:
        return META_KEY in zarr.open_group(zarr_store(uri, read_only=True), mode="r").attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, ValueError):
        return False


def _dtype_name(values: pd.Series) -> str:
    return {"b": "bool", "i": "int64", "u": "int64", "f": "float64"}.get(values.dtype.kind, "str")


def _column(values: np.ndarray) -> np.ndarray:
    """Zarr's variable-length strings come back as numpy StringDType: hand pandas objects."""
    values = np.asarray(values)
    return values.astype(object) if values.dtype.kind == "T" else values


def _create_frame(parent: zarr.Group, name: str, dtypes: Mapping[str, str], index: str) -> zarr.Group:
    columns = [c for c in dtypes if c != index]
    g = parent.create_group(name, attributes={"_index": index, "column-order": columns,
                                              "encoding-type": "dataframe", **_ENC})
    for col, dtype in dtypes.items():
        enc = "string-array" if dtype == "str" else "array"
        g.create_array(col, shape=(0,), dtype=_ZDTYPE[dtype], chunks=(FRAME_CHUNK,),
                       attributes={"encoding-type": enc, **_ENC})
    return g


def _append_frame(g: zarr.Group, df: pd.DataFrame) -> None:
    for col in [g.attrs["_index"], *g.attrs["column-order"]]:
        arr = g[col]
        n = arr.shape[0]
        values = df[col].to_numpy()
        arr.resize((n + len(df),))
        arr[n:] = values.astype(str).astype(object) if arr.dtype.kind in "OTU" else values


def _create_anndata(parent: zarr.Group, mod: str, obs_types: Mapping[str, str], var: pd.DataFrame) -> None:
    g = parent.create_group(mod, attributes={"encoding-type": "anndata", "encoding-version": "0.1.0"})
    _create_frame(g, "obs", obs_types, "obs_id")
    vframe = _create_frame(g, "var", {c: _dtype_name(var[c]) for c in var.columns}, "var_id")
    _append_frame(vframe, var)
    x = g.create_group("X", attributes={"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                                        "shape": [0, len(var)]})
    x.create_array("data", shape=(0,), dtype="int32", chunks=(VALUE_CHUNK,))
    x.create_array("indices", shape=(0,), dtype="int32", chunks=(VALUE_CHUNK,))
    x.create_array("indptr", shape=(1,), dtype="int64", chunks=(FRAME_CHUNK,))[:] = np.zeros(1, np.int64)
    for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
        g.create_group(key, attributes={"encoding-type": "dict", "encoding-version": "0.1.0"})


def _open_root(uri: StoreURI, *, read_only: bool) -> zarr.Group:
    try:
        return zarr.open_group(zarr_store(uri, read_only=read_only), mode="r" if read_only else "r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
        raise StoreError(uri, "uri", f"not a Zarr group ({type(exc).__name__})") from None


class ZarrStore(Store):
    backend = "zarr"

    def __init__(self, uri: StoreURI, *, writable: bool = False) -> None:
        self._root = _open_root(uri, read_only=not writable)
        if META_KEY not in self._root.attrs:
            raise StoreError(uri, "attributes", "a Zarr group, but not an scmm-atlas store")
        super().__init__(uri, StoreInfo.from_json(self._root.attrs[META_KEY]))

    def _writable_root(self) -> zarr.Group:
        return _open_root(self.uri, read_only=False)

    def obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        g = self._root["obs"]
        names = list(columns) if columns is not None else self.obs_columns
        data = {c: _column(g[c][: self.n_obs]) for c in names}
        index = pd.Index(_column(g["obs_id"][: self.n_obs]), name="obs_id")
        return pd.DataFrame(data, index=index)

    def _read_obs_slice(self, start: int, stop: int, columns: list[str]) -> pd.DataFrame:
        g = self._root["obs"]
        return pd.DataFrame({c: _column(g[c][start:stop]) for c in columns})

    def _read_var(self, mod: str) -> pd.DataFrame:
        df = ad.io.read_elem(self._root["mod"][mod]["var"])
        return df.rename_axis("var_id").reset_index()

    def _read_counts(self, mod: str, start: int, stop: int) -> sp.csr_matrix:
        x = self._root["mod"][mod]["X"]
        ptr = x["indptr"][start : stop + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return sp.csr_matrix((x["data"][lo:hi], x["indices"][lo:hi], ptr - lo),
                             shape=(stop - start, len(self.var(mod))))

    def write_var_stats(self, mod: str, stats: pd.DataFrame) -> None:
        var = self._writable_root()["mod"][mod]["var"]
        for col in stats.columns:
            var[col][:] = stats[col].to_numpy()
        self._var_cache.pop(mod, None)

    def save_info(self) -> None:
        self._writable_root().attrs[META_KEY] = self.info.to_json()

    @property
    def results_uri(self) -> str:
        return self.uri.child("results")

    def appender(self, n_new: int) -> StoreWriter:
        return _ZarrWriter(self._writable_root(), self.info, base=self.n_obs)


class _ZarrWriter(StoreWriter):
    def __init__(self, root: zarr.Group, info: StoreInfo, *, base: int) -> None:
        self.root, self.info, self.base = root, info, base
        self._written = 0
        # Shapes before this writer, so that abort() can hide what it wrote.
        self._shapes = {f"obs/{c}": root["obs"][c].shape for c in root["obs"].array_keys()}
        for mod in info.modalities:
            g = root["mod"][mod]
            self._shapes.update({f"mod/{mod}/obs/{c}": g["obs"][c].shape for c in g["obs"].array_keys()})
            self._shapes.update({f"mod/{mod}/X/{c}": g["X"][c].shape for c in ("data", "indices", "indptr")})

    def write(self, offset: int, obs: pd.DataFrame, counts: Mapping[str, sp.csr_matrix]) -> None:
        _append_frame(self.root["obs"], obs)
        for mod in self.info.modalities:
            g = self.root["mod"][mod]
            _append_frame(g["obs"], obs)
            mat = counts[mod]
            data, indices, indptr = g["X"]["data"], g["X"]["indices"], g["X"]["indptr"]
            nnz, n_ptr = data.shape[0], indptr.shape[0]
            data.resize((nnz + mat.nnz,))
            indices.resize((nnz + mat.nnz,))
            data[nnz:] = mat.data.astype(np.int32)
            indices[nnz:] = mat.indices.astype(np.int32)
            indptr.resize((n_ptr + mat.shape[0],))
            indptr[n_ptr:] = mat.indptr[1:].astype(np.int64) + nnz
        self._written = offset + len(obs)

    def commit(self) -> None:
        n = self.base + self._written
        for mod in self.info.modalities:
            x = self.root["mod"][mod]["X"]
            x.attrs["shape"] = [n, int(x.attrs["shape"][1])]
        self.info.n_obs = n
        self.root.attrs[META_KEY] = self.info.to_json()

    def abort(self) -> None:
        for path, shape in self._shapes.items():
            self.root[path].resize(shape)


def create(uri: StoreURI, info: StoreInfo, vars_: Mapping[str, pd.DataFrame], n_obs: int) -> StoreWriter:
    """Create an empty store group; the writer fills it."""
    del n_obs  # Zarr arrays grow as cells are written.
    root = zarr.open_group(zarr_store(uri, read_only=False), mode="w-", zarr_format=3)
    obs_types = obs_dtypes(info.modalities)
    _create_frame(root, "obs", obs_types, "obs_id")
    mods = root.create_group("mod")
    for mod in info.modalities:
        _create_anndata(mods, mod, obs_types, vars_[mod])
    root.create_group("results")
    root.attrs[META_KEY] = info.to_json()
    return _ZarrWriter(root, info, base=0)
