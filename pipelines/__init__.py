"""Pipelines: the pipeline configs (``*.yaml`` here) and the Ray Job entry points that run them.

``python -m pipelines.run | train | reprocess | demo`` is what ``ray job submit`` runs: from a
checkout (``--working-dir .`` uploads this folder beside ``scmm_atlas/``) or from an installed wheel
(which ships this package beside ``scmm_atlas``). Each is the matching ``scmm-atlas`` command; the
stages themselves are :mod:`scmm_atlas.pipeline`. The run configs they name are in ``configs/``.
"""

from __future__ import annotations

import os


def job_args(args: list[str]) -> list[str]:
    """Inside a Ray job (``RAY_ADDRESS`` set by the job supervisor), join that cluster."""
    if "--ray-address" not in args and os.environ.get("RAY_ADDRESS"):
        return [*args, "--ray-address", "auto"]
    return args
