"""The end-to-end pipeline (resumable stages) and scheduled reprocessing of a growing store."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pytest
import yaml
from conftest import FAST_TRAIN, random_counts, write_h5ad

from scmm_atlas import results
from scmm_atlas.cli import main
from scmm_atlas.pipeline.config import load_pipeline
from scmm_atlas.pipeline.reprocess import reprocess
from scmm_atlas.pipeline.runner import run_pipeline
from scmm_atlas.store import open_store
from scmm_atlas.store.results import index

STAGES = ("ingest", "stats", "train", "infer", "report")


def write_dataset(folder: Path, n: int, seed: int, prefix: str) -> list[str]:
    """RNA (40 genes) + ADT (6 proteins) for ``n`` cells named ``prefix``0.. (inputs for ingest)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}{i}" for i in range(n)]
    rna = write_h5ad(folder / "rna.h5ad", random_counts(n, 40, seed), obs_names=names,
                     obs={"cell_type": [f"t{i % 2}" for i in range(n)]})
    adt = write_h5ad(folder / "adt.h5ad", random_counts(n, 6, seed + 1), obs_names=names,
                     var_names=[f"p{j}" for j in range(6)])
    return [f"RNA={rna}", f"ADT={adt}"]


def pipeline_config(tmp: Path, store: str, inputs: list[str], *, workdir: str | None = None,
                    report: bool = True, train: tuple[str, ...] = ()) -> Path:
    cfg = {"store": store, "workdir": workdir or str(tmp / "work"),
           "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
           "ingest": {"inputs": inputs, "label_key": "cell_type"}, "stats": {"n_top_genes": 30},
           "train": {"config": "atlas_cite", "overrides": [*FAST_TRAIN, "train.epochs=2", *train]},
           "infer": {"actors": 1}, "report": {"enabled": report, "max_cells": 500}}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(store: str, version: str | None = None) -> dict[str, object]:
    with results.open(store, version) as res:
        return {"joint": res.embeddings().to_numpy(), "adt": res.predictions("ADT", source="RNA").to_numpy(),
                "rna": res.predictions("RNA", source="ADT").to_numpy(), "ids": res.embeddings().index.to_numpy(),
                "programs": res.programs(), "version": res.version}


@pytest.fixture(scope="module")
def grown(tmp_path_factory, ray_session):
    """Dataset A through the pipeline, then dataset B appended: the store, tracking URI and A's results."""
    tmp = tmp_path_factory.mktemp("grow")
    store = str(tmp / "atlas.zarr")
    config = pipeline_config(tmp, store, write_dataset(tmp / "A", 300, 1, "A"))
    result = run_pipeline(load_pipeline(config), progress=False)
    assert result.ran == STAGES
    return {"tmp": tmp, "store": store, "config": config, "tracking": f"sqlite:///{tmp / 'mlflow.db'}",
            "before": snapshot(store), "published": result.published.record}


@pytest.mark.slow
def test_a_second_run_skips_every_finished_stage(grown, capsys) -> None:
    result = run_pipeline(load_pipeline(grown["config"]), progress=False)
    assert result.ran == ()
    assert result.published.record == grown["published"] and result.trained.version == "1"
    assert Path(grown["tmp"] / "work" / "report" / "index.html").exists()
    assert main(["run", "--config", str(grown["config"]), "--no-progress"]) == 0  # the CLI prints what happened
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"[{stage}] skipped: already done for the same inputs and config" in out
    assert "[train] running" not in out


def test_a_changed_stage_config_reruns_that_stage_and_what_depends_on_it(grown, tmp_path) -> None:
    cfg = yaml.safe_load(grown["config"].read_text())
    cfg["report"]["max_cells"] = 400
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    assert run_pipeline(load_pipeline(changed), progress=False).ran == ("report",)


def test_reprocess_maps_appended_cells_and_leaves_published_results_unchanged(grown, capsys) -> None:
    store, tracking, before = grown["store"], grown["tracking"], grown["before"]
    b_inputs = write_dataset(grown["tmp"] / "B", 150, 7, "B")
    assert main(["ingest", "--store", store, "--append", "--dataset", "B", "--no-progress", *b_inputs]) == 0
    with results.open(store) as res:  # before reprocessing: the published version covers A only
        assert len(res.embeddings()) == 300
    done = reprocess(store, "scmm-atlas", tracking=tracking, progress=False)
    assert (done.action, done.version, done.new_cells, done.record.n_cells) == ("extend", "1", 150, 450)
    after = snapshot(store)
    assert after["version"] == before["version"] == "1"
    assert len(after["joint"]) == 450 and list(after["ids"][300:]) == [f"B{i}" for i in range(150)]
    for key in ("joint", "adt", "rna"):  # A's rows: bit for bit what was published before
        assert np.array_equal(after[key][:300], before[key], equal_nan=True)
        assert np.isfinite(after[key][300:]).all()
    assert after["programs"].equals(before["programs"])
    # B mapped with the same model as A: a B cell's embedding matches a fresh full inference
    with open_store(store) as s:
        assert [r.n_cells for r in index(s)] == [450]
    plain = ad.read_zarr(f"{store}/results/{index(open_store(store))[0].entry}/cells")
    assert plain.n_obs == 450 and np.array_equal(plain.obsm["X_scmm"], after["joint"], equal_nan=True)
    # idempotent: nothing left to do, nothing written; the CLI says so
    args = ["reprocess", "--store", store, "--model", "scmm-atlas", "--tracking-uri", tracking, "--no-progress"]
    assert main(args) == 0
    assert "nothing to do: version 1 (champion) has results for all 450 cells" in capsys.readouterr().out
    assert np.array_equal(snapshot(store)["joint"], after["joint"])


