"""The Ray Data loader: sharded, shuffled, sparse blocks to dense minibatches (real local Ray)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import PLANTED_N, write_h5ad

from scmm_atlas.data.loader import LoaderConfig, ShardLoader
from scmm_atlas.data.prepare import prepare_layout
from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.store import StoreError, open_store

N = PLANTED_N
SMALL = {"batch_size": 50, "block_cells": 128}


@pytest.fixture(scope="module")
def stores(planted_stores, ray_session) -> dict[str, Path]:
    for uri in planted_stores.values():
        with open_store(uri) as store:
            prepare_layout(store, shard_cells=300, seed=5, val_fraction=0)
    return planted_stores


def _cells(uri: Path, epoch: int, *, rank: int = 0, world: int = 1, **config) -> list[np.ndarray]:
    return [cells for cells, *_ in _batches(uri, epoch, rank=rank, world=world, **config)]


def _batches(uri: Path, epoch: int, *, rank: int = 0, world: int = 1, **config) -> list[tuple]:
    with ShardLoader(uri, rank=rank, world_size=world, config=LoaderConfig(**{**SMALL, **config})) as loader:
        return [(b.cells, b.x, b.masks, b.batch_codes) for b in loader.epoch(epoch)]


@pytest.mark.parametrize("mode", ["layout", "store"])
def test_every_cell_once_per_epoch_across_two_ranks(stores, mode) -> None:
    for epoch in (0, 1):
        per_rank = [np.concatenate(_cells(stores["zarr"], epoch, rank=r, world=2, mode=mode, drop_last=False))
                    for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == N // 2
        np.testing.assert_array_equal(np.sort(np.concatenate(per_rank)), np.arange(N))


def test_rows_of_every_modality_and_covariate_belong_to_the_same_cell(stores) -> None:
    with ShardLoader(stores["soma"], config=LoaderConfig(**SMALL)) as loader:
        assert loader.n_features == {"RNA": 20, "ADT": 4} and loader.batches == ["b0", "b1", "b2"]
        for batch in loader.epoch(0):
            cells = batch.cells
            assert batch.x["RNA"].dtype.is_floating_point and batch.x["RNA"].shape == (50, 20)
            np.testing.assert_array_equal(batch.x["RNA"][:, 0].numpy(), cells + 1)
            has_adt = cells < N - 100
            np.testing.assert_array_equal(batch.masks["ADT"].numpy(), has_adt)
            np.testing.assert_array_equal(batch.x["ADT"][:, 0].numpy(), np.where(has_adt, 2 * (cells + 1), 0))
            np.testing.assert_array_equal(batch.batch_codes.numpy(), cells % 3)
            np.testing.assert_array_equal(batch.library["RNA"].numpy(), batch.x["RNA"].sum(1).numpy())


def test_same_seed_same_batches_other_epoch_other_order(stores) -> None:
    first, again, other = (_cells(stores["zarr"], e) for e in (0, 0, 1))
    assert len(first) == N // 50
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(np.concatenate(first), np.concatenate(other))
    assert not np.array_equal(np.concatenate(first), np.concatenate(_cells(stores["zarr"], 0, seed=1)))


def test_epochs_in_a_row_stream_ahead_and_match_fresh_loaders(stores) -> None:
    with ShardLoader(stores["zarr"], config=LoaderConfig(**SMALL)) as loader:
        chained = [[b.cells for b in loader.epoch(e)] for e in range(3)]
        assert loader.stats.batches == 3 * N // 50
    for e, batches in enumerate(chained):
        assert all(np.array_equal(a, b) for a, b in zip(batches, _cells(stores["zarr"], e), strict=True))


@pytest.mark.parametrize("mode", ["layout", "store"])
def test_both_backends_give_identical_batches(stores, mode) -> None:
    a, b = (_batches(stores[k], 1, rank=1, world=2, mode=mode) for k in ("soma", "zarr"))
    assert len(a) == len(b) == N // 2 // 50
    for (ca, xa, ma, ba), (cb, xb, mb, bb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ca, cb)
        assert all(bool((xa[m] == xb[m]).all()) and bool((ma[m] == mb[m]).all()) for m in xa)
        assert bool((ba == bb).all())


def test_train_and_validation_splits_partition_the_cells(tmp_path, ray_session) -> None:
    from conftest import make_planted_stores

    uri = make_planted_stores(tmp_path, backends=("zarr",))["zarr"]
    with open_store(uri) as store:
        info, _ = prepare_layout(store, val_fraction=0.2)
    config = LoaderConfig(**SMALL, drop_last=False)
    with ShardLoader(uri, config=config) as train, ShardLoader(uri, split="val", config=config) as val:
        a = np.concatenate([b.cells for b in train.epoch(0)])
        b = np.concatenate([b.cells for b in val.epoch(0)])
    assert len(b) == info.n_cells("val") and 120 < len(b) < 280
    assert not set(a) & set(b)
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(N))


def test_store_order_batches_mix_cells_through_the_buffer(stores) -> None:
    batches = _cells(stores["soma"], 0, mode="store", buffer_blocks=4)
    assert np.median([np.ptp(c) for c in batches]) > 128  # cells from several 128-cell blocks


def test_a_store_larger_than_the_buffer_streams_in_bounded_memory(tmp_path, ray_session) -> None:
    peaks = {}
    for n in (4_000, 16_000):
        rng = np.random.default_rng(n)
        x = sp.random(n, 200, density=0.1, format="csr", random_state=rng, dtype=np.float32)
        x.data = np.ceil(x.data * 20)
        write_h5ad(tmp_path / f"x{n}.h5ad", x, obs_names=[f"c{i}" for i in range(n)])
        uri = tmp_path / f"s{n}.zarr"
        ingest(str(uri), [f"RNA={tmp_path / f'x{n}.h5ad'}"], IngestOptions(progress=False))
        with open_store(uri) as store:
            prepare_layout(store, shard_cells=2_000, val_fraction=0)
        config = LoaderConfig(batch_size=100, block_cells=500)
        with ShardLoader(uri, config=config) as loader:
            tracemalloc.start()
            seen = sum(len(b.cells) for b in loader.epoch(0))
            peaks[n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert seen == n
    dense_16k = 16_000 * 200 * 4
    assert peaks[16_000] < 1.3 * peaks[4_000] + (1 << 20), peaks
    assert peaks[16_000] < dense_16k / 4, peaks


def test_clear_errors_for_bad_settings(stores, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"LoaderConfig\.batch_size must be positive"):
        LoaderConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"LoaderConfig\.mode"):
        LoaderConfig(mode="random")
    with pytest.raises(ValueError, match="rank must be in"):
        ShardLoader(stores["zarr"], rank=2, world_size=2)
    bare = tmp_path / "bare.zarr"
    write_h5ad(tmp_path / "x.h5ad", sp.csr_matrix(np.ones((10, 3), np.float32)))
    ingest(str(bare), [f"RNA={tmp_path / 'x.h5ad'}"], IngestOptions(progress=False))
    with pytest.raises(StoreError, match="train_layout: no training layout: run `scmm-atlas prepare --store"):
        ShardLoader(bare, config=LoaderConfig(mode="layout"))
    with pytest.raises(StoreError, match="no training layout"):
        ShardLoader(bare, split="val")


def _train_loop(cfg: dict) -> None:
    import ray.train

    loader = ShardLoader.for_train_worker(cfg["store"], LoaderConfig(**SMALL))
    ctx = ray.train.get_context()
    cells = [b.cells.tolist() for e in range(2) for b in loader.epoch(e)]
    loader.close()
    Path(cfg["out"], f"rank{ctx.get_world_rank()}.json").write_text(json.dumps(cells))


@pytest.mark.slow
def test_inside_two_ray_train_workers_each_gets_its_share(stores, tmp_path) -> None:
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig

    from scmm_atlas.train.driver import Trainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests are not importable in Ray workers
    Trainer(_train_loop, train_loop_config={"store": str(stores["zarr"]), "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="loader")).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    per_epoch = N // 2 // 50
    for r in ranks:
        assert len(r) == 2 * per_epoch and all(len(b) == 50 for b in r)
    for e in range(2):
        seen = np.concatenate([np.concatenate(r[e * per_epoch : (e + 1) * per_epoch]) for r in ranks])
        np.testing.assert_array_equal(np.sort(seen), np.arange(N))


def test_a_torch_dataset_streams_each_ranks_share_and_reshuffles_per_epoch(stores) -> None:
    """For torch users outside Ray Train (Lightning, scvi-tools): DataLoader(StoreDataset, batch_size=None)."""
    from torch.utils.data import DataLoader

    from scmm_atlas.data.dataset import StoreDataset

    config = LoaderConfig(**SMALL, drop_last=False)
    ranks = [StoreDataset(str(stores["zarr"]), config, rank=r, world_size=2) for r in range(2)]
    try:
        seen = {}
        for epoch in (0, 1):
            for data in ranks:
                data.set_epoch(epoch)
            seen[epoch] = [np.concatenate([b.cells for b in DataLoader(d, batch_size=None)]) for d in ranks]
            assert len(seen[epoch][0]) == len(seen[epoch][1]) == N // 2
            np.testing.assert_array_equal(np.sort(np.concatenate(seen[epoch])), np.arange(N))
        assert not np.array_equal(seen[0][0], seen[1][0])  # another epoch, another order
        ranks[0].set_epoch(0)
        np.testing.assert_array_equal(np.concatenate([b.cells for b in ranks[0]]), seen[0][0])  # same epoch, same
        batch = next(iter(ranks[1]))
        assert batch.x["RNA"].shape == (50, 20) and set(batch.masks) == {"RNA", "ADT"}
    finally:
        for data in ranks:
            data.close()
    with pytest.raises(ValueError, match=r"rank must be within 0\.\.1"):
        StoreDataset(str(stores["zarr"]), rank=2, world_size=2)
