"""Readers for users' files: one AnnData ``.h5ad`` per modality, a MuData ``.h5mu``, a 10x ``.h5``.

Each modality becomes a :class:`MatrixSource` that reads row (cell) ranges straight from HDF5 with
h5py, so that memory is bounded by the rows asked for, never by the file. Only barcodes, feature
names, ``indptr`` and the few obs columns asked for are held whole (a few bytes per cell).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata._io.specs.registry import IORegistryError

from ..errors import InputError
from ..store.base import HASH_CHUNK, hash_strings

# Canonical names for common modality spellings; anything else is upper-cased.
MODALITY_ALIASES = {
    "rna": "RNA", "gex": "RNA", "gene expression": "RNA",
    "protein": "ADT", "prot": "ADT", "adt": "ADT", "antibody capture": "ADT", "cite": "ADT",
    "atac": "ATAC", "peaks": "ATAC", "chromatin": "ATAC",
}


def canonical_modality(name: str) -> str:
    return MODALITY_ALIASES.get(name.strip().lower(), name.strip().upper().replace(" ", "_"))


# What reading a damaged or unexpected file raises: h5py (OSError, KeyError, RuntimeError on corrupt
# metadata), numpy, scipy and pandas (ValueError, TypeError, IndexError on wrong shapes or dtypes),
# anndata (IORegistryError on an unknown encoding).
_READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError, OverflowError, IORegistryError)
INT32_MAX = np.iinfo(np.int32).max  # the store keeps counts as int32


@contextmanager
def reading(where: str | Path, field_: str) -> Iterator[None]:
    """Read ``field_`` of a user's file: whatever a damaged or unexpected file raises becomes an
    :class:`InputError` naming the file and the field (never a traceback, never a half-read value)."""
    try:
        yield
    except InputError:
        raise
    except UnicodeDecodeError:
        raise InputError(where, field_, "text that is not UTF-8: the file is damaged or not written by "
                         "AnnData or Cell Ranger") from None
    except _READ_ERRORS as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise InputError(where, field_, f"cannot be read: damaged, or not laid out as expected "
                         f"({type(exc).__name__}: {reason})") from None


def _strings(values: np.ndarray) -> np.ndarray:
    """An object array of ``str`` (no fixed-width copy: barcodes are a few bytes per cell)."""
    out = np.asarray(values)
    if out.dtype.kind == "O" and (not len(out) or isinstance(out[0], str)):
        return out
    if out.dtype.kind in ("S", "O"):
        return np.array([v.decode("utf-8") for v in out], dtype=object)
    return out.astype(str).astype(object)


class BarcodeColumn:
    """Cell barcodes of a source, read from the file on demand; only their hashes stay in memory
    (8 bytes per cell), so that ingest memory barely grows with the number of cells."""

    def __init__(self, node: h5py.Dataset | np.ndarray, where: str, field_: str) -> None:
        _require(node.ndim == 1, where, field_, f"names must be 1-D, found {node.ndim}-D")
        self._node, self.where, self.field = node, where, field_
        self._hashes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._node)

    def read(self, start: int, stop: int) -> np.ndarray:
        node = self._node
        if isinstance(node, h5py.Dataset):
            with reading(self.where, self.field):
                return _strings(node[start:stop])
        return node[start:stop]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Barcodes at ``rows`` (any order), read in one span per chunk of the file."""
        out = np.empty(len(rows), dtype=object)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        lo, hi = int(sorted_rows[0]), int(sorted_rows[-1]) + 1
        if hi - lo <= 4 * len(rows) + HASH_CHUNK:
            out[order] = self.read(lo, hi)[sorted_rows - lo]
        else:
            out[order] = [self.read(int(r), int(r) + 1)[0] for r in sorted_rows]
        return out

    @property
    def hashes(self) -> np.ndarray:
        if self._hashes is None:
            n = len(self)
            self._hashes = np.empty(n, dtype=np.uint64)
            for start in range(0, n, HASH_CHUNK):
                stop = min(start + HASH_CHUNK, n)
                self._hashes[start:stop] = hash_strings(self.read(start, stop))
        return self._hashes


