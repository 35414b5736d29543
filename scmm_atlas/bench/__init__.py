"""``scmm-atlas bench NAME``: ours and the peers on the same data in one run, a table, ``--json``.

Each bench module has ``run(args) -> list[dict]``: one flat row per system, ``system`` first.
Systems run in fresh subprocesses with the same environment (thread counts, denormal setting),
so that wall time and peak RSS are each system's own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCHES = {
    "ingest": "scmm_atlas.bench.ingest",
    "faithful": "scmm_atlas.bench.faithful",
    "step": "scmm_atlas.bench.step",
    "quality": "scmm_atlas.bench.quality",
    "loader": "scmm_atlas.bench.loader",
    "train": "scmm_atlas.bench.train",
    "infer": "scmm_atlas.bench.infer",
}


def run_child(system: str, module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module args`` in a fresh process; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env if env is not None else os.environ.copy(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return "-" if value is None else str(value)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> list[dict]:
    module = importlib.import_module(BENCHES[args.name])
    rows = module.run(args)
    if args.json:
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        Path(args.json).write_text(json.dumps({"rows": clean}, indent=2, allow_nan=False))
        print(f"rows written to {args.json}")
    return rows
