"""Shuffle plans: which contiguous cell ranges each rank reads in each epoch.

A plan is a pure function of (seed, epoch, rank, world size): no Ray, no store, no global RNG.
Cells are cut into contiguous blocks (big reads are what make TileDB/Zarr fast); every epoch the
block order is shuffled with ``default_rng([seed, epoch])``, the shuffled blocks are laid end to
end, and rank r takes the r-th equal share of that sequence (a block may be split between two
ranks). Every rank gets the same number of cells, which DDP needs.

Drop policy: when the cell count is not a multiple of the world size, the last ``n_cells %
world_size`` cells of the epoch's shuffled sequence are skipped (at most ``world_size - 1``
cells, different ones each epoch). No cell is ever read twice in an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LoadRequest:
    """Read cells ``[start, stop)`` of the store (a contiguous range)."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class BlockShufflePlan:
    """Contiguous blocks of ``block_size`` cells in a seeded, per-epoch order, dealt to ranks."""

    def __init__(self, n_cells: int, *, block_size: int = 8192, seed: int = 0) -> None:
        if n_cells <= 0:
            raise ValueError(f"n_cells must be positive, got {n_cells}: is the store empty?")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.n_cells, self.block_size, self.seed = int(n_cells), int(block_size), int(seed)
        starts = np.arange(0, self.n_cells, self.block_size)
        self._starts = starts
        self._stops = np.minimum(starts + self.block_size, self.n_cells)

    @property
    def n_blocks(self) -> int:
        return len(self._starts)

    def cells_per_rank(self, world_size: int) -> int:
        """Cells every rank reads per epoch (the same for all ranks)."""
        self.check_rank(0, world_size)
        return self.n_cells // world_size

    def block_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of block indices."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_blocks)

    def epoch(self, epoch: int, *, rank: int = 0, world_size: int = 1) -> list[LoadRequest]:
        """The contiguous ranges ``rank`` reads in ``epoch``, in reading order."""
        self.check_rank(rank, world_size)
        order = self.block_order(epoch)
        sizes = self._stops[order] - self._starts[order]
        ends = np.cumsum(sizes)  # position of each shuffled block's end in the epoch sequence
        share = self.n_cells // world_size
        lo, hi = rank * share, (rank + 1) * share
        requests = []
        first = int(np.searchsorted(ends, lo, side="right"))
        for i in range(first, len(order)):
            begin = int(ends[i] - sizes[i])
            if begin >= hi:
                break
            block_start = int(self._starts[order[i]])
            a, b = max(lo, begin) - begin, min(hi, int(ends[i])) - begin
            requests.append(LoadRequest(block_start + a, block_start + b))
        return requests

    def check_rank(self, rank: int, world_size: int) -> None:
        """A clear error when ``rank`` of ``world_size`` cannot read this plan."""
        if world_size <= 0:
            raise ValueError(f"world_size must be positive, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if self.n_cells < world_size:
            raise ValueError(f"{self.n_cells} cells cannot be shared by {world_size} ranks: use fewer workers")
