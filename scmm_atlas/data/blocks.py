"""Sparse blocks of cells and the compact arrays that carry them between processes.

A block is what crosses a process boundary: per modality the CSR arrays of the selected features
in the smallest dtype that holds them (``uint16`` indices and counts when they fit), plus per-cell
arrays (store index, batch code, modality masks, library sizes), as a flat dict of numpy arrays
(the layout stores the same arrays). Ray moves such a dict with each array out of band: stored
once in shared memory, mapped by the consumer without a copy. The consumer keeps it that way
(:class:`CompactBlock`) and gathers each minibatch's rows straight into a small float32 CSR, so a
block is never converted or copied whole in the training process.

No torch here: feeder processes import this module and should stay small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


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


class CompactBlock:
    """A block as :func:`compact_arrays` made it (possibly read-only views of shared memory), rows gathered
    on demand: :meth:`take` gives a :class:`SparseBlock` of float32 counts and int32 indices."""

    def __init__(self, arrays: Mapping[str, np.ndarray], n_features: Mapping[str, int]) -> None:
        self.arrays, self.n_features = arrays, dict(n_features)
        self._len = len(arrays["cell"])

    def __len__(self) -> int:
        return self._len

    def take(self, rows: np.ndarray) -> SparseBlock:
        rows = np.asarray(rows, dtype=np.int64)
        counts = {m: _gather(self.arrays[f"{m}/indptr"], self.arrays[f"{m}/indices"], self.arrays[f"{m}/data"], rows,
                             n_var) for m, n_var in self.n_features.items()}
        obs = {k: v[rows] for k, v in self.arrays.items() if "/" not in k}
        return SparseBlock(counts, obs)


def _gather(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray, n_var: int) -> sp.csr_matrix:
    """Rows ``rows`` of a CSR given by its arrays, as a float32 CSR with int32 indices (vectorised: one
    ``repeat`` and two gathers, whatever the rows)."""
    starts = indptr[rows] - indptr[0]
    lens = indptr[rows + 1] - indptr[rows]
    out_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_ptr[1:])
    pos = np.repeat(starts - out_ptr[:-1], lens) + np.arange(out_ptr[-1])
    return sp.csr_matrix((data[pos].astype(np.float32), indices[pos].astype(np.int32), out_ptr.astype(np.int32)),
                         shape=(len(rows), n_var))
