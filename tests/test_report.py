"""``scmm-atlas infer / query / report`` from the command line on a real store and a real local Ray."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import debian_packages
from PIL import Image

from scmm_atlas.cli import main
from scmm_atlas.store import open_store
from scmm_atlas.store.results import open_results


@pytest.fixture(scope="module")
def published(ray_session, tmp_path_factory):
    """A planted Zarr store with a model folder (meta.json + weights) inferred and published via the CLI."""
    from conftest import make_planted_stores, write_model_folder

    tmp = tmp_path_factory.mktemp("report")
    uri = str(make_planted_stores(tmp, backends=("zarr",))["zarr"])
    write_model_folder(uri, tmp / "model")
    assert main(["infer", "--store", uri, "--model", str(tmp / "model"), "--version", "7", "--top-n", "4",
                 "--no-progress"]) == 0
    return uri, tmp


def test_query_outputs(published, tmp_path, capsys) -> None:
    uri, _ = published
    assert main(["query", "versions", "--store", uri]) == 0
    assert "7" in capsys.readouterr().out
    assert main(["query", "embeddings", "--store", uri, "--where", "batch=b2", "--out", str(tmp_path / "e.csv")]) == 0
    emb = pd.read_csv(tmp_path / "e.csv", index_col=0)
    assert len(emb) == 333 and emb.index[0] == "c2" and list(emb.columns) == ["z0", "z1", "z2"]
    with open_store(uri) as store:
        np.testing.assert_allclose(emb.to_numpy(), open_results(store).embedding("joint")[2::3], rtol=1e-5)
    assert main(["query", "predictions", "--store", uri, "--target", "ADT", "--ids", "c999,c1",
                 "--out", str(tmp_path / "p.parquet")]) == 0
    pred = pd.read_parquet(tmp_path / "p.parquet")
    assert list(pred.index) == ["c1", "c999"] and pred.shape[1] == 4 and (pred.to_numpy() > 0).all()
    assert main(["query", "embeddings", "--store", uri, "--dim", "1", "--out", str(tmp_path / "e.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "e.h5ad").shape == (1000, 1)
    assert main(["query", "programs", "--store", uri, "--dim", "0", "--modality", "ADT"]) == 0
    out = capsys.readouterr().out
    assert "ADT" in out and "rho" in out
    assert main(["query", "predictions", "--store", uri, "--target", "ADT", "--out", str(tmp_path / "x.txt")]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert main(["query", "predictions", "--store", uri, "--target", "GEX"]) == 2
    assert "predicts no GEX" in capsys.readouterr().err
    assert main(["query", "markers", "--store", uri, "--top", "3", "--out", str(tmp_path / "m.csv")]) == 0
    marks = pd.read_csv(tmp_path / "m.csv")
    assert set(marks["level"]) == {"cluster"}  # the planted store has no labels to sub-cluster
    assert set(marks["modality"]) == {"RNA", "ADT"} and marks["rank"].max() == 3
    assert marks["pval_adj"].between(0, 1).all() and marks["frac_in"].between(0, 1).all()


@pytest.fixture(scope="module")
def report_page(published, tmp_path_factory) -> dict:
    """One report of the published store (600 of its 1,000 cells), shared by the checks of its files and page."""
    from scmm_atlas.evaluate.report import report

    uri, _ = published
    return report(uri, tmp_path_factory.mktemp("page") / "rep", max_cells=600)


FIGURES = {"umap.png", "programs_RNA.png", "programs_ADT.png", "ADT_clusters.png", "ADT_scatter.png"}


def test_report_figures(report_page) -> None:
    done = report_page
    folder = Path(done["html"]).parent
    names = {p.rsplit("/", 1)[-1] for p in done["figures"]}
    assert names == FIGURES
    for path in done["figures"]:
        with Image.open(path) as img:
            assert img.size[0] > 300 and img.size[1] > 200
            assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
    page = (folder / "index.html").read_text()
    assert all(f'src="{n}"' in page for n in names)
    assert "markers of each cluster" in page and len(pd.read_csv(folder / "markers.csv")) > 0
    assert done["numbers"]["cells_shown"] == 600 and done["numbers"]["leiden_clusters"] >= 2
    assert done["mlflow_run"] is None and done["mlflow_url"] is None  # a model folder: nothing to log to


def test_report_page_reads(report_page, published) -> None:
    """Names, not paths, in the title; formatted numbers; a caption per figure; the per-protein table."""
    uri, _ = published
    done = report_page
    page = Path(done["html"]).read_text()
    assert "<title>cells.zarr · results 7 · scmm-atlas report</title>" in page and "<h1>cells.zarr</h1>" in page
    assert f"<code>{uri}</code>" in page and f"<h1>{uri}" not in page  # the full URI only in the details line
    assert "600 of 1,000" in page and "_median_pearson" not in page
    median = done["numbers"]["ADT_from_RNA_median_pearson"]
    assert f"median r = {median:.3f}" in page and str(median) not in page
    assert page.count("<figcaption>") == len(FIGURES) and page.count("<figcaption><b>") == len(FIGURES)
    assert "nothing was logged to MLflow" in page and "<script" not in page and "http" not in page  # offline
    table = pd.read_csv(Path(done["html"]).parent / "ADT_pearson.csv")
    assert sorted(table["feature"]) == ["p0", "p1", "p2", "p3"]
    r = table["pearson_r"].dropna().to_numpy()
    assert (np.diff(r) <= 0).all() and table["pearson_r"].notna().cumprod().sum() == len(r)  # best first, NaN last
    assert np.isclose(np.nanmedian(table["pearson_r"]), median)
    assert all(f"<td class='num'>{v:.3f}</td>" in page for v in r)


def test_report_links_the_mlflow_run(tmp_path) -> None:
    """The run of a ``runs:/`` model is found before the page is written; a local store's page says how
    to serve it and links to mlflow ui's default address, a server's page links to the server."""
    import mlflow

    from scmm_atlas.evaluate.page import Page
    from scmm_atlas.evaluate.tracking import MlflowRun, find_run, log_artifacts
    from scmm_atlas.store.results.spec import ResultRecord

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    experiment = client.create_experiment("atlas", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    record = ResultRecord(entry="v3-0123abcd", version="3", model_uri=f"runs:/{run_id}/model",
                          time="2026-01-02T03:04:05+00:00", n_cells=6855, pairs=(), library_size=None)
    run = find_run(record, tracking)
    assert run is not None and (run.run_id, run.experiment_id) == (run_id, experiment)
    assert find_run(replace(record, model_uri="runs:/0123abc/model"), tracking) is None
    assert find_run(replace(record, model_uri="/models/folder"), tracking) is None
    (tmp_path / "index.html").write_text("page")
    assert log_artifacts(run, [tmp_path / "index.html"])
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/index.html"]
    page = Page("s3://bucket/atlas/pbmc.soma", "soma", 7000, record, {"cells_shown": 6855, "leiden_clusters": 21},
                "label", 5, None, run=run).html()
    assert f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}" in page
    assert f"mlflow ui --backend-store-uri {tracking}" in page and "6,855 of 6,855" in page
    assert "<h1>pbmc.soma</h1>" in page and "2026-01-02 03:04 UTC" in page
    server = MlflowRun(None, "r1", "4", "https://mlflow.example.org/")
    assert server.links() == ("https://mlflow.example.org/#/experiments/4/runs/r1", None)
    assert MlflowRun(None, "r1", "4", "databricks").links() == (None, None)


def test_report_escapes_what_the_store_says(ray_session, tmp_path) -> None:
    """Markup in a store (a cell-type label, a protein's name) reaches the page as text: the template
    escapes every value, so a store cannot run script in the reader's browser."""
    from conftest import random_counts, write_h5ad, write_model_folder

    from scmm_atlas.evaluate.report import report
    from scmm_atlas.ingest.write import IngestOptions, ingest

    evil, n = "<script>alert(1)</script>", 300
    write_h5ad(tmp_path / "rna.h5ad", random_counts(n, 20, 1),
               obs={"donor": [f"b{i % 3}" for i in range(n)], "kind": [evil if i % 2 else "T" for i in range(n)]})
    write_h5ad(tmp_path / "adt.h5ad", random_counts(n, 4, 2), var_names=["p0", "p1", "p2", evil])
    uri = str(tmp_path / "cells.zarr")
    ingest(uri, [f"RNA={tmp_path / 'rna.h5ad'}", f"ADT={tmp_path / 'adt.h5ad'}"],
           IngestOptions(batch_key="donor", label_key="kind", progress=False))
    write_model_folder(uri, tmp_path / "model")
    assert main(["infer", "--store", uri, "--model", str(tmp_path / "model"), "--no-progress"]) == 0
    page = Path(report(uri, tmp_path / "rep", max_cells=n)["html"]).read_text()
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page  # the protein, in the per-protein table
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;/" in page  # its label's sub-clusters, in the markers table
    assert "<script" not in page and "alert(1)</" not in page


@pytest.mark.slow
def test_report_umap_at_atlas_like_sizes(tmp_path) -> None:
    """More cells than scanpy's exact-neighbour cut-off (~10,000 cells, where its approximate path
    failed with scipy 1.17): the report's UMAP and clusters still come out."""
    from scmm_atlas.evaluate.figures import umap

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3_000)
    emb = rng.normal(size=(12_000, 8)) + labels[:, None] * 4.0
    clusters = umap(emb, pd.Series(labels.astype(str), name="cell_type"), tmp_path / "umap.png", seed=0)
    assert clusters.shape == (12_000,) and len(np.unique(clusters)) >= 4
    assert (tmp_path / "umap.png").stat().st_size > 10_000


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's Chromium and its chromedriver (installed with apt when missing: the browser test must run,
    not skip). Selenium gets both paths, so Selenium Manager downloads nothing."""
    debian_packages([CHROMIUM, CHROMEDRIVER], ["chromium", "chromium-driver"], "the report's browser test")
    return CHROMIUM, CHROMEDRIVER


def test_report_in_headless_chromium(report_page, chromium) -> None:
    """The page as a reader gets it: it loads offline, every figure decodes, nothing errs in the console,
    the CSS applies and the per-protein table shows formatted r, best first."""
    import re

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromium[1]), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(report_page["html"]).resolve().as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        assert driver.title.startswith("cells.zarr") and driver.find_element(By.TAG_NAME, "h1").text == "cells.zarr"
        images = driver.execute_script("return Array.from(document.images, i => "
                                       "[i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])")
        assert {src for src, *_ in images} == FIGURES
        assert all(done and w > 0 and h > 0 for _, done, w, h in images), images
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        captions = driver.find_elements(By.TAG_NAME, "figcaption")
        assert len(captions) == len(FIGURES) and all(len(c.text) > 80 for c in captions)
        table = driver.find_element(By.ID, "per-protein-table")
        assert table.value_of_css_property("border-collapse") == "collapse"  # the inline CSS applied
        rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in table.find_elements(By.TAG_NAME, "tr")]
        assert len(rows) == 5 and rows[0] == []  # the header, then the store's four proteins
        assert all(re.fullmatch(r"-?\d\.\d{3}|–", row[2]) for row in rows[1:]), rows
        r = [float(row[2]) for row in rows[1:] if row[2] != "–"]
        assert r == sorted(r, reverse=True)
        driver.execute_script("console.error('probe')")  # the console check sees errors when there are any
        assert any("probe" in e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE")
    finally:
        driver.quit()
