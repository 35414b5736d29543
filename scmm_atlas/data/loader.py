"""The per-worker loader: this rank's ranges of an epoch through Ray Data, a shuffle buffer, dense batches.

Inside a Ray Train worker, :meth:`ShardLoader.for_train_worker` takes the rank and world size from
the train context, so each worker streams exactly its share of the epoch's shuffle plan (the
equivalent of ``get_dataset_shard``, but with the plan's guarantees: each cell once per epoch across
ranks, equal cells per rank, a reproducible order). Blocks are read by Ray tasks ahead of the
consumer (``prefetch_blocks``); minibatches are gathered and made dense in a background thread
(``prefetch_batches`` ahead), on the worker's device: on a GPU from pinned memory, copied without
blocking and densified there.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import ray
import torch
from ray.data import ExecutionResources

from ..store.errors import StoreError
from ..store.uri import StoreURI, parse_uri
from .batches import minibatches, to_dense
from .blocks import SparseBlock, decode
from .layout import LayoutInfo, layout_uri, read_info
from .plan import BlockShufflePlan, LoadRequest
from .source import COLUMN, SourceSpec, StoreDatasource

log = logging.getLogger(__name__)
MODES = ("auto", "layout", "store")


@dataclass(frozen=True)
class LoaderConfig:
    """How a worker loads. The defaults were tuned with ``scmm-atlas bench loader`` on 2 cores."""

    batch_size: int = 256
    block_cells: int = 32768  # cells per contiguous read and per Ray block (fewer, larger Ray objects:
    # 8k-cell blocks ran ~190k cells/s, 32k-cell blocks ~290k on 2 cores)
    buffer_blocks: int | None = None  # blocks mixed by the local shuffle buffer (None: 1 on the pre-shuffled
    # layout, whose blocks are already random samples; 8 in store order)
    prefetch_blocks: int = 1  # decoded blocks read ahead (Ray holds 2 more encoded ones)
    prefetch_batches: int = 4  # dense minibatches made ahead by a thread
    ranges_per_task: int = 1  # ranges per Ray read task
    read_cpus: float = 0.25  # logical CPUs reserved by each read task (reads are light; training
    # workers reserve the rest)
    read_tasks: int = 1  # read tasks in flight per worker: one read process keeps up with a consumer
    # (~600k cells/s read + encode) and each more costs ~150 MB
    mode: str = "auto"  # "layout" (pre-shuffled), "store" (store order), "auto": layout if up to date
    seed: int = 0
    drop_last: bool = True  # drop each epoch's last partial minibatch (DDP needs equal steps)

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_cells", "buffer_blocks", "prefetch_blocks", "prefetch_batches",
                     "ranges_per_task", "read_tasks"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"LoaderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"LoaderConfig.mode must be one of {MODES}, got {self.mode!r}")


class Batch(NamedTuple):
    x: dict[str, torch.Tensor]  # dense float32 counts per modality
    masks: dict[str, torch.Tensor]  # has_<MOD>
    batch: torch.Tensor  # batch codes
    library: dict[str, torch.Tensor]  # total counts per modality
    cells: np.ndarray  # store indices (for bookkeeping, stays on the host)


@dataclass
class LoaderStats:
    """Seconds the consumer waited for a batch, and batches handed out (for ``wait fraction`` metrics)."""

    wait_s: float = 0.0
    batches: int = 0
    first_batch_s: list[float] = field(default_factory=list)


class ShardLoader:
    """One rank's view of the epochs of a store."""

    def __init__(self, store_uri: str | StoreURI, *, split: str = "train", rank: int = 0, world_size: int = 1,
                 config: LoaderConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config or LoaderConfig()
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.spec = _source_spec(parse_uri(store_uri) if not isinstance(store_uri, StoreURI) else store_uri,
                                 self.config.mode, split)
        self.n_cells = self.spec.n_cells
        self.plan = BlockShufflePlan(self.n_cells, block_size=self.config.block_cells, seed=self.config.seed)
        self.plan.check_rank(rank, world_size)
        self.stats = LoaderStats()
        self._stream: Prefetcher | None = None
        self._stream_epoch = -1

    @classmethod
    def for_train_worker(cls, store_uri: str, config: LoaderConfig | None = None, *, split: str = "train"
                         ) -> ShardLoader:
        """Inside a Ray Train worker: rank, world size and device from the train context."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return cls(store_uri, split=split, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                   config=config, device=ray.train.torch.get_device())

    @property
    def n_features(self) -> dict[str, int]:
        return dict(self.spec.n_features)

    @property
    def batches(self) -> list[str]:
        return list(self.spec.batches)

    def warm_up(self) -> float:
        """Read two tiny ranges through Ray Data, so that its actors and read workers (and their imports)
        are up before the first epoch; returns the seconds it took. Call it while the model is built."""
        start = time.perf_counter()
        n = min(2, self.n_cells)
        for _ in self._dataset([LoadRequest(i, i + 1) for i in range(n)]).iter_batches(batch_size=None):
            pass
        return time.perf_counter() - start

    def dataset(self, epoch: int) -> ray.data.Dataset:
        """This rank's ranges of ``epoch`` as a Ray dataset of encoded sparse blocks, in plan order."""
        return self._dataset(self.plan.epoch(epoch, rank=self.rank, world_size=self.world_size))

    def _dataset(self, requests: list[LoadRequest]) -> ray.data.Dataset:
        source = StoreDatasource(self.spec, requests, ranges_per_task=self.config.ranges_per_task)
        ds = ray.data.read_datasource(source, override_num_blocks=len(requests), num_cpus=self.config.read_cpus,
                                      concurrency=self.config.read_tasks)
        ds.context.execution_options.preserve_order = True  # reproducible batches
        # read ahead a few blocks, not as far as the object store allows: unbounded, Ray Data filled the
        # store ahead of a slow consumer (memory that grew with the epoch's length) and read blocks a
        # truncated epoch never used
        block_bytes = self.config.block_cells * self.spec.bytes_per_cell
        ds.context.execution_options.resource_limits = ExecutionResources.for_limits(
            object_store_memory=(self.config.read_tasks + 2) * block_bytes)
        ds.context.enable_progress_bars = False  # one dataset per epoch: Ray's bars would be noise
        return ds

    def blocks(self, epoch: int) -> Iterator[SparseBlock]:
        """Decoded blocks of ``epoch``. A background thread streams epoch after epoch: the next epoch's
        Ray dataset starts as soon as this one's reads are done, so epoch boundaries cost no wait."""
        if self._stream is None or self._stream_epoch != epoch:
            self.close()
            self._stream, self._stream_epoch = Prefetcher(self._blocks_from(epoch), self.config.prefetch_blocks), epoch
        for item in self._stream:
            if isinstance(item, _EpochEnd):
                self._stream_epoch = item.epoch + 1
                return
            yield item

    def _blocks_from(self, epoch: int) -> Iterator[SparseBlock | _EpochEnd]:
        for e in itertools.count(epoch):
            for table in self.dataset(e).iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                for value in table.column(COLUMN).chunks:
                    for i in range(len(value)):
                        yield decode(memoryview(value[i].as_buffer()))
            yield _EpochEnd(e)

    def close(self) -> None:
        """Stop reading ahead (the loader can be used again: the next epoch starts a new stream)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sparse_batches(self, epoch: int) -> Iterator[SparseBlock]:
        """Shuffled sparse minibatches of ``epoch`` (seeded by seed, epoch and rank)."""
        rng = np.random.default_rng([self.config.seed, int(epoch), self.rank])
        cfg = self.config
        buffer_blocks = cfg.buffer_blocks or (1 if self.spec.mode == "layout" else 8)
        return minibatches(self.blocks(epoch), batch_size=cfg.batch_size, buffer_cells=buffer_blocks *
                           cfg.block_cells, rng=rng, drop_last=cfg.drop_last)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Dense minibatches of ``epoch`` on the loader's device, made ahead in a background thread."""
        pin = self.device.type == "cuda"
        start = time.perf_counter()
        made = Prefetcher((_dense(b, self.device, pin) for b in self.sparse_batches(epoch)),
                          self.config.prefetch_batches)
        try:
            for i, batch in enumerate(made):
                if i == 0:
                    self.stats.first_batch_s.append(time.perf_counter() - start)
                self.stats.batches += 1
                yield batch
        finally:
            made.close()
            self.stats.wait_s += made.wait_s


def _dense(block: SparseBlock, device: torch.device, pin: bool) -> Batch:
    x, masks, codes = to_dense(block, device, pin_memory=pin)
    library = {m: torch.as_tensor(block.obs[f"library_{m}"], device=device) for m in block.counts}
    return Batch(x, masks, codes, library, block.obs["cell"])


@dataclass(frozen=True)
class _EpochEnd:
    epoch: int


_DONE = object()


class Prefetcher:
    """Items of an iterator produced by a daemon thread up to ``depth`` ahead; its exceptions re-raised
    in the consumer. ``wait_s``: time the consumer spent waiting for items."""

    def __init__(self, items: Iterator, depth: int) -> None:
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name="scmm-loader", daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator over a Ray dataset shuts its executor down now, not at garbage collection

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - t0
            if item is _DONE:
                self._queue.put(_DONE)  # iterating again ends at once
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=0.5)  # a producer blocked on its source exits by itself (daemon)


