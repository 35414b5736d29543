"""In-memory training for small data and tests (the distributed trainer lives in ``train/``).

The rules (beta warm-up, learning rate, early stopping, best weights) are :class:`~.training.TrainingPlan`'s,
shared with the distributed trainer. Bookkeeping follows the original scMM so that faithful mode's numbers
line up with its: the epoch's loss is the sum of the batch losses (each summed over cells) divided by
the number of cells in the split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ..memory import keep_freed_buffers
from .mmvae import MMVAE
from .training import MIN_BATCH_CELLS, FitConfig, TrainingPlan, adam


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


def _batches(idx: np.ndarray, batch_size: int, *, drop_last: bool) -> list[np.ndarray]:
    stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
    return [b for b in (idx[i : i + batch_size] for i in range(0, stop, batch_size)) if len(b) >= MIN_BATCH_CELLS]


def evaluate(model: MMVAE, data: CellData, idx: np.ndarray, *, beta: float, plan: TrainingPlan) -> float:
    """Per-cell validation loss over ``idx`` in eval mode (cells in the given order)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for b in _batches(idx, plan.cfg.batch_size, drop_last=False):
            total += float(plan.eval_loss(model, *data.take(b), beta))
    return total / max(len(idx), 1)


def _train_epoch(model: MMVAE, data: CellData, order: np.ndarray, plan: TrainingPlan, opt: torch.optim.Optimizer,
                 beta: float) -> tuple[float, dict[str, float], float, int]:
    """One pass over ``order``: (loss, reconstruction per modality, KL: sums over cells; cells seen)."""
    cfg, params = plan.cfg, [p for g in opt.param_groups for p in g["params"]]
    model.train()
    total, recon, kl, seen = 0.0, {}, 0.0, 0
    for b in _batches(order, cfg.batch_size, drop_last=cfg.drop_last):
        out = plan.step_loss(model, *data.take(b), beta)
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
    return total, recon, kl, seen


def fit(model: MMVAE, data: CellData, train_idx: np.ndarray, val_idx: np.ndarray | None, cfg: FitConfig, *,
        on_epoch: Callable[[EpochRecord], None] | None = None) -> FitResult:
    """Train ``model`` on ``train_idx``; early-stop on ``val_idx`` (never on test cells); the best
    weights are loaded at the end."""
    keep_freed_buffers()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    plan = TrainingPlan(cfg)
    opt = adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, amsgrad=cfg.amsgrad,
               weight_decay=cfg.weight_decay)
    result = FitResult()
    train_idx = np.asarray(train_idx)
    n_train = max(len(train_idx), 1)
    for epoch in range(1, cfg.epochs + 1):
        beta = plan.start_epoch(opt, epoch)
        t0 = time.perf_counter()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        total, recon, kl, seen = _train_epoch(model, data, order, plan, opt, beta)
        train_s = time.perf_counter() - t0
        val = None
        if val_idx is not None and len(val_idx):
            val = evaluate(model, data, np.asarray(val_idx), beta=beta, plan=plan)
        rec = EpochRecord(epoch=epoch, beta=beta, lr=cfg.lr_at(epoch), train_loss=total / n_train, val_loss=val,
                          recon={k: v / n_train for k, v in recon.items()}, kl=kl / n_train, train_s=train_s,
                          cells_per_s=seen / max(train_s, 1e-9))
        result.history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        if plan.end_epoch(model, epoch, val):
            result.stopped_early = True
            break
    result.best_epoch, result.best_val = plan.state.best_epoch, plan.state.best_val
    if plan.best is not None:
        model.load_state_dict(plan.best)
    return result
