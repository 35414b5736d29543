"""``scmm-atlas infer / query / report`` from the command line on a real store and a real local Ray."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
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


def test_report_figures(published, tmp_path) -> None:
    from scmm_atlas.evaluate.report import report

    uri, _ = published
    done = report(uri, tmp_path / "rep", max_cells=600)
    names = {p.rsplit("/", 1)[-1] for p in done["figures"]}
    assert names == {"umap.png", "programs_RNA.png", "programs_ADT.png", "ADT_clusters.png", "ADT_scatter.png"}
    for path in done["figures"]:
        with Image.open(path) as img:
            assert img.size[0] > 300 and img.size[1] > 200
            assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas
    page = (tmp_path / "rep" / "index.html").read_text()
    assert all(f'src="{n}"' in page for n in names)
    assert "markers of each cluster" in page and len(pd.read_csv(tmp_path / "rep" / "markers.csv")) > 0
    assert done["numbers"]["cells_shown"] == 600 and done["numbers"]["leiden_clusters"] >= 2
    assert done["mlflow_run"] is None  # a model folder: nothing to log to


@pytest.mark.slow
def test_report_umap_at_atlas_like_sizes(tmp_path) -> None:
    """More cells than scanpy's exact-neighbour cut-off (~10,000 cells, where its approximate path
    failed with scipy 1.17): the report's UMAP and clusters still come out."""
    from scmm_atlas.evaluate.report import _umap

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3_000)
    emb = rng.normal(size=(12_000, 8)) + labels[:, None] * 4.0
    clusters = _umap(emb, pd.Series(labels.astype(str), name="cell_type"), tmp_path / "umap.png", seed=0)
    assert clusters.shape == (12_000,) and len(np.unique(clusters)) >= 4
    assert (tmp_path / "umap.png").stat().st_size > 10_000
