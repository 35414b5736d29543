"""Shared fixtures: the real datasets, small generated inputs, a moto S3 server in its own process."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from xdist_scheduling import pytest_xdist_make_scheduler  # noqa: F401 (the hook: loadscope that survives a crash)

from scmm_atlas.bench.testcluster import QUIET_RAY

# Small tensors: one intra-op thread is as fast, and it does not collapse (100x) when another
# process holds the second core, as OpenMP threads spinning for a busy core do.
torch.set_num_threads(1)

# S3 credentials for the moto server, set before the shared Ray starts so that its workers inherit
# them (credentials are never handed to Ray tasks). The secret is unique to the session: tests
# search everything written for it.
TEST_SECRET = f"scmm-test-secret-{os.urandom(8).hex()}"
os.environ.update({"AWS_ACCESS_KEY_ID": "scmm-test-key", "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
                   "AWS_DEFAULT_REGION": "us-east-1"})
# Every Ray the tests start (the shared one, the commands' own) without Ray's idle overheads on a 2-core
# machine (bench/testcluster.py's QUIET_RAY: a log monitor globbing every 0.1 s, a preemption watcher per run)
os.environ.update(QUIET_RAY)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCMM_ATLAS_DATA", REPO.parent / "shared" / "data"))


def debian_packages(files: list[str], packages: list[str], why: str) -> None:
    """Install Debian ``packages`` with apt when any of ``files`` is missing (CI runs as root on Debian 12):
    tests that need a system tool run, never skip. Fails, saying what to do, where apt cannot run."""
    import shutil
    import subprocess

    if all(Path(f).is_file() for f in files):
        return
    install = f"apt-get update -qq && apt-get install -y -qq {' '.join(packages)}"
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None or not shutil.which("apt-get"):
        pytest.fail(f"{why}: {', '.join(files)} missing and not installable here: run `{install}` as root (Debian 12)")
    done = subprocess.run([*sudo, "bash", "-c", install], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode != 0 or not all(Path(f).is_file() for f in files):
        pytest.fail(f"`{install}` failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "pbmc10k_cite" / "rna.h5ad").exists():
        pytest.fail(f"real datasets not found at {DATA} (set SCMM_ATLAS_DATA)")
    return DATA


def tree_digest(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (byte-identical checks)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_h5ad(path: Path, x: np.ndarray | sp.spmatrix, *, obs_names=None, var_names=None,
               obs: dict | None = None, dtype: str = "float32") -> Path:
    """A small AnnData file (CSR X unless ``x`` is a dense array)."""
    n, g = x.shape
    obs_df = pd.DataFrame(obs or {}, index=pd.Index(obs_names if obs_names is not None else
                                                     [f"c{i}" for i in range(n)]).astype(str))
    var_df = pd.DataFrame(index=pd.Index(var_names if var_names is not None else
                                         [f"g{j}" for j in range(g)]).astype(str))
    mat = x.astype(dtype)
    adata = ad.AnnData(mat, obs=obs_df, var=var_df)
    adata.write_h5ad(path)
    return path


def random_counts(n: int, g: int, seed: int = 0, density: float = 0.3) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    m = sp.random(n, g, density=density, format="csr", random_state=rng)
    m.data = rng.integers(1, 50, m.nnz).astype(np.float64)
    # every cell has counts
    m = m + sp.csr_matrix((np.ones(n), (np.arange(n), rng.integers(0, g, n))), shape=(n, g))
    return sp.csr_matrix(m)


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Two small paired modalities (RNA 60 x 30, ADT 60 x 5)."""
    rna = write_h5ad(tmp_path / "rna.h5ad", random_counts(60, 30, 1), obs={"batch": ["b1"] * 30 + ["b2"] * 30})
    adt = write_h5ad(tmp_path / "adt.h5ad", random_counts(60, 5, 2), var_names=[f"p{j}" for j in range(5)])
    return rna, adt


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, in its own process (TileDB's S3 client blocks the GIL)."""
    from scmm_atlas.bench.s3faults import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture()
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket; credentials and endpoint only through environment variables."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    name = f"atlas-{time.time_ns()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def write_model_folder(store_uri: str, folder: Path, seed: int = 0) -> Path:
    """A small untrained model for the store's selected features, as a folder ``infer --model`` loads."""
    from scmm_atlas.model import MMVAE, MMVAEConfig
    from scmm_atlas.model.saved import write_meta
    from scmm_atlas.store import open_store

    with open_store(store_uri) as store:
        features = {m: [str(f) for f in store.feature_names(m, "selected")] for m in store.modalities}
    config = MMVAEConfig(modalities={m: {"n_features": len(f), "hidden": 8, "n_layers": 1}
                                     for m, f in features.items()}, latent_dim=3, n_batches=3)
    model_dir = folder / "artifacts"
    model_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    torch.save(MMVAE(config).state_dict(), model_dir / "best_model.pt")
    write_meta(model_dir, config, features, ["b0", "b1", "b2"])
    return folder


PLANTED_N = 1000
# training overrides that keep a Ray Train run to seconds on tiny stores
FAST_TRAIN = ["train.epochs=3", "train.warmup_epochs=1", "train.batch_size=64", "train.patience=10",
              "distributed.val_fraction=0.2", "distributed.loader.block_cells=256",
              "model.modalities.RNA.hidden=64", "model.modalities.ADT.hidden=64"]


def make_planted_stores(tmp: Path, n: int = PLANTED_N, *, backends=("soma", "zarr")) -> dict[str, Path]:
    """The same cells in each backend: column 0 of RNA holds cell + 1 and of ADT 2 * (cell + 1), so any
    row says which cell it is; the last 100 cells have no ADT; batch = "b{cell % 3}"."""
    from scmm_atlas.ingest.write import IngestOptions, ingest

    rna = sp.lil_matrix(random_counts(n, 20, 1))
    adt = sp.lil_matrix(random_counts(n, 4, 2))
    rna[:, 0] = np.arange(n)[:, None] + 1
    adt[:, 0] = 2 * (np.arange(n)[:, None] + 1)
    batch = np.array([f"b{i % 3}" for i in range(n)])
    write_h5ad(tmp / "rna.h5ad", rna.tocsr(), obs={"donor": batch})
    write_h5ad(tmp / "adt.h5ad", adt.tocsr()[: n - 100], obs_names=[f"c{i}" for i in range(n - 100)],
               var_names=[f"p{j}" for j in range(4)])
    out = {}
    for backend in backends:
        out[backend] = tmp / f"cells.{backend}"
        ingest(str(out[backend]), [f"RNA={tmp / 'rna.h5ad'}", f"ADT={tmp / 'adt.h5ad'}"],
               IngestOptions(batch_key="donor", progress=False))
    return out


@pytest.fixture(scope="session")
def planted_stores(tmp_path_factory) -> dict[str, Path]:
    return make_planted_stores(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: 2 CPUs, a bounded object store, no dashboard."""
    import ray

    from scmm_atlas.data.ray_session import LOCAL_SYSTEM_CONFIG

    ray.init(address="local", num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", configure_logging=False, _system_config=LOCAL_SYSTEM_CONFIG)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


# Tiers: markers that follow from the fixtures a test uses, so that no test can forget them.
# `make test-fast` (the edit-test loop) leaves out the slow, Ray, S3 and browser tiers; CI runs all.
TIER_FIXTURES = {"ray_session": "ray", "s3_server": "s3", "chromium": "browser"}


# `make test` runs pytest-xdist with --dist loadscope: whole modules go to the workers in collection order, so
# the longest modules (a CI run's durations) come first and the run does not end with one of them alone
LONGEST_FIRST = ("test_cluster.py", "test_train.py", "test_chaos.py",
                 "test_fuzz.py", "test_install.py", "test_pipeline.py", "test_s3_faults.py", "test_scale.py",
                 "test_results.py", "test_shared_store.py", "test_bench_cluster.py", "test_testcluster.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept
    for item in items:
        for fixture, marker in TIER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))
