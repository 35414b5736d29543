"""The per-worker loader: this rank's ranges of an epoch from feeder actors, a shuffle buffer, dense batches.

Inside a Ray Train worker, :meth:`ShardLoader.for_train_worker` takes the rank and world size from
the train context, so each worker streams exactly its share of the epoch's shuffle plan (each cell
once per epoch across ranks, equal cells per rank, a reproducible order). The plan is dealt in
rounds (:mod:`.plan`) that the shuffle buffer never mixes across, so a round's end is a point where
the cells trained are a prefix of the epoch: :attr:`ShardLoader.batches_per_round` says where, and
``epoch(e, start=cells)`` resumes there, with any world size. Blocks are read by
feeder actors (:mod:`.feeder`) ``read_ahead`` requests ahead of the consumer; the training process
only receives ready blocks: one thread takes them (``prefetch_blocks`` ahead, left in shared memory as
they arrived), another gathers shuffled minibatches and makes them dense (``prefetch_batches`` ahead) on
the worker's device: on a GPU from pinned memory, copied without blocking and densified there.
No data-pipeline scheduler runs in the training process.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import StoreError
from ..store.uri import StoreURI, parse_uri
from .batches import minibatches, to_dense
from .blocks import CompactBlock, SparseBlock
from .feeder import BlockSource, Feeders
from .layout import LayoutInfo, layout_uri, read_info
from .plan import BlockShufflePlan

log = logging.getLogger(__name__)
MODES = ("auto", "layout", "store")


@dataclass(frozen=True)
class LoaderConfig:
    """How a worker loads. The defaults were tuned with ``scmm-atlas bench loader`` on 2 cores."""

    batch_size: int = 256
    block_cells: int = 16384  # cells per contiguous read and per block handed over (32k blocks: ~5-10 %
    # more cells/s, ~100 MiB more memory)
    buffer_blocks: int | None = None  # blocks mixed by the local shuffle buffer (None: 1 on the pre-shuffled
    # layout, whose blocks are already random samples; 8 in store order)
    read_ahead: int = 2  # read requests in flight to the feeders (blocks waiting in the object store)
    prefetch_blocks: int = 1  # received blocks converted ahead of the shuffle buffer
    prefetch_batches: int = 4  # dense minibatches made ahead by a thread
    readers: int = 1  # feeder actors per training worker: one keeps up with a consumer and each more
    # is a process of its own
    read_cpus: float = 0.25  # logical CPUs reserved by each feeder (reads are light; training workers
    # reserve the rest)
    mode: str = "auto"  # "layout" (pre-shuffled), "store" (store order), "auto": layout if up to date
    seed: int = 0
    drop_last: bool = True  # drop each epoch's last partial minibatch (DDP needs equal steps)
    accumulate: int = 1  # minibatches per optimizer step: a round is a whole number of optimizer steps

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_cells", "buffer_blocks", "read_ahead", "prefetch_blocks",
                     "prefetch_batches", "readers", "accumulate"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"LoaderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"LoaderConfig.mode must be one of {MODES}, got {self.mode!r}")


class Minibatch(NamedTuple):
    x: dict[str, torch.Tensor]  # dense float32 counts per modality
    masks: dict[str, torch.Tensor]  # has_<MOD>
    batch_codes: torch.Tensor  # each cell's code of the batch covariate (its experimental batch)
    library: dict[str, torch.Tensor]  # total counts per modality
    cells: np.ndarray  # store indices (for bookkeeping, stays on the host)


@dataclass
class LoaderStats:
    """Seconds the consumer waited for a batch, and batches handed out (for ``wait fraction`` metrics)."""

    wait_s: float = 0.0
    batches: int = 0
    first_batch_s: list[float] = field(default_factory=list)


class ShardLoader:
    """One rank's view of the epochs of a store.

    ``feeders``: the feeder actors to read through, e.g. shared by a worker's training and validation
    loaders (their owner closes them); by default the loader starts its own and :meth:`close` ends them.
    ``layout``: the layout (:class:`~.layout.LayoutInfo` as a dict) the run pinned, so that every
    worker reads the same shards whatever ``prepare`` commits meanwhile (default: the committed one)."""

    def __init__(self, store_uri: str | StoreURI, *, split: str = "train", rank: int = 0, world_size: int = 1,
                 config: LoaderConfig | None = None, device: torch.device | str = "cpu",
                 feeders: Feeders | None = None, layout: Mapping[str, Any] | None = None) -> None:
        self.config = config or LoaderConfig()
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.spec = _block_source(parse_uri(store_uri) if not isinstance(store_uri, StoreURI) else store_uri,
                                 self.config.mode, split, layout)
        self.n_cells = self.spec.n_cells
        self.plan = BlockShufflePlan(self.n_cells, block_size=self.config.block_cells, seed=self.config.seed)
        self.plan.check_rank(rank, world_size)
        self.stats = LoaderStats()
        self._feeders, self._own_feeders = feeders, feeders is None
        self._stream: Prefetcher | None = None
        self._stream_at = (-1, 0)  # (epoch, start) the running stream delivers next

    @classmethod
    def for_train_worker(cls, store_uri: str, config: LoaderConfig | None = None, *, split: str = "train",
                         feeders: Feeders | None = None, layout: Mapping[str, Any] | None = None) -> ShardLoader:
        """Inside a Ray Train worker: rank, world size and device from the train context."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return cls(store_uri, split=split, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                   config=config, device=ray.train.torch.get_device(), feeders=feeders, layout=layout)

    @property
    def n_features(self) -> dict[str, int]:
        return dict(self.spec.n_features)

    @property
    def batches(self) -> list[str]:
        return list(self.spec.batches)

    @property
    def round_cells(self) -> int:
        """Cells each rank takes per round: the shuffle buffer's size, rounded up to whole optimizer steps."""
        cfg = self.config
        buffer_blocks = cfg.buffer_blocks or (1 if self.spec.mode == "layout" else 8)
        step = cfg.batch_size * cfg.accumulate
        return -(-buffer_blocks * cfg.block_cells // step) * step

    @property
    def batches_per_round(self) -> int:
        return self.round_cells // self.config.batch_size

    @property
    def feeders(self) -> Feeders:
        if self._feeders is None:
            self._feeders = Feeders(readers=self.config.readers, cpus=self.config.read_cpus)
        return self._feeders

    def warm_up(self) -> float:
        """Start the feeders and open the source in them, so that their start-up (a process, imports,
        metadata reads) is not paid by the first epoch; returns the seconds it took. Call it while the
        model is built."""
        start = time.perf_counter()
        self.feeders.warm_up(self.spec)
        return time.perf_counter() - start

    def rounds(self, epoch: int, *, start: int = 0) -> Iterator[list[CompactBlock]]:
        """Received blocks of ``epoch`` from position ``start``, a list per round. A background thread
        streams epoch after epoch: the next epoch's reads are requested as soon as this one's are, so
        epoch boundaries cost no wait."""
        if self._stream is None or self._stream_at != (epoch, start):
            self._stop_stream()
            stream = _blocks_from(self.feeders, self.spec, self.plan, epoch, start=start, rank=self.rank,
                                  world_size=self.world_size, round_cells=self.round_cells,
                                  read_ahead=self.config.read_ahead)
            self._stream, self._stream_at = Prefetcher(stream, self.config.prefetch_blocks), (epoch, start)
        pending: list[CompactBlock] = []
        for item in self._stream:
            if isinstance(item, _EpochEnd):
                self._stream_at = (item.epoch + 1, 0)
                return
            if isinstance(item, _RoundEnd):
                yield pending
                pending = []
            else:
                pending.append(item)

    def _stop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Stop reading ahead and end the loader's own feeders (a later epoch starts new ones)."""
        self._stop_stream()
        if self._own_feeders and self._feeders is not None:
            self._feeders.close()
            self._feeders = None

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        """A loader dropped unclosed ends its reads and its feeders (the stream's thread holds no reference to
        it); quietly, as at interpreter exit Ray may be gone already."""
        if "_stream" in vars(self):
            with contextlib.suppress(Exception):
                self.close()

    def sparse_batches(self, epoch: int, *, start: int = 0) -> Iterator[SparseBlock]:
        """Shuffled sparse minibatches of ``epoch`` from position ``start``: each round's cells are shuffled
        among themselves (seeded by seed, epoch, rank, world size and the round's position), so a round
        ends with all its cells trained and a resumed epoch repeats an unbroken run's batches."""
        cfg, cells = self.config, self.round_cells
        for i, round_blocks in enumerate(self.rounds(epoch, start=start)):
            at = self.plan.position_after(i, world_size=self.world_size, round_cells=cells, start=start)
            rng = np.random.default_rng([cfg.seed, int(epoch), self.rank, self.world_size, at])
            yield from minibatches(round_blocks, batch_size=cfg.batch_size, buffer_cells=cells, rng=rng,
                                   drop_last=cfg.drop_last)

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[Minibatch]:
        """Dense minibatches of ``epoch`` on the loader's device, made ahead in a background thread.
        ``start``: cells of the epoch's sequence already trained (a resumed epoch, from a round's end)."""
        pin = self.device.type == "cuda"
        t0 = time.perf_counter()
        made = Prefetcher((_dense(b, self.device, pin) for b in self.sparse_batches(epoch, start=start)),
                          self.config.prefetch_batches)
        try:
            for i, batch in enumerate(made):
                if i == 0:
                    self.stats.first_batch_s.append(time.perf_counter() - t0)
                self.stats.batches += 1
                yield batch
        finally:
            made.close()
            self.stats.wait_s += made.wait_s


def _blocks_from(feeders: Feeders, spec: BlockSource, plan: BlockShufflePlan, epoch: int, *, start: int, rank: int,
                 world_size: int, round_cells: int, read_ahead: int) -> Iterator[CompactBlock | _RoundEnd | _EpochEnd]:
    """Epoch after epoch of a rank's blocks, from position ``start`` of ``epoch`` on, each round closed by a
    marker (a function: the thread that runs it must not keep the loader alive). The reads run ahead across
    rounds: one stream of requests, cut where each round ends."""
    for e in itertools.count(epoch):
        rounds = plan.rounds(e, rank=rank, world_size=world_size, round_cells=round_cells, start=start if e == epoch
                             else 0)
        ends = set(itertools.accumulate(len(r) for r in rounds))  # request counts at which a round is complete
        requests = [r for piece in rounds for r in piece]
        for n, arrays in enumerate(feeders.stream(spec, requests, read_ahead=read_ahead), start=1):
            yield CompactBlock(arrays, spec.n_features)
            if n in ends:
                yield _RoundEnd()
        yield _EpochEnd(e)


def _dense(block: SparseBlock, device: torch.device, pin: bool) -> Minibatch:
    x, masks, codes = to_dense(block, device, pin_memory=pin)
    library = {m: torch.as_tensor(block.obs[f"library_{m}"], device=device) for m in block.counts}
    return Minibatch(x, masks, codes, library, block.obs["cell"])


@dataclass(frozen=True)
class _EpochEnd:
    epoch: int


class _RoundEnd:
    """Marks the end of a round's blocks in the stream."""


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


def _block_source(uri: StoreURI, mode: str, split: str, layout: Mapping[str, Any] | None = None) -> BlockSource:
    pinned = LayoutInfo(**layout) if layout is not None else None
    info = None if mode == "store" else pinned or read_info(layout_uri(uri))
    if info is not None and mode == "auto" and layout is None:
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
        return BlockSource(uri.uri, "layout", info.n_cells(split), split, dict(info.n_features),
                          tuple(info.batches), tuple((str(n), int(r)) for n, r in info.splits.get(split, [])))
    from ..store import open_store
    from .store_blocks import StoreBlockReader

    with open_store(uri) as store:
        reader = StoreBlockReader(store)
        return BlockSource(uri.uri, "store", store.n_obs, split, reader.n_features, tuple(reader.batches))

