"""The one small interface that both store backends (TileDB-SOMA and Zarr) implement.

Layout, shared by both backends:
- obs: ``obs_id`` (cell barcode), ``dataset``, ``batch``, ``cell_type`` ("" when unknown), and per
  modality ``has_<MOD>`` (presence), ``total_counts_<MOD>`` and ``n_features_<MOD>``.
- per modality: raw counts (sparse int32, cells x features; a cell without the modality has an
  empty row) and ``var`` with ``var_id`` plus feature statistics and the ``selected`` flag.
- ``results/``: reserved for versioned results (embeddings, predictions, programs), one entry per
  model version, published atomically by the inference stage.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import StoreError
from .uri import StoreURI

FORMAT_VERSION = 1
OBS_STRING_COLUMNS = ("obs_id", "dataset", "batch", "cell_type")
# Feature statistics written by ``scmm-atlas stats`` (see ingest/stats.py); NaN until computed.
VAR_STAT_COLUMNS: dict[str, str] = {
    "n_cells": "int64",
    "total_counts": "float64",
    "mean": "float64",
    "variance": "float64",
    "variances_norm": "float64",
    "hvg_rank": "float64",
    "selected": "bool",
}
# What each modality's counts are, for feature selection and the likelihood.
MODALITY_KINDS = {"RNA": "rna", "ADT": "protein", "ATAC": "atac"}

Features = Literal["all", "selected"] | np.ndarray
HASH_CHUNK = 1 << 17
LAYOUT_NAME = "train_layout"  # the training layout's folder inside a store (written by ``data.prepare``)


def hash_strings(values: np.ndarray) -> np.ndarray:
    """64-bit hashes of strings: how cell ids are matched without holding the strings whole."""
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)


def modality_kind(name: str) -> str:
    return MODALITY_KINDS.get(name, "other")


def obs_modality_columns(mod: str) -> dict[str, str]:
    return {f"has_{mod}": "bool", f"total_counts_{mod}": "int64", f"n_features_{mod}": "int64"}


def obs_dtypes(modalities: Sequence[str]) -> dict[str, str]:
    """Column -> dtype of the obs table (index ``obs_id`` included, as ``str``)."""
    cols = {c: "str" for c in OBS_STRING_COLUMNS}
    for mod in modalities:
        cols.update(obs_modality_columns(mod))
    return cols


def empty_var(features: pd.DataFrame) -> pd.DataFrame:
    """A var table for new features: extra string columns kept, statistics not yet computed."""
    var = pd.DataFrame({"var_id": features.index.astype(str)})
    for col in features.columns:
        var[col] = features[col].astype(str).to_numpy()
    for col, dtype in VAR_STAT_COLUMNS.items():
        var[col] = np.zeros(len(var), dtype=dtype) if dtype != "float64" else np.nan
    return var


@dataclass
class StoreInfo:
    """Store-level metadata kept beside the data."""

    modalities: list[str]
    kinds: dict[str, str]
    n_obs: int = 0
    stats_n_obs: int = 0  # n_obs when feature statistics were last computed (0: never)
    selection: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    cells_committed_ms: int = 0  # when cells were last committed (ms since the epoch; 0: not recorded)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreInfo:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class StoreWriter(abc.ABC):
    """Adds cells at the end of a store. Cells become visible to readers at :meth:`commit`."""

    @abc.abstractmethod
    def write(self, offset: int, obs: pd.DataFrame, counts: Mapping[str, sp.csr_matrix]) -> None:
        """Write new cells ``offset .. offset + len(obs)`` (offset counts from the first new cell).

        ``obs`` has the columns of :func:`obs_dtypes`; ``counts`` one canonical CSR per modality.
        Calls come in ascending, contiguous order.
        """

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the new cells part of the store."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Forget what was written (best effort: a created store is removed)."""


