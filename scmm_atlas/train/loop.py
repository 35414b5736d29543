"""What each Ray Train worker runs: DDP over this rank's share of every epoch.

The loss is computed inside one module's ``forward`` (:class:`LossModule`) so that DDP sees one
forward per step and all-reduces the gradients in backward. Sums (losses, cells, data wait) are
all-reduced so that every rank takes the same early-stopping decision. Rank 0 writes checkpoints
(reported to Ray Train) and logs each epoch to MLflow.

Elastic runs: a worker group of any size in ``[min, max]`` keeps the configured global batch (more
accumulation with fewer workers, :meth:`~..config.DistributedSection.step_shape`) and the gradient's
scale; the epoch's progress is counted in cells of the plan's sequence (checkpoints are taken where
a round ends), so a run that lost or gained a host reads each cell once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ..config import RunConfig
from ..data.feeder import Feeders
from ..data.loader import Minibatch, ShardLoader
from ..faults import FaultPlan
from ..memory import keep_freed_buffers
from ..model import MMVAE
from ..model.training import MIN_BATCH_CELLS, TrainingPlan, adam
from . import state as ckpt

log = logging.getLogger(__name__)
VAL_BLOCK_CELLS = 4096  # validation blocks: smaller than training's, as their order does not matter


class LossModule(torch.nn.Module):
    """``forward`` returns (loss summed over cells, detached [loss, KL, reconstruction per modality] sums).

    The sums stay on the device and are added up there: reading them every step would make the host
    wait for the GPU instead of queueing the next step."""

    def __init__(self, model: MMVAE, plan: TrainingPlan) -> None:
        super().__init__()
        self.model, self.plan = model, plan

    @property
    def part_names(self) -> list[str]:
        return ["loss", "kl", *(f"recon_{m}" for m in self.model.names)]

    def forward(self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], batch: torch.Tensor | None,
                beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.plan.step_loss(self.model, x, mask, batch, beta)
        zero = out.loss.detach().new_zeros(())
        parts = [out.loss.detach(), zero if out.kl is None else out.kl, *(out.recon.get(m, zero)
                                                                         for m in self.model.names)]
        return out.loss, torch.stack([p.float() for p in parts])


def _batch_codes(batch: Minibatch, model: MMVAE) -> torch.Tensor | None:
    return batch.batch_codes if model.config.n_batches > 0 else None


def _allreduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@dataclass(frozen=True)
class WorkerJob:
    """What the driver hands every worker, as ``train_loop_config={"job": WorkerJob(...)}`` (Ray Train
    wants a dict; the record inside is typed)."""

    config: RunConfig
    store: str
    layout: dict[str, Any] | None = None  # the layout the driver pinned (None: reading in store order)
    run_id: str | None = None  # the MLflow run rank 0 logs into (None: no tracking)
    tracking_uri: str | None = None
    faults: FaultPlan = field(default_factory=FaultPlan)  # tests only (scmm_atlas.faults)
    fault_marker: str | None = None  # a file that marks the injected fault as done
    resume_from: str | None = None  # the checkpoint a resumed run starts from
    warm_start: dict[str, torch.Tensor] | None = None  # weights copied in where names and shapes agree
    progress: bool = False
    log_level: str = "INFO"  # of Ray Train's per-report lines


@dataclass
class _Worker:
    """What one worker holds for the run: built by :func:`_setup`, released by :func:`_teardown`."""

    job: WorkerJob
    rank: int
    world: int
    feeders: Feeders
    train_data: ShardLoader
    val_data: ShardLoader
    loss: LossModule
    wrapped: torch.nn.Module
    opt: torch.optim.Optimizer
    plan: TrainingPlan
    accum: int  # minibatches per optimizer step at this world size
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    tracker: _Tracker | None = None
    bar: _EpochBar | None = None
    checkpointed_step: int = 0  # the optimizer step of the last checkpoint

    @property
    def run(self) -> RunConfig:
        return self.job.config

    @property
    def model(self) -> MMVAE:
        return self.loss.model

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.opt.param_groups for p in g["params"]]


def train_loop(cfg: dict[str, Any]) -> None:
    """A worker's whole run: ``cfg["job"]`` is its :class:`WorkerJob`."""
    job: WorkerJob = cfg["job"]
    _quiet_report_logs(job.log_level)
    w = _setup(job)
    for epoch in range(w.plan.state.epoch + 1, w.run.train.epochs + 1):
        beta = w.plan.start_epoch(w.opt, epoch)
        if _end_of_epoch(w, epoch, beta, _train_epoch(w, epoch, beta)):
            break
    _teardown(w)


