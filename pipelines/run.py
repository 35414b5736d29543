"""``ray job submit --working-dir . -- python -m scmm_atlas.jobs.run --config YAML [--store URI] [--tracking-uri URI]``

The Ray Job entry point of the whole pipeline (ingest -> stats -> train + register -> infer ->
report), the same options as ``scmm-atlas run``; inside a Ray job it joins the job's cluster
(``RAY_ADDRESS`` is set by the job supervisor).
"""

from __future__ import annotations

import sys

from ..cli import main
from . import job_args

if __name__ == "__main__":
    sys.exit(main(["run", *job_args(sys.argv[1:])]))
