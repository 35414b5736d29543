"""Sparse blocks of cells and their wire format.

A block is what crosses a process boundary: per modality the CSR arrays of the selected features
in the smallest dtype that holds them (``uint16`` indices and counts when they fit), plus per-cell
arrays (store index, batch code, modality masks, library sizes). On the wire a block is one
``bytes`` value: a JSON header and the raw arrays, 8-byte aligned, so that decoding is a handful
of ``np.frombuffer`` views. Ray moves one such value per block (one row, one binary column): Ray's
per-column overhead for object columns cost 3-5x the throughput on this machine.

No torch here: Ray read workers import this module and should stay small.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

_ALIGN = 8
_HEADER_LEN = np.dtype("<u8")


@dataclass
class SparseBlock:
    """Cells of one or more ranges: counts per modality (CSR) and per-cell arrays.

    ``obs`` keys: ``cell`` (store index), ``batch`` (int codes), ``has_<MOD>`` (bool) and
    ``library_<MOD>`` (total counts over all the modality's features)."""

    counts: dict[str, sp.csr_matrix]
    obs: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.obs["cell"])

    def take(self, rows: np.ndarray) -> SparseBlock:
        return SparseBlock({m: c[rows] for m, c in self.counts.items()}, {k: v[rows] for k, v in self.obs.items()})

    @staticmethod
    def concat(blocks: Sequence[SparseBlock]) -> SparseBlock:
        if len(blocks) == 1:
            return blocks[0]
        counts = {m: sp.vstack([b.counts[m] for b in blocks], format="csr") for m in blocks[0].counts}
        obs = {k: np.concatenate([b.obs[k] for b in blocks]) for k in blocks[0].obs}
        return SparseBlock(counts, obs)


def smallest_uint(values: np.ndarray, upper: int | None = None) -> np.ndarray:
    """``values`` (non-negative integers) as uint16 when they fit, else unchanged."""
    top = upper if upper is not None else (int(values.max()) if len(values) else 0)
    return values.astype(np.uint16) if top <= np.iinfo(np.uint16).max else values


def compact_arrays(block: SparseBlock) -> dict[str, np.ndarray]:
    """The block as named flat arrays in compact dtypes (what the layout stores and the wire carries)."""
    out: dict[str, np.ndarray] = {}
    for mod, mat in block.counts.items():
        out[f"{mod}/indptr"] = mat.indptr.astype(np.int64, copy=False)
        out[f"{mod}/indices"] = smallest_uint(mat.indices, mat.shape[1] - 1)
        out[f"{mod}/data"] = smallest_uint(mat.data) if mat.data.dtype.kind in "iu" else mat.data
    out.update(block.obs)
    return out


def from_arrays(arrays: Mapping[str, np.ndarray], n_features: Mapping[str, int]) -> SparseBlock:
    """A :class:`SparseBlock` of float32 counts and int32 indices, ready for row gathers and ``toarray``."""
    counts = {}
    for mod, n_var in n_features.items():
        indptr = arrays[f"{mod}/indptr"]
        indptr = (indptr - indptr[0]).astype(np.int32 if indptr[-1] - indptr[0] < 2**31 else np.int64)
        indices = arrays[f"{mod}/indices"].astype(indptr.dtype)
        data = arrays[f"{mod}/data"].astype(np.float32)
        counts[mod] = sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_var), copy=False)
    obs = {k: v for k, v in arrays.items() if "/" not in k}
    return SparseBlock(counts, obs)


def encode(arrays: Mapping[str, np.ndarray], n_features: Mapping[str, int]) -> bytearray:
    """One buffer: header length, JSON header, then each array 8-byte aligned."""
    entries, offset = [], 0
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        entries.append([name, arr.dtype.str, len(arr), offset])
        offset += -(-arr.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"features": dict(n_features), "arrays": entries}).encode()
    start = -(-(_HEADER_LEN.itemsize + len(header)) // _ALIGN) * _ALIGN
    buf = bytearray(start + offset)
    buf[: _HEADER_LEN.itemsize] = np.array(len(header), _HEADER_LEN).tobytes()
    buf[_HEADER_LEN.itemsize : _HEADER_LEN.itemsize + len(header)] = header
    view = memoryview(buf)
    for (_, _, _, off), arr in zip(entries, arrays.values(), strict=True):
        raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
        view[start + off : start + off + len(raw)] = raw
    return buf


def decode(buf: bytes | memoryview) -> SparseBlock:
    """Inverse of :func:`encode` (views over ``buf``, then one dtype conversion per CSR array)."""
    n_header = int(np.frombuffer(buf, _HEADER_LEN, count=1)[0])
    header = json.loads(bytes(buf[_HEADER_LEN.itemsize : _HEADER_LEN.itemsize + n_header]))
    start = -(-(_HEADER_LEN.itemsize + n_header) // _ALIGN) * _ALIGN
    arrays = {name: np.frombuffer(buf, np.dtype(dtype), count=n, offset=start + off)
              for name, dtype, n, off in header["arrays"]}
    return from_arrays(arrays, header["features"])
