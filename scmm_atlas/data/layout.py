"""The pre-shuffled training layout: the selected features of every cell, in a random cell order.

Atlases are stored sorted (by dataset, often by cell type), so contiguous reads of the store give
unmixed minibatches, and random reads are slow. The layout (annbatch's approach) pays the shuffle
once: cells are dealt at random into shards and shuffled within them (see ``prepare.py``), so any
contiguous range of layout rows is a random sample of the store and the loader only ever makes
large contiguous reads.

Cells are split into ``train`` and ``val`` by a stable hash of their id (:func:`is_validation`), so
the same cells are held out on every run and appended cells never move old ones; each split has
its own shards. It is a Zarr group ``<store>/train_layout`` beside the store's own data (for both
backends): ``shards/<name>/`` holds per modality ``<MOD>/indptr|indices|data`` (CSR, uncompressed, compact
dtypes) and per-cell ``cell`` (store index), ``batch``, ``has_<MOD>``, ``library_<MOD>``. The root
attribute ``scmm_atlas_layout`` (:class:`LayoutInfo`) lists each split's shards in row order and is
written last: it is the commit point. Shards are never modified; appended cells get their own shards.
A training run pins the layout it started with (:attr:`LayoutInfo.splits` travels to its workers)
and holds a lease naming its shards (:data:`READER_LEASE`), so a rebuild meanwhile removes only
shards that no live run reads.

Only zarr and numpy here: this runs inside Ray read workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import zarr

from ..errors import StoreError
from ..store.base import LAYOUT_NAME
from ..store.uri import StoreURI, zarr_store

READER_LEASE = "layout-reader-"  # + a run's token; payload {"shards": [names]}
META_KEY = "scmm_atlas_layout"
FORMAT_VERSION = 2
ROW_CHUNK = 1 << 14
VALUE_CHUNK = 1 << 20
SPLITS = ("train", "val")
_HASH_MOD = 1_000_000


def is_validation(id_hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Held-out cells: those whose 64-bit id hash falls in the first ``fraction`` of 10**6 buckets."""
    return (np.asarray(id_hashes, dtype=np.uint64) % np.uint64(_HASH_MOD)) < np.uint64(round(fraction * _HASH_MOD))


@dataclass
class LayoutInfo:
    """What a layout holds. ``store_n_obs``: it covers the store's cells ``[0, store_n_obs)``."""

    store_n_obs: int
    modalities: list[str]
    n_features: dict[str, int]
    selection: str  # fingerprint of the selected features it was written with
    batches: list[str]  # batch code -> store obs "batch" value
    seed: int
    val_fraction: float
    splits: dict[str, list[list]] = field(default_factory=dict)  # split -> [[name, rows], ...] in row order
    format_version: int = FORMAT_VERSION

    def n_cells(self, split: str = "train") -> int:
        return sum(rows for _, rows in self.splits.get(split, []))


def layout_uri(store_uri: StoreURI) -> StoreURI:
    return StoreURI(store_uri.child(LAYOUT_NAME))


def open_root(uri: StoreURI, *, mode: str) -> zarr.Group:
    return zarr.open_group(zarr_store(uri, read_only=mode == "r"), mode=mode, zarr_format=3)


def read_info(uri: StoreURI) -> LayoutInfo | None:
    """The committed layout at ``uri``, or None when there is none (or only one of an older format)."""
    try:
        attrs = open_root(uri, mode="r").attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    meta = attrs.get(META_KEY)
    if meta is None or meta.get("format_version") != FORMAT_VERSION:
        return None  # none, or an older format that ``prepare`` rewrites
    return LayoutInfo(**meta)


def write_shard(root: zarr.Group, name: str, arrays: Mapping[str, np.ndarray]) -> None:
    """One shard's arrays (from :func:`~.blocks.compact_arrays`), uncompressed: decoding would cost
    more than the local disk or page cache saves."""
    group = root.require_group("shards").create_group(name)
    for key, arr in arrays.items():
        chunk = VALUE_CHUNK if key.endswith(("/indices", "/data")) else ROW_CHUNK
        out = group.create_array(key, shape=arr.shape, dtype=arr.dtype, chunks=(max(1, min(chunk, len(arr))),),
                                 compressors=None, filters=None, fill_value=0)
        out[:] = arr


def commit(root: zarr.Group, info: LayoutInfo) -> None:
    root.attrs[META_KEY] = asdict(info)


class Layout:
    """Reads contiguous rows ``[start, stop)`` of one split (which may span shards) as compact arrays.

    ``shards``: the split's ``[[name, rows], ...]`` a run pinned (default: the committed layout's)."""

    def __init__(self, uri: StoreURI, split: str = "train", shards: Sequence[Sequence] | None = None) -> None:
        info = read_info(uri)
        if info is None:
            raise StoreError(uri, META_KEY, "no training layout here: run `scmm-atlas prepare --store STORE`")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.uri, self.info, self.split = uri, info, split
        self._shards = [list(s) for s in shards] if shards is not None else info.splits.get(split, [])
        self._root = open_root(uri, mode="r")
        rows = np.array([r for _, r in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(rows)])
        self._arrays: dict[tuple[int, str], zarr.Array] = {}

    @property
    def n_cells(self) -> int:
        return int(self._starts[-1])

    def _array(self, shard: int, key: str) -> zarr.Array:
        if (shard, key) not in self._arrays:
            self._arrays[shard, key] = self._root[f"shards/{self._shards[shard][0]}/{key}"]
        return self._arrays[shard, key]

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if not 0 <= start < stop <= self.n_cells:
            raise IndexError(f"layout rows [{start}, {stop}) outside [0, {self.n_cells})")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        for shard in range(first, len(self._shards)):
            lo, hi = self._starts[shard], self._starts[shard + 1]
            if lo >= stop:
                break
            pieces.append(self._read_shard(shard, int(max(start, lo) - lo), int(min(stop, hi) - lo)))
        return pieces[0] if len(pieces) == 1 else _concat(pieces)

    def _read_shard(self, shard: int, a: int, b: int) -> dict[str, np.ndarray]:
        out = {}
        for mod in self.info.modalities:
            indptr = self._array(shard, f"{mod}/indptr")[a : b + 1]
            lo, hi = int(indptr[0]), int(indptr[-1])
            out[f"{mod}/indptr"] = indptr - lo
            for key in ("indices", "data"):
                out[f"{mod}/{key}"] = self._array(shard, f"{mod}/{key}")[lo:hi]
        for key in ("cell", "batch", *(f"{p}_{m}" for m in self.info.modalities for p in ("has", "library"))):
            out[key] = self._array(shard, key)[a:b]
        return out


def _concat(pieces: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several shards as one block (each CSR's indptr shifted by the values before it)."""
    out = {}
    for key in pieces[0]:
        if key.endswith("/indptr"):
            nnz = np.cumsum([0] + [int(p[key][-1]) for p in pieces[:-1]])
            out[key] = np.concatenate([pieces[0][key][:1]] + [p[key][1:] + n for p, n in zip(pieces, nnz, strict=True)])
        else:
            out[key] = np.concatenate([p[key] for p in pieces])
    return out
