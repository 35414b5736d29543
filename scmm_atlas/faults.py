"""Fault injection for the fault-tolerance tests, kept out of every config a user writes.

The plan comes from the environment variable ``SCMM_ATLAS_FAULTS`` (``train_step=42``,
``infer_block=2``, ``infer_block_s=3``, ``train_batch_ms=200``, comma-separated), read by the driver, which
hands it to its workers inside their job: Ray's workers need not share the driver's environment. Unset: no faults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import InputError
from .settings import settings

ENV = "SCMM_ATLAS_FAULTS"


@dataclass(frozen=True)
class FaultPlan:
    train_step: int = 0  # the last training worker raises once at this global optimizer step (0: never)
    infer_block: int = -1  # the inference worker handed this block raises (-1: never)
    infer_block_s: int = 0  # every inference block takes at least this many seconds (a host can be killed mid-run)
    train_batch_ms: int = 0  # every training minibatch takes this many ms longer (a host can leave and return mid-run)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultPlan:
        text = (settings().faults if environ is None else environ.get(ENV, "")).strip()
        known = sorted(f.name for f in fields(cls))
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in known or not value.strip().lstrip("-").isdigit():
                raise InputError(ENV, item, f"expected KEY=INTEGER items, KEY one of {', '.join(known)}")
            values[key.strip()] = int(value)
        return cls(**values)