def _quiet_report_logs(level: str) -> None:
    """Ray Train 2.60 logs every report at INFO through a logger named by its source file's path
    (``.../train/v2/_internal/execution/context.py``), which its LoggingConfig does not reach: set
    that logger's level, found by name among the loggers already made, without importing it."""
    suffix = os.path.join("execution", "context.py")
    for name in list(logging.Logger.manager.loggerDict):
        if name.endswith(suffix) and f"{os.sep}ray{os.sep}" in name:
            logging.getLogger(name).setLevel(level)


def _loaders(job: WorkerJob, batch_size: int, accum: int) -> tuple[Feeders, ShardLoader, ShardLoader]:
    """The training and validation loaders of this worker, sharing one pool of feeders."""
    tr, dist_cfg = job.config.train, job.config.distributed
    loader_cfg = dist_cfg.loader.build(seed=tr.seed, drop_last=True, batch_size=batch_size, accumulate=accum)
    feeders = Feeders(readers=loader_cfg.readers, cpus=loader_cfg.read_cpus)
    train_data = ShardLoader.for_train_worker(job.store, loader_cfg, feeders=feeders, layout=job.layout)
    # validation reads its cells once per epoch in any order: small blocks, one read in flight
    val_cfg = replace(loader_cfg, drop_last=False, block_cells=min(loader_cfg.block_cells, VAL_BLOCK_CELLS),
                      read_ahead=1)
    val_data = ShardLoader.for_train_worker(job.store, val_cfg, split="val", feeders=feeders, layout=job.layout)
    return feeders, train_data, val_data


def _setup(job: WorkerJob) -> _Worker:
    """Loaders, model (warm-started, DDP-wrapped), optimizer and plan, restored from this run's last
    checkpoint after a worker failure or from the one a resumed run starts from."""
    run = job.config
    tr, dist_cfg = run.train, run.distributed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, dist_cfg.torch_threads or int(dist_cfg.cpus_per_worker)))
    keep_freed_buffers()
    batch_size, accum = dist_cfg.step_shape(tr.batch_size, world)
    feeders, train_data, val_data = _loaders(job, batch_size, accum)
    torch.manual_seed(tr.seed)
    model = MMVAE(run.model.build(train_data.n_features, len(train_data.batches)))
    if job.warm_start is not None:  # before DDP wraps it: rank 0's weights are broadcast
        fresh = ckpt.warm_start(model, job.warm_start)
        if rank == 0:
            log.info("warm start: %d parameter tensors re-initialised (%s)", len(fresh), ", ".join(fresh[:5]))
    plan = TrainingPlan(tr)
    loss = LossModule(model, plan)
    wrapped = ray.train.torch.prepare_model(loss)
    opt = adam([p for p in model.parameters() if p.requires_grad], lr=tr.lr, amsgrad=tr.amsgrad,
               weight_decay=tr.weight_decay)
    restored = ray.train.get_checkpoint() or (ray.train.Checkpoint(job.resume_from) if job.resume_from else None)
    if restored is not None:
        with restored.as_directory() as d:
            payload, plan.state, plan.best = ckpt.load(Path(d))
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        if rank == 0:
            log.info("restored from %s: %d epochs done, step %d, %d cells into epoch %d, on %d workers",
                     restored.path, plan.state.epoch, plan.state.step, plan.state.epoch_cells, plan.state.epoch + 1,
                     world)
    train_data.warm_up()
    w = _Worker(job, rank, world, feeders, train_data, val_data, loss, wrapped, opt, plan, accum,
                checkpointed_step=plan.state.step)
    if train_data.device.type == "cuda" and dist_cfg.bf16:
        w.autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    if rank == 0 and job.run_id:
        w.tracker = _Tracker(job)
        w.tracker.log_text(f"global batch {batch_size} x {world} workers x {accum} accumulation = "
                           f"{batch_size * world * accum} cells per optimizer step")
    if rank == 0 and job.progress:
        w.bar = _EpochBar(tr.epochs, plan.state.epoch)
    return w


