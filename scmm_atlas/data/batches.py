"""The shuffle buffer over whole sparse blocks, and dense minibatches.

Blocks stay sparse until the minibatch is made dense on the device that computes: nothing dense
crosses a process boundary. The buffer gathers several blocks (so a minibatch mixes cells from
different parts of the store) and deals shuffled minibatches with vectorised row indexing, never
one cell at a time.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator

import numpy as np
import torch

from .blocks import SparseBlock


def minibatches(blocks: Iterable[SparseBlock], *, batch_size: int, buffer_cells: int, rng: np.random.Generator,
                drop_last: bool = False) -> Iterator[SparseBlock]:
    """Shuffled minibatches from a buffer of whole blocks.

    Blocks are gathered until the buffer holds at least ``buffer_cells`` cells; the buffer is then
    shuffled and dealt in minibatches, the remainder (under ``batch_size``) carried into the next
    buffer. ``rng`` is injected so that a plan's (seed, epoch, rank) fixes the order.
    """
    if batch_size <= 0 or buffer_cells <= 0:
        raise ValueError(f"batch_size and buffer_cells must be positive, got {batch_size} and {buffer_cells}")
    pending: list[SparseBlock] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        if held >= max(buffer_cells, batch_size):
            rest = yield from _deal(SparseBlock.concat(pending), batch_size, rng)
            pending, held = ([rest], len(rest)) if rest is not None else ([], 0)
    if held:
        rest = yield from _deal(SparseBlock.concat(pending), batch_size, rng)
        if rest is not None and not drop_last:
            yield rest


def _deal(buffer: SparseBlock, batch_size: int, rng: np.random.Generator
          ) -> Generator[SparseBlock, None, SparseBlock | None]:
    """Yield full minibatches of the shuffled buffer; return the remainder (or None)."""
    order = rng.permutation(len(buffer))
    full = len(order) - len(order) % batch_size
    for i in range(0, full, batch_size):
        yield buffer.take(order[i : i + batch_size])
    return buffer.take(order[full:]) if full < len(order) else None


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
