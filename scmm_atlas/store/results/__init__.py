"""Versioned inference results in the store, published atomically.

One *entry* per inference attempt (``v<model version>-<id>``) under the store's ``results``
location holds: per-cell embeddings (joint and per modality), cross-modal predictions in the
target modality's feature space, and the pseudocell programs (and their traversals) as tables.
Attempts are written in place (row blocks by many writers, in any order) and are invisible until
:func:`publish` adds them to the *index*, a single metadata write; readers resolve versions through
the index, so they see the previous version until the new one is complete. Cells appended to the
store later are added to a published entry by :func:`extend`; readers through the index see them
once republished.

Several writers may work on one store at once (two ``infer`` runs, ``infer`` beside ``reprocess``):
each holds a lease (:mod:`..lease`) on the entry it writes (exclusive: two extensions of one entry
cannot interleave), and :func:`publish` updates the index under the store's index lock. Publish
removes only entries that nobody holds and nobody can still be reading: an attempt that died (its
lease dead) at once, a superseded version after ``SCMM_ATLAS_RESULTS_RETAIN_S`` seconds (``retired`` in the
index), so a reader that resolved it just before keeps its arrays.

Both backends use layouts that plain readers open without this project: on Zarr each entry's
``cells`` and ``pred_<T>_from_<S>`` groups are AnnData groups (``anndata.read_zarr``), ``programs``
an AnnData-encoded dataframe (``anndata.io.read_elem``); on TileDB-SOMA the published arrays are
members of each measurement's ``obsm`` and ``X`` (``tiledbsoma.io.to_anndata``) and programs a
SOMA DataFrame.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from collections.abc import Callable

from ...errors import StoreError
from ...settings import settings
from ..base import Store
from ..lease import Lease, held, lock
from .spec import INDEX_KEY, ResultRecord, ResultsBackend, ResultSpec, ResultsReader, ResultsWriter

ENTRY_LEASE = "entry-"  # + the entry's name: the lease of whoever writes it


_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_ENTRY = re.compile(r"v[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}-[0-9a-f]{8}")


def check_name(store: Store, field: str, value: str, pattern: re.Pattern[str] = _LABEL) -> str:
    """Version labels and entry names become paths inside the store: letters, digits, ``_.-`` only."""
    if not pattern.fullmatch(value) or ".." in value:
        raise StoreError(store.uri, field, f"{value!r} is not a valid name (letters, digits and _.- only)")
    return value


def _backend(store: Store) -> ResultsBackend:
    """The results module of the store's backend (imported on first use: each pulls in its library)."""
    if store.backend == "zarr":
        from . import zarr_format as mod
    else:
        from . import soma_format as mod
    return mod


def begin(store: Store, spec: ResultSpec) -> ResultsWriter:
    """Create a new entry for ``spec`` sized to the store's cells (it stays unpublished)."""
    check_name(store, "version", spec.version)
    spec.n_obs = store.n_obs
    spec.entry = f"v{spec.version}-{uuid.uuid4().hex[:8]}"
    spec.created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    # leased before it exists: no publish removes it
    return _leased(store, spec.entry, lambda: _backend(store).create_entry(store, spec))


def open_writer(store: Store, entry: str) -> ResultsWriter:
    """Reopen an entry being written (new, or extended) to write its row blocks, e.g. in a Ray actor."""
    return _backend(store).open_entry(store, entry)


def extend(store: Store, record: ResultRecord) -> ResultsWriter:
    """Reopen the published entry of ``record`` to add the rows of cells appended to the store since.

    Rows ``record.n_cells`` onwards are written in place; readers bound every read by the
    record they resolved, so they keep seeing the published rows (unchanged, never rewritten)
    until :func:`publish` records the new count. The store must only have grown by appends.
    """
    old = record.n_cells
    if store.n_obs < old:
        raise StoreError(store.uri, INDEX_KEY, f"the store has {store.n_obs} cells, fewer than the {old} of "
                         f"published version {record.version}: it was rebuilt, recompute the results")
    check_name(store, f"{INDEX_KEY}/entry", record.entry, _ENTRY)
    # one extension at a time
    return _leased(store, record.entry, lambda: _backend(store).extend_entry(store, record.entry, old, store.n_obs))


