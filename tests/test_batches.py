"""Blocks from the store through the shuffle buffer to dense minibatches (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import PLANTED_N

from scmm_atlas.data import BlockShufflePlan
from scmm_atlas.data.batches import minibatches, to_dense
from scmm_atlas.data.store_blocks import StoreBlockReader
from scmm_atlas.store import open_store

N = PLANTED_N


@pytest.fixture(scope="module")
def stores(planted_stores) -> dict[str, Path]:
    return planted_stores


def _epoch(uri: Path, *, epoch: int, rank: int, world: int, seed: int = 0):
    plan = BlockShufflePlan(N, block_size=64, seed=seed)
    with open_store(uri) as store:
        reader = StoreBlockReader(store, features="all")
        blocks = [reader.read(r.start, r.stop) for r in plan.epoch(epoch, rank=rank, world_size=world)]
    rng = np.random.default_rng([seed, epoch, rank])
    return [(*to_dense(b), b.obs["cell"]) for b in minibatches(blocks, batch_size=50, buffer_cells=256, rng=rng)]


def test_rows_of_every_modality_and_covariate_belong_to_the_same_cell(stores) -> None:
    for x, masks, codes, cells in _epoch(stores["zarr"], epoch=0, rank=0, world=1):
        np.testing.assert_array_equal(x["RNA"][:, 0].numpy(), cells + 1)
        has_adt = cells < N - 100
        np.testing.assert_array_equal(masks["ADT"].numpy(), has_adt)
        np.testing.assert_array_equal(x["ADT"][:, 0].numpy(), np.where(has_adt, 2 * (cells + 1), 0))
        np.testing.assert_array_equal(codes.numpy(), cells % 3)


def test_every_cell_once_per_epoch_across_two_ranks_through_the_buffer(stores) -> None:
    for epoch in range(2):
        cells = np.concatenate([c for r in range(2) for *_, c in _epoch(stores["soma"], epoch=epoch, rank=r, world=2)])
        np.testing.assert_array_equal(np.sort(cells), np.arange(N))


def test_both_backends_give_identical_batches(stores) -> None:
    a = _epoch(stores["soma"], epoch=1, rank=1, world=2)
    b = _epoch(stores["zarr"], epoch=1, rank=1, world=2)
    assert len(a) == len(b)
    for (xa, ma, ca, cells_a), (xb, mb, cb, cells_b) in zip(a, b, strict=True):
        np.testing.assert_array_equal(cells_a, cells_b)
        for m in xa:
            assert bool((xa[m] == xb[m]).all()) and bool((ma[m] == mb[m]).all())
        assert bool((ca == cb).all())


def test_same_seed_same_batches_other_epoch_other_order(stores) -> None:
    first = [c for *_, c in _epoch(stores["zarr"], epoch=0, rank=0, world=1)]
    again = [c for *_, c in _epoch(stores["zarr"], epoch=0, rank=0, world=1)]
    other = [c for *_, c in _epoch(stores["zarr"], epoch=1, rank=0, world=1)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    mixed = first[0]
    assert np.ptp(mixed) > 256  # a minibatch mixes cells from several blocks
