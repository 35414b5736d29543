"""Writes that fail part-way (a full disk): ``ingest`` and ``prepare`` as real processes under a
file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored, so that a write past it fails with EFBIG
instead of killing the process). Each must end in one ``error: STORE: write failed ...`` line and
leave what was there before byte-identical (a new store: nothing at its path).

``infer`` is not run here: it needs Ray, whose own processes (logs, object spilling) would inherit
the limit and fail outside our code; its published versions are atomic, which tests/test_results.py
checks with an injected fault.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import random_counts, tree_digest, write_h5ad

from scmm_atlas.cli import main
from scmm_atlas.store import open_store

pytestmark = pytest.mark.slow  # end-to-end: the full tier (make test), not the edit-test loop

# Bytes: above every metadata file of these stores (at most ~15 kB), below their count arrays and
# the layout's spilled pieces (~300 kB), so that each command fails after it has written something.
LIMIT = 100_000
N_CELLS = 3000


def _limited(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _cli_limited(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scmm_atlas.cli", *args, "--no-progress"], capture_output=True,
                          text=True, timeout=300, preexec_fn=_limited(LIMIT))


def _assert_write_failed(stderr: str, store: Path) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert errors[0].startswith(f"error: {store}: write failed: File too large"), errors[0]
    assert errors[0].endswith("the store was left as it was"), errors[0]


def _nothing_beside(store: Path) -> None:
    """No staging folder or backup of ``store`` left in its folder."""
    assert not [p.name for p in store.parent.iterdir() if p.name.startswith(f".{store.name}.")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Cells "a*" for a store, the same cells as "b*" to append (RNA 3000 x 300, ADT 3000 x 10)."""
    folder = tmp_path_factory.mktemp("disk_full")
    out = {}
    for prefix in ("a", "b"):
        names = [f"{prefix}{i}" for i in range(N_CELLS)]
        out[f"{prefix}_rna"] = write_h5ad(folder / f"{prefix}_rna.h5ad", random_counts(N_CELLS, 300, 1),
                                          obs_names=names)
        out[f"{prefix}_adt"] = write_h5ad(folder / f"{prefix}_adt.h5ad", random_counts(N_CELLS, 10, 2),
                                          obs_names=names, var_names=[f"p{j}" for j in range(10)])
    return out


def _ingest_args(store: Path, inputs: dict[str, Path], prefix: str) -> list[str]:
    return ["ingest", "--store", str(store), "--n-top-genes", "100", f"RNA={inputs[f'{prefix}_rna']}",
            f"ADT={inputs[f'{prefix}_adt']}"]


def _store(tmp_path: Path, backend: str, inputs: dict[str, Path]) -> Path:
    store = tmp_path / f"cells.{backend}"
    assert main([*_ingest_args(store, inputs, "a"), "--backend", backend, "--no-progress"]) == 0
    return store


@pytest.mark.parametrize("backend", ["soma", "zarr"])
def test_new_store_write_fails_and_leaves_nothing(backend: str, tmp_path: Path, inputs) -> None:
    store = tmp_path / f"new.{backend}"
    proc = _cli_limited(*_ingest_args(store, inputs, "a"), "--backend", backend)
    _assert_write_failed(proc.stderr, store)
    assert proc.returncode == 2
    assert not store.exists()
    _nothing_beside(store)


@pytest.mark.parametrize("backend", ["soma", "zarr"])
def test_append_write_fails_and_leaves_the_store_byte_identical(backend: str, tmp_path: Path, inputs) -> None:
    """TileDB writes new fragment and schema files, Zarr rewrites the last chunk of every growing
    array and adds new ones: all are undone, file for file, and the same append then succeeds."""
    store = _store(tmp_path, backend, inputs)
    before = tree_digest(store)
    proc = _cli_limited(*_ingest_args(store, inputs, "b"), "--append")
    _assert_write_failed(proc.stderr, store)
    assert proc.returncode == 2
    assert tree_digest(store) == before
    _nothing_beside(store)
    assert main([*_ingest_args(store, inputs, "b"), "--append", "--no-progress"]) == 0
    with open_store(store) as s:
        assert s.n_obs == 2 * N_CELLS
        assert s.obs().index[N_CELLS] == "b0"
        np.testing.assert_array_equal(s.read("RNA", N_CELLS, 2 * N_CELLS).toarray(),
                                      s.read("RNA", 0, N_CELLS).toarray())  # the same counts, appended whole


