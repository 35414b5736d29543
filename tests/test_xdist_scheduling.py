"""The suite's own scheduler: a worker that dies costs its test, not the rest of the run (tests/xdist_scheduling.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CRASHING_SUITE = {
    "test_a.py": "import time\ndef test_a1(): time.sleep(0.5)\ndef test_a2(): pass\n",
    "test_b.py": "import os\ndef test_b1(): pass\ndef test_crash(): os.abort()\ndef test_after(): pass\n",
    "test_c.py": "def test_c1(): pass\n",
    "test_d.py": "def test_d1(): pass\ndef test_d2(): pass\n",
    "conftest.py": "from xdist_scheduling import pytest_xdist_make_scheduler  # noqa: F401\n",
}


def test_a_crashed_worker_fails_its_test_and_the_run_goes_on_to_the_end(tmp_path: Path) -> None:
    for name, text in CRASHING_SUITE.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                          "loadscope", "--no-loadscope-reorder", "-o", "addopts="], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # xdist's own scheduler hangs here
    assert "1 failed, 7 passed" in out.stdout, out.stdout[-2000:]
    assert "FAILED test_b.py::test_crash" in out.stdout
