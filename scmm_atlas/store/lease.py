"""Leases: which live process holds what in a store, so that concurrent writers never remove each
other's work and a killed one never blocks the rest.

A lease ``name`` is a small JSON file ``<store>/_leases/<name>.<generation>.json`` (local or S3,
through fsspec) saying who holds it (host, pid, a random token), until when, and a payload. The
holder rewrites it every ``ttl / 3`` seconds from a daemon thread. A lease is *live* while it has
not expired and, on the holder's own host, its process still exists: a SIGKILLed holder's lease is
dead at once on its machine, and after ``ttl`` seconds on any other.

Taking a lease only ever *creates* a file, with create-if-absent (``O_EXCL`` locally, S3's
``If-None-Match: *``): the taker lists the name's generations, and when the newest is absent or
dead creates the next one; of several takers exactly one succeeds, the others retry. The winner then
deletes the older generations. So one primitive serves both uses: short exclusive sections (the
results index's read-modify-write) and long-lived claims (an entry being written; the layout shards
a training run reads), which others query with :func:`held`.

A holder knows when it has lost its lease: a heartbeat that comes after the lease expired (the
process stalled past ``ttl``: another may have taken it meanwhile), or that finds the file gone, no
longer its own or a newer generation beside it, stops renewing and marks the lease lost. The holder's
work asks :meth:`Lease.check` before each step that relies on the lease (a publish, the next block)
and stops with a :class:`~..errors.StoreError`; leaving a ``with`` block of a lost lease raises it.
A heartbeat that cannot read or write (a flaky store) tries again at the next beat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import StoreError
from ..settings import settings
from .uri import filesystem

log = logging.getLogger(__name__)
LEASE_DIR = "_leases"
_FILE = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)\.(?P<gen>\d+)\.json")
_HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_live(record: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether the holder of ``record`` still holds it (not expired; its process exists if on this host)."""
    if float(record.get("expires", 0)) <= (time.time() if now is None else now):
        return False
    return record.get("host") != _HOST or _pid_alive(int(record.get("pid", -1)))


class Lease:
    """Hold ``name`` in the store at ``store_uri`` (``with`` block, or :meth:`acquire` / :meth:`release`)."""

    def __init__(self, store_uri: str, name: str, *, data: Mapping[str, Any] | None = None, ttl: float | None = None,
                 wait_s: float = 0.0) -> None:
        if not _FILE.fullmatch(f"{name}.0.json"):
            raise ValueError(f"lease name {name!r}: letters, digits and _.- only")
        self.store_uri, self.name, self.data, self.wait_s = store_uri, name, dict(data or {}), wait_s
        self.ttl = ttl if ttl is not None else settings().lease_ttl_s
        self.fs, self.dir = _folder(store_uri)
        self.token = uuid.uuid4().hex
        self.path: str | None = None
        self.lost: str | None = None  # why the lease was lost (None: held, or never taken)
        self._expires = 0.0  # of the record last written
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"host": _HOST, "pid": os.getpid(), "token": self.token, "expires": time.time() + self.ttl,
                "data": self.data}

    def _write(self, record: dict[str, Any], *, create: bool = False) -> bool:
        assert self.path is not None
        if create:
            if not _create(self.fs, self.path, record):
                return False
        else:
            with self.fs.open(self.path, "w") as f:
                json.dump(record, f)
        self._expires = float(record["expires"])
        return True

    def check(self) -> None:
        """Raise a :class:`StoreError` if the lease was lost: the work it guards must stop."""
        if self.lost is not None:
            raise StoreError(self.store_uri, f"{LEASE_DIR}/{self.name}", f"lease lost ({self.lost}): another "
                             "process may have taken over what it guarded; this work stopped, run it again")

    def acquire(self) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for a live holder to let go; else a :class:`StoreError`."""
        deadline, pause = time.monotonic() + self.wait_s, 0.05
        self.fs.makedirs(self.dir, exist_ok=True)
        while True:
            gens = _generations(self.fs, self.dir).get(self.name, [])
            holder = _read(self.fs, f"{self.dir}/{self.name}.{gens[-1]}.json") if gens else None
            if holder is None or not is_live(holder):
                self.path = f"{self.dir}/{self.name}.{gens[-1] + 1 if gens else 0}.json"
                if self._write(self._record(), create=True):
                    for gen in gens:  # dead or released holders before us
                        _remove(self.fs, f"{self.dir}/{self.name}.{gen}.json")
                    break
                self.path = None
                continue  # another taker won this generation: look again
            if time.monotonic() >= deadline:
                raise StoreError(self.store_uri, f"{LEASE_DIR}/{self.name}", f"held by process {holder['pid']} on "
                                 f"{holder['host']} (another writer of this store): retry when it has finished")
            time.sleep(pause)
            pause = min(1.0, pause * 2)
        self.lost = None
        self._stop.clear()
        self._beat = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._beat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.lost = self._beat_once()
            except OSError as exc:  # a flaky store: the next beat tries again, well within ttl
                log.warning("%s: could not renew lease %s: %s", self.store_uri, self.name, exc)
                continue
            if self.lost is not None:
                log.error("%s: lease %s lost: %s", self.store_uri, self.name, self.lost)
                return

    def _beat_once(self) -> str | None:
        """Renew the lease if it is still ours; else why it is lost."""
        assert self.path is not None
        late = time.time() - self._expires
        if late >= 0:
            return f"not renewed for {late + self.ttl:.0f} s, past its {self.ttl:.0f} s TTL"
        current = _read(self.fs, self.path, strict=True)
        if current is None or current.get("token") != self.token:
            return "taken by another holder"
        gen = int(_FILE.fullmatch(self.path.rsplit("/", 1)[-1])["gen"])
        if any(g > gen for g in _generations(self.fs, self.dir).get(self.name, [])):
            return "a newer generation was taken"
        self._write(self._record())
        return None

    def release(self) -> None:
        """Stop renewing and remove the lease file, if it is still this holder's."""
        if self.path is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            if self.lost is None or (_read(self.fs, self.path) or {}).get("token") == self.token:
                _remove(self.fs, self.path)
        except OSError as exc:  # storage failing: the lease expires by itself (nobody renews it now)
            log.warning("%s: could not release lease %s (it expires in %.0f s): %s", self.store_uri, self.name,
                        self.ttl, exc)
        self.path = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.release()
        if exc_type is None:
            self.check()