def _train_epoch(w: _Worker, epoch: int, beta: float) -> dict[str, float]:
    """This rank's share of ``epoch`` (from a mid-epoch checkpoint's position): sums of the loss parts
    and cells, data wait, wall and training-thread CPU seconds."""
    st, dist_cfg, tr, data = w.plan.state, w.run.distributed, w.run.train, w.train_data
    w.model.train()
    parts = torch.zeros(len(w.loss.part_names), dtype=torch.float64, device=data.device)
    cells, start, per_round = 0, st.epoch_cells, data.batches_per_round
    # the summed loss scaled so that the gradient is the same at any world size: the configured minibatch's
    # share of the global batch
    scale = tr.batch_size / (data.config.batch_size * w.accum)
    cap = dist_cfg.max_steps_per_epoch * dist_cfg.global_batch(tr.batch_size)  # in cells of the epoch (0: none)
    wait0, t0, cpu0 = data.stats.wait_s, time.perf_counter(), time.thread_time()
    pending = 0  # minibatches accumulated since the last optimizer step
    for i, batch in enumerate(data.epoch(epoch - 1, start=start)):
        if cap and start + i * data.config.batch_size * w.world >= cap:
            break
        _maybe_fail(w.job, st.step + 1, w.rank, w.world)
        if w.job.faults.train_batch_ms:
            time.sleep(w.job.faults.train_batch_ms / 1000)
        pending += 1
        accumulate = pending < w.accum
        with w.wrapped.no_sync() if accumulate and hasattr(w.wrapped, "no_sync") else contextlib.nullcontext():
            with w.autocast:
                loss, step_parts = w.wrapped(batch.x, batch.masks, _batch_codes(batch, w.model), beta)
            (loss * scale).backward()
        if not accumulate:
            _optimizer_step(w)
            pending = 0
        parts += step_parts
        cells += len(batch.cells)
        if (i + 1) % per_round == 0:  # a round's end: the cells trained are a prefix of the epoch's sequence
            st.epoch_cells = data.plan.position_after((i + 1) // per_round, world_size=w.world,
                                                      round_cells=data.round_cells, start=start)
            if dist_cfg.checkpoint_every_steps and st.step - w.checkpointed_step >= dist_cfg.checkpoint_every_steps:
                _report(w, {"epoch": st.epoch, "step": st.step, "epoch_cells": st.epoch_cells})
    if pending:  # the epoch's last minibatches, short of a whole accumulation: their gradients were not synced
        _average_gradients(w)
        _optimizer_step(w)
    return {**dict(zip(w.loss.part_names, parts.tolist(), strict=True)), "cells": float(cells),
            "wait": w.train_data.stats.wait_s - wait0, "epoch_s": time.perf_counter() - t0,
            "thread_cpu": time.thread_time() - cpu0}  # this (the training) thread's CPU time, from the OS


def _optimizer_step(w: _Worker) -> None:
    if w.run.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(w.params, w.run.train.grad_clip)
    w.opt.step()
    w.opt.zero_grad(set_to_none=True)
    w.plan.state.step += 1


def _average_gradients(w: _Worker) -> None:
    """What DDP's backward does outside ``no_sync``: every rank's gradients averaged over the ranks."""
    if w.world > 1 and dist.is_initialized():
        for p in w.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= w.world


def _validate(w: _Worker, beta: float, epoch: int) -> tuple[float, float]:
    """(loss sum, cells) over this rank's validation cells."""
    w.model.eval()
    loader = w.val_data
    total, cells = torch.zeros((), dtype=torch.float64, device=loader.device), 0
    with torch.no_grad():
        for batch in loader.epoch(epoch):
            if len(batch.cells) < MIN_BATCH_CELLS:
                continue
            total += w.plan.eval_loss(w.model, batch.x, batch.masks, _batch_codes(batch, w.model), beta)
            cells += len(batch.cells)
    loader.close()  # no reading ahead into the next validation while the next epoch trains
    return float(total), cells