def _leased(store: Store, entry: str, make: Callable[[], ResultsWriter]) -> ResultsWriter:
    """``make()``'s writer of ``entry``, holding the entry's lease (released if ``make`` fails)."""
    lease = Lease(store.uri.uri, ENTRY_LEASE + entry).acquire()
    try:
        writer = make()
    except BaseException:
        lease.release()
        raise
    writer.lease = lease
    return writer


def index(store: Store) -> list[ResultRecord]:
    """Published versions, oldest first."""
    return [_record(store, raw) for raw in _backend(store).read_index(store).get("published", [])]


def _record(store: Store, raw: object) -> ResultRecord:
    try:
        return ResultRecord.from_json(raw)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(store.uri, f"{INDEX_KEY}/published", f"a record of another shape ({type(exc).__name__}: "
                         f"{exc}): written by another program?") from None


def publish(store: Store, writer: ResultsWriter) -> ResultRecord:
    """Make the writer's entry the current results of its version (one metadata write, under the
    index lock), then remove entries that nobody holds and that are not published or retained."""
    spec = writer.spec
    mod = _backend(store)
    with lock(store.uri.uri, "results-index") as index_lock:
        if writer.lease is not None:  # lost while the entry was written: a publish may have removed it
            writer.lease.check()
        writer._link()
        current = mod.read_index(store)
        published = list(current.get("published", []))
        now = time.time()
        retired = [r for r in current.get("retired", []) if r["entry"] != spec.entry]
        retired += [{"entry": e["entry"], "since": now} for e in published
                    if e["version"] == spec.version and e["entry"] != spec.entry]
        record = ResultRecord(entry=spec.entry, version=spec.version, model_uri=spec.model_uri,
                              time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), n_cells=spec.n_obs,
                              pairs=tuple(spec.pairs), library_size=spec.library_size)
        same = [i for i, e in enumerate(published) if e["entry"] == spec.entry]
        if same:  # an extended entry keeps its place: which version is the latest does not change
            published[same[0]] = record.to_json()
        else:
            published = [*(e for e in published if e["version"] != spec.version), record.to_json()]
        retained = [r for r in retired if now - float(r["since"]) < settings().results_retain_s]
        index_lock.check()  # stalled past its TTL in this section: another may have written the index since
        mod.write_index(store, {"published": published, "retired": retained})
        keep = {e["entry"] for e in published} | {r["entry"] for r in retained}
        busy = {name[len(ENTRY_LEASE):] for name in held(store.uri.uri, ENTRY_LEASE)} - {spec.entry}
        for entry in mod.list_entries(store):
            if entry not in keep and entry not in busy:
                mod.remove_entry(store, entry)
    writer.close()
    return record


def resolve(store: Store, version: str | None = None) -> ResultRecord:
    """The index record of ``version`` (default: the latest published)."""
    published = index(store)
    if not published:
        raise StoreError(store.uri, INDEX_KEY, "no published results: run `scmm-atlas infer` first")
    if version is None:
        return published[-1]
    for record in published:
        if record.version == str(version):
            return record
    raise StoreError(store.uri, INDEX_KEY, f"no published results for version {version!r} (published: "
                     f"{', '.join(e.version for e in published)})")


def open_results(store: Store, version: str | None = None) -> ResultsReader:
    """A reader for a published version (default: the latest)."""
    record = resolve(store, version)
    check_name(store, f"{INDEX_KEY}/entry", record.entry, _ENTRY)  # the index names a folder: no escapes
    return _backend(store).open_reader(store, record)
