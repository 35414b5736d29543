"""The Ray Data datasource: read tasks over groups of cell ranges that yield sparse blocks.

Each Ray block is one row with one binary column, ``block``: a :func:`~.blocks.encode`d sparse
block (CSR of the selected features per modality plus per-cell arrays). Nothing dense crosses a
process boundary, and Ray handles one buffer per block instead of an object column per array.
Ranges come either from the pre-shuffled training layout (``mode="layout"``) or from the store
itself (``mode="store"``: its own cell order, for stores without a layout).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..store.uri import StoreURI
from .blocks import compact_arrays, encode
from .layout import Layout, layout_uri
from .plan import LoadRequest

COLUMN = "block"
_SCHEMA = pa.schema([(COLUMN, pa.large_binary())])


@dataclass(frozen=True)
class SourceSpec:
    """Where blocks come from; small and picklable (it travels to every read task)."""

    store_uri: str
    mode: str  # "layout" | "store"
    n_cells: int
    split: str  # "train" | "val" of the layout ("store" mode: "train", every cell)
    n_features: dict[str, int]
    batches: tuple[str, ...] = ()  # batch categories ("store" mode: fixed by the driver)
    bytes_per_cell: float = 1024.0  # estimate, for Ray's memory accounting


_READERS: dict[tuple, object] = {}  # per worker process: opened once, reused by later tasks


def _reader(spec: SourceSpec):
    key = (spec.store_uri, spec.mode, spec.split, spec.n_cells, spec.batches)
    if key not in _READERS:
        if spec.mode == "layout":
            _READERS[key] = Layout(layout_uri(StoreURI(spec.store_uri)), spec.split)
        else:  # the store's own order: the store layer (and its backend) is only needed here
            from ..store import open_store
            from .reading import StoreBlockReader

            _READERS[key] = StoreBlockReader(open_store(spec.store_uri), batches=list(spec.batches))
    return _READERS[key]


def read_encoded(spec: SourceSpec, request: LoadRequest) -> bytearray:
    """One range, encoded for the wire."""
    reader = _reader(spec)
    if spec.mode == "layout":
        arrays = reader.read(request.start, request.stop)
    else:
        arrays = compact_arrays(reader.read(request.start, request.stop))
    return encode(arrays, spec.n_features)


def _table(buf: bytearray) -> pa.Table:
    """A one-row table over ``buf`` without copying it."""
    offsets = pa.py_buffer(np.array([0, len(buf)], dtype=np.int64))
    column = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(buf)])
    return pa.Table.from_arrays([column], schema=_SCHEMA)


class StoreDatasource(Datasource):
    """Ranges ``requests`` (in reading order), dealt in contiguous groups to at most ``parallelism`` tasks."""

    def __init__(self, spec: SourceSpec, requests: Sequence[LoadRequest], *, ranges_per_task: int = 1) -> None:
        if ranges_per_task <= 0:
            raise ValueError(f"ranges_per_task must be positive, got {ranges_per_task}")
        self.spec, self.requests, self.ranges_per_task = spec, list(requests), ranges_per_task

    def estimate_inmemory_data_size(self) -> int:
        return int(sum(len(r) for r in self.requests) * self.spec.bytes_per_cell)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object = None) -> list[ReadTask]:
        step = max(self.ranges_per_task, -(-len(self.requests) // max(parallelism, 1)))
        tasks = []
        for i in range(0, len(self.requests), step):
            group = self.requests[i : i + step]
            meta = BlockMetadata(num_rows=len(group), size_bytes=int(sum(len(r) for r in group) *
                                                                     self.spec.bytes_per_cell),
                                 input_files=None, exec_stats=None)
            tasks.append(ReadTask(lambda g=group, s=self.spec: _read_group(s, g), meta, schema=_SCHEMA))
        return tasks


def _read_group(spec: SourceSpec, group: list[LoadRequest]) -> Iterator[pa.Table]:
    for request in group:
        yield _table(read_encoded(spec, request))
