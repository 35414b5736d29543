"""A seeded sample of a store's cells and their obs and counts, read a slice at a time: the report and
the summary look at a sample, and a whole store need not fit in memory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..store import Store
from ..store.base import HASH_CHUNK


def sample_rows(n: int, max_cells: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers of at most ``max_cells`` of ``n`` cells (all of them when they fit), so that
    the slices below read each chunk once."""
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def _slices(store: Store, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, the sorted ``rows`` inside it) per chunk of the store that holds any of them."""
    for start in range(0, store.n_obs, HASH_CHUNK):
        stop = min(store.n_obs, start + HASH_CHUNK)
        pick = rows[(rows >= start) & (rows < stop)]
        if len(pick):
            yield start, stop, pick


def read_obs(store: Store, rows: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """The obs ``columns`` of the sorted ``rows``, in their order."""
    parts = [store.obs_slice(start, stop, columns).iloc[pick - start] for start, stop, pick in _slices(store, rows)]
    return pd.concat(parts, ignore_index=True)


def read_counts(store: Store, mod: str, rows: np.ndarray, features: list[str]) -> np.ndarray:
    """Dense counts of ``features`` for the sorted ``rows``; a feature the store lacks reads as zeros."""
    cols = store.var(mod).index.get_indexer(pd.Index(features))
    out = np.zeros((len(rows), len(features)), dtype=np.float32)
    found = cols >= 0
    done = 0
    for start, stop, pick in _slices(store, rows):
        out[done : done + len(pick), found] = store.read(mod, start, stop, cols[found])[pick - start].toarray()
        done += len(pick)
    return out
