"""``ray job submit --working-dir . -- python -m pipelines.train --store URI [--config YAML] [KEY=VALUE ...]``

The Ray Job entry point for training: the same options as ``scmm-atlas train``; inside a Ray job
it joins the job's cluster (``RAY_ADDRESS`` is set by the job supervisor).
"""

from __future__ import annotations

import os
import sys

from scmm_atlas.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--ray-address" not in args and os.environ.get("RAY_ADDRESS"):
        args += ["--ray-address", "auto"]
    sys.exit(main(["train", *args]))
