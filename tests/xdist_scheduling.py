"""``--dist loadscope`` that survives a crashed worker (the suite's CI runs with it).

pytest-xdist 3.8's ``LoadScopeScheduling`` deadlocks the session after a worker dies (a segfault, a
timeout that kills the process): it queues the dead worker's *finished* modules again, as empty work
units that never complete, and hands a replacement worker a single unit, which a worker with one test
waits on for a "next item" that never comes (pytest-xdist#1378, #1327). A CI run hung so for the rest
of its 90 minutes. Here only unfinished modules go back, without the test the worker died on (it is
already reported failed; running it again would take the replacement down too, pytest-xdist#1371),
and a worker is topped up until it has more than two tests or the queue is empty.
"""

from __future__ import annotations

import pytest
from xdist.scheduler import LoadScopeScheduling
from xdist.workermanage import WorkerController


class CrashSafeLoadScope(LoadScopeScheduling):
    def remove_node(self, node: WorkerController) -> str | None:
        workload = self.assigned_work.pop(node)
        unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
        if not unfinished:
            return None
        scope, crashed = next((s, n) for s, unit in unfinished.items() for n, done in unit.items() if not done)
        unfinished[scope][crashed] = True
        self.workqueue.update((s, unit) for s, unit in unfinished.items() if not all(unit.values()))
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def _reschedule(self, node: WorkerController) -> None:
        if node.shutting_down:
            return
        while self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
            self._assign_work_unit(node)
        if not self.workqueue:
            node.shutdown()


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> CrashSafeLoadScope | None:
    """The hook (imported by conftest.py): this scheduler wherever ``--dist loadscope`` is asked for."""
    return CrashSafeLoadScope(config, log) if config.getvalue("dist") == "loadscope" else None
