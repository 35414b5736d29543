"""``ray job submit --working-dir . -- python -m pipelines.run --config atlas [--store URI] [--tracking-uri URI]``

The whole pipeline (ingest -> stats -> train + register -> infer -> report) of a pipeline config
(a file, or the name of one in this folder), the same options as ``scmm-atlas run``; inside a Ray
job it joins the job's cluster (``RAY_ADDRESS`` is set by the job supervisor).
"""

from __future__ import annotations

import sys

from scmm_atlas.cli import main

from . import job_args

if __name__ == "__main__":
    sys.exit(main(["run", *job_args(sys.argv[1:])]))
