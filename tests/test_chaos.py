"""Random SIGKILLs of the pipeline's processes (driver, Ray Train worker, read actor, inference actor),
then reruns: the outputs equal an uninterrupted run's and a reader never sees a partial version.
`scmm-atlas bench chaos --runs N` runs more, every kind in turn (README); CI runs one: a Ray Train
worker killed mid-training (seed 1), restarted by Ray Train from its last checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_pipeline_survives_random_kills(tmp_path) -> None:
    out = tmp_path / "chaos.json"
    env = {**os.environ, "SCMM_ATLAS_CHAOS_SEED": "1"}
    done = subprocess.run([sys.executable, "-m", "scmm_atlas.cli", "bench", "chaos", "--runs", "1", "--json",
                           str(out), "--workdir", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    row = json.loads(out.read_text())["rows"][0]
    assert row["system"] == "scmm-atlas" and set(row) >= {"kills_injected", "kills_survived", "bytes_lost",
                                                          "s3_faults_injected", "s3_ops_completed"}
    assert row["kills_injected"] == 1 and "killed train worker" in done.stdout, done.stdout
    assert row["kills_survived"] == row["kills_injected"] and row["bytes_lost"] == 0, done.stdout
