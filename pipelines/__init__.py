"""Jobs: the Ray Job entry points (``python -m scmm_atlas.jobs.run | train | reprocess``) and the demo.

What ``ray job submit`` runs. They live in the package (not beside it) so that an installed
``scmm-atlas`` has them too; the pipeline's stages are :mod:`scmm_atlas.pipeline`.
"""

from __future__ import annotations

import os


def job_args(args: list[str]) -> list[str]:
    """Inside a Ray job (``RAY_ADDRESS`` set by the job supervisor), join that cluster."""
    if "--ray-address" not in args and os.environ.get("RAY_ADDRESS"):
        return [*args, "--ray-address", "auto"]
    return args
