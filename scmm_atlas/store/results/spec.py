"""What every results backend shares: the entry's spec, the writer and reader interfaces, and the
:class:`ResultsBackend` protocol that ``zarr_format`` and ``soma_format`` implement. The lifecycle
(begin, publish, extend, resolve) is the package's (``__init__``), which picks a backend; backends
import only this module, so nothing imports back up.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ...errors import StoreError
from ..base import Store
from ..lease import Lease

INDEX_KEY = "scmm_results"
JOINT = "joint"


def pair_name(source: str, target: str) -> str:
    return f"{target}_from_{source}"


@dataclass
class ResultSpec:
    """What an entry holds; saved with it, so that any process can reopen it for writing."""

    version: str  # model version (the registry's), or a run id
    model_uri: str
    latent_dim: int  # width of each modality's embedding
    modalities: list[str]
    pairs: list[tuple[str, str]]  # (source, target)
    target_features: dict[str, list[str]]  # target modality -> its feature names (the model's)
    library_size: float | None  # predictions per this many counts (None: the model's library scale)
    chunk_rows: int = 4096  # rows per storage chunk: concurrent writers' blocks start at multiples of it
    n_obs: int = 0
    row_start: int = 0  # the first row this attempt writes (> 0 when it extends a published entry)
    entry: str = ""
    created: str = ""
    joint_dim: int = 0  # width of the joint embedding (0: latent_dim; the experts side by side are wider)

    def __post_init__(self) -> None:
        self.pairs = [tuple(p) for p in self.pairs]
        self.joint_dim = self.joint_dim or self.latent_dim

    def width(self, key: str) -> int:
        """Columns of the embedding ``key`` (``joint`` or a modality)."""
        return self.joint_dim if key == JOINT else self.latent_dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultSpec:
        return cls(**data)


@dataclass(frozen=True)
class ResultRecord:
    """One published version in the results index: what readers resolve. Stored as plain JSON."""

    entry: str  # the entry's folder: v<version>-<id>
    version: str
    model_uri: str
    time: str  # when it was (last) published, UTC ISO 8601
    n_cells: int  # its rows: the store's first n_cells cells
    pairs: tuple[tuple[str, str], ...]  # (source, target) of each cross-modal prediction
    library_size: float | None  # predictions per this many counts (None: the model's library scale)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pairs": [list(p) for p in self.pairs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultRecord:
        """Raises KeyError, TypeError or ValueError on a record of another shape."""
        size = data["library_size"]
        return cls(entry=str(data["entry"]), version=str(data["version"]), model_uri=str(data["model_uri"]),
                   time=str(data["time"]), n_cells=int(data["n_cells"]),
                   pairs=tuple((str(s), str(t)) for s, t in data["pairs"]),
                   library_size=None if size is None else float(size))


class ResultsWriter(abc.ABC):
    """Writes one entry. Row blocks may come from many processes (reopened with :func:`open_writer`);
    blocks must not share a storage chunk (``spec.chunk_rows`` divides every block start, except
    ``spec.row_start``, the first new row of an extended entry)."""

    def __init__(self, store: Store, spec: ResultSpec) -> None:
        self.store, self.spec = store, spec
        self.lease: Lease | None = None  # held by the process that begins and publishes the entry

    def close(self) -> None:
        """Let go of the entry (after publishing, or giving up: then the next publish removes it)."""
        if self.lease is not None:
            self.lease.release()

    @abc.abstractmethod
    def write_cells(self, start: int, joint: np.ndarray, per_modality: Mapping[str, np.ndarray],
                    predictions: Mapping[tuple[str, str], np.ndarray]) -> None:
        """Rows ``start .. start + len(joint)`` of every per-cell array."""

    @abc.abstractmethod
    def write_table(self, name: str, table: pd.DataFrame) -> None:
        """A small table of the entry (``programs``, ``traversals``), written whole."""

    @abc.abstractmethod
    def _link(self) -> None:
        """Backend step before the index names the entry (SOMA: link arrays into obsm / X)."""

    def check_block(self, start: int, n: int) -> None:
        aligned = start % self.spec.chunk_rows == 0 or start == self.spec.row_start
        if not aligned or start < self.spec.row_start or start + n > self.spec.n_obs:
            raise ValueError(f"result rows {start}..{start + n}: blocks must start at a multiple of "
                             f"{self.spec.chunk_rows} (or at row {self.spec.row_start}) and end by {self.spec.n_obs}")


class ResultsReader(abc.ABC):
    """One published entry."""

    def __init__(self, store: Store, record: ResultRecord, spec: ResultSpec) -> None:
        self.store, self.record, self.spec = store, record, spec

    @property
    def n_obs(self) -> int:
        """Rows of this version: the store's first ``n_obs`` cells (cells appended later have none yet)."""
        return self.record.n_cells

    @abc.abstractmethod
    def embedding(self, key: str = JOINT, rows: np.ndarray | None = None) -> np.ndarray:
        """[cells, latent] of ``key``: ``joint`` or a modality (its expert's location)."""

    @abc.abstractmethod
    def prediction(self, source: str, target: str, rows: np.ndarray | None = None) -> np.ndarray: ...

    @abc.abstractmethod
    def table(self, name: str) -> pd.DataFrame:
        """A table of the entry (empty if it was not written)."""

    def programs(self) -> pd.DataFrame:
        return self.table("programs")

    def traversals(self) -> pd.DataFrame:
        return self.table("traversals")

    def check_pair(self, source: str, target: str) -> None:
        if (source, target) not in self.spec.pairs:
            raise StoreError(self.store.uri, "pairs", f"version {self.spec.version} has no {target} predicted "
                             f"from {source} (it has {', '.join(pair_name(*p) for p in self.spec.pairs)})")

    def check_key(self, key: str) -> None:
        if key != JOINT and key not in self.spec.modalities:
            raise StoreError(self.store.uri, "embedding", f"no embedding {key!r}: use 'joint' or one of "
                             f"{self.spec.modalities}")


class ResultsBackend(Protocol):
    """A backend's results module: where entries live and how they are read (see :mod:`scmm_atlas.store.results`)."""

    def create_entry(self, store: Store, spec: ResultSpec) -> ResultsWriter: ...

    def open_entry(self, store: Store, entry: str) -> ResultsWriter: ...

    def extend_entry(self, store: Store, entry: str, old: int, n: int) -> ResultsWriter: ...

    def read_index(self, store: Store) -> dict[str, Any]: ...

    def write_index(self, store: Store, index: Mapping[str, Any]) -> None: ...

    def list_entries(self, store: Store) -> list[str]: ...

    def remove_entry(self, store: Store, entry: str) -> None: ...

    def open_reader(self, store: Store, record: ResultRecord) -> ResultsReader: ...


def sorted_rows(rows: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Row indices as a sorted unique int64 array; all rows when None."""
    if rows is None:
        return np.arange(n, dtype=np.int64)
    out = np.unique(np.asarray(rows, dtype=np.int64))
    if len(out) and (out[0] < 0 or out[-1] >= n):
        raise ValueError(f"row indices must be within 0..{n - 1}")
    return out