def _source_spec(uri: StoreURI, mode: str, split: str) -> SourceSpec:
    info = read_info(layout_uri(uri)) if mode != "store" else None
    if info is not None and mode == "auto":
        from ..store import open_store

        with open_store(uri) as store:
            if info.store_n_obs != store.n_obs:
                log.warning("%s: the training layout covers %d of %d cells: reading in store order (less mixed "
                            "batches); run `scmm-atlas prepare --store %s`", uri, info.store_n_obs, store.n_obs, uri)
                info = None
    if info is None and (mode == "layout" or split != "train"):
        raise StoreError(uri, "train_layout", f"no training layout: run `scmm-atlas prepare --store {uri}` "
                         "(or read in store order with mode='store')")
    if info is not None:
        return SourceSpec(uri.uri, "layout", info.n_cells(split), split, dict(info.n_features),
                          tuple(info.batches), _bytes_per_cell(info))
    from ..store import open_store
    from .reading import StoreBlockReader

    with open_store(uri) as store:
        reader = StoreBlockReader(store)
        return SourceSpec(uri.uri, "store", store.n_obs, split, reader.n_features, tuple(reader.batches))


def _bytes_per_cell(info: LayoutInfo) -> float:
    return 64.0 + 0.1 * 4 * sum(info.n_features.values())  # ~10 % nonzero at 4 bytes per value
