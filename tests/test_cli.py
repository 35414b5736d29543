"""The command line: documented options, summaries, and the ingest benchmark's rows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scmm_atlas.cli import build_parser, main


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def test_ingest_help_documents_every_option(capsys) -> None:
    p = _subparser("ingest")
    for action in p._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    try:
        main(["ingest", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    text = capsys.readouterr().out
    for action in p._actions:
        for opt in action.option_strings:
            assert opt in text
    assert "MOD=FILE.h5ad" in text and ".h5mu" in text and "10x" in text


def test_ingest_then_info_and_stats(data_dir: Path, tmp_path: Path, capsys) -> None:
    src = data_dir / "a549_scicar"
    uri = tmp_path / "a549.soma"
    assert main(["ingest", "--store", str(uri), "--no-progress", "--label-key", "dex_time_h",
                 f"RNA={src / 'rna.h5ad'}", f"ATAC={src / 'atac.h5ad'}"]) == 0
    out = capsys.readouterr().out
    assert "ingested 2,641 cells" in out and "ATAC" in out
    assert main(["stats", "--store", str(uri), "--n-top-genes", "500", "--no-progress"]) == 0
    assert "RNA: 500 features selected" in capsys.readouterr().out
    assert main(["info", "--store", str(uri)]) == 0
    info = capsys.readouterr().out
    assert "2,641 cells" in info and "cell_type 3 values" in info
    assert main(["prepare", "--store", str(uri), "--no-progress", "--val-fraction", "0"]) == 0
    assert "wrote 2,641 training + 0 held-out cells (1 shards)" in capsys.readouterr().out
    assert main(["prepare", "--store", str(uri), "--val-fraction", "0"]) == 0
    assert "layout up to date (2,641 training + 0 held-out cells)" in capsys.readouterr().out
    assert main(["prepare", "--store", str(tmp_path / "nothing")]) == 2
    assert "nothing: uri: no store here" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_ingest_small(tmp_path: Path, capsys) -> None:
    out = tmp_path / "rows.json"
    assert main(["bench", "ingest", "--cells", "3000", "--genes", "200", "--workdir", str(tmp_path),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    systems = {(r["system"], r["cells"]) for r in rows}
    assert systems == {("scmm-atlas soma", 3000), ("scmm-atlas zarr", 3000), ("tiledbsoma.io.from_h5ad", 3000),
                       ("scmm-atlas soma", 6000), ("scmm-atlas zarr", 6000)}
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_rss_mib"] > 50
    assert "time_vs_from_h5ad" in capsys.readouterr().out


def test_generated_h5ad_is_realistic(tmp_path: Path) -> None:
    from scmm_atlas.bench.ingest import generate_h5ad

    path = generate_h5ad(tmp_path / "g.h5ad", 4000, 500, chunk=1500)
    a = ad.read_h5ad(path)
    assert a.shape == (4000, 500)
    density = a.X.nnz / (4000 * 500)
    assert 0.06 < density < 0.09
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() >= 1
    assert a.obs["cell_type"].nunique() == 20


@pytest.mark.slow
def test_loader_bench_measures_rate_mixing_and_the_memory_of_child_processes(tmp_path) -> None:
    import subprocess
    import time

    from scmm_atlas.bench.loader import batch_entropy, measure
    from scmm_atlas.bench.monitor import MARK_ENV, TreeMemory

    assert batch_entropy(np.zeros(256, dtype=int)) == 0.0
    assert abs(batch_entropy(np.arange(256) % 16) - 4.0) < 1e-9

    def stream():
        while True:
            time.sleep(0.01)
            yield np.arange(100) % 4

    result = measure(stream(), start=time.perf_counter(), warmup_s=0.05, window_s=0.2, windows=3)
    assert len(result["rates"]) == 3 and all(5_000 < r < 10_000 for r in result["rates"])  # 100 cells / ~11 ms
    assert result["mixing_bits"] == 2.0 and 0 < result["first_batch_s"] < 0.1
    # a child that marks, then starts a grandchild holding 200 MB: the tree's peak counts it, the mark's does not
    hog = ("import os, subprocess, sys; from scmm_atlas.bench.monitor import mark; mark(); "
           "subprocess.run([sys.executable, '-c', 'import numpy as np, time; a = np.ones(200 * 2**20 // 8); "
           "time.sleep(2.5)'])")
    mark_file = tmp_path / "mark"
    child = subprocess.Popen([sys.executable, "-c", hog], env={**os.environ, MARK_ENV: str(mark_file)})
    with TreeMemory(child.pid, every_s=0.05, pss_every_s=0.1, tree_every_s=0.1,
                    mark=str(mark_file)) as memory:
        child.wait()
    assert child.returncode == 0 and not mark_file.exists()
    assert memory.peak_kib > memory.before_mark() + 150 * 1024  # the grandchild's 200 MB are counted
    assert 0 < memory.cpu_frac < 0.05
