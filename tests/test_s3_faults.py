"""Object storage faults: a fault-injecting proxy between the project and moto's S3 server.

Ingest, inference and queries through 3-10% of requests failing (500 InternalError, 503 SlowDown,
resets, timeouts) give the same store and results as without faults; a write to an existing store
that cannot complete fails and leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import botocore.config
import botocore.exceptions
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import random_counts, write_h5ad

from scmm_atlas import results
from scmm_atlas.bench.s3faults import FaultyProxy
from scmm_atlas.infer.stage import InferConfig, infer
from scmm_atlas.infer.trained import TrainedModel
from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.model import MMVAE, MMVAEConfig
from scmm_atlas.store import open_store
from scmm_atlas.store.results import open_results

N_CELLS = 300
# a short read timeout, so that a held 'timeout' fault is a real client timeout and costs little
RETRY_ENV = {"SCMM_ATLAS_S3_MAX_ATTEMPTS": "10", "SCMM_ATLAS_S3_READ_TIMEOUT": "0.3"}
# What a fault costs sets the rates: s3fs backs off ~0.5 s (botocore's standard mode) and a Zarr store takes
# ~10 requests per array (~3,300 here), so 3% of them is ~100 faults; TileDB backs off 50 ms but holds a
# 'timeout' fault to its close (its request timeout has whole seconds) and retries SlowDown after 1.5 s
# whatever its settings, so that kind is left out with it (s3fs gets it)
ZARR_FAULTS = {"rate": 0.03, "hold_s": 0.6}
SOMA_FAULTS = {"rate": 0.1, "hold_s": 0.6, "kinds": ("500", "reset", "timeout")}
INFER = InferConfig(block_cells=128, batch_size=100, top_n=3, executor="local", actors=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("s3faults")
    rna = write_h5ad(tmp / "rna.h5ad", random_counts(N_CELLS, 30, 1),
                     obs={"donor": [f"b{i % 3}" for i in range(N_CELLS)]})
    adt = write_h5ad(tmp / "adt.h5ad", random_counts(N_CELLS, 5, 2), var_names=[f"p{j}" for j in range(5)])
    return [f"RNA={rna}", f"ADT={adt}"]


@pytest.fixture()
def faulty_env(s3_bucket, monkeypatch):
    for name, value in RETRY_ENV.items():
        monkeypatch.setenv(name, value)
    return s3_bucket


def _contents(uri: str) -> dict[str, object]:
    """Everything a store holds, read through the project's reader."""
    with open_store(uri) as store:
        out: dict[str, object] = {"n_obs": store.n_obs, "obs": store.obs()}
        for mod in store.modalities:
            out[f"var/{mod}"] = store.var(mod)
            out[f"X/{mod}"] = store.read(mod, 0, store.n_obs)
    return out


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(got[key], value, check_dtype=False, check_categorical=False)
        elif hasattr(value, "toarray"):
            assert (got[key] != value).nnz == 0, key
        else:
            assert got[key] == value, key


@contextlib.contextmanager
def _ingested_through_faults(monkeypatch: pytest.MonkeyPatch, uri: str, inputs: list[str], opts: IngestOptions, *,
                             seed: int, faults: dict) -> Iterator[tuple[FaultyProxy, tuple[int, int]]]:
    """A faulty proxy in front of moto and ``inputs`` ingested through it: (the proxy, its (faults, ops) of
    the ingest); the endpoint stays the proxy's inside the block."""
    with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], seed=seed, **faults) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        ingest(uri, inputs, opts)
        yield proxy, (proxy.faults_injected, proxy.ops_completed)


def _trained(uri: str) -> TrainedModel:
    with open_store(uri) as store:
        features = {m: [str(f) for f in store.feature_names(m)] for m in store.modalities}
    torch.manual_seed(0)
    mods = {m: {"n_features": len(f), "hidden": 8, "n_layers": 1} for m, f in features.items()}
    config = MMVAEConfig(modalities=mods, latent_dim=3, n_batches=3)
    return TrainedModel(config=config, state=MMVAE(config).state_dict(), features=features, batches=["b0", "b1", "b2"],
                        version="1", uri="test://1")


def _outputs(uri: str) -> dict[str, np.ndarray]:
    with open_store(uri) as store:
        reader = open_results(store)
        out = {"joint": reader.embedding("joint"), "ADT_from_RNA": reader.prediction("RNA", "ADT")}
    with results.open(uri) as res:
        b1 = res.embeddings(where={"batch": ["b1"]})
        out["query"], out["query_ids"] = b1.to_numpy(), b1.index.to_numpy()
    return out


def _s3(endpoint: str, attempts: int = 1, **config: object):
    retries = {"total_max_attempts": attempts, "mode": "standard"}
    return boto3.client("s3", endpoint_url=endpoint, config=botocore.config.Config(retries=retries, **config))