def held(store_uri: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Live leases whose names start with ``prefix``: name -> the holder's payload."""
    fs, folder = _folder(store_uri)
    out = {}
    for name, gens in _generations(fs, folder).items():
        if name.startswith(prefix):
            record = _read(fs, f"{folder}/{name}.{gens[-1]}.json")
            if record is not None and is_live(record):
                out[name] = dict(record.get("data") or {})
    return out


@contextlib.contextmanager
def lock(store_uri: str, name: str, *, wait_s: float = 300.0) -> Iterator[Lease]:
    """An exclusive section, waiting up to ``wait_s`` for another holder (the results index's
    read-modify-write; one ``prepare`` or append per store)."""
    with Lease(store_uri, f"lock-{name}", wait_s=wait_s) as lease:
        yield lease


def _folder(store_uri: str) -> tuple[Any, str]:
    fs, root = filesystem(store_uri)
    return fs, f"{root.rstrip('/')}/{LEASE_DIR}"


def _generations(fs, folder: str) -> dict[str, list[int]]:
    try:
        paths = fs.ls(folder, detail=False, refresh=True) if fs.exists(folder) else []
    except FileNotFoundError:
        paths = []
    out: dict[str, list[int]] = {}
    for path in paths:
        m = _FILE.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
        if m:
            out.setdefault(m["name"], []).append(int(m["gen"]))
    return {k: sorted(v) for k, v in out.items()}


def _read(fs, path: str, *, strict: bool = False) -> dict[str, Any] | None:
    """A lease file, or None when it is gone. One caught mid-write reads as held for a second more, or,
    ``strict``, raises OSError (its holder's heartbeat looks again at the next beat)."""
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if strict:
            raise OSError(f"{path}: unreadable ({exc})") from exc
        return {"host": "?", "pid": -1, "expires": time.time() + 1.0}  # being written: look again shortly


def _create(fs, path: str, record: Mapping[str, Any]) -> bool:
    """Create ``path`` only if absent; False when it exists."""
    try:
        with fs.open(path, "xb") as f:
            f.write(json.dumps(record).encode())
    except FileExistsError:
        return False
    return True


def _remove(fs, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)
