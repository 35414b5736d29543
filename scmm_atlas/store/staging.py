"""Writing a store safely: a new store is built aside and renamed into place, a failed write to an
existing local store is taken back file for file, and a half-built store is removed. Used by
ingest, gene activity and the layout, whichever backend."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreError
from . import open_store, store_exists
from .uri import StoreURI


@contextmanager
def restored_on_failure(loc: StoreURI, *, untouched: Collection[str] = ()) -> Iterator[None]:
    """Run the body; if it raises, put the local folder ``loc`` back file for file as it was (removed,
    if it did not exist), so that a write that fails part-way (a full disk) leaves no trace. Entries
    of ``loc`` named in ``untouched`` are left alone: the body does not write them, others may.

    TileDB only ever adds files, and Zarr replaces a file whole (written aside, then renamed over
    it), so hard links to the files as they were keep the old versions at no copying cost: files
    added are deleted, files replaced or deleted are linked back. An S3 store is left to the
    backend's own commit point."""
    if loc.is_s3:
        yield
        return
    root = loc.path
    backup = root.parent / f".{root.name}.backup-{uuid.uuid4().hex[:8]}"
    existed = root.exists()
    before = set(_entries(root, untouched)) if existed else set()
    try:
        for rel in before:
            if (root / rel).is_file() and not (root / rel).is_symlink():
                (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(root / rel, backup / rel)
        try:
            yield
        except BaseException:
            _restore(root, backup, before, existed, untouched)
            raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def _entries(root: Path, untouched: Collection[str]) -> list[Path]:
    """Paths under ``root``, relative to it, but for those under an ``untouched`` entry."""
    return [rel for p in root.rglob("*") if (rel := p.relative_to(root)).parts[0] not in untouched]


def _restore(root: Path, backup: Path, before: set[Path], existed: bool, untouched: Collection[str]) -> None:
    if not existed:
        shutil.rmtree(root, ignore_errors=True)
        return
    for rel in sorted(_entries(root, untouched), reverse=True):  # children before their folder
        path = root / rel
        if rel in before:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for saved in backup.rglob("*"):
        path = root / saved.relative_to(backup)
        if saved.is_file() and not (path.exists() and os.path.samefile(path, saved)):
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(saved, path)


def check_new_store(loc: StoreURI, *, option: str, exists_hint: str) -> None:
    """Refuse to create a store where something already is, or in a local folder that does not exist
    (``option``: the flag that named ``loc``; ``exists_hint``: what to do when a store is there)."""
    if store_exists(loc):
        raise StoreError(loc, "uri", f"a store already exists here: {exists_hint}" if is_store(loc)
                         else f"a file or folder that is not a store is here: choose another {option} path")
    if not loc.is_s3 and not loc.path.parent.is_dir():
        raise StoreError(loc, "uri", "the parent folder does not exist")


def staging(loc: StoreURI) -> StoreURI:
    """Where a new local store is built before it is renamed into place (S3: the place itself)."""
    if loc.is_s3:
        return loc
    return StoreURI(str(loc.path.parent / f".{loc.path.name}.ingest-{uuid.uuid4().hex[:8]}"))


def remove_store(loc: StoreURI) -> None:
    """Delete whatever is at ``loc`` (a half-built store), local or on S3."""
    if loc.is_s3:
        import s3fs

        from .uri import fsspec_options

        fs = s3fs.S3FileSystem(**fsspec_options())
        if fs.exists(loc.uri):
            fs.rm(loc.uri, recursive=True)
    elif loc.path.exists():
        shutil.rmtree(loc.path)


def is_store(loc: StoreURI) -> bool:
    try:
        open_store(loc).close()
    except StoreError:
        return False
    return True
