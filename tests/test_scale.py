"""Distributed correctness at a test-sized scale: 20,000 cells, 2 Ray Train workers, the feeder loader.

The same path as ``scmm-atlas bench scale`` at 2M cells: every training cell read exactly once per
epoch across ranks with equal batches per rank, a resumed epoch that deals exactly the batches the
interrupted one would have, and a training run killed mid-epoch that ends where an uninterrupted
one does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_counts, write_h5ad

from scmm_atlas.config import load_config
from scmm_atlas.data.layout import Layout, layout_uri, read_info
from scmm_atlas.data.loader import LoaderConfig, ShardLoader
from scmm_atlas.data.prepare import prepare_layout
from scmm_atlas.ingest.write import IngestOptions, ingest
from scmm_atlas.store import open_store
from scmm_atlas.train.driver import train

N, BATCH, BLOCK, RESUME_ROUNDS = 20_000, 64, 1024, 3
RESUME_AT = RESUME_ROUNDS * BLOCK // BATCH  # minibatches per rank before the resumed round (a round: one block)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("scale")
    rna = write_h5ad(tmp / "rna.h5ad", random_counts(N, 40, 3, density=0.2),
                     obs={"donor": [f"d{i % 4}" for i in range(N)]})
    adt = write_h5ad(tmp / "adt.h5ad", random_counts(N, 6, 4, density=0.8), var_names=[f"p{j}" for j in range(6)])
    uri = tmp / "cells.zarr"
    ingest(str(uri), [f"RNA={rna}", f"ADT={adt}"], IngestOptions(batch_key="donor", progress=False))
    with open_store(uri) as s:
        prepare_layout(s, shard_cells=3_000, val_fraction=0.1)
    return uri


def _worker(cfg: dict) -> None:
    import ray.train

    config = LoaderConfig(batch_size=BATCH, block_cells=BLOCK, seed=3)
    rank = ray.train.get_context().get_world_rank()
    with ShardLoader.for_train_worker(cfg["store"], config) as loader:
        epochs = [[b.cells.tolist() for b in loader.epoch(e)] for e in range(2)]
    with ShardLoader.for_train_worker(cfg["store"], config) as fresh:  # as after a restart
        resumed = [(b.cells.tolist(), float(b.x["RNA"].sum()), float(b.x["ADT"].sum()))
                   for b in fresh.epoch(1, start=RESUME_ROUNDS * 2 * BLOCK)]
    with ShardLoader.for_train_worker(cfg["store"], config) as again:
        full = [(b.cells.tolist(), float(b.x["RNA"].sum()), float(b.x["ADT"].sum())) for b in again.epoch(1)]
    Path(cfg["out"], f"rank{rank}.json").write_text(json.dumps({"epochs": epochs, "resumed": resumed,
                                                                "tail": full[RESUME_AT:]}))


def test_two_workers_read_each_cell_once_per_epoch_and_resume_mid_epoch_exactly(store, tmp_path, ray_session) -> None:
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig

    from scmm_atlas.train.driver import Trainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests are not importable in Ray workers
    Trainer(_worker, train_loop_config={"store": str(store), "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="scale")).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    uri = layout_uri(open_store(store).uri)
    n_train = read_info(uri).n_cells("train")
    val = Layout(uri, "val")
    held_out = val.read(0, val.n_cells)["cell"]
    for e in range(2):
        per_rank = [r["epochs"][e] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == (n_train // 2) // BATCH  # equal steps, last partial dropped
        seen = np.concatenate([np.concatenate(batches) for batches in per_rank])
        assert len(np.unique(seen)) == len(seen)  # no cell twice
        assert n_train - len(seen) < 2 * BATCH  # only the dropped remainders are missing
        assert not np.isin(seen, held_out).any() and seen.min() >= 0 and seen.max() < N  # training cells only
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # each epoch its own order
    for r in ranks:
        assert len(r["resumed"]) == len(r["epochs"][1]) - RESUME_AT > 0
        assert r["resumed"] == r["tail"]  # the same cells, in the same batches, with the same counts
        assert [c for c, _, _ in r["resumed"]] == r["epochs"][1][RESUME_AT:]


def _config(tmp: Path, *extra: str):
    return load_config("atlas_cite", [
        "train.epochs=2", "train.warmup_epochs=1", f"train.batch_size={BATCH}", "train.patience=10",
        "model.modalities.RNA.hidden=32", "model.modalities.ADT.hidden=32", "model.dropout=0.1",
        f"distributed.loader.block_cells={BLOCK}", "distributed.num_workers=2", "distributed.torch_threads=1",
        "distributed.checkpoint_every_steps=40", f"distributed.storage_path={tmp / 'ray'}", *extra])


def test_a_worker_killed_mid_epoch_resumes_from_the_checkpoint_and_ends_where_an_unbroken_run_does(
        store, tmp_path, ray_session, monkeypatch) -> None:
    unbroken = train(_config(tmp_path), str(store), run_name="unbroken", track=False, progress=False)
    steps = unbroken.history[0]["step"]
    assert steps > 100
    fault = steps + 50  # in epoch 2, after a mid-epoch checkpoint (every 40 steps: one in (steps + 10, fault))
    monkeypatch.setenv("SCMM_ATLAS_FAULTS", f"train_step={fault}")
    broken = train(_config(tmp_path, "distributed.max_failures=1"),
                   str(store), run_name="broken", track=False, progress=False)
    assert (tmp_path / "ray" / "broken" / "fault_injected").exists()
    assert [h["epoch"] for h in broken.history] == [1, 2] and broken.history[-1]["step"] == 2 * steps
    # same batches, same weights and RNG from the checkpoint: the same model, bit for bit up to summation order
    for a, b in zip(unbroken.history, broken.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
