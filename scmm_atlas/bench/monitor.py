"""Memory of a benchmarked process tree, measured from outside it at well under 1 % of a core.

The sampler runs in the bench's parent process (idle while a system runs), never inside the
system measured, so it takes no GIL from it, and it is the same for every system. Reading a
process's PSS (psutil's ``memory_full_info``: ``/proc/PID/smaps_rollup``) walks its page tables:
~16 ms for an idle local Ray's ten processes, more for big ones, which at 5 reads a second cost
~40 % of a core. So it is read rarely: every ``every_s`` the sampler sums the processes' resident
and anonymous-resident KiB (psutil's ``memory_info``: the kernel's statm counters, ~0.1 ms for the
tree) and reads the PSS only when the resident sum is a new high,
``grow`` above the highest sum at which the PSS was read, at most once per ``pss_every_s``. Between
readings the PSS is taken to have moved as the anonymous memory did (statm's resident minus shared:
private growth counts in full, and shared pages, which PSS splits among their mappers, are left to the
next reading, which their growth of the resident sum triggers). Checked on ``bench loader``'s Ray tree
against a PSS reading every second: peak 2,167 vs 2,174 MiB at 0.5 % vs 3.4 % of a core; counting the
resident growth instead overstated it by 216 MiB, the pages Ray's processes share. A reading re-reads only
the processes whose statm counters moved since their last one (Ray's idle actors are half the tree). The tree is
re-listed every ``tree_every_s``. When the file ``mark`` appears (the system calls :func:`mark` where
the part measured apart begins, e.g. its loader), the PSS is read at once and the file removed:
:meth:`before_mark` is the peak up to then. ``cpu_frac`` is the sampler thread's own CPU time (user
and kernel, from the OS) over its wall time; every bench row reports it as ``monitor_cpu_frac``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

MARK_ENV = "SCMM_BENCH_MARK"
T = TypeVar("T")


def mark() -> None:
    """In a benchmarked child: tell the parent's :class:`TreeMemory` that the part measured apart begins,
    and wait (up to 5 s) until it has read the PSS and removed the file. A no-op outside a bench."""
    path = os.environ.get(MARK_ENV)
    if not path:
        return
    open(path, "a").close()
    deadline = time.monotonic() + 5
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _resident_kib(proc: psutil.Process) -> tuple[int, int]:
    """(resident, resident anonymous) KiB: the resident minus its shared (file-backed and shmem) pages."""
    m = proc.memory_info()
    return m.rss // 1024, (m.rss - m.shared) // 1024


def _pss_kib(proc: psutil.Process) -> int:
    return proc.memory_full_info().pss // 1024


class TreeMemory:
    """Peak summed PSS (KiB) of process ``pid`` and all its descendants, sampled from another process."""

    def __init__(self, pid: int, *, every_s: float = 0.5, pss_every_s: float = 5.0, grow: float = 0.02,
                 tree_every_s: float = 5.0, mark: str | None = None) -> None:
        self.pid, self.mark = pid, mark
        self.marked_at: float | None = None
        self.peak_kib = 0
        self.samples: list[tuple[float, int]] = []  # (time.time(), summed PSS KiB) at each PSS reading
        self.cpu_s = self.wall_s = 0.0
        self._pss_cache: dict[int, tuple[tuple[int, int], int]] = {}  # pid -> (statm at reading, PSS)
        self._every, self._pss_every, self._grow, self._tree_every = every_s, pss_every_s, grow, tree_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    @property
    def cpu_frac(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s else 0.0

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> dict[int, psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return {p.pid: p for p in (root, *root.children(recursive=True))}
        except psutil.Error:
            return {}

    @staticmethod
    def _read(procs: dict[int, psutil.Process], read: Callable[[psutil.Process], T]) -> dict[int, T]:
        out = {}
        for pid, proc in procs.items():
            try:
                out[pid] = read(proc)
            except psutil.Error:
                continue  # exited between listing and reading
        return out

    def _pss(self, procs: dict[int, psutil.Process], statm: dict[int, tuple[int, int]]) -> int:
        """The tree's PSS, re-read only for processes whose resident memory moved since their last reading
        (an idle process's PSS moves only when others map or drop the pages it shares)."""
        stale = {pid: procs[pid] for pid, counts in statm.items() if self._pss_cache.get(pid, (None,))[0] != counts}
        for pid, pss in self._read(stale, _pss_kib).items():
            self._pss_cache[pid] = (statm[pid], pss)
        return sum(self._pss_cache[pid][1] for pid in statm if pid in self._pss_cache)

    def _run(self) -> None:
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        procs, listed, last_pss, rss_high, last_pss_kib, anon_at_pss = {}, -1e9, -1e9, 0, 0, 0
        while True:
            stopping = self._stop.wait(self._every)
            now = time.perf_counter()
            if now - listed >= self._tree_every or stopping:
                procs, listed = self._tree(), now
            statm = self._read(procs, _resident_kib)
            rss, anon = sum(r for r, _ in statm.values()), sum(a for _, a in statm.values())
            self.peak_kib = max(self.peak_kib, last_pss_kib + anon - anon_at_pss)
            marked = self.marked_at is None and self.mark is not None and os.path.exists(self.mark)
            if marked or (rss > rss_high * (1 + self._grow) and now - last_pss >= self._pss_every):
                pss = self._pss(procs, statm)
                self.peak_kib = max(self.peak_kib, pss)
                self.samples.append((time.time(), pss))
                last_pss, rss_high, last_pss_kib, anon_at_pss = now, max(rss_high, rss), pss, anon
                if marked:
                    self.marked_at = time.time()
                    os.remove(self.mark)
            if stopping:
                break
        self.cpu_s, self.wall_s = time.thread_time() - cpu0, time.perf_counter() - wall0

    def before_mark(self) -> int | None:
        """Peak PSS (KiB) read up to the moment ``mark`` appeared (None if it never did)."""
        if self.marked_at is None:
            return None
        return max(kib for t, kib in self.samples if t <= self.marked_at)