@pytest.mark.parametrize("backend", ["soma", "zarr"])
def test_prepare_write_fails_and_leaves_the_layout_as_it_was(backend: str, tmp_path: Path, inputs) -> None:
    """A first layout, and one extended after an append: the limit trips while the shuffled pieces
    are written; the store is byte-identical after, and prepare then succeeds."""
    store = _store(tmp_path, backend, inputs)
    for step in ("first", "extend"):
        before = tree_digest(store)
        proc = _cli_limited("prepare", "--store", str(store))
        _assert_write_failed(proc.stderr, store)
        assert proc.returncode == 2
        assert tree_digest(store) == before, step
        _nothing_beside(store)
        assert main(["prepare", "--store", str(store), "--no-progress"]) == 0
        if step == "first":
            assert main([*_ingest_args(store, inputs, "b"), "--append", "--no-progress"]) == 0


def test_prepare_failing_between_shards_leaves_no_shard(tmp_path: Path, inputs, monkeypatch, capsys) -> None:
    """A failure after some shards are written (which the size limit cannot pick out: the spilled
    pieces are larger than any shard file): the shards already written are removed too."""
    from scmm_atlas.data import prepare

    store = _store(tmp_path, "zarr", inputs)
    assert main(["prepare", "--store", str(store), "--no-progress", "--shard-cells", "1000"]) == 0
    assert main([*_ingest_args(store, inputs, "b"), "--append", "--no-progress"]) == 0
    before = tree_digest(store)
    written = []

    def write_shard(root, name, arrays):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        prepare.write_shard.__wrapped__(root, name, arrays)

    write_shard.__wrapped__ = prepare.write_shard
    monkeypatch.setattr(prepare, "write_shard", write_shard)
    capsys.readouterr()
    assert main(["prepare", "--store", str(store), "--no-progress", "--shard-cells", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {store}: write failed: No space left on device") and err.count("\n") == 1, err
    assert len(written) == 2 and tree_digest(store) == before
    _nothing_beside(store)


def test_infer_write_fails_and_the_published_version_stays(tmp_path: Path) -> None:
    """`infer` on one machine (worker threads, no Ray) under the limit: the new entry's arrays cannot
    be written, the command says so in one line, version 1 stays the published one unchanged, and a
    rerun without the limit publishes version 2 and removes the dead attempt's entry."""
    import zarr
    from conftest import make_planted_stores, write_model_folder

    from scmm_atlas.store.results import index, open_results

    uri = str(make_planted_stores(tmp_path, n=N_CELLS, backends=("zarr",))["zarr"])
    model = write_model_folder(uri, tmp_path / "model")
    infer = ["infer", "--store", uri, "--model", str(model), "--top-n", "3"]
    assert main([*infer, "--version", "1", "--no-progress"]) == 0
    with open_store(uri) as store:
        before, published = open_results(store).embedding("joint"), index(store)
    proc = subprocess.run([sys.executable, "-m", "scmm_atlas.cli", *infer, "--version", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limited(8_000),
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {uri}: write failed: File too large"), lines
    with open_store(uri) as store:
        assert index(store) == published
        np.testing.assert_array_equal(open_results(store).embedding("joint"), before)
    assert main([*infer, "--version", "2", "--no-progress"]) == 0
    with open_store(uri) as store:
        assert [r.version for r in index(store)] == ["1", "2"]
        entries = sorted(zarr.open_group(f"{uri}/results", mode="r").group_keys())
        assert entries == sorted(r.entry for r in index(store))  # the dead attempt's entry is gone
