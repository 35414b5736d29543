"""The training driver: layout, Ray, a ``TorchTrainer`` with N DDP workers, then MLflow's model.

What ``scmm-atlas train`` and ``python -m pipelines.train`` (the ``ray job submit`` entry point)
call. Locally it starts Ray sized to the machine (its dashboard and job server on 127.0.0.1
only, :func:`~..data.ray_session.ensure_ray`); with ``ray_address`` it joins a cluster. The run's
MLflow id is kept beside its Ray Train checkpoints so that ``resume=True`` continues both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from ..config import DistributedSection, RunConfig
from ..data.layout import LayoutInfo
from ..data.prepare import pin, prepare_layout
from ..data.ray_session import ensure_ray
from ..errors import ClusterError
from ..faults import FaultPlan
from ..model import MMVAEConfig
from ..model.training import TrainState
from ..store import StoreError, open_store
from ..store.uri import arrow_s3, aws_settings
from . import state as ckpt
from .loop import EpochLog, WorkerJob, train_loop

log = logging.getLogger(__name__)
RUN_FILE = "scmm_run.json"


@dataclass
class TrainResult:
    run_id: str | None  # None: trained without tracking
    run_name: str
    model_version: str | None
    champion: bool
    best_val: float | None
    epochs: int
    history: list[dict[str, float]]
    wall_s: float


def init_ray(address: str | None, dist_cfg: DistributedSection) -> DistributedSection:
    """Join ``address`` or start a local Ray sized to this machine; returns the section with the
    per-worker CPUs shrunk if the workers would leave no CPU for the loader's read tasks."""
    ensure_ray(address)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    loader = dist_cfg.loader.build()
    read = loader.read_cpus * loader.readers  # each worker's feeders (its training and validation loaders share them)
    need = dist_cfg.max_workers * (dist_cfg.cpus_per_worker + read)
    if not address and not dist_cfg.use_gpu and need > cpus:  # a cluster keeps the size asked for: hosts may join
        per = max(0.25, cpus / dist_cfg.max_workers - read)
        log.warning("%d workers x %.2f CPUs leave no CPU for reading on %.0f CPUs: %.2f CPUs per worker",
                    dist_cfg.max_workers, dist_cfg.cpus_per_worker, cpus, per)
        dist_cfg = replace(dist_cfg, cpus_per_worker=per, torch_threads=dist_cfg.torch_threads or
                           max(1, int(dist_cfg.cpus_per_worker)))
    return dist_cfg


class RunDir:
    """A run's folder under Ray Train's storage path, local or ``s3://`` (through fsspec)."""

    def __init__(self, storage_path: str, name: str) -> None:
        from ..store.uri import filesystem

        if "://" not in storage_path:
            storage_path = str(Path(storage_path).expanduser().resolve())
        self.storage = storage_path
        self.fs, root = filesystem(storage_path)
        self.path = f"{root.rstrip('/')}/{name}"

    def read(self, name: str) -> str | None:
        target = f"{self.path}/{name}"
        return self.fs.cat_file(target).decode() if self.fs.exists(target) else None

    def write(self, name: str, text: str) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
        self.fs.pipe_file(f"{self.path}/{name}", text.encode())

    def latest_checkpoint(self) -> str | None:
        found = sorted(p for p in self.fs.glob(f"{self.path}/checkpoint_*")
                       if self.fs.exists(f"{p}/{ckpt.STATE_FILE}"))  # names carry a sortable timestamp
        if not found:
            return None
        return f"s3://{found[-1]}" if self.storage.startswith("s3://") else found[-1]


def _storage(path: str) -> dict[str, Any]:
    """Ray Train's storage arguments: on S3 pyarrow's filesystem with this project's endpoint and
    retries (Ray's own would retry 3 times)."""
    if not path.startswith("s3://"):
        return {"storage_path": path}
    fs, inside = arrow_s3(path)
    return {"storage_path": inside, "storage_filesystem": fs}


