"""The store layer: the only code that knows TileDB-SOMA or Zarr.

The backends are imported when a store is opened or created, not with the package: Ray read workers
that only need :mod:`.uri` should not pay tiledbsoma's ~250 MB per process."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pandas as pd

from ..errors import InputError, StoreError
from .base import Store, StoreInfo, StoreWriter
from .uri import StoreURI, parse_uri

BACKENDS = ("soma", "zarr")

__all__ = ["BACKENDS", "InputError", "Store", "StoreError", "StoreInfo", "StoreURI", "StoreWriter",
           "backend_for", "create_store", "open_store", "parse_uri", "store_exists"]


def backend_for(uri: StoreURI, backend: str | None = None) -> str:
    """The backend to create at ``uri``: as asked, else Zarr for a ``.zarr`` suffix, else SOMA."""
    if backend is not None:
        if backend not in BACKENDS:
            raise StoreError(uri, "backend", f"unknown backend {backend!r}: use one of {BACKENDS}")
        return backend
    return "zarr" if uri.uri.rstrip("/").endswith(".zarr") else "soma"


def _detect(uri: StoreURI) -> str | None:
    from . import zarr_backend

    if zarr_backend.is_zarr(uri):
        return "zarr"
    from . import soma_backend  # only now: tiledbsoma costs ~250 MB per process, and hosts may lack it

    if soma_backend.is_soma(uri):
        return "soma"
    return None


def store_exists(uri: str | os.PathLike[str] | StoreURI) -> bool:
    """True when something that could be a store (any file or object) is at ``uri``."""
    loc = uri if isinstance(uri, StoreURI) else parse_uri(uri)
    if loc.is_s3:
        import s3fs

        from .uri import fsspec_options

        return s3fs.S3FileSystem(**fsspec_options()).exists(loc.uri)
    return loc.path.exists()


def open_store(uri: str | os.PathLike[str] | StoreURI, *, writable: bool = False) -> Store:
    """Open an existing store of either backend; a clear error when ``uri`` is not one."""
    loc = uri if isinstance(uri, StoreURI) else parse_uri(uri)
    if not store_exists(loc):
        raise StoreError(loc, "uri", "no store here (nothing exists at this location)")
    kind = _detect(loc)
    if kind is None:
        raise StoreError(loc, "uri", "not an scmm-atlas store (neither an scmm-atlas Zarr group "
                         "nor a TileDB-SOMA experiment)")
    if kind == "zarr":
        from .zarr_backend import ZarrStore

        return ZarrStore(loc, writable=writable)
    from .soma_backend import SomaStore

    return SomaStore(loc)


def create_store(uri: StoreURI, backend: str, info: StoreInfo, vars_: Mapping[str, pd.DataFrame],
                 n_obs: int) -> StoreWriter:
    """Create the layout at ``uri`` (which must not exist) and return a writer for its cells."""
    import importlib

    module = importlib.import_module(f".{'zarr' if backend == 'zarr' else 'soma'}_backend", __name__)
    return module.create(uri, info, vars_, n_obs)
