"""Checks on users' inputs, run in full before anything is written so that bad input never
touches a store. Counts are scanned in bounded chunks (a first, read-only pass over the file)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import InputError
from .input_files import INT32_MAX, MatrixSource


@dataclass(frozen=True)
class CellCounts:
    """Per-cell totals of one source, in the source's row order."""

    total: np.ndarray  # int64 library size
    nnz: np.ndarray  # int64 detected features


def check_names(src: MatrixSource) -> None:
    """Non-empty modality, unique barcodes, unique feature names."""
    if src.n_obs == 0 or len(src.var) == 0:
        raise InputError(src.path, src.field, f"empty modality {src.modality}: "
                         f"{src.n_obs} cells x {len(src.var)} features")
    hashes = src.barcodes.hashes
    uniq, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    if len(uniq) != len(hashes):
        row = int(first[np.argmax(counts > 1)])
        raise InputError(src.path, f"{src.modality} obs_names (cell barcodes)",
                         f"{len(hashes) - len(uniq)} duplicated, e.g. {src.barcodes.read(row, row + 1)[0]!r}: "
                         "names must be unique")
    if not src.var.index.is_unique:
        dups = src.var.index[src.var.index.duplicated()].unique()
        raise InputError(src.path, f"{src.modality} var_names (features)",
                         f"{len(dups)} duplicated, e.g. {dups[0]!r}: names must be unique")


def row_sums(values: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR ``values`` (empty rows give 0), as int64."""
    cum = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cum[ptr[1:]] - cum[ptr[:-1]]


def _first_row(src: MatrixSource, start: int, ptr: np.ndarray, mask: np.ndarray) -> str:
    pos = int(np.flatnonzero(mask)[0])
    return _cell(src, start + int(np.searchsorted(ptr, pos, side="right")) - 1)


def _cell(src: MatrixSource, row: int) -> str:
    return str(src.barcodes.read(row, row + 1)[0])


def scan_counts(src: MatrixSource, *, max_cells: int, max_nnz: int, progress: bool = False) -> CellCounts:
    """Refuse values that are not counts; return per-cell totals and detected features."""
    kind = np.dtype(src.dtype).kind
    if kind not in "biuf":
        raise InputError(src.path, src.field, f"dtype {src.dtype} is not numeric counts")
    total = np.zeros(src.n_obs, dtype=np.int64)
    nnz = np.zeros(src.n_obs, dtype=np.int64)
    bar = tqdm(total=src.n_obs, desc=f"check {src.modality}", unit="cell", disable=not progress, leave=False)
    for start, stop in src.iter_ranges(max_cells, max_nnz):
        mat = src.read_range(start, stop)
        data, ptr = mat.data, mat.indptr
        where = (src.path, src.field)
        if kind == "f":
            bad = ~np.isfinite(data)
            if bad.any():
                val = data[np.flatnonzero(bad)[0]]
                raise InputError(*where, f"contains {'NaN' if np.isnan(val) else 'inf'} "
                                 f"(cell {_first_row(src, start, ptr, bad)!r}): counts must be finite")
        if kind in "if":
            neg = data < 0
            if neg.any():
                raise InputError(*where, f"contains negative values (cell {_first_row(src, start, ptr, neg)!r}):"
                                 " raw counts are needed")
        big = data > INT32_MAX
        if big.any():
            raise InputError(*where, f"contains counts above {INT32_MAX:,}, e.g. {data[big][0]:g} (cell "
                             f"{_first_row(src, start, ptr, big)!r}): the store keeps counts as 32-bit integers")
        if kind == "f":
            frac = data != np.floor(data)
            if frac.any():
                raise InputError(*where, f"contains non-integer values, e.g. {data[frac][0]:g} (cell "
                                 f"{_first_row(src, start, ptr, frac)!r}): the NB/ZINB likelihoods need raw "
                                 "integer counts, not normalised data (use --layer to pick a counts layer)")
        total[start:stop] = row_sums(data, ptr)
        over = np.flatnonzero(total[start:stop] > INT32_MAX)
        if len(over):  # repeated (cell, feature) entries are summed when stored: bound every sum
            raise InputError(*where, f"cell {_cell(src, start + int(over[0]))!r} has more than {INT32_MAX:,} "
                             "counts in all: the store keeps counts as 32-bit integers")
        nnz[start:stop] = row_sums(data != 0, ptr)
        bar.update(stop - start)
    bar.close()
    return CellCounts(total=total, nnz=nnz)


def check_features_match(src: MatrixSource, store_features: pd.Index, store_where: str) -> np.ndarray:
    """Column order that maps the source's features onto the store's; refuse a different feature set."""
    features = src.var.index
    if features.equals(store_features):
        return np.arange(len(features))
    if len(features) == len(store_features) and features.isin(store_features).all():
        return features.get_indexer(store_features)
    missing = store_features.difference(features)
    extra = features.difference(store_features)
    raise InputError(src.path, f"{src.modality} var_names",
                     f"feature space differs from the store {store_where} ({len(extra)} new, e.g. "
                     f"{list(extra[:2])}; {len(missing)} missing, e.g. {list(missing[:2])}); "
                     f"pass --feature-map {src.modality}=intersect or {src.modality}=MAP.tsv to map them")
