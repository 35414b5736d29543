"""What each Ray Train worker runs: DDP over this rank's share of every epoch.

The loss is computed inside one module's ``forward`` (:class:`LossModule`) so that DDP sees one
forward per step and all-reduces the gradients in backward. Sums (losses, cells, data wait) are
all-reduced so that every rank takes the same early-stopping decision. Rank 0 writes checkpoints
(reported to Ray Train) and logs each epoch to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ..config import RunConfig
from ..data.feeder import Feeders
from ..data.loader import Batch, LoaderConfig, ShardLoader
from ..memory import keep_freed_buffers
from ..model import MMVAE
from ..model.fit import adam
from ..model.objectives import OBJECTIVES
from . import state as ckpt
from .state import TrainState

log = logging.getLogger(__name__)
VAL_BLOCK_CELLS = 4096  # validation blocks: smaller than training's, as their order does not matter


class LossModule(torch.nn.Module):
    """``forward`` returns (loss summed over cells, detached [loss, KL, reconstruction per modality] sums).

    The sums stay on the device and are added up there: reading them every step would make the host
    wait for the GPU instead of queueing the next step."""

    def __init__(self, model: MMVAE, objective: str, K: int) -> None:
        super().__init__()
        self.model, self.objective, self.K = model, objective, K

    @property
    def part_names(self) -> list[str]:
        return ["loss", "kl", *(f"recon_{m}" for m in self.model.names)]

    def forward(self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], batch: torch.Tensor | None,
                beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"beta": beta} if self.objective == "elbo" else {}
        out = OBJECTIVES[self.objective](self.model, x, mask=mask, batch=batch, K=self.K, **kwargs)
        zero = out.loss.detach().new_zeros(())
        parts = [out.loss.detach(), zero if out.kl is None else out.kl, *(out.recon.get(m, zero)
                                                                         for m in self.model.names)]
        return out.loss, torch.stack([p.float() for p in parts])


def _batch_codes(batch: Batch, model: MMVAE) -> torch.Tensor | None:
    return batch.batch if model.config.n_batches > 0 else None


def _allreduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _validate(model: MMVAE, loader: ShardLoader, *, objective: str, K: int, beta: float, epoch: int
              ) -> tuple[float, float]:
    """(loss sum, cells) over this rank's validation cells."""
    model.eval()
    obj = OBJECTIVES["iwae" if objective == "dreg" else objective]
    kwargs = {"beta": beta} if objective == "elbo" else {}
    total, cells = torch.zeros((), dtype=torch.float64, device=loader.device), 0
    with torch.no_grad():
        for batch in loader.epoch(epoch):
            if len(batch.cells) < 2:
                continue
            total += obj(model, batch.x, mask=batch.masks, batch=_batch_codes(batch, model), K=K, **kwargs).loss
            cells += len(batch.cells)
    loader.close()  # no reading ahead into the next validation while the next epoch trains
    return float(total), cells