@pytest.mark.slow
def test_reprocess_retrains_warm_started_when_enough_cells_are_new(grown) -> None:
    store, tracking = grown["store"], grown["tracking"]
    if len(snapshot(store)["joint"]) != 450:
        pytest.fail("runs after the append test (module order)")
    c_inputs = write_dataset(grown["tmp"] / "C", 300, 11, "C")
    assert main(["ingest", "--store", store, "--append", "--dataset", "C", "--no-progress", *c_inputs]) == 0
    done = reprocess(store, "scmm-atlas", tracking=tracking, retrain_if_new_fraction=0.3, progress=False)
    assert (done.action, done.version, done.new_cells) == ("retrain", "2", 750)
    client = mlflow.MlflowClient(tracking)
    assert str(client.get_model_version_by_alias("scmm-atlas", "champion").version) == "2"
    with open_store(store) as s:
        assert {r.version: r.n_cells for r in index(s)} == {"1": 450, "2": 750}
    latest = snapshot(store)
    assert latest["version"] == "2" and np.isfinite(latest["joint"]).all()
    # the new champion was trained on all 750 cells: no retrain, nothing to do
    again = reprocess(store, "scmm-atlas", tracking=tracking, retrain_if_new_fraction=0.3, progress=False)
    assert (again.action, again.version, again.new_cells) == ("nothing", "2", 0)


@pytest.mark.slow  # continues from the previous test's store (its published version 2)
def test_reprocess_recomputes_every_cell_when_the_champion_changed(grown, capsys) -> None:
    store, tracking = grown["store"], grown["tracking"]
    client = mlflow.MlflowClient(tracking)
    v1 = client.get_model_version("scmm-atlas", "1")
    v3 = client.create_model_version("scmm-atlas", v1.source, run_id=v1.run_id)  # a new champion, no results yet
    args = ["reprocess", "--store", store, "--model", "scmm-atlas", "--tracking-uri", tracking, "--no-progress"]
    try:
        client.set_registered_model_alias("scmm-atlas", "champion", v3.version)
        done = reprocess(store, "scmm-atlas", tracking=tracking, progress=False)
        assert (done.action, done.version, done.new_cells) == ("recompute", str(v3.version), 750)
        with open_store(store) as s:
            assert [(r.version, r.n_cells) for r in index(s)] == [("1", 450), ("2", 750), ("3", 750)]
        # same weights as version 1: its 450 published rows are reproduced
        np.testing.assert_allclose(snapshot(store, "3")["joint"][:450], snapshot(store, "1")["joint"], atol=1e-5)
        client.set_registered_model_alias("scmm-atlas", "champion", "1")  # roll back: v1 covers 450 of 750
        done = reprocess(store, "scmm-atlas", tracking=tracking, progress=False)
        assert (done.action, done.version, done.new_cells) == ("extend", "1", 300)
        with open_store(store) as s:  # extended in place: the latest version is still 3
            assert [(r.version, r.n_cells) for r in index(s)] == [("1", 750), ("2", 750), ("3", 750)]
        client.delete_registered_model_alias("scmm-atlas", "champion")
        assert main(args) == 2
        assert "no registered model 'scmm-atlas' with a 'champion' alias" in capsys.readouterr().err
    finally:
        client.set_registered_model_alias("scmm-atlas", "champion", "2")


def test_pipeline_config_errors_name_the_file_and_key(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"store": str(tmp_path / "x.zarr"), "train": {"epochs": 3}}))
    assert main(["run", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: train.epochs: unknown key (known: config, " \
        "num_workers, overrides, use_gpu)"
    missing = tmp_path / "nostore.yaml"
    missing.write_text(yaml.safe_dump({"store": str(tmp_path / "none.zarr")}))
    assert main(["run", "--config", str(missing)]) == 2
    assert "none.zarr: store: no store here, and the config has no ingest section" in capsys.readouterr().err
    assert main(["run", "--config", str(missing), "--force", "training"]) == 2
    assert "--force: training: no such stage" in capsys.readouterr().err
    pairs = tmp_path / "pairs.yaml"
    pairs.write_text(yaml.safe_dump({"store": str(tmp_path / "x.zarr"), "infer": {"pairs": ["RNA-ADT"]}}))
    assert main(["run", "--config", str(pairs)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {pairs}: infer: expected SOURCE:TARGET items, got ['RNA-ADT']"
