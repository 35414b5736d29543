"""A torch ``IterableDataset`` over a store, for any torch training loop (Lightning, scvi-tools users).

TileDB-SOMA-ML's ``ExperimentDataset`` is the model: each iteration is one epoch of this rank's share of
the cells (the training or validation split of the layout, or every cell in store order), shuffled by the
same plan as ``scmm-atlas train`` (a pure function of seed, epoch, rank and world size), so that the ranks
of a DDP job read disjoint cells. Rank and world size come from ``torch.distributed`` when it is
initialised. Call :meth:`StoreDataset.set_epoch` before each epoch, as with a ``DistributedSampler``.

It yields whole minibatches (:class:`~.loader.Minibatch`): use ``DataLoader(dataset, batch_size=None)``
with no worker processes (``num_workers=0``): the reads already run ahead in feeder actors on Ray (this
process's, else the cluster in ``RAY_ADDRESS``, else a local one started on first use).

>>> from torch.utils.data import DataLoader
>>> from scmm_atlas.data.dataset import StoreDataset
>>> data = StoreDataset("atlas.zarr", LoaderConfig(batch_size=256))
>>> for epoch in range(10):
...     data.set_epoch(epoch)
...     for batch in DataLoader(data, batch_size=None):
...         batch.x["RNA"], batch.masks["ADT"], batch.batch_codes
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from .loader import LoaderConfig, Minibatch, ShardLoader
from .ray_session import ensure_ray


class StoreDataset(IterableDataset):
    """One rank's minibatches of a store, an epoch per iteration (module doc)."""

    def __init__(self, store_uri: str, config: LoaderConfig | None = None, *, split: str = "train",
                 rank: int | None = None, world_size: int | None = None, ray_address: str | None = None,
                 device: torch.device | str = "cpu") -> None:
        ddp = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if ddp else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be within 0..{self.world_size - 1} (world_size {self.world_size}), "
                             f"got {self.rank}")
        self.store_uri, self.config, self.split = store_uri, config or LoaderConfig(), split
        self.ray_address, self.device = ray_address, device
        self.epoch = 0
        self._loader: ShardLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its shuffle)."""
        self.epoch = epoch

    @property
    def loader(self) -> ShardLoader:
        """The rank's loader, made on first use (it starts feeder actors on Ray)."""
        if self._loader is None:
            ensure_ray(self.ray_address)
            self._loader = ShardLoader(self.store_uri, split=self.split, rank=self.rank,
                                       world_size=self.world_size, config=self.config, device=self.device)
        return self._loader

    def __iter__(self) -> Iterator[Minibatch]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("StoreDataset reads ahead in Ray actors already: use DataLoader(..., num_workers=0)")
        yield from self.loader.epoch(self.epoch)

    def close(self) -> None:
        """End the loader's feeder actors (a later iteration starts new ones)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None
