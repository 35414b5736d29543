"""``scmm-atlas prepare``: write (or extend) the pre-shuffled training layout of a store.

An out-of-core shuffle, memory bounded by ``chunk_cells`` + ``shard_cells`` cells:
0. count the held-out cells (:func:`~.layout.is_validation` of the cell ids), chunk by chunk;
1. read the store in contiguous chunks; deal each chunk's cells of each split at random into that
   split's shards, the number each shard receives drawn from a multivariate hypergeometric over
   the shards' remaining room (so shards end exactly balanced and every assignment is equally
   likely), spilling the pieces to a local temporary folder;
2. per shard, gather its pieces, shuffle them and write the shard.
Cells appended to the store later get shards of their own (their rows follow the existing ones);
a changed feature selection or validation fraction rebuilds the layout, committed before the old
shards are removed; shards that a live training run pinned (:func:`pin`) stay until it ends.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import uuid
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from ..errors import StoreError
from ..store import Store
from ..store.base import HASH_CHUNK, hash_strings
from ..store.lease import Lease, held, lock
from ..store.staging import restored_on_failure
from ..store.uri import StoreURI
from . import layout as lay
from .blocks import SparseBlock, compact_arrays
from .layout import SPLITS, LayoutInfo, commit, is_validation, layout_uri, open_root, read_info, write_shard
from .store_blocks import StoreBlockReader, batch_categories

log = logging.getLogger(__name__)
SHARD_CELLS = 1 << 16
CHUNK_CELLS = 1 << 16
VAL_FRACTION = 0.1
LOCK_WAIT_S = 6 * 3600.0  # another prepare of the same store writing a large layout


def selection_fingerprint(store: Store, features: str = "selected") -> str:
    digest = hashlib.sha1()
    for mod in store.modalities:
        digest.update(mod.encode() + store.feature_index(mod, features).astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def prepare_layout(store: Store, *, seed: int = 0, val_fraction: float = VAL_FRACTION, shard_cells: int = SHARD_CELLS,
                   chunk_cells: int = CHUNK_CELLS, rebuild: bool = False, tmp_dir: str | None = None,
                   progress: bool = False) -> tuple[LayoutInfo, str]:
    """Bring the layout of ``store`` up to date; returns it and what was done, in words.

    One ``prepare`` per store at a time (a lease: another waits, then finds the layout up to date);
    a write that fails part-way (a full disk) leaves a local layout file for file as it was."""
    if shard_cells <= 0 or chunk_cells <= 0:
        raise ValueError(f"shard_cells and chunk_cells must be positive, got {shard_cells} and {chunk_cells}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    uri = layout_uri(store.uri)
    with lock(store.uri.uri, "layout", wait_s=LOCK_WAIT_S), restored_on_failure(uri):
        return _update(store, uri, seed=seed, val_fraction=val_fraction, shard_cells=shard_cells,
                       chunk_cells=chunk_cells, rebuild=rebuild, tmp_dir=tmp_dir, progress=progress)


def _update(store: Store, uri: StoreURI, *, seed: int, val_fraction: float, shard_cells: int, chunk_cells: int,
            rebuild: bool, tmp_dir: str | None, progress: bool) -> tuple[LayoutInfo, str]:
    fingerprint = selection_fingerprint(store)
    old = None if rebuild else read_info(uri)
    if old is not None and (old.selection != fingerprint or old.val_fraction != val_fraction
                            or old.store_n_obs > store.n_obs):
        log.warning("%s: feature selection or validation fraction changed: rebuilding the training layout", uri)
        old = None
    if old is not None and old.store_n_obs == store.n_obs:
        _remove_stale(store, old)  # left by a rebuild while a run read them
        return old, f"layout up to date ({old.n_cells('train'):,} training + {old.n_cells('val'):,} held-out cells)"
    lo = old.store_n_obs if old is not None else 0
    reader = StoreBlockReader(store, batches=batch_categories(store))
    root = open_root(uri, mode="a")
    new = _shuffle_into_shards(store, reader, lo, _next_generation(root), root, seed=seed, val_fraction=val_fraction,
                               shard_cells=shard_cells, chunk_cells=chunk_cells, tmp_dir=tmp_dir, progress=progress)
    splits = {s: (list(old.splits.get(s, [])) if old is not None else []) + new[s] for s in SPLITS}
    info = LayoutInfo(store_n_obs=store.n_obs, modalities=store.modalities, n_features=reader.n_features,
                      selection=fingerprint, batches=reader.batches, seed=seed, val_fraction=val_fraction,
                      splits=splits)
    commit(root, info)
    _remove_stale(store, info, root)
    n_new = {s: sum(r for _, r in new[s]) for s in SPLITS}
    what = "added" if old is not None else "wrote"
    return info, (f"layout {uri}: {what} {n_new['train']:,} training + {n_new['val']:,} held-out cells "
                  f"({len(new['train']) + len(new['val'])} shards)")


def pin(store: Store, info: LayoutInfo) -> Lease:
    """Hold ``info``'s shards for a training run (release the lease when it ends): a ``prepare``
    rebuilding the layout meanwhile leaves them in place."""
    shards = [name for split in info.splits.values() for name, _ in split]
    lease = Lease(store.uri.uri, f"{lay.READER_LEASE}{uuid.uuid4().hex[:12]}", data={"shards": shards}).acquire()
    missing = set(shards) - set(_shard_names(open_root(layout_uri(store.uri), mode="r")))
    if missing:  # rebuilt between our prepare and the lease
        lease.release()
        raise StoreError(store.uri, "train_layout", "the training layout was rebuilt by another process while "
                         "this run started: run the command again")
    return lease


def _remove_stale(store: Store, info: LayoutInfo, root=None) -> None:
    """Drop shards of earlier layouts: after the commit, and none that a live run pinned, so that
    readers never see a hole."""
    keep = {name for split in info.splits.values() for name, _ in split}
    keep |= {name for lease in held(store.uri.uri, lay.READER_LEASE).values() for name in lease.get("shards", [])}
    root = root if root is not None else open_root(layout_uri(store.uri), mode="r")
    stale = [name for name in _shard_names(root) if name not in keep]
    if stale and root.read_only:
        root = open_root(layout_uri(store.uri), mode="a")
    for name in stale:
        del root["shards"][name]


def _shard_names(root) -> list[str]:
    return list(root["shards"].group_keys()) if "shards" in root else []


def _next_generation(root) -> int:
    return 1 + max((int(n.split("-")[0]) for n in _shard_names(root)), default=-1)


def _held_out(store: Store, start: int, stop: int, fraction: float) -> np.ndarray:
    ids = store.obs_slice(start, stop, ["obs_id"])["obs_id"].to_numpy()
    return is_validation(hash_strings(ids), fraction)


def _balanced(n: int, shard_cells: int) -> np.ndarray:
    k = -(-n // shard_cells)
    return np.full(k, n // k, dtype=np.int64) + (np.arange(k) < n % k) if n else np.zeros(0, dtype=np.int64)


def _shuffle_into_shards(store: Store, reader: StoreBlockReader, lo: int, generation: int, root, *, seed: int,
                         val_fraction: float, shard_cells: int, chunk_cells: int, tmp_dir: str | None,
                         progress: bool) -> dict[str, list[list]]:
    n_val = sum(int(_held_out(store, a, min(a + HASH_CHUNK, store.n_obs), val_fraction).sum())
                for a in range(lo, store.n_obs, HASH_CHUNK))
    room = {"train": _balanced(store.n_obs - lo - n_val, shard_cells), "val": _balanced(n_val, shard_cells)}
    rng = np.random.default_rng([seed, lo])  # appended cells get their own stream
    bar = tqdm(total=2 * (store.n_obs - lo), desc="prepare layout", unit="cell", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="scmm-layout-", dir=tmp_dir) as tmp:
        for chunk, start in enumerate(range(lo, store.n_obs, chunk_cells)):
            stop = min(start + chunk_cells, store.n_obs)
            block = reader.read(start, stop)
            held = _held_out(store, start, stop, val_fraction)
            for split, rows in (("train", np.flatnonzero(~held)), ("val", np.flatnonzero(held))):
                if not len(rows):
                    continue
                counts = rng.multivariate_hypergeometric(room[split], len(rows))
                room[split] -= counts
                for shard, part in enumerate(np.split(rng.permutation(rows), np.cumsum(counts)[:-1])):
                    if len(part):
                        _spill(Path(tmp, f"{split}-{shard}-{chunk}.npz"), block.take(np.sort(part)))
            bar.update(len(block))
        shards: dict[str, list[list]] = {s: [] for s in SPLITS}
        for split in SPLITS:
            for shard in range(len(room[split])):
                paths = sorted(Path(tmp).glob(f"{split}-{shard}-*.npz"), key=lambda p: int(p.stem.split("-")[2]))
                block = SparseBlock.concat([_load(p) for p in paths])
                for p in paths:
                    p.unlink()
                name = f"{generation:03d}-{split}-{shard:05d}"
                write_shard(root, name, compact_arrays(block.take(rng.permutation(len(block)))))
                shards[split].append([name, len(block)])
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
