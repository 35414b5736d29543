"""``python -m pipelines.reprocess --store URI --model NAME [--retrain-if-new-fraction F]``

The scheduled job (a Kubernetes CronJob that submits a RayJob, or a cron / systemd timer running
``ray job submit``): maps the cells that have no results for the champion model yet and publishes
them; a run with nothing to do is a no-op. Same options as ``scmm-atlas reprocess``.
"""

from __future__ import annotations

import sys

from scmm_atlas.cli import main

from . import job_args

if __name__ == "__main__":
    sys.exit(main(["reprocess", *job_args(sys.argv[1:])]))