def train_loop(cfg: dict[str, Any]) -> None:
    # Ray Train 2.60 logs every report at INFO through a logger named by its file path, which its
    # LoggingConfig does not reach
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(cfg.get("log_level", "INFO"))
    run = RunConfig.from_dict(cfg["config"])
    tr, dist_cfg = run.train, run.distributed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, dist_cfg.torch_threads or int(dist_cfg.cpus_per_worker)))
    keep_freed_buffers()
    loader_cfg = LoaderConfig(**{"batch_size": tr.batch_size, "seed": tr.seed, "drop_last": True, **dist_cfg.loader})
    feeders = Feeders(readers=loader_cfg.readers, cpus=loader_cfg.read_cpus)  # shared by both loaders
    layout = cfg.get("layout")  # the layout the driver pinned (None: reading in store order)
    train_data = ShardLoader.for_train_worker(cfg["store"], loader_cfg, feeders=feeders, layout=layout)
    # validation reads its cells once per epoch in any order: small blocks, one read in flight
    val_cfg = replace(loader_cfg, drop_last=False, block_cells=min(loader_cfg.block_cells, VAL_BLOCK_CELLS),
                      read_ahead=1)
    val_data = ShardLoader.for_train_worker(cfg["store"], val_cfg, split="val", feeders=feeders, layout=layout)
    device = train_data.device
    torch.manual_seed(tr.seed)
    model = MMVAE(run.model.build(train_data.n_features, len(train_data.batches)))
    if cfg.get("warm_start") is not None:  # before DDP wraps it: rank 0's weights are broadcast
        fresh = ckpt.warm_start(model, cfg["warm_start"])
        if rank == 0:
            log.info("warm start: %d parameter tensors re-initialised (%s)", len(fresh), ", ".join(fresh[:5]))
    loss_module = LossModule(model, tr.objective, tr.K)
    wrapped = ray.train.torch.prepare_model(loss_module)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adam(params, lr=tr.lr, amsgrad=tr.amsgrad, weight_decay=tr.weight_decay)
    st, best_model = TrainState(), None
    # this run's last checkpoint after a worker failure, else the one a resumed run starts from
    restored = ray.train.get_checkpoint() or (ray.train.Checkpoint(cfg["resume_from"]) if cfg.get("resume_from")
                                              else None)
    if restored is not None:
        with restored.as_directory() as d:
            payload, st, best_model = ckpt.load(Path(d))
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
    train_data.warm_up()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and dist_cfg.bf16
                else contextlib.nullcontext())
    tracker = _Tracker(cfg) if rank == 0 and cfg.get("run_id") else None
    if tracker is not None:
        tracker.log_text(f"global batch {tr.batch_size} x {world} workers x {dist_cfg.grad_accum} accumulation = "
                         f"{tr.batch_size * world * dist_cfg.grad_accum} cells per optimizer step")
    bar = _EpochBar(tr.epochs, st.epoch) if rank == 0 and cfg.get("progress") else None
    for epoch in range(st.epoch + 1, tr.epochs + 1):
        beta = tr.beta(epoch)
        tr.set_lr(opt, epoch)
        model.train()
        parts, cells = torch.zeros(len(loss_module.part_names), dtype=torch.float64, device=device), 0
        wait0, t0, cpu0 = train_data.stats.wait_s, time.perf_counter(), time.thread_time()
        skip = st.epoch_batches
        for i, batch in enumerate(train_data.epoch(epoch - 1, skip=skip), start=skip):
            if dist_cfg.max_steps_per_epoch and i >= dist_cfg.max_steps_per_epoch * dist_cfg.grad_accum:
                break
            _maybe_fail(cfg, dist_cfg, st.step + 1, rank, world)
            accumulate = (i + 1) % dist_cfg.grad_accum != 0
            with wrapped.no_sync() if accumulate and hasattr(wrapped, "no_sync") else contextlib.nullcontext():
                with autocast:
                    loss, step_parts = wrapped(batch.x, batch.masks, _batch_codes(batch, model), beta)
                (loss / dist_cfg.grad_accum).backward()
            if not accumulate:
                if tr.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                st.step += 1
            st.epoch_batches = i + 1
            parts += step_parts
            cells += len(batch.cells)
            if dist_cfg.checkpoint_every_steps and st.step % dist_cfg.checkpoint_every_steps == 0 and not accumulate:
                _report(rank, {"epoch": st.epoch, "step": st.step}, model, opt, st, best_model)
        sums = {**dict(zip(loss_module.part_names, parts.tolist(), strict=True)), "cells": float(cells)}
        epoch_s = time.perf_counter() - t0
        thread_cpu = time.thread_time() - cpu0  # this (the training) thread's CPU time, from the OS
        wait = train_data.stats.wait_s - wait0
        val_sum, val_cells = _validate(model, val_data, objective=tr.objective, K=tr.K, beta=beta, epoch=epoch - 1)
        keys = sorted(sums)
        reduced = dict(zip([*keys, "val_sum", "val_cells", "wait", "epoch_s", "thread_cpu"], _allreduce(
            [sums[k] for k in keys] + [val_sum, val_cells, wait, epoch_s, thread_cpu], device), strict=True))
        n = max(reduced["cells"], 1.0)
        val = reduced["val_sum"] / reduced["val_cells"] if reduced["val_cells"] else None
        metrics = {"epoch": epoch, "step": st.step, "beta": beta, "lr": tr.lr_at(epoch),
                   "train_loss": reduced["loss"] / n,
                   "kl": reduced["kl"] / n, "cells_per_s": reduced["cells"] / (reduced["epoch_s"] / world),
                   "data_wait_frac": reduced["wait"] / max(reduced["epoch_s"], 1e-9),
                   "train_thread_cpu_frac": reduced["thread_cpu"] / max(reduced["epoch_s"], 1e-9),
                   **{k: reduced[k] / n for k in keys if k.startswith("recon_")}}
        if val is not None:
            metrics["val_loss"] = val
        st.epoch, st.epoch_batches = epoch, 0
        stop = False
        if val is not None and epoch > tr.warmup_epochs:
            if st.best_val is None or val < st.best_val:
                st.best_val, st.best_epoch, st.bad_epochs = val, epoch, 0
                best_model = _cpu_state(model)
            else:
                st.bad_epochs += 1
                stop = st.bad_epochs >= tr.patience
        if best_model is None and epoch == tr.epochs:  # no validation cells or too short for warm-up
            best_model = _cpu_state(model)
        if st.best_val is not None:
            metrics["best_val_loss"] = st.best_val
        st.history.append(metrics)
        if tracker is not None:
            tracker.log_epoch(metrics)
        if bar is not None:
            bar.epoch(metrics)
        _report(rank, metrics, model, opt, st, best_model)
        if stop:
            break
    if bar is not None:
        bar.close()
    train_data.close()
    val_data.close()
    feeders.close()


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


def _cpu_state(model: MMVAE) -> dict[str, torch.Tensor]:
    """A copy of the weights that later steps do not change."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _report(rank: int, metrics: dict[str, float], model: MMVAE, opt: torch.optim.Optimizer, st: TrainState,
            best_model: dict[str, torch.Tensor] | None) -> None:
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            ckpt.save(Path(d), model=model, optimizer=opt, state=st, best_model=best_model)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_fail(cfg: dict[str, Any], dist_cfg, step: int, rank: int, world: int) -> None:
    """Fault injection for tests: one worker raises once, at ``fault_at_step``."""
    if not dist_cfg.fault_at_step or step != dist_cfg.fault_at_step or rank != world - 1:
        return
    marker = Path(cfg["fault_marker"])
    if marker.exists():
        return
    marker.write_text(f"failed at step {step} on rank {rank}\n")
    raise RuntimeError(f"injected fault at step {step} on rank {rank}")


class _Tracker:
    """Rank 0's MLflow logging into the run the driver opened."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(cfg["tracking_uri"]), cfg["run_id"]

    def log_epoch(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        epoch = int(metrics["epoch"])
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, epoch) for k, v in metrics.items()
                                                    if k != "epoch"])

    def log_text(self, text: str) -> None:
        self.client.set_tag(self.run_id, "global_batch", text)
