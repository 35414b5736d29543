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


def _round_cells(plan: BlockShufflePlan, epoch: int, world: int, round_cells: int, start: int = 0,
                 rounds: slice = slice(None)) -> np.ndarray:
    parts = [_cells([r for piece in plan.rounds(epoch, rank=k, world_size=world, round_cells=round_cells,
                                                start=start)[rounds] for r in piece]) for k in range(world)]
    return np.concatenate(parts)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_whole_rounds_are_a_prefix_of_the_epochs_sequence(world: int) -> None:
    plan = BlockShufflePlan(10_000, block_size=700, seed=2)
    sequence = _cells(plan.epoch(4))  # one rank: the whole sequence in order
    for done in range(4):
        trained = _round_cells(plan, 4, world, 512, rounds=slice(0, done))
        at = plan.position_after(done, world_size=world, round_cells=512)
        np.testing.assert_array_equal(np.sort(trained), np.sort(sequence[:at]))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_a_resized_epoch_reads_each_cell_once(before: int, after: int) -> None:
    """An elastic run that loses or gains workers mid-epoch: rounds trained by ``before`` workers, then
    the rest of the epoch dealt to ``after`` from the position the checkpoint recorded."""
    n, rc = 9_973, 300
    plan = BlockShufflePlan(n, block_size=1000, seed=5)
    first = _round_cells(plan, 1, before, rc, rounds=slice(0, 5))
    at = plan.position_after(5, world_size=before, round_cells=rc)
    rest = _round_cells(plan, 1, after, rc, start=at)
    parts = [[r for piece in plan.rounds(1, rank=k, world_size=after, round_cells=rc, start=at) for r in piece]
             for k in range(after)]
    assert len({len(_cells(p)) for p in parts}) == 1  # equal cells per rank after the resize
    seen = np.concatenate([first, rest])
    assert len(np.unique(seen)) == len(seen)  # never twice
    assert n - len(seen) < after  # only the last round's remainder is skipped


def test_rounds_without_a_size_are_the_equal_shares() -> None:
    plan = BlockShufflePlan(5_000, block_size=333, seed=1)
    for rank in range(3):
        assert [r for piece in plan.rounds(2, rank=rank, world_size=3) for r in piece] == plan.epoch(
            2, rank=rank, world_size=3)
    with pytest.raises(ValueError, match="start must be in"):
        plan.rounds(0, start=5_001)
    with pytest.raises(ValueError, match="round_cells must be positive"):
        plan.rounds(0, round_cells=0)
