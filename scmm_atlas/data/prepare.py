"""``scmm-atlas prepare``: write (or extend) the pre-shuffled training layout of a store.

An out-of-core shuffle in two passes, memory bounded by ``chunk_cells`` + ``shard_cells`` cells:
1. read the store in contiguous chunks; deal each chunk's cells at random into shards, with the
   number each shard receives drawn from a multivariate hypergeometric over the shards' remaining
   room (so shards end exactly balanced and every assignment is equally likely), spilling the
   pieces to a local temporary folder;
2. per shard, gather its pieces, shuffle them and write the shard.
Cells appended to the store later get shards of their own (their rows follow the existing ones);
a changed feature selection rebuilds the layout, committed before the old shards are removed.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from ..store import Store
from .blocks import SparseBlock, compact_arrays
from .layout import LayoutInfo, commit, layout_uri, open_root, read_info, write_shard
from .reading import StoreBlockReader, batch_categories

log = logging.getLogger(__name__)
SHARD_CELLS = 1 << 16
CHUNK_CELLS = 1 << 16


def selection_fingerprint(store: Store, features: str = "selected") -> str:
    digest = hashlib.sha1()
    for mod in store.modalities:
        digest.update(mod.encode() + store.feature_index(mod, features).astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def prepare_layout(store: Store, *, seed: int = 0, shard_cells: int = SHARD_CELLS, chunk_cells: int = CHUNK_CELLS,
                   rebuild: bool = False, tmp_dir: str | None = None, progress: bool = False) -> tuple[LayoutInfo, str]:
    """Bring the layout of ``store`` up to date; returns it and what was done, in words."""
    if shard_cells <= 0 or chunk_cells <= 0:
        raise ValueError(f"shard_cells and chunk_cells must be positive, got {shard_cells} and {chunk_cells}")
    uri = layout_uri(store.uri)
    fingerprint = selection_fingerprint(store)
    old = None if rebuild else read_info(uri)
    if old is not None and (old.selection != fingerprint or old.store_n_obs > store.n_obs):
        log.info("feature selection changed since the layout was written: rebuilding it")
        old = None
    if old is not None and old.store_n_obs == store.n_obs:
        return old, f"layout up to date ({old.n_cells:,} cells)"
    lo = old.store_n_obs if old is not None else 0
    reader = StoreBlockReader(store, batches=batch_categories(store))
    root = open_root(uri, mode="a")
    shards = _shuffle_into_shards(store, reader, lo, _next_generation(root), root, seed=seed, shard_cells=shard_cells,
                                  chunk_cells=chunk_cells, tmp_dir=tmp_dir, progress=progress)
    kept = list(old.shards) if old is not None else []
    info = LayoutInfo(n_cells=sum(r for _, r in kept + shards), store_n_obs=store.n_obs,
                      modalities=store.modalities, n_features=reader.n_features, selection=fingerprint,
                      batches=reader.batches, seed=seed, shards=kept + shards)
    stale = [name for name in _shard_names(root) if name not in {n for n, _ in info.shards}]
    commit(root, info)
    for name in stale:  # after the commit: readers of the previous layout never see a hole
        del root["shards"][name]
    what = f"added {store.n_obs - lo:,} cells in {len(shards)} shards" if old else \
        f"wrote {info.n_cells:,} cells in {len(shards)} shards"
    return info, f"layout {uri}: {what}"


def _shard_names(root) -> list[str]:
    return list(root["shards"].group_keys()) if "shards" in root else []


def _next_generation(root) -> int:
    return 1 + max((int(n.split("-")[0]) for n in _shard_names(root)), default=-1)


def _shuffle_into_shards(store: Store, reader: StoreBlockReader, lo: int, generation: int, root, *, seed: int,
                         shard_cells: int, chunk_cells: int, tmp_dir: str | None, progress: bool) -> list[list]:
    n = store.n_obs - lo
    n_shards = -(-n // shard_cells)
    room = np.full(n_shards, n // n_shards, dtype=np.int64) + (np.arange(n_shards) < n % n_shards)
    rng = np.random.default_rng([seed, lo])  # appended cells get their own stream
    bar = tqdm(total=2 * n, desc="prepare layout", unit="cell", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="scmm-layout-", dir=tmp_dir) as tmp:
        for chunk, start in enumerate(range(lo, store.n_obs, chunk_cells)):
            block = reader.read(start, min(start + chunk_cells, store.n_obs))
            counts = rng.multivariate_hypergeometric(room, len(block))
            room -= counts
            parts = np.split(rng.permutation(len(block)), np.cumsum(counts)[:-1])
            for shard, rows in enumerate(parts):
                if len(rows):
                    _spill(Path(tmp, f"{shard}-{chunk}.npz"), block.take(np.sort(rows)))
            bar.update(len(block))
        shards = []
        for shard in range(n_shards):
            paths = sorted(Path(tmp).glob(f"{shard}-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
            block = SparseBlock.concat([_load(p) for p in paths])
            for p in paths:
                p.unlink()
            name = f"{generation:03d}-{shard:05d}"
            write_shard(root, name, compact_arrays(block.take(rng.permutation(len(block)))))
            shards.append([name, len(block)])
            bar.update(len(block))
    bar.close()
    return shards


def _spill(path: Path, block: SparseBlock) -> None:
    arrays = {f"{m}.{k}": getattr(c, k) for m, c in block.counts.items() for k in ("indptr", "indices", "data")}
    shapes = {f"{m}.shape": np.array(c.shape) for m, c in block.counts.items()}
    np.savez(path, **arrays, **shapes, **{f"obs.{k}": v for k, v in block.obs.items()})


def _load(path: Path) -> SparseBlock:
    with np.load(path) as z:
        mods = [k[: -len(".shape")] for k in z.files if k.endswith(".shape")]
        counts = {m: sp.csr_matrix((z[f"{m}.data"], z[f"{m}.indices"], z[f"{m}.indptr"]), shape=tuple(z[f"{m}.shape"]))
                  for m in mods}
        obs = {k[len("obs."):]: z[k] for k in z.files if k.startswith("obs.")}
    return SparseBlock(counts, obs)
