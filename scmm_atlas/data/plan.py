"""Shuffle plans: which contiguous cell ranges each rank reads in each epoch.

A plan is a pure function of (seed, epoch, rank, world size, and where the epoch resumes): no Ray,
no store, no global RNG. Cells are cut into contiguous blocks (big reads are what make TileDB/Zarr
fast); every epoch the block order is shuffled with ``default_rng([seed, epoch])`` and the shuffled
blocks are laid end to end: the epoch's *sequence*, which does not depend on the world size.

The sequence is dealt in *rounds*: in each round every rank takes the next ``round_cells`` cells
(rank r the r-th piece), so after any whole number of rounds the cells trained are exactly a prefix
of the sequence. A checkpoint taken at a round boundary therefore records the epoch's progress as
one number, the cells of the sequence consumed, and a run resumed with *another* world size deals
the rest of the sequence to its ranks from there: each cell is still read once per epoch when an
elastic run shrinks or grows mid-epoch (count cells, not steps). Without ``round_cells`` there is
one round: rank r takes the r-th equal share (a block may be split between two ranks).

Drop policy: the last round's cells are shared equally; when they are not a multiple of the world
size, its last ``cells % world_size`` are skipped (at most ``world_size - 1`` cells, different ones
each epoch). No cell is ever read twice in an epoch. Every rank gets the same number of cells,
which DDP needs.
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
        """The contiguous ranges ``rank`` reads in ``epoch``, in reading order (one round: its equal share)."""
        return [r for piece in self.rounds(epoch, rank=rank, world_size=world_size) for r in piece]

    def rounds(self, epoch: int, *, rank: int = 0, world_size: int = 1, round_cells: int | None = None,
               start: int = 0) -> list[list[LoadRequest]]:
        """The ranges ``rank`` reads in ``epoch`` from position ``start`` of the epoch's sequence, one list
        per round: ``round_cells`` cells a round (None: the whole rest of the epoch in one round)."""
        self.check_rank(rank, world_size)
        if not 0 <= start <= self.n_cells:
            raise ValueError(f"start must be in [0, {self.n_cells}], got {start}")
        if round_cells is not None and round_cells <= 0:
            raise ValueError(f"round_cells must be positive, got {round_cells}")
        order = self.block_order(epoch)
        sizes = self._stops[order] - self._starts[order]
        ends = np.cumsum(sizes)  # position of each shuffled block's end in the epoch sequence
        out = []
        for lo, hi in _round_pieces(self.n_cells, start, rank, world_size, round_cells):
            out.append(self._ranges(order, sizes, ends, lo, hi))
        return out

    def position_after(self, rounds_done: int, *, world_size: int, round_cells: int, start: int = 0) -> int:
        """Where the epoch's sequence stands once every rank has finished ``rounds_done`` rounds from ``start``."""
        return min(self.n_cells, start + rounds_done * world_size * round_cells)

    def _ranges(self, order: np.ndarray, sizes: np.ndarray, ends: np.ndarray, lo: int, hi: int) -> list[LoadRequest]:
        """Positions ``[lo, hi)`` of the epoch's sequence as store ranges (pieces of whole blocks)."""
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


def _round_pieces(n_cells: int, start: int, rank: int, world_size: int, round_cells: int | None
                  ) -> list[tuple[int, int]]:
    """``rank``'s piece of each round, as positions ``[lo, hi)`` of the epoch's sequence: full rounds of
    ``round_cells`` each, then the rest shared equally (its last ``rest % world_size`` cells skipped)."""
    pieces = []
    base = start
    while base < n_cells:
        left = n_cells - base
        if round_cells is not None and left >= world_size * round_cells:
            pieces.append((base + rank * round_cells, base + (rank + 1) * round_cells))
            base += world_size * round_cells
            continue
        share = left // world_size
        if share:
            pieces.append((base + rank * share, base + (rank + 1) * share))
        break
    return pieces