def test_proxy_forwards_requests_unchanged_and_injects_the_faults_asked(s3_server, s3_bucket) -> None:
    big = os.urandom(11 << 20)  # a three-part multipart upload (5 MiB parts)
    with FaultyProxy(s3_server, rate=0.0) as proxy:
        s3 = _s3(proxy.url, 1)
        s3.put_object(Bucket=s3_bucket, Key="small", Body=b"hello world")
        s3.upload_fileobj(io.BytesIO(big), s3_bucket, "big", Config=boto3.s3.transfer.TransferConfig(
            multipart_threshold=5 << 20, multipart_chunksize=5 << 20, use_threads=False))
        conn = http.client.HTTPConnection(proxy.url.removeprefix("http://"))  # a chunked body, as aws-chunked uses
        conn.request("PUT", f"/{s3_bucket}/chunked", body=iter([b"abc", b"defgh"]), encode_chunked=True)
        assert conn.getresponse().read() == b""
        conn.close()
        assert s3.head_object(Bucket=s3_bucket, Key="big")["ContentLength"] == len(big)
        assert s3.get_object(Bucket=s3_bucket, Key="big", Range="bytes=7-5000000")["Body"].read() == big[7:5000001]
        assert s3.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == big
        assert s3.get_object(Bucket=s3_bucket, Key="chunked")["Body"].read() == b"abcdefgh"
        # 1 put, 3 multipart calls + 3 parts, 1 chunked put, head, 2 gets, 1 get
        assert _eventually(lambda: (proxy.ops_completed, proxy.faults_injected), (11, 0)) == (11, 0)

    for kind, code in (("500", "InternalError"), ("503", "SlowDown")):
        with FaultyProxy(s3_server, rate=1.0, kinds=[kind]) as proxy:
            s3 = _s3(proxy.url, 3)
            with pytest.raises(botocore.exceptions.ClientError) as err:
                s3.get_object(Bucket=s3_bucket, Key="small")
            assert err.value.response["Error"]["Code"] == code, err.value  # the XML body was parsed: retried
            assert (proxy.faults_injected, proxy.ops_completed, proxy.faults_by_kind) == (3, 0, {kind: 3})
    with FaultyProxy(s3_server, rate=1.0, kinds=["reset"]) as proxy:
        with socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(f"GET /{s3_bucket}/small HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            with pytest.raises(ConnectionResetError):  # an RST, not an orderly close
                sock.recv(1)
        with pytest.raises(botocore.exceptions.ConnectionClosedError):
            _s3(proxy.url, 2).get_object(Bucket=s3_bucket, Key="small")
        assert proxy.faults_injected == 3
    with FaultyProxy(s3_server, rate=1.0, kinds=["timeout"], hold_s=5.0) as proxy:
        t0 = time.perf_counter()
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            _s3(proxy.url, 1, read_timeout=0.3).get_object(Bucket=s3_bucket, Key="small")
        assert time.perf_counter() - t0 < 3 and proxy.faults_injected == 1  # a timeout, not the whole hold

    # only the writes fail: a store stays readable; the rate can change while the proxy runs
    with FaultyProxy(s3_server, rate=1.0, kinds=["500"], methods=["PUT", "POST", "DELETE"]) as proxy:
        s3 = _s3(proxy.url, 1)
        assert s3.get_object(Bucket=s3_bucket, Key="small")["Body"].read() == b"hello world"
        with pytest.raises(botocore.exceptions.ClientError, match="InternalError"):
            s3.put_object(Bucket=s3_bucket, Key="small", Body=b"changed")
        proxy.rate = 0.0
        s3.put_object(Bucket=s3_bucket, Key="other", Body=b"x")
        assert _eventually(lambda: (proxy.faults_injected, proxy.ops_completed), (1, 2)) == (1, 2)


def _eventually(read, want, timeout_s: float = 5.0):
    """The proxy (its own process) counts a request once the response is sent, which can be just after the
    client has read it: poll the counters briefly instead of racing them. Returns the last value read."""
    deadline = time.monotonic() + timeout_s
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def test_retry_settings_come_from_the_environment(monkeypatch) -> None:
    from scmm_atlas.errors import InputError
    from scmm_atlas.store.uri import fsspec_options, tiledb_config

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for name in (*RETRY_ENV, "SCMM_ATLAS_S3_CONNECT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert fsspec_options() == {"config_kwargs": {"retries": {"total_max_attempts": 8, "mode": "standard"}},
                                "max_concurrency": 1}
    assert tiledb_config()["vfs.s3.connect_max_tries"] == "7" and "vfs.s3.request_timeout_ms" not in tiledb_config()
    monkeypatch.setenv("SCMM_ATLAS_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SCMM_ATLAS_S3_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("SCMM_ATLAS_S3_READ_TIMEOUT", "0.5")
    assert fsspec_options()["config_kwargs"] == {"retries": {"total_max_attempts": 3, "mode": "standard"},
                                                 "connect_timeout": 2.0, "read_timeout": 0.5}
    cfg = tiledb_config()
    assert (cfg["vfs.s3.connect_max_tries"], cfg["vfs.s3.connect_timeout_ms"], cfg["vfs.s3.request_timeout_ms"]) == (
        "2", "2000", "500")
    monkeypatch.setenv("SCMM_ATLAS_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(InputError, match="SCMM_ATLAS_S3_MAX_ATTEMPTS: environment: Input should be greater than or "
                                         r"equal to 1 \(got '0'\)"):
        fsspec_options()
    monkeypatch.setenv("SCMM_ATLAS_S3_MAX_ATTEMPTS", "")  # empty: unset, the default
    monkeypatch.setenv("SCMM_ATLAS_S3_READ_TIMEOUT", "soon")
    with pytest.raises(InputError, match="SCMM_ATLAS_S3_READ_TIMEOUT: environment: Input should be a valid number"):
        fsspec_options()


@pytest.mark.slow
def test_zarr_ingest_inference_and_query_through_faults_equal_a_run_without(faulty_env, inputs, tmp_path,
                                                                            monkeypatch) -> None:
    local = str(tmp_path / "cells.zarr")  # the same operations, on a local store: no faults
    opts = IngestOptions(batch_key="donor", progress=False, stats=False)
    ingest(local, inputs, opts)
    trained = _trained(local)
    infer(local, trained, config=INFER, progress=False)
    uri = f"s3://{faulty_env}/cells.zarr"
    moto = os.environ["AWS_ENDPOINT_URL"]
    with _ingested_through_faults(monkeypatch, uri, inputs, opts, seed=1, faults=ZARR_FAULTS) as (proxy, ingested):
        infer(uri, trained, config=INFER, progress=False)
        got = _outputs(uri)
    print(f"zarr: ingest {ingested}, inference and query {proxy.faults_injected - ingested[0]} faults, "
          f"{proxy.ops_completed - ingested[1]} ops; by kind {proxy.faults_by_kind}")
    assert ingested[0] > 0 and ingested[1] > 0
    assert proxy.faults_injected > ingested[0] and proxy.ops_completed > ingested[1]
    assert all(proxy.faults_by_kind.values()), proxy.faults_by_kind  # every kind, 503 SlowDown included
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)  # read back from moto directly
    _assert_same(_contents(uri), _contents(local))
    want = _outputs(local)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.slow
def test_soma_ingest_and_read_back_through_faults_equal_a_run_without(faulty_env, inputs, tmp_path,
                                                                      monkeypatch) -> None:
    local = str(tmp_path / "cells.soma")
    opts = IngestOptions(batch_key="donor", progress=False)  # statistics and the feature selection too
    ingest(local, inputs, opts)
    uri = f"s3://{faulty_env}/cells.soma"
    moto = os.environ["AWS_ENDPOINT_URL"]
    with _ingested_through_faults(monkeypatch, uri, inputs, opts, seed=2, faults=SOMA_FAULTS) as (proxy, ingested):
        got = _contents(uri)
        with open_store(uri) as store:
            selected = list(store.feature_names("RNA", "selected"))
    print(f"soma: ingest {ingested}, read back {proxy.faults_injected - ingested[0]} faults, "
          f"{proxy.ops_completed - ingested[1]} ops; by kind {proxy.faults_by_kind}")
    assert ingested[0] > 0 and ingested[1] > 0 and proxy.faults_injected > ingested[0]
    want = _contents(local)
    _assert_same(got, want)
    with open_store(local) as store:
        assert selected == list(store.feature_names("RNA", "selected"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
    _assert_same(_contents(uri), want)  # and as moto holds it


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "methods"), [("zarr", None), ("soma", ("PUT", "POST", "DELETE"))])
def test_append_that_cannot_write_fails_with_one_line_and_leaves_the_store_as_it_was(
        faulty_env, inputs, backend, methods) -> None:
    """zarr: every request fails; soma: the store can be read, every write fails."""
    uri = f"s3://{faulty_env}/cells.{backend}"
    ingest(uri, inputs, IngestOptions(batch_key="donor", progress=False, stats=False, backend=backend))
    before = _contents(uri)
    moto = os.environ["AWS_ENDPOINT_URL"]
    keys = sorted(o["Key"] for o in _s3(moto).list_objects_v2(Bucket=faulty_env).get("Contents", []))
    # not SlowDown: TileDB retries it for minutes whatever its settings
    with FaultyProxy(moto, rate=1.0, kinds=("500", "reset"), methods=methods) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "SCMM_ATLAS_S3_MAX_ATTEMPTS": "2"}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "scmm_atlas.cli", "ingest", "--store", uri, "--append",
                               "--dataset", "again", "--prefix-barcodes", "--no-progress", *inputs],
                              env=env, capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
    print(f"{backend}: failed append in {wall:.1f} s, {proxy.faults_injected} faults, {proxy.ops_completed} ops")
    assert done.returncode != 0 and proxy.faults_injected > 0
    if methods is not None:
        assert proxy.ops_completed > 0  # it read the store before its first write failed
    _assert_same(_contents(uri), before)  # through moto directly
    assert sorted(o["Key"] for o in _s3(moto).list_objects_v2(Bucket=faulty_env).get("Contents", [])) == keys
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {uri}: object storage failed after retries"), lines
