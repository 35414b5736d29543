"""Resumable stages: each finished stage is recorded with a fingerprint of its inputs and config.

A stage is skipped (and says so) when its record's fingerprint matches and its outputs are still
there (the store, the registered model version, the published results, the report), so deleting
an output or changing an input reruns that stage and, through the fingerprints, every later one.
Records live in ``<workdir>/pipeline.json`` (a local folder or ``s3://``), rewritten whole after
each stage. What happens is logged (logger ``scmm_atlas.pipeline``; the CLI prints it) and kept as
data: :attr:`StageRecords.ran` lists the stages that ran this time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, TypeVar

T = TypeVar("T")

STATE_FILE = "pipeline.json"
log = logging.getLogger(__name__)


def fingerprint(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageRecords:
    """The stage records of one pipeline workdir."""

    def __init__(self, workdir: str) -> None:
        from ..store.uri import filesystem, parse_uri

        self.fs, self.root = filesystem(parse_uri(workdir).uri)  # validated as a store's: no '..' escapes
        self.path = f"{self.root.rstrip('/')}/{STATE_FILE}"
        self.records: dict[str, dict[str, Any]] = (json.loads(self.fs.cat_file(self.path))["stages"]
                                                   if self.fs.exists(self.path) else {})
        self.ran: list[str] = []  # the stages that ran (not skipped) through this object, in order

    def _save(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        tmp = f"{self.path}.partial"
        self.fs.pipe_file(tmp, json.dumps({"stages": self.records}, indent=1).encode())
        self.fs.mv(tmp, self.path)  # a reader never sees half a file

    def run(self, name: str, inputs: Mapping[str, Any], work: Callable[[], T], still_there: Callable[[T], bool], *,
            kind: type[T], force: bool = False) -> T:
        """``work()``'s outputs (a ``kind`` record), or the recorded ones when this stage already ran on
        ``inputs`` and they are still there."""
        fp = fingerprint(inputs)
        done = self.records.get(name)
        recorded = _as(kind, done["outputs"]) if done and done["fingerprint"] == fp and not force else None
        if recorded is not None and still_there(recorded):
            log.info("[%s] skipped: already done for the same inputs and config (%s, %.0f s then)", name,
                     done["finished"], done["wall_s"])
            return recorded
        log.info("[%s] running", name)
        t0 = time.perf_counter()
        outputs = work()
        wall = time.perf_counter() - t0
        self.records[name] = {"fingerprint": fp, "outputs": asdict(outputs), "wall_s": round(wall, 1),
                              "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        self._save()
        self.ran.append(name)
        log.info("[%s] done in %.0f s", name, wall)
        return outputs


def _as(kind: type[T], outputs: Mapping[str, Any]) -> T | None:
    """A recorded stage's outputs as ``kind``; None when they were written in another shape (an older
    version of this program): the stage then runs again."""
    try:
        return kind(**outputs)
    except (TypeError, KeyError, ValueError):  # other fields, or a nested record of another shape
        return None
