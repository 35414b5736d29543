"""The demo (README command 1): the whole pipeline on the real CITE-seq data, then resumed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scmm_atlas.cli import main
from scmm_atlas.store import open_store


@pytest.mark.slow
def test_demo_runs_the_pipeline_on_real_data_and_prints_the_summary(data_dir: Path, tmp_path, monkeypatch,
                                                                     ray_session, capsys) -> None:
    from scmm_atlas.pipeline.demo import run_demo

    monkeypatch.chdir(tmp_path)  # the demo writes under ./runs/demo
    (tmp_path / "runs" / "demo" / "stale").mkdir(parents=True)
    lines = run_demo(data_dir, fresh=True, progress=False, overrides=("train.epochs=3", "train.warmup_epochs=1"))
    out = capsys.readouterr().out
    assert not (tmp_path / "runs" / "demo" / "stale").exists()
    assert lines[0] == "cells: 6,855; modalities: RNA (6,855 cells), ADT (6,855 cells)"
    assert re.search(r"training: 3 epochs in \d+ s", out)
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
    # the demo again: every stage is skipped, the same summary is printed
    assert run_demo(data_dir, progress=False, overrides=("train.epochs=3", "train.warmup_epochs=1")) == lines
    again = capsys.readouterr().out
    assert all(f"[{s}] skipped" in again for s in ("ingest", "stats", "train", "infer", "report"))


def test_demo_without_the_data_says_where_to_point_it(tmp_path, capsys) -> None:
    assert main(["demo", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: data: the real datasets are not here (pass "
                                               "--data or set SCMM_ATLAS_DATA)")