class Store(abc.ABC):
    """Read access to a store, plus the few writes that feature statistics need."""

    backend: str

    def __init__(self, uri: StoreURI, info: StoreInfo) -> None:
        self.uri = uri
        self.info = info
        self._var_cache: dict[str, pd.DataFrame] = {}

    # -- shape -------------------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        return self.info.n_obs

    @property
    def modalities(self) -> list[str]:
        return list(self.info.modalities)

    def kind(self, mod: str) -> str:
        return self.info.kinds.get(mod, "other")

    def _check_modality(self, mod: str) -> None:
        if mod not in self.info.modalities:
            raise StoreError(self.uri, "modality", f"no modality {mod!r}; the store has {self.modalities}")

    # -- tables ------------------------------------------------------------------------------
    @abc.abstractmethod
    def obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The obs table (index: ``obs_id``), optionally only some columns."""

    def obs_slice(self, start: int, stop: int, columns: Sequence[str]) -> pd.DataFrame:
        """Some obs columns of cells ``[start, stop)`` in store order (no index): for chunked passes."""
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"cell range [{start}, {stop}) outside [0, {self.n_obs})")
        return self._read_obs_slice(start, stop, list(columns))

    @abc.abstractmethod
    def _read_obs_slice(self, start: int, stop: int, columns: list[str]) -> pd.DataFrame: ...

    def obs_id_hashes(self) -> np.ndarray:
        """:func:`hash_strings` of every ``obs_id``, read in chunks (8 bytes per cell in memory)."""
        out = np.empty(self.n_obs, dtype=np.uint64)
        for start in range(0, self.n_obs, HASH_CHUNK):
            stop = min(start + HASH_CHUNK, self.n_obs)
            out[start:stop] = hash_strings(self._read_obs_slice(start, stop, ["obs_id"])["obs_id"].to_numpy())
        return out

    @property
    def obs_columns(self) -> list[str]:
        return [c for c in obs_dtypes(self.modalities) if c != "obs_id"]

    def var(self, mod: str) -> pd.DataFrame:
        """The var table of one modality (index: ``var_id``) with statistics and ``selected``."""
        self._check_modality(mod)
        if mod not in self._var_cache:
            self._var_cache[mod] = self._read_var(mod).set_index("var_id")
        return self._var_cache[mod]

    def feature_names(self, mod: str, features: Features = "all") -> pd.Index:
        return self.var(mod).index[self.feature_index(mod, features)]

    def feature_index(self, mod: str, features: Features = "all") -> np.ndarray:
        """Column indices for ``features``: all, the recorded selection, or given indices."""
        var = self.var(mod)
        if isinstance(features, str) and features == "all":
            return np.arange(len(var))
        if isinstance(features, str) and features == "selected":
            if not self.info.stats_n_obs:
                raise StoreError(self.uri, f"ms/{mod}/var/selected",
                                 "no feature selection yet: run `scmm-atlas stats --store URI`")
            return np.flatnonzero(var["selected"].to_numpy())
        return np.asarray(features, dtype=np.int64)

    # -- counts ------------------------------------------------------------------------------
    def read(self, mod: str, start: int, stop: int, features: Features = "all") -> sp.csr_matrix:
        """Raw counts of cells ``[start, stop)`` as an int32 CSR (cells x features)."""
        self._check_modality(mod)
        if not 0 <= start <= stop <= self.n_obs:
            raise IndexError(f"cell range [{start}, {stop}) outside [0, {self.n_obs})")
        mat = self._read_counts(mod, start, stop)
        if isinstance(features, str) and features == "all":
            return mat
        return mat[:, self.feature_index(mod, features)]

    # -- backend hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def _read_var(self, mod: str) -> pd.DataFrame: ...

    @abc.abstractmethod
    def _read_counts(self, mod: str, start: int, stop: int) -> sp.csr_matrix: ...

    @abc.abstractmethod
    def write_var_stats(self, mod: str, stats: pd.DataFrame) -> None:
        """Overwrite the statistics columns of ``var`` (rows in var order)."""

    @abc.abstractmethod
    def save_info(self) -> None:
        """Persist :attr:`info`."""

    @abc.abstractmethod
    def appender(self, n_new: int) -> StoreWriter:
        """A writer that adds ``n_new`` cells after the existing ones."""

    @property
    @abc.abstractmethod
    def results_uri(self) -> str:
        """Where versioned results live (reserved; written by the inference stage)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open handles."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> str:
        """A few human-readable lines about the store."""
        lines = [f"store   {self.uri}  ({self.backend}, {self.n_obs:,} cells)"]
        obs = self.obs()
        for mod in self.modalities:
            var = self.var(mod)
            present = int(obs[f"has_{mod}"].sum())
            sel = int(var["selected"].sum()) if self.info.stats_n_obs else 0
            lib = obs.loc[obs[f"has_{mod}"], f"total_counts_{mod}"]
            med = float(np.median(lib)) if len(lib) else 0.0
            lines.append(f"  {mod:<5} {self.kind(mod):<8} {len(var):>7,} features, {sel:>6,} selected; "
                         f"{present:>9,} cells with it; median counts/cell {med:,.0f}")
        for col in ("dataset", "batch", "cell_type"):
            vals = obs[col][obs[col] != ""]
            if len(vals):
                top = ", ".join(f"{k} ({v:,})" for k, v in vals.value_counts().head(5).items())
                more = f" +{vals.nunique() - 5} more" if vals.nunique() > 5 else ""
                lines.append(f"  {col:<9} {vals.nunique()} values: {top}{more}")
        if self.info.stats_n_obs and self.info.stats_n_obs != self.n_obs:
            lines.append(f"  note: statistics cover {self.info.stats_n_obs:,} of {self.n_obs:,} cells; "
                         "rerun `scmm-atlas stats`")
        return "\n".join(lines)


def csr_to_coo_rows(mat: sp.csr_matrix, row_offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, data) of a canonical CSR, rows shifted by ``row_offset``, int64 coords."""
    rows = np.repeat(np.arange(row_offset, row_offset + mat.shape[0], dtype=np.int64), np.diff(mat.indptr))
    return rows, mat.indices.astype(np.int64), mat.data
