"""The shuffle buffer over whole sparse blocks, and dense minibatches.

Blocks stay sparse until the minibatch is made dense on the device that computes: nothing dense
crosses a process boundary. The buffer gathers several blocks (so a minibatch mixes cells from
different parts of the store) and deals shuffled minibatches with vectorised row gathers, never
one cell at a time, and never by concatenating whole blocks.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator

import numpy as np
import torch

from .blocks import CompactBlock, SparseBlock

Rows = SparseBlock | CompactBlock  # anything with len() and take(rows) -> SparseBlock


def minibatches(blocks: Iterable[Rows], *, batch_size: int, buffer_cells: int, rng: np.random.Generator,
                drop_last: bool = False) -> Iterator[SparseBlock]:
    """Shuffled minibatches from a buffer of whole blocks.

    Blocks are gathered until the buffer holds at least ``buffer_cells`` cells; the buffer's cells are
    then shuffled and dealt in minibatches, the remainder (under ``batch_size``) carried into the next
    buffer. Each minibatch's rows are gathered from the blocks they come from: blocks are never
    concatenated or copied whole. ``rng`` is injected so that a plan's (seed, epoch, rank) fixes the order.
    """
    if batch_size <= 0 or buffer_cells <= 0:
        raise ValueError(f"batch_size and buffer_cells must be positive, got {batch_size} and {buffer_cells}")
    pending: list[Rows] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        if held >= max(buffer_cells, batch_size):
            rest = yield from _deal(pending, batch_size, rng)
            pending, held = ([rest], len(rest)) if rest is not None else ([], 0)
    if held:
        rest = yield from _deal(pending, batch_size, rng)
        if rest is not None and not drop_last:
            yield rest


def _deal(parts: list[Rows], batch_size: int, rng: np.random.Generator
          ) -> Generator[SparseBlock, None, SparseBlock | None]:
    """Yield full minibatches of the shuffled rows of ``parts``; return the remainder (or None)."""
    bounds = np.cumsum([0] + [len(p) for p in parts])
    order = rng.permutation(int(bounds[-1]))
    full = len(order) - len(order) % batch_size
    for i in range(0, full, batch_size):
        yield _take(parts, bounds, order[i : i + batch_size])
    return _take(parts, bounds, order[full:]) if full < len(order) else None


def _take(parts: list[Rows], bounds: np.ndarray, rows: np.ndarray) -> SparseBlock:
    """Rows ``rows`` of the parts laid end to end, grouped by the part they come from."""
    if len(parts) == 1:
        return parts[0].take(rows)
    source = np.searchsorted(bounds, rows, side="right") - 1
    pieces = [parts[k].take(rows[source == k] - bounds[k]) for k in np.unique(source)]
    return SparseBlock.concat(pieces)


def to_dense(batch: SparseBlock, device: torch.device | str = "cpu", *, pin_memory: bool = False
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None]:
    """(counts, masks, batch codes) as tensors on ``device``. On a GPU the CSR arrays are copied
    (pinned, non-blocking) and densified there; on the CPU scipy densifies directly."""
    device = torch.device(device)
    x = {}
    for m, c in batch.counts.items():
        if device.type == "cpu":
            x[m] = torch.from_numpy(c.toarray().astype(np.float32, copy=False))
            continue
        parts = [torch.from_numpy(a) for a in (c.indptr.astype(np.int64), c.indices.astype(np.int64),
                                               c.data.astype(np.float32))]
        if pin_memory:
            parts = [p.pin_memory() for p in parts]
        crow, col, val = (p.to(device, non_blocking=True) for p in parts)
        x[m] = torch.sparse_csr_tensor(crow, col, val, size=c.shape).to_dense()
    masks = {m: torch.as_tensor(batch.obs[f"has_{m}"], device=device) for m in batch.counts
             if f"has_{m}" in batch.obs}
    codes = torch.as_tensor(batch.obs["batch"], dtype=torch.long, device=device) if "batch" in batch.obs else None
    return x, masks, codes
