"""``scmm-atlas bench NAME``: ours and the peers on the same data in one run, a table, ``--json``.

Each bench module has ``run(args) -> list[dict]``: one flat row per system, ``system`` first.
Systems run in fresh subprocesses with the same environment (thread counts, denormal setting),
so that wall time and peak memory are each system's own; the memory of each system's process tree
is sampled from this (idle) parent process by :class:`~.monitor.TreeMemory`, the same way for
every system. Every bench prints the CPU model first: figures compare only within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .monitor import MARK_ENV, TreeMemory

BENCHES = {
    "ingest": "scmm_atlas.bench.ingest",
    "faithful": "scmm_atlas.bench.faithful",
    "step": "scmm_atlas.bench.step",
    "quality": "scmm_atlas.bench.quality",
    "sweep": "scmm_atlas.bench.sweep",
    "loader": "scmm_atlas.bench.loader",
    "train": "scmm_atlas.bench.train",
    "infer": "scmm_atlas.bench.infer",
    "scale": "scmm_atlas.bench.scale",
    "chaos": "scmm_atlas.bench.chaos",
    "mapping": "scmm_atlas.bench.mapping",
    "unpaired": "scmm_atlas.bench.unpaired",
    "cluster": "scmm_atlas.bench.cluster",
}


def run_child(system: str, module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module args`` in a fresh process; its last stdout line is a JSON object, returned
    with the memory of the child's process tree: ``peak_pss_mib``, ``monitor_cpu_frac`` (the sampler's
    cost) and, when the child called :func:`~.monitor.mark`, ``base_pss_mib`` (the peak before it)."""
    with tempfile.TemporaryDirectory(prefix="scmm-bench-") as tmp:
        mark = str(Path(tmp, "mark"))
        env = {**(env if env is not None else os.environ), MARK_ENV: mark}
        with open(Path(tmp, "out"), "w+") as out, open(Path(tmp, "err"), "w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=err, text=True, env=env)
            with TreeMemory(proc.pid, mark=mark) as memory:
                code = proc.wait()
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
    if code != 0:
        raise RuntimeError(f"{system} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(peak_pss_mib=memory.peak_kib / 1024, monitor_cpu_frac=memory.cpu_frac)
    if (base := memory.before_mark()) is not None:
        result["base_pss_mib"] = base / 1024
    return result


def _cpuinfo() -> tuple[str, str]:
    model, flags = "unknown CPU", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value + " "
    return model, flags


def vector_isa() -> str:
    """This CPU's widest vector extension: "AVX-512", "AVX2" or "no AVX2" (CPU speeds compare only within one)."""
    flags = _cpuinfo()[1]
    return "AVX-512" if " avx512f " in flags else "AVX2" if " avx2 " in flags else "no AVX2"


def machine() -> str:
    """The CPU model, its vector extensions, cores and the denormal setting, for the bench's header."""
    model, flags = _cpuinfo()
    amx = ", AMX" if " amx_tile " in flags else ""
    return (f"CPU: {model} ({vector_isa()}{amx}), {os.cpu_count()} logical CPUs; denormals not flushed "
            "(torch's default) in every system")


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            if 0 < abs(value) < 0.1:
                return f"{value:.4f}"
            return f"{value:.3f}" if abs(value) < 10 else f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
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
    print(machine(), flush=True)
    rows = module.run(args)
    if args.json:
        clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        Path(args.json).write_text(json.dumps({"rows": clean}, indent=2, allow_nan=False))
        print(f"rows written to {args.json}")
    return rows
