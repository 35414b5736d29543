"""The demo (README command 1): the whole pipeline on the real CITE-seq data, then resumed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scmm_atlas.cli import main
from scmm_atlas.store import open_store


@pytest.mark.slow
def test_demo_runs_the_pipeline_on_real_data_and_prints_the_summary(data_dir: Path, tmp_path, monkeypatch,
                                                                     ray_session) -> None:
    from scmm_atlas.pipeline.demo import run_demo

    monkeypatch.chdir(tmp_path)  # the demo writes under ./runs/demo
    (tmp_path / "runs" / "demo" / "stale").mkdir(parents=True)
    quick = ("train.epochs=3", "train.warmup_epochs=1")
    demo = run_demo(data_dir, fresh=True, progress=False, overrides=quick)
    lines, out = demo.lines, "\n".join(demo.lines)
    assert not (tmp_path / "runs" / "demo" / "stale").exists()
    assert demo.pipeline.ran == ("ingest", "stats", "train", "infer", "report")
    assert lines[0] == "cells: 6,855; modalities: RNA (6,855 cells), ADT (6,855 cells)"
    assert re.search(r"training: 3 epochs in \d+ s", out) and demo.pipeline.trained.epochs == 3
    ari = re.search(r"7 labels\): ARI (0\.\d+), NMI (0\.\d+) at the best-NMI resolution", out)
    assert ari and float(ari.group(1)) > 0.2 and float(ari.group(2)) > 0.3  # 3 epochs: rough, not random
    fair = re.search(r"15-NN accuracy (0\.\d+); bio-conservation (0\.\d+)", out)
    assert fair and float(fair.group(1)) > 0.7 and 0.3 < float(fair.group(2)) < 1  # random labels: ~0.4 / ~0.2
    held = re.search(r"RNA -> ADT on (\d+) held-out cells: mean Pearson r (0\.\d+)", out)
    assert held and 500 < int(held.group(1)) < 900 and float(held.group(2)) > 0.15  # random: ~0
    assert len(re.findall(r"program of dim \d+: RNA up: \S+, \S+, \S+; RNA down: ", out)) == 3
    report = tmp_path / "runs" / "demo" / "report" / "index.html"
    assert report.exists() and f"report: {report}" in out
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in out and "--host 127.0.0.1" in out
    with open_store(tmp_path / "runs" / "demo" / "pbmc10k_cite.soma") as store:
        assert store.modalities == ["RNA", "ADT"] and store.info.selection["RNA"]["n_selected"] == 4000
    # the demo again: every stage is skipped, the same summary
    again = run_demo(data_dir, progress=False, overrides=quick)
    assert again.lines == lines and again.pipeline.ran == ()


def test_demo_without_the_data_says_where_to_point_it(tmp_path, capsys) -> None:
    assert main(["demo", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: data: the real datasets are not here (pass "
                                               "--data or set SCMM_ATLAS_DATA)")
