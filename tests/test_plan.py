"""Shuffle plans: pure functions of (seed, epoch, rank, world size), tested without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from scmm_atlas.data import BlockShufflePlan


def _cells(requests) -> np.ndarray:
    return np.concatenate([np.arange(r.start, r.stop) for r in requests]) if requests else np.array([], int)


@pytest.mark.parametrize("n_cells,block,world", [(10_000, 512, 2), (10_000, 999, 2), (4096, 4096, 2), (12, 5, 3)])
def test_every_cell_exactly_once_per_epoch_across_ranks(n_cells: int, block: int, world: int) -> None:
    plan = BlockShufflePlan(n_cells, block_size=block, seed=3)
    for epoch in range(3):
        parts = [_cells(plan.epoch(epoch, rank=r, world_size=world)) for r in range(world)]
        assert all(len(p) == plan.cells_per_rank(world) for p in parts)
        everything = np.concatenate(parts)
        np.testing.assert_array_equal(np.sort(everything), np.arange(n_cells))


def test_drop_policy_when_cells_do_not_divide() -> None:
    plan = BlockShufflePlan(10_001, block_size=300, seed=0)
    dropped = []
    for epoch in range(4):
        parts = [_cells(plan.epoch(epoch, rank=r, world_size=2)) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == 5000
        seen = np.concatenate(parts)
        assert len(np.unique(seen)) == len(seen) == 10_000  # never twice
        dropped.append(int(np.setdiff1d(np.arange(10_001), seen)[0]))
    assert len(set(dropped)) > 1  # a different cell is skipped in different epochs


def test_reproducible_and_different_each_epoch() -> None:
    a, b = BlockShufflePlan(50_000, block_size=1000, seed=7), BlockShufflePlan(50_000, block_size=1000, seed=7)
    assert a.epoch(2, rank=1, world_size=2) == b.epoch(2, rank=1, world_size=2)
    assert a.epoch(0, rank=0, world_size=2) != a.epoch(1, rank=0, world_size=2)
    assert BlockShufflePlan(50_000, block_size=1000, seed=8).epoch(0) != a.epoch(0)


def test_requests_are_contiguous_pieces_of_blocks() -> None:
    plan = BlockShufflePlan(9_000, block_size=1000, seed=1)
    for rank in range(2):
        for req in plan.epoch(5, rank=rank, world_size=2):
            assert 0 < len(req) <= 1000
            assert req.start // 1000 == (req.stop - 1) // 1000  # within one block


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="block_size must be positive"):
        BlockShufflePlan(10, block_size=0)
    with pytest.raises(ValueError, match="store empty"):
        BlockShufflePlan(0)
    plan = BlockShufflePlan(10, block_size=4)
    with pytest.raises(ValueError, match="rank must be in"):
        plan.epoch(0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="use fewer workers"):
        BlockShufflePlan(3, block_size=2).epoch(0, rank=0, world_size=4)
