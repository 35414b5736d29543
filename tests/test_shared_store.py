"""The pipeline and queries on a shared S3 store (moto's server on 127.0.0.1), concurrent readers
during a publish, and that no credential reaches logs, MLflow or anything written."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import TEST_SECRET
from test_pipeline import pipeline_config, write_dataset

from scmm_atlas import results
from scmm_atlas.cli import main
from scmm_atlas.pipeline.config import load_pipeline
from scmm_atlas.pipeline.runner import run_pipeline


@pytest.fixture(scope="module")
def s3_atlas(s3_server, tmp_path_factory, ray_session):
    """The pipeline on ``s3://BUCKET/atlas`` (a TileDB-SOMA store), its stage records on S3 too."""
    tmp = tmp_path_factory.mktemp("s3atlas")
    bucket = f"shared-{time.time_ns()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3_server)
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
        store = f"s3://{bucket}/atlas"
        # stage records on S3; Ray Train's checkpoints local (its controller, started before this test set
        # the moto endpoint, could not reach it: on a cluster the endpoint is in every node's environment)
        config = pipeline_config(tmp, store, write_dataset(tmp / "A", 240, 3, "A"), workdir=f"s3://{bucket}/work",
                                 train=(f"distributed.storage_path={tmp / 'ray'}",))
        assert main(["run", "--config", str(config), "--no-progress"]) == 0
        yield {"tmp": tmp, "bucket": bucket, "store": store, "config": config, "endpoint": s3_server,
               "tracking": f"sqlite:///{tmp / 'mlflow.db'}"}


@pytest.fixture()
def s3_env(s3_atlas, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_atlas["endpoint"])
    return s3_atlas


@pytest.mark.slow
def test_pipeline_on_s3_records_its_stages_there_and_resumes(s3_env) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_env["endpoint"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_env["bucket"], Prefix="work/")["Contents"]}
    assert keys == {"work/pipeline.json"}
    assert run_pipeline(load_pipeline(s3_env["config"]), progress=False).ran == ()  # every stage skipped


def test_query_reads_the_shared_store(s3_env, tmp_path, capsys) -> None:
    out = tmp_path / "emb.parquet"
    assert main(["query", "embeddings", "--store", s3_env["store"], "--where", "cell_type=t1", "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 120 and table.shape[1] == 20 and np.isfinite(table.to_numpy()).all()
    assert all(int(i[1:]) % 2 == 1 for i in table.index)
    assert main(["query", "predictions", "--store", s3_env["store"], "--target", "ADT", "--ids", "A3,A4"]) == 0
    printed = capsys.readouterr().out
    assert "A3" in printed and "A4" in printed and "p5" in printed


def _reader(store: str, seen: list[tuple[str, int]], errors: list[BaseException], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with results.open(store) as res:
                n = res.reader.n_obs
                emb = res.embeddings().to_numpy()
                adt = res.predictions("ADT", source="RNA").to_numpy()
                assert emb.shape == (n, 20) and adt.shape == (n, 6), (emb.shape, adt.shape)
                assert np.isfinite(emb).all() and np.isfinite(adt).all(), f"version {res.version} incomplete"
                seen.append((res.version, n))
        except BaseException as exc:  # reported by the test
            errors.append(exc)
            return


@pytest.mark.slow
def test_two_readers_see_only_complete_versions_while_inference_publishes(s3_env) -> None:
    store = s3_env["store"]
    stop, errors = threading.Event(), []
    seen: list[list[tuple[str, int]]] = [[], []]
    readers = [threading.Thread(target=_reader, args=(store, seen[i], errors, stop)) for i in range(2)]
    for t in readers:
        t.start()
    try:
        for label in ("1b", "1c"):  # two more versions, published while the readers read
            assert main(["infer", "--store", store, "--model", "models:/scmm-atlas/1", "--tracking-uri",
                         s3_env["tracking"], "--version", label, "--actors", "1", "--no-progress"]) == 0
        time.sleep(1.0)
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=120)
    assert not errors, errors[0]
    versions = {v for reads in seen for v, _ in reads}
    assert all(len(reads) >= 2 for reads in seen), [len(r) for r in seen]
    assert versions <= {"1", "1b", "1c"} and "1c" in versions, versions


def _grep(root: Path, secret: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits


def test_no_credential_reaches_logs_mlflow_params_or_anything_written(s3_env) -> None:
    import ray

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret == TEST_SECRET  # the run above had it set, and used S3 with it
    needle = secret.encode()
    s3 = boto3.client("s3", endpoint_url=s3_env["endpoint"])
    objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_env["bucket"])
               for o in page.get("Contents", [])]
    assert len(objects) > 50
    leaked = [k for k in objects if needle in s3.get_object(Bucket=s3_env["bucket"], Key=k)["Body"].read()]
    assert not leaked, leaked
    assert not _grep(s3_env["tmp"], needle)  # MLflow's database and artifacts, the report, inputs
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert (session / "logs").is_dir() and not _grep(session / "logs", needle)
    client = mlflow.MlflowClient(s3_env["tracking"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(secret in v for v in values)
        assert any(v.startswith("s3://") for v in run.data.params.values())  # the store URI is logged, not keys