@dataclass
class MatrixSource:
    """Counts of one modality in one file, rows = cells."""

    path: Path
    modality: str
    field: str  # HDF5 path of the matrix, e.g. "X", "layers/counts", "mod/rna/X", "matrix"
    barcodes: BarcodeColumn
    var: pd.DataFrame  # index = feature ids (the store's var_id)
    group: h5py.Group | h5py.Dataset
    columns: np.ndarray | None = None  # column subset (10x files mix feature types)
    n_source_cols: int = 0  # columns in the file's matrix when ``columns`` selects a subset
    # obs dataframes to look up batch/label columns in; True: same row order as the matrix
    obs_frames: list[tuple[h5py.Group, bool]] = field(default_factory=list)
    _indptr: np.ndarray | None = None

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def dense(self) -> bool:
        return isinstance(self.group, h5py.Dataset)

    @property
    def n_obs(self) -> int:
        return len(self.barcodes)

    @property
    def n_cols(self) -> int:
        """Columns of the file's matrix (more than ``var`` when ``columns`` selects a subset)."""
        return self.n_source_cols or len(self.var)

    @property
    def indptr(self) -> np.ndarray:
        """Row offsets (for dense X: row * n_cols, so that nnz budgets still work); checked whole once,
        as a damaged ``indptr`` would send reads outside the data."""
        if self._indptr is None:
            if self.dense:
                self._indptr = np.arange(self.n_obs + 1, dtype=np.int64) * self.group.shape[1]
            else:
                field_ = f"{self.field.split('[')[0]}/indptr"
                with reading(self.path, field_):
                    node = self.group["indptr"]
                    _require(node.dtype.kind in "iu", self.where, field_, f"dtype {node.dtype} is not integer")
                    ptr = node[:].astype(np.int64)
                n_data = len(self.group["data"])
                _require(len(ptr) == self.n_obs + 1 and ptr[0] >= 0 and (np.diff(ptr) >= 0).all()
                         and ptr[-1] <= n_data, self.where, field_,
                         f"row offsets are not {self.n_obs + 1} non-decreasing values within the "
                         f"{n_data} stored values: the sparse matrix is damaged")
                self._indptr = ptr
        return self._indptr

    def read_range(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``[start, stop)`` as CSR with this modality's columns, values as stored. Column indices
        are checked: out of range, they would make scipy write outside its arrays."""
        if self.dense:
            with reading(self.path, self.field):
                mat = sp.csr_matrix(self.group[start:stop])
            return mat if self.columns is None else mat[:, self.columns]
        ptr = self.indptr[start : stop + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        with reading(self.path, self.field):
            data, indices = self.group["data"][lo:hi], self.group["indices"][lo:hi]
        if len(indices) and (indices.dtype.kind not in "iu" or indices.min() < 0 or indices.max() >= self.n_cols):
            raise InputError(self.path, f"{self.field.split('[')[0]}/indices", f"column indices outside [0, "
                             f"{self.n_cols}) (or not integers): the sparse matrix is damaged")
        with reading(self.path, self.field):
            mat = sp.csr_matrix((data, indices, ptr - lo), shape=(stop - start, self.n_cols))
        return mat if self.columns is None else mat[:, self.columns]

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows by ascending index, read as few contiguous runs as possible."""
        if len(rows) == 0:
            return sp.csr_matrix((0, len(self.var)), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = np.split(rows, breaks)
        parts = [self.read_range(int(r[0]), int(r[-1]) + 1) for r in runs]
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    @property
    def dtype(self) -> np.dtype:
        return self.group.dtype if self.dense else self.group["data"].dtype

    def iter_ranges(self, max_cells: int, max_nnz: int) -> Iterator[tuple[int, int]]:
        """Cell ranges of at most ``max_cells`` cells and (unless one cell exceeds it) ``max_nnz``."""
        ptr, start = self.indptr, 0
        while start < self.n_obs:
            stop = min(start + max_cells, self.n_obs)
            limit = int(np.searchsorted(ptr, ptr[start] + max_nnz, side="right")) - 1
            stop = max(start + 1, min(stop, limit))
            yield start, stop
            start = stop

    def obs_column(self, name: str) -> np.ndarray | None:
        """An obs column for this source's rows, from the file's obs frames (None if absent)."""
        for frame, aligned in self.obs_frames:
            frame_name = frame.name.lstrip("/")
            field_ = f"{frame_name}/{name}"
            with reading(self.path, field_):
                if name not in frame:
                    continue
                values = np.asarray(ad.io.read_elem(frame[name]), dtype=object)
                index = None if aligned else BarcodeColumn(_index_node(frame), self.where, f"{frame_name}_names")
            n_rows = self.n_obs if index is None else len(index)
            _require(values.shape == (n_rows,), self.where, field_, f"{values.shape} values for {n_rows} cells")
            if index is None:
                return values
            rows = pd.Index(index.hashes).get_indexer(self.barcodes.hashes)
            out = np.full(self.n_obs, None, dtype=object)
            out[rows >= 0] = values[rows[rows >= 0]]
            return out
        return None


def _require(cond: bool, where: str, field_: str, problem: str) -> None:
    if not cond:
        raise InputError(where, field_, problem)


def _open_h5(path: Path, stack: ExitStack, claimed: str) -> h5py.File:
    if not path.exists():
        raise InputError(path, "path", "file not found")
    a = "an" if claimed[:1] in "AEIOUaeiou" else "a"
    if path.is_dir():
        raise InputError(path, "path", f"is a directory, not {a} {claimed} file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "path", "file is not readable (permission denied)")
    with path.open("rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            raise InputError(path, "format", f"gzip-compressed: decompress it (gunzip) and pass the {claimed} file")
    try:
        return stack.enter_context(h5py.File(path, "r"))
    except OSError as exc:
        reason = str(exc).split(";")[0].split("(")[0].strip() or "unreadable"
        raise InputError(path, "format", f"not a readable HDF5 file, so not {a} {claimed} file ({reason})") from None


def _shape_of(values: object, where: str, field_: str) -> tuple[int, int]:
    """A matrix shape as stored (an attribute or a dataset): two non-negative integers."""
    shape = np.asarray(values)
    _require(shape.shape == (2,) and shape.dtype.kind in "iu" and bool((shape >= 0).all()), where, field_,
             f"shape {shape.tolist()!r} is not two non-negative integers")
    return int(shape[0]), int(shape[1])


def _vector(group: h5py.Group, key: str, where: str, field_: str) -> h5py.Dataset:
    """A 1-D dataset ``key`` of ``group``."""
    node = group.get(key)
    _require(isinstance(node, h5py.Dataset) and node.ndim == 1, where, f"{field_}/{key}",
             "missing, or not a 1-D array")
    return node


def _matrix_group(f: h5py.File | h5py.Group, key: str, where: str) -> h5py.Group | h5py.Dataset:
    if key.startswith("layers/") and key not in f:
        have = sorted(f["layers"]) if "layers" in f else []
        raise InputError(where, key, f"missing: this input has no layer {key.split('/', 1)[1]!r} (its layers: "
                         f"{have}); name layers per modality with --layer MOD=NAME")
    _require(key in f, where, key, "missing: not an AnnData file (no counts matrix)")
    node = f[key]
    if isinstance(node, h5py.Dataset):
        _require(node.ndim == 2, where, key, f"expected a 2-D matrix, found {node.ndim}-D")
        return node
    enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
    if enc in ("csc_matrix", "csc"):
        raise InputError(where, key, "stored as CSC; ingest streams cells and needs CSR: "
                         "re-save with adata.X = adata.X.tocsr()")
    _require(enc in ("csr_matrix", "csr"), where, key, f"unsupported matrix encoding {enc!r}")
    data, indices = (_vector(node, k, where, key) for k in ("data", "indices"))
    _vector(node, "indptr", where, key)
    _require(len(data) == len(indices), where, key, f"{len(data)} values but {len(indices)} column indices")
    return node


def _index_node(group: h5py.Group) -> h5py.Dataset | np.ndarray:
    node = group[group.attrs["_index"]]
    if isinstance(node, h5py.Dataset) and node.dtype.kind in "OS":
        return node
    values = np.asarray(ad.io.read_elem(node))  # unusual encodings: read whole
    return _strings(values) if values.ndim == 1 else values


def _frame_index(group: h5py.Group, where: str, field_: str) -> BarcodeColumn:
    """The names (index) of an AnnData dataframe."""
    _require(isinstance(group, h5py.Group) and "_index" in group.attrs, where, field_,
             "missing or not an AnnData dataframe")
    with reading(where, f"{field_}/_index"):
        return BarcodeColumn(_index_node(group), where, f"{field_}_names")


def _anndata_source(path: Path, root: h5py.Group, modality: str, layer: str | None,
                    prefix: str = "") -> MatrixSource:
    where = str(path)
    key = "X" if layer is None else f"layers/{layer}"
    for part in ("obs", "var"):
        _require(part in root, where, prefix + part, "missing: not an AnnData file")
    with reading(where, prefix + key):
        matrix = _matrix_group(root, key, where)
        shape = matrix.shape if isinstance(matrix, h5py.Dataset) else matrix.attrs.get("shape")
    n_rows, n_cols = _shape_of(shape, where, prefix + key)
    barcodes = _frame_index(root["obs"], where, prefix + "obs")
    var_names = _frame_index(root["var"], where, prefix + "var")
    features = pd.Index(var_names.read(0, len(var_names)))
    _require((n_rows, n_cols) == (len(barcodes), len(features)), where, prefix + key,
             f"shape {(n_rows, n_cols)} does not match obs/var ({len(barcodes)}, {len(features)})")
    frames = [(root["obs"], True)]
    if prefix and "obs" in root.file and "_index" in root.file["obs"].attrs:
        frames.append((root.file["obs"], False))  # MuData's global obs, in its own order
    return MatrixSource(path=path, modality=modality, field=prefix + key, barcodes=barcodes,
                        var=pd.DataFrame(index=features), group=matrix, obs_frames=frames)


def _tenx_sources(path: Path, f: h5py.File) -> list[MatrixSource]:
    where = str(path)
    _require("matrix" in f, where, "matrix", "missing: not a 10x Cell Ranger feature-barcode .h5 file")
    g = f["matrix"]
    _require(isinstance(g, h5py.Group), where, "matrix", "not a group: not a 10x Cell Ranger .h5 file")
    for key in ("data", "indices", "indptr", "shape", "barcodes", "features"):
        _require(key in g, where, f"matrix/{key}", "missing: not a 10x Cell Ranger .h5 file")
    data, indices = (_vector(g, k, where, "matrix") for k in ("data", "indices"))
    _require(len(data) == len(indices), where, "matrix", f"{len(data)} values but {len(indices)} row indices")
    _vector(g, "indptr", where, "matrix")
    with reading(where, "matrix/shape"):
        n_features, n_cells = _shape_of(g["shape"][()], where, "matrix/shape")
    barcodes = BarcodeColumn(_vector(g, "barcodes", where, "matrix"), where, "matrix/barcodes")
    feats = g["features"]
    _require(isinstance(feats, h5py.Group), where, "matrix/features", "not a group: not a 10x Cell Ranger .h5 file")

    def feature_column(key: str) -> np.ndarray:
        with reading(where, f"matrix/features/{key}"):
            return _strings(_vector(feats, key, where, "matrix/features")[:])

    ids = feature_column("id")
    names = feature_column("name") if "name" in feats else ids
    types = feature_column("feature_type") if "feature_type" in feats else np.full(len(ids), "Gene Expression")
    _require(len(ids) == len(names) == len(types) == n_features and len(barcodes) == n_cells, where,
             "matrix/shape", f"shape {(n_features, n_cells)} does not match features ({len(ids)} ids, "
             f"{len(names)} names, {len(types)} types) and barcodes ({len(barcodes)})")
    sources = []
    for ftype in pd.unique(types):
        cols = np.flatnonzero(types == ftype)
        var = pd.DataFrame({"feature_name": names[cols]}, index=pd.Index(ids[cols]))
        # 10x stores features × cells as CSC, which is cells × features CSR: rows stream the same way.
        sources.append(MatrixSource(path=path, modality=canonical_modality(ftype), field=f"matrix[{ftype}]",
                                    barcodes=barcodes, var=var, group=g, columns=cols,
                                    n_source_cols=n_features))
    return sources


@dataclass(frozen=True)
class SourceSpec:
    """What the user named on the command line: ``[MOD=]PATH``."""

    path: Path
    modality: str | None = None

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        mod, sep, path = text.partition("=")
        if sep and "/" not in mod and mod:
            return cls(Path(path).expanduser(), canonical_modality(mod))
        return cls(Path(text).expanduser())

    @property
    def format(self) -> str:
        name = self.path.name.lower()
        if name.endswith(".h5ad"):
            return "h5ad"
        if name.endswith(".h5mu"):
            return "h5mu"
        if name.endswith(".h5"):
            return "10x"
        if name.endswith((".mtx", ".mtx.gz")):
            raise InputError(self.path, "path", "Matrix Market is not read: write an .h5ad first, e.g. "
                             "scanpy.read_10x_mtx(FOLDER).write_h5ad('rna.h5ad')")
        raise InputError(self.path, "path", "unknown format: expected .h5ad, .h5mu or a 10x .h5 file")


def _open_spec(spec: SourceSpec, stack: ExitStack, layer_of: Callable[[str], str | None]) -> list[MatrixSource]:
    """The sources of one input file."""
    fmt = spec.format
    f = _open_h5(spec.path, stack, {"h5ad": "AnnData .h5ad", "h5mu": "MuData .h5mu", "10x": "10x Cell Ranger .h5"}[fmt])
    if fmt == "10x":
        return _tenx_sources(spec.path, f)
    if fmt == "h5ad":
        if spec.modality is None:
            raise InputError(spec.path, "modality", "name the modality of an .h5ad: MOD=path.h5ad")
        if "mod" in f and "X" not in f:
            raise InputError(spec.path, "format", "this is a MuData file, not an .h5ad")
        return [_anndata_source(spec.path, f, spec.modality, layer_of(spec.modality))]
    _require("mod" in f and len(f["mod"]), str(spec.path), "mod", "missing: not a MuData .h5mu file")
    mods = {name: canonical_modality(name) for name in f["mod"]}
    return [_anndata_source(spec.path, f["mod"][name], mod, layer_of(mod), prefix=f"mod/{name}/")
            for name, mod in mods.items() if not spec.modality or mod == spec.modality]


def open_sources(specs: Sequence[SourceSpec], stack: ExitStack, *, layer: str | Mapping[str, str] | None = None,
                 modalities: Sequence[str] | None = None) -> list[MatrixSource]:
    """Open every source file (kept open on ``stack``) and return one source per modality.

    ``layer``: read counts from ``layers/NAME`` instead of X: one NAME for every input, or a
    modality -> NAME mapping (modalities not in it read X)."""
    layers = {canonical_modality(k): v for k, v in layer.items()} if isinstance(layer, Mapping) else None

    def layer_of(mod: str) -> str | None:
        return layers.get(mod) if layers is not None else layer

    out: list[MatrixSource] = []
    for spec in specs:
        with reading(spec.path, "format"):  # damaged HDF5 metadata, met while finding the groups
            out.extend(_open_spec(spec, stack, layer_of))
    if modalities:
        wanted = {canonical_modality(m) for m in modalities}
        out = [s for s in out if s.modality in wanted]
        missing = wanted - {s.modality for s in out}
        if missing:
            raise InputError(", ".join(str(s.path) for s in specs), "modalities",
                             f"not found in the inputs: {sorted(missing)}")
    seen: dict[str, MatrixSource] = {}
    for src in out:
        if src.modality in seen:
            raise InputError(src.path, "modality", f"{src.modality} given twice "
                             f"(also in {seen[src.modality].path})")
        seen[src.modality] = src
    if layers is not None and (unknown := sorted(set(layers) - set(seen))):
        raise InputError(", ".join(str(s.path) for s in specs), "--layer",
                         f"no input modality {unknown[0]} (the inputs have {sorted(seen)})")
    return out
