"""``ray job submit --working-dir . -- python -m pipelines.train --store URI [--config YAML] [KEY=VALUE ...]``

Training alone: the same options as ``scmm-atlas train``; inside a Ray job it joins the job's
cluster (``RAY_ADDRESS`` is set by the job supervisor).
"""

from __future__ import annotations

import sys

from scmm_atlas.cli import main

from . import job_args

if __name__ == "__main__":
    sys.exit(main(["train", *job_args(sys.argv[1:])]))
