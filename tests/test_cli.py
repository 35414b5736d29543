"""The command line: documented options, summaries, and the ingest benchmark's rows."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np

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
