"""Block feeders: Ray actors that read a rank's cell ranges and hand each block over by ObjectRef.

A training process must not host a data-pipeline scheduler. Ray Data's streaming executor runs its
scheduling loop in the process that iterates the dataset: inside a Ray Train worker, backpressured
by a bounded read-ahead, that loop held the GIL for 50-70 % of a core once an epoch outlived its
reads (500k cells), leaving the training thread ~40 %. Here the consumer schedules its own reads:
it keeps a window of ``read_ahead`` requests in flight to ``readers`` feeder actors (requests dealt
round robin, results taken in order), and one ``ray.get`` per block, which waits without the GIL.
A feeder is an actor on the consumer's node, started once per training worker (shared by its
training and validation loaders) and reused by every epoch; it holds the opened layout or store.
A block is a dict of compact numpy arrays: Ray stores it once in shared memory and the consumer
maps it without a copy. A feeder that dies fails its worker's next read, and Ray Train restarts
the worker group from the last checkpoint (``distributed.max_failures``), as for any worker failure.

No torch here: feeder processes import this module and should stay small.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..store.uri import StoreURI
from .blocks import compact_arrays
from .layout import Layout, layout_uri
from .plan import LoadRequest


@dataclass(frozen=True)
class BlockSource:
    """Where blocks come from; small and picklable (it travels with every read request)."""

    store_uri: str
    mode: str  # "layout" | "store"
    n_cells: int
    split: str  # "train" | "val" of the layout ("store" mode: "train", every cell)
    n_features: dict[str, int]
    batches: tuple[str, ...] = ()  # batch categories ("store" mode: fixed by the driver)
    shards: tuple[tuple[str, int], ...] | None = None  # "layout" mode: the split's shards the run pinned


class BlockFeeder:
    """What a feeder actor runs: reads ranges of one or more sources, opening each once."""

    def __init__(self) -> None:
        self._readers: dict[tuple, object] = {}

    def _reader(self, spec: BlockSource):
        key = (spec.store_uri, spec.mode, spec.split, spec.n_cells, spec.batches, spec.shards)
        if key not in self._readers:
            if spec.mode == "layout":
                self._readers[key] = Layout(layout_uri(StoreURI(spec.store_uri)), spec.split, spec.shards)
            else:  # the store's own order: the store layer (and its backend) is only needed here
                from ..store import open_store
                from .store_blocks import StoreBlockReader

                self._readers[key] = StoreBlockReader(open_store(spec.store_uri), batches=list(spec.batches))
        return self._readers[key]

    def read(self, spec: BlockSource, request: LoadRequest) -> dict[str, np.ndarray]:
        """One range as compact arrays (:func:`~.blocks.compact_arrays`)."""
        block = self._reader(spec).read(request.start, request.stop)
        return block if spec.mode == "layout" else compact_arrays(block)

    def ready(self) -> bool:
        return True


class Feeders:
    """``readers`` feeder actors on this process's node (soft affinity: elsewhere only if it has no room).

    Each reserves ``cpus`` logical CPUs. An explicit scheduling strategy keeps them out of a Ray Train
    worker's placement group, whose bundle the worker fills. :meth:`close` ends them; so does the end
    of the process that made them (actors share their owner's fate)."""

    def __init__(self, *, readers: int = 1, cpus: float = 0.25) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if readers <= 0:
            raise ValueError(f"readers must be positive, got {readers}")
        strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        actor = ray.remote(BlockFeeder).options(num_cpus=cpus, scheduling_strategy=strategy)
        self.actors = [actor.remote() for _ in range(readers)]

    def warm_up(self, spec: BlockSource) -> None:
        """Wait until every feeder is up and has opened ``spec`` (imports and metadata reads done)."""
        import ray

        ray.get([a.read.remote(spec, LoadRequest(0, 1)) for a in self.actors])

    def stream(self, spec: BlockSource, requests: Sequence[LoadRequest], *, read_ahead: int
               ) -> Iterator[dict[str, np.ndarray]]:
        """The blocks of ``requests`` in order, ``read_ahead`` requests in flight."""
        import ray

        pending: deque = deque()
        todo = iter(enumerate(requests))

        def submit() -> None:
            nxt = next(todo, None)
            if nxt is not None:
                i, request = nxt
                pending.append(self.actors[i % len(self.actors)].read.remote(spec, request))

        for _ in range(read_ahead):
            submit()
        while pending:
            ref = pending.popleft()
            submit()
            yield ray.get(ref)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)  # reads still queued are dropped with it: their results are not wanted
        self.actors = []
