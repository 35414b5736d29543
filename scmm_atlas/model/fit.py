"""In-memory training for small data and tests (the distributed trainer lives in ``train/``).

Bookkeeping follows the original scMM so that faithful mode's numbers line up with its: the
epoch's loss is the sum of the batch losses (each summed over cells) divided by the number of
cells in the split; beta = (epoch - 1) / W during warm-up, then 1; batches of one cell are
skipped. Early stopping watches the validation loss only after warm-up, and the best state is
restored at the end. ``kl_weight`` is the KL's weight once warm-up ends (1: the ELBO); the
learning rate is constant or follows a cosine from ``lr`` to ``lr * lr_min_factor`` over the
epoch cap. These rules are used by the distributed trainer as well.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ..memory import keep_freed_buffers
from .mmvae import MMVAE
from .objectives import OBJECTIVES

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class FitConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    amsgrad: bool = True
    weight_decay: float = 0.0
    warmup_epochs: int = 25
    objective: str = "elbo"  # elbo | iwae | dreg
    K: int = 1
    patience: int = 10
    seed: int = 0
    drop_last: bool = True
    grad_clip: float | None = None
    kl_weight: float = 1.0
    lr_schedule: str = "constant"  # constant | cosine
    lr_min_factor: float = 0.05

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.kl_weight < 0:
            raise ValueError(f"train.kl_weight must be >= 0, got {self.kl_weight}")

    def beta(self, epoch: int) -> float:
        w = self.warmup_epochs
        return self.kl_weight * ((epoch - 1) / w if w > 0 and epoch <= w else 1.0)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (1-based)."""
        if self.lr_schedule == "constant" or self.epochs <= 1:
            return self.lr
        progress = (epoch - 1) / (self.epochs - 1)
        return self.lr * (self.lr_min_factor + (1 - self.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def set_lr(self, opt: torch.optim.Optimizer, epoch: int) -> None:
        for group in opt.param_groups:
            group["lr"] = self.lr_at(epoch)


@dataclass
class EpochRecord:
    epoch: int
    beta: float
    lr: float
    train_loss: float  # per cell
    val_loss: float | None
    recon: dict[str, float]  # per cell, training pass
    kl: float  # per cell, training pass
    train_s: float
    cells_per_s: float


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    best_val: float | None = None
    stopped_early: bool = False


class CellData:
    """Counts of a set of cells in memory: per modality a dense tensor (or CSR densified per batch),
    with optional presence masks and batch codes."""

    def __init__(self, counts: Mapping[str, np.ndarray | sp.spmatrix | torch.Tensor], *,
                 mask: Mapping[str, np.ndarray] | None = None, batch: np.ndarray | None = None,
                 dense_limit_bytes: int = 2 << 30) -> None:
        self.names = list(counts)
        self.n = next(iter(counts.values())).shape[0]
        total = sum(int(np.prod(c.shape)) * 4 for c in counts.values())
        self._dense = total <= dense_limit_bytes
        self.counts = {m: self._prepare(c) for m, c in counts.items()}
        self.mask = {m: torch.as_tensor(np.asarray(v), dtype=torch.bool) for m, v in mask.items()} if mask else None
        self.batch = torch.as_tensor(np.array(batch, dtype=np.int64)) if batch is not None else None

    def _prepare(self, c: np.ndarray | sp.spmatrix | torch.Tensor) -> torch.Tensor | sp.csr_matrix:
        if isinstance(c, torch.Tensor):
            return c.float()
        if sp.issparse(c) and not self._dense:
            return sp.csr_matrix(c, dtype=np.float32)
        if sp.issparse(c):
            return torch.from_numpy(c.toarray().astype(np.float32))
        return torch.from_numpy(np.asarray(c, dtype=np.float32))

    def take(self, idx: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
                                             torch.Tensor | None]:
        """Counts, masks and batch codes of the cells ``idx``."""
        tidx = torch.from_numpy(idx)
        x = {m: c.index_select(0, tidx) if isinstance(c, torch.Tensor) else torch.from_numpy(c[idx].toarray())
             for m, c in self.counts.items()}
        mask = {m: v[tidx] for m, v in self.mask.items()} if self.mask is not None else None
        return x, mask, self.batch[tidx] if self.batch is not None else None


def adam(params: list[torch.nn.Parameter], *, lr: float, amsgrad: bool = True, weight_decay: float = 0.0
         ) -> torch.optim.Adam:
    """Adam as every trainer here builds it: the fused kernel (one pass over the parameters
    instead of ~12 per-tensor passes; the same update up to float rounding) where the parameters
    allow it (float32 on the CPU or a GPU), else the default implementation."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, amsgrad=amsgrad, weight_decay=weight_decay, fused=fused or None)


def _batches(idx: np.ndarray, batch_size: int, *, drop_last: bool) -> list[np.ndarray]:
    stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
    return [idx[i : i + batch_size] for i in range(0, stop, batch_size)]


def evaluate(model: MMVAE, data: CellData, idx: np.ndarray, *, beta: float, batch_size: int, objective: str = "elbo",
             K: int = 1) -> float:
    """Per-cell loss over ``idx`` in eval mode (cells in the given order)."""
    model.eval()
    total = 0.0
    obj = OBJECTIVES["iwae" if objective == "dreg" else objective]
    kwargs = {"beta": beta} if objective == "elbo" else {}
    with torch.no_grad():
        for b in _batches(idx, batch_size, drop_last=False):
            if len(b) == 1:
                continue
            x, mask, batch = data.take(b)
            total += float(obj(model, x, mask=mask, batch=batch, K=K, **kwargs).loss)
    return total / max(len(idx), 1)


def fit(model: MMVAE, data: CellData, train_idx: np.ndarray, val_idx: np.ndarray | None, cfg: FitConfig, *,
        on_epoch: Callable[[EpochRecord], None] | None = None) -> FitResult:
    """Train ``model`` on ``train_idx``; early-stop on ``val_idx`` (never on test cells)."""
    keep_freed_buffers()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adam(params, lr=cfg.lr, amsgrad=cfg.amsgrad, weight_decay=cfg.weight_decay)
    objective = OBJECTIVES[cfg.objective]
    result = FitResult()
    best_state, bad_epochs = None, 0
    train_idx = np.asarray(train_idx)
    for epoch in range(1, cfg.epochs + 1):
        beta = cfg.beta(epoch)
        cfg.set_lr(opt, epoch)
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        total, recon, kl, seen = 0.0, {}, 0.0, 0
        t0 = time.perf_counter()
        for b in _batches(order, cfg.batch_size, drop_last=cfg.drop_last):
            if len(b) == 1:
                continue
            x, mask, batch = data.take(b)
            kwargs = {"beta": beta} if cfg.objective == "elbo" else {}
            out = objective(model, x, mask=mask, batch=batch, K=cfg.K, **kwargs)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            total += float(out.loss.detach())
            for k, v in out.recon.items():
                recon[k] = recon.get(k, 0.0) + float(v)
            kl += float(out.kl) if out.kl is not None else 0.0
            seen += len(b)
        train_s = time.perf_counter() - t0
        n_train = max(len(train_idx), 1)
        val = None
        if val_idx is not None and len(val_idx):
            val = evaluate(model, data, np.asarray(val_idx), beta=beta, batch_size=cfg.batch_size,
                           objective=cfg.objective, K=cfg.K)
        rec = EpochRecord(epoch=epoch, beta=beta, lr=cfg.lr_at(epoch), train_loss=total / n_train, val_loss=val,
                          recon={k: v / n_train for k, v in recon.items()}, kl=kl / n_train, train_s=train_s,
                          cells_per_s=seen / max(train_s, 1e-9))
        result.history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        if val is None or epoch <= cfg.warmup_epochs:
            continue
        if result.best_val is None or val < result.best_val:
            result.best_val, result.best_epoch, bad_epochs = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                result.stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