@dataclass
class _Tracking:
    """The MLflow side of a run (all None when training without tracking)."""

    uri: str | None = None
    client: Any = None
    run_id: str | None = None


def _tracking(tracking: str | None, track: bool) -> _Tracking:
    if not track:
        return _Tracking()
    import mlflow

    from .tracking import tracking_uri

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    return _Tracking(uri, mlflow.MlflowClient(uri))


def _open_run(config: RunConfig, run_dir: RunDir, tracked: _Tracking, *, name: str, uri: str, info: LayoutInfo,
              resume: bool) -> str | None:
    """Start the run's MLflow run and record it beside the checkpoints, or find them again for a
    resume; returns the checkpoint a resumed run starts from."""
    recorded = run_dir.read(RUN_FILE)
    if resume:
        if recorded is None:
            raise StoreError(run_dir.path, RUN_FILE, "no run to resume here: check --name and "
                             "distributed.storage_path")
        tracked.run_id = json.loads(recorded)["run_id"] if tracked.client is not None else None
        return run_dir.latest_checkpoint()
    if recorded is not None:
        raise StoreError(run_dir.path, "name", "a run with this name exists: pass --resume or another --name")
    if tracked.client is not None:
        from .tracking import flatten, start_run

        dist_cfg = config.distributed
        global_batch = dist_cfg.global_batch(config.train.batch_size)
        params = {**flatten(config.to_dict()), "store": uri, "global_batch": str(global_batch),
                  "layout.val_fraction": str(info.val_fraction),
                  "layout.train_cells": str(info.n_cells("train")), "layout.val_cells": str(info.n_cells("val"))}
        tracked.run_id = start_run(tracked.client, dist_cfg.experiment, name, params, {"store": uri})
    run_dir.write(RUN_FILE, json.dumps({"run_id": tracked.run_id, "tracking_uri": tracked.uri}))
    return None


class Trainer(TorchTrainer):
    """Ray Train's ``TorchTrainer`` without two of its default callbacks where they only cost:

    - the datasets callback when the run has no Ray Datasets (ours reads the store itself): it starts a
      ``DatasetManager`` actor, a process importing Ray Data, at every worker-group start;
    - the placement-group cleaner where Ray runs no dashboard (a local Ray with ``SCMM_ATLAS_RAY_DASHBOARD=0``,
      or one started so by the caller). It asks the dashboard's state API every second whether the
      controller still lives; with no dashboard each question hangs for 10 s, and every run ended ~18 s
      after its last epoch, waiting for it to stop. It only acts if the controller dies while its driver
      lives on; the run's placement group goes with the driver's job in any case."""

    def _create_default_callbacks(self) -> list[Any]:
        unused = () if self.datasets else (DatasetsCallback,)
        if not ray._private.worker.get_dashboard_url():  # no state API: the cleaner would hang on it
            unused += (PlacementGroupCleanerCallback,)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unused)]


def _trainer(job: WorkerJob, run_dir: RunDir, name: str) -> TorchTrainer:
    """The ``TorchTrainer`` of ``job``: its workers (elastic where ``num_workers`` is [min, max]), storage,
    logging, retries and checkpoints. Each worker finds its host's interface for the collectives
    (:mod:`scmm_atlas.netif`, the job's setup hook set by :func:`~..data.ray_session.ensure_ray`). Ray
    Train's controller runs beside this driver (on the head under ``ray job submit``), so the loss of
    a worker host costs its workers, never the run's state. A worker group that cannot be placed
    within ``worker_wait_s`` ends the run (Ray Train would retry for ever)."""
    dist_cfg = job.config.distributed
    workers = tuple(dist_cfg.num_workers) if dist_cfg.elastic else dist_cfg.num_workers
    # S3 endpoint / region (never credentials: workers use their own or the node's role)
    env = aws_settings() if job.store.startswith("s3://") else {}
    start_s, retries = _start_budget(dist_cfg)
    os.environ[WORKER_START_TIMEOUT_ENV] = str(start_s)  # read by the controller (Ray propagates it)
    os.environ.setdefault(POLL_ENV, str(POLL_S))
    return Trainer(
        train_loop, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=dist_cfg.use_gpu,
                                     resources_per_worker={"CPU": dist_cfg.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=dist_cfg.resize_interval_s),
        run_config=RayRunConfig(name=name, **_storage(run_dir.storage), logging_config=LoggingConfig(job.log_level),
                                worker_runtime_env={"env_vars": env},
                                callbacks=[EpochLog(job.tracking_uri, job.run_id)] if job.run_id else None,
                                failure_config=FailureConfig(max_failures=dist_cfg.max_failures,
                                                             controller_failure_limit=retries),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)))


WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# How often Ray Train's controller polls the workers; it takes one report per worker per poll and a
# worker's next report waits for it (a queue of one), so each epoch or mid-epoch checkpoint cost up to
# Ray's default 2 s: most of a small run's epoch. A poll is one actor call per worker; one that hangs is
# carried over (a worker is declared dead after 10 min of it), so polling often raises no false alarm.
# Ray's variable wins where it is set.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.25
ELASTIC_START_S = 30.0  # an elastic start that hangs was sized on a stale view of the hosts: decide again soon


def _start_budget(dist_cfg: DistributedSection) -> tuple[float, int]:
    """(seconds one worker-group start may wait, starts that may time out) so that a run waits about
    ``worker_wait_s`` for its workers. A fixed-size run waits once. An elastic run right after losing a
    host may size its group on a view that still counts the lost host (Ray marks a silent host dead
    after ~15 s): it waits in short starts and sizes each from what is alive then, with room for one
    such start per failure it may recover from."""
    if not dist_cfg.elastic:
        return dist_cfg.worker_wait_s, 0
    start_s = min(dist_cfg.worker_wait_s, ELASTIC_START_S)
    return start_s, math.ceil(dist_cfg.worker_wait_s / start_s) + max(dist_cfg.max_failures, 0)


def _fit(trainer: TorchTrainer, dist_cfg: DistributedSection) -> ray.train.Result:
    """``trainer.fit()``, with a worker group that could not be placed in time as one line naming what is missing."""
    from ray.train import ControllerError

    try:
        return trainer.fit()
    except ControllerError as exc:
        if type(exc.controller_failure).__name__ not in ("WorkerGroupStartupTimeoutError",
                                                          "InsufficientClusterResourcesError"):
            raise
        raise ClusterError(ray.get_runtime_context().gcs_address, "distributed.num_workers",
                           _missing(dist_cfg)) from None


