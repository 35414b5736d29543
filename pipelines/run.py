"""``ray job submit --working-dir . -- python -m pipelines.run --config YAML [--store URI] [--tracking-uri URI]``

The Ray Job entry point of the whole pipeline (ingest -> stats -> train + register -> infer ->
report), the same options as ``scmm-atlas run``; inside a Ray job it joins the job's cluster
(``RAY_ADDRESS`` is set by the job supervisor).
"""

from __future__ import annotations

import sys

from pipelines import job_args
from scmm_atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *job_args(sys.argv[1:])]))
