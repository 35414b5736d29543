"""``python -m pipelines.demo``: the demo (README command 1) as a job, the same options as
``scmm-atlas demo`` (:mod:`scmm_atlas.pipeline.demo` runs it on ``pbmc_demo.yaml`` of this folder)."""

from __future__ import annotations

import sys

from scmm_atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