def _end_of_epoch(w: _Worker, epoch: int, beta: float, sums: dict[str, float]) -> bool:
    """Validation, the sums all-reduced over ranks (every rank takes the same decision), the plan's
    early stopping and best weights, logging and the checkpoint; returns whether to stop."""
    val_sum, val_cells = _validate(w, beta, epoch - 1)
    keys = sorted(sums)
    reduced = dict(zip([*keys, "val_sum", "val_cells"], _allreduce(
        [sums[k] for k in keys] + [val_sum, val_cells], w.train_data.device), strict=True))
    n = max(reduced["cells"], 1.0)
    val = reduced["val_sum"] / reduced["val_cells"] if reduced["val_cells"] else None
    metrics = {"epoch": epoch, "step": w.plan.state.step, "beta": beta, "lr": w.run.train.lr_at(epoch),
               "workers": w.world, "cells": reduced["cells"],
               "train_loss": reduced["loss"] / n,
               "kl": reduced["kl"] / n, "cells_per_s": reduced["cells"] / (reduced["epoch_s"] / w.world),
               "data_wait_frac": reduced["wait"] / max(reduced["epoch_s"], 1e-9),
               "train_thread_cpu_frac": reduced["thread_cpu"] / max(reduced["epoch_s"], 1e-9),
               **{k: reduced[k] / n for k in keys if k.startswith("recon_")}}
    if val is not None:
        metrics["val_loss"] = val
    stop = w.plan.end_epoch(w.model, epoch, val)
    if w.plan.state.best_val is not None:
        metrics["best_val_loss"] = w.plan.state.best_val
    w.plan.state.history.append(metrics)
    _report(w, metrics)  # MLflow gets the epoch from the controller once its checkpoint is registered (EpochLog)
    if w.bar is not None:
        w.bar.epoch(metrics)
    return stop


def _teardown(w: _Worker) -> None:
    if w.bar is not None:
        w.bar.close()
    w.train_data.close()
    w.val_data.close()
    w.feeders.close()


class _EpochBar:
    """Epochs done, with the losses, drawn by the driver (``ray.experimental.tqdm_ray``)."""

    def __init__(self, epochs: int, done: int) -> None:
        from ray.experimental import tqdm_ray

        self.bar = tqdm_ray.tqdm(total=epochs, desc="train", unit="epoch")
        if done:
            self.bar.update(done)

    def epoch(self, metrics: dict[str, float]) -> None:
        val = f", val {metrics['val_loss']:,.1f}" if "val_loss" in metrics else ""
        speed = f"{metrics['cells_per_s']:,.0f} cells/s"
        self.bar.set_description(f"train: loss {metrics['train_loss']:,.1f}{val}, {speed}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        sys.stdout.flush()  # the closing state must reach the driver before this worker exits


def _report(w: _Worker, metrics: dict[str, float]) -> None:
    """Report ``metrics`` to Ray Train, with rank 0's checkpoint of the run so far."""
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if w.rank == 0:
            ckpt.save(Path(d), model=w.model, optimizer=w.opt, state=w.plan.state, best_model=w.plan.best)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
    w.checkpointed_step = w.plan.state.step


def _maybe_fail(job: WorkerJob, step: int, rank: int, world: int) -> None:
    """Fault injection for tests: the last worker raises once, at the plan's ``train_step``."""
    at = job.faults.train_step
    if not at or step != at or rank != world - 1 or job.fault_marker is None:
        return
    marker = Path(job.fault_marker)
    if marker.exists():
        return
    marker.write_text(f"failed at step {step} on rank {rank}\n")
    raise RuntimeError(f"injected fault at step {step} on rank {rank}")


class _Tracker:
    """Rank 0's MLflow logging into the run the driver opened."""

    def __init__(self, job: WorkerJob) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(job.tracking_uri), job.run_id

    def log_text(self, text: str) -> None:
        self.client.set_tag(self.run_id, "global_batch", text)


class EpochLog(ray.train.UserCallback):
    """Each epoch's metrics into the MLflow run, from Ray Train's controller once it has registered the
    epoch's checkpoint. A worker group lost after an epoch's report but before the controller took it
    redoes that epoch from the checkpoint before: logged from the workers, the epoch would appear twice."""

    def __init__(self, tracking_uri: str | None, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        epoch_end = metrics[0] if metrics else {}
        if "train_loss" not in epoch_end:  # a checkpoint inside an epoch
            return
        stamp, epoch = int(time.time() * 1000), int(epoch_end["epoch"])
        MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=[
            Metric(k, float(v), stamp, epoch) for k, v in epoch_end.items() if k != "epoch"])