def _missing(dist_cfg: DistributedSection) -> str:
    """What the cluster lacks for ``dist_cfg``'s workers, and what to change."""
    per = dist_cfg.cpus_per_worker
    room = sum(int(n["Resources"].get("CPU", 0) // per) for n in ray.nodes() if n["Alive"])
    want = f"{dist_cfg.min_workers} workers" if dist_cfg.elastic else f"{dist_cfg.num_workers} workers"
    return (f"{want} of {per:g} CPUs could not be placed within {dist_cfg.worker_wait_s:g} s "
            f"(distributed.worker_wait_s); the {sum(n['Alive'] for n in ray.nodes())} live hosts have room for {room}: "
            "add hosts, lower distributed.cpus_per_worker, or make the run elastic with num_workers=[min, max]")


def train(config: RunConfig, store_uri: str, *, ray_address: str | None = None, resume: bool = False,
          run_name: str | None = None, tracking: str | None = None, track: bool = True, progress: bool = True,
          warm_start: dict[str, torch.Tensor] | None = None, make_champion: bool = False) -> TrainResult:
    """Train on ``store_uri`` with ``config``; log and register the model; return what happened.

    ``track=False`` trains without MLflow (no run, no registered model: the checkpoints alone), for
    quick experiments and hosts without a tracking store. ``warm_start`` initialises the model from
    these weights where names and shapes agree; ``make_champion`` moves the champion alias to the new
    version whatever its validation loss (a retrain on more cells: the losses are not comparable)."""
    start = time.perf_counter()
    with open_store(store_uri) as store:
        info, what = prepare_layout(store, val_fraction=config.distributed.val_fraction, progress=progress)
        log.info(what)
        features = {m: [str(f) for f in store.feature_names(m, "selected")] for m in store.modalities}
        uri = store.uri.uri
    try:  # a config that cannot fit this store fails here, not in every worker
        model_cfg = config.model.build({m: len(f) for m, f in features.items()}, len(info.batches))
    except ValueError as exc:
        raise StoreError(uri, "modalities", str(exc)) from None
    config = replace(config, distributed=init_ray(ray_address, config.distributed))
    dist_cfg = config.distributed
    name = run_name or time.strftime("scmm-%Y%m%d-%H%M%S")
    run_dir, tracked = RunDir(dist_cfg.storage_path, name), _tracking(tracking, track)
    latest = _open_run(config, run_dir, tracked, name=name, uri=uri, info=info, resume=resume)
    log.info("global batch: %d cells (%d per worker x %s workers x %d accumulation)",
             dist_cfg.global_batch(config.train.batch_size), config.train.batch_size, dist_cfg.num_workers,
             dist_cfg.grad_accum)
    job = WorkerJob(config=config, store=uri, layout=asdict(info), run_id=tracked.run_id, tracking_uri=tracked.uri,
                    faults=FaultPlan.from_env(), fault_marker=f"{run_dir.path}/fault_injected", resume_from=latest,
                    warm_start=warm_start, progress=progress,
                    # Ray Train's per-epoch INFO lines only when this module logs INFO
                    log_level="INFO" if log.isEnabledFor(logging.INFO) else "WARNING")
    trainer = _trainer(job, run_dir, name)
    # The layout's shards stay while the workers read them. Pinned last, just before the workers
    # start: a failure in the set-up above cannot leave the lease renewed for the life of this process.
    pinned = pin(store, info)
    try:
        result = _fit(trainer, dist_cfg)
    finally:
        pinned.release()
    pinned.check()  # lost mid-run: a `prepare` may have replaced shards being read; nothing is registered
    with result.checkpoint.as_directory() as d:
        payload, st, best = ckpt.load(Path(d))
    version, champion = None, False
    if tracked.run_id is not None:
        version, champion = _register(tracked, best if best is not None else payload["model"], st, config,
                                      model_cfg=model_cfg, features=features, info=info, make_champion=make_champion)
    return TrainResult(run_id=tracked.run_id, run_name=name, model_version=version, champion=champion,
                       best_val=st.best_val, epochs=st.epoch, history=st.history, wall_s=time.perf_counter() - start)


def _register(tracked: _Tracking, weights: dict[str, torch.Tensor], st: TrainState, config: RunConfig, *,
              model_cfg: MMVAEConfig, features: dict[str, list[str]], info: LayoutInfo, make_champion: bool
              ) -> tuple[str | None, bool]:
    """Log the kept weights as the run's model (registered; champion if better), its artifacts, and
    end the run: (model version, whether it is the champion)."""
    from .tracking import log_artifacts, log_model

    with tempfile.TemporaryDirectory() as d:
        path = Path(d, ckpt.BEST_FILE)
        torch.save(weights, path)
        version, champion = log_model(tracked.run_id, weights=path, model_config=model_cfg, features=features,
                                      batches=info.batches, model_name=config.distributed.model_name,
                                      val_loss=st.best_val, store_n_obs=info.store_n_obs,
                                      force_champion=make_champion)
    log_artifacts(tracked.client, tracked.run_id, config=config.to_dict(), features=features, history=st.history)
    tracked.client.set_terminated(tracked.run_id)
    return version, champion
