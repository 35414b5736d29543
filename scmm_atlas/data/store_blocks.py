"""Blocks read from the store itself: the direct loading mode and the input of layout preparation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..store import Store
from ..store.base import HASH_CHUNK
from .blocks import SparseBlock


def batch_categories(store: Store) -> list[str]:
    """Distinct ``batch`` values in order of first appearance in the store: stable when cells are appended,
    so batch codes of existing cells never change."""
    seen: dict[str, None] = {}
    for start in range(0, store.n_obs, HASH_CHUNK):
        col = store.obs_slice(start, min(start + HASH_CHUNK, store.n_obs), ["batch"])["batch"]
        seen.update(dict.fromkeys(pd.unique(col.to_numpy())))
    return list(seen)


class StoreBlockReader:
    """Reads contiguous cell ranges of ``store``: selected features of each modality plus per-cell arrays."""

    def __init__(self, store: Store, *, features: str = "selected", batches: list[str] | None = None) -> None:
        self.store = store
        self.columns = {m: store.feature_index(m, features) for m in store.modalities}
        self.batches = batches if batches is not None else batch_categories(store)
        self._codes = {b: i for i, b in enumerate(self.batches)}

    @property
    def n_features(self) -> dict[str, int]:
        return {m: len(c) for m, c in self.columns.items()}

    def read(self, start: int, stop: int) -> SparseBlock:
        mods = self.store.modalities
        obs = self.store.obs_slice(start, stop, ["batch", *(f"{p}_{m}" for m in mods for p in ("has", "total_counts"))])
        unknown = set(pd.unique(obs["batch"])) - self._codes.keys()
        if unknown:
            raise ValueError(f"{self.store.uri}: obs/batch: values {sorted(unknown)[:5]} not among the known "
                             "batches; the store grew since the categories were read: reopen the loader")
        arrays = {
            "cell": np.arange(start, stop, dtype=np.int64),
            "batch": obs["batch"].map(self._codes).to_numpy(np.int32),
            **{f"has_{m}": obs[f"has_{m}"].to_numpy(bool) for m in mods},
            **{f"library_{m}": obs[f"total_counts_{m}"].to_numpy(np.float32) for m in mods},
        }
        counts = {m: self.store.read(m, start, stop, features=self.columns[m]) for m in mods}
        return SparseBlock(counts, arrays)
