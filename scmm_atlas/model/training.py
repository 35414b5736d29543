"""Every training rule, once: the in-memory trainer (:mod:`.fit`) and the Ray Train workers
(``train/loop.py``) both drive a :class:`TrainingPlan` (after scvi-tools' ``TrainingPlan``).

The rules follow the original scMM so that faithful mode's numbers line up with its: beta =
(epoch - 1) / W during warm-up, then ``kl_weight`` (1: the ELBO); batches of one cell are skipped;
early stopping watches the validation loss only after warm-up, and the best weights are the ones
kept (the last epoch's when validation never ran). The learning rate is constant or follows a
cosine from ``lr`` to ``lr * lr_min_factor`` over the epoch cap. Only the ELBO has a KL term for
beta to weigh: the importance-weighted bounds train on the bound itself (beta 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .mmvae import MMVAE
from .objectives import OBJECTIVES, Objective

LR_SCHEDULES = ("constant", "cosine")
MIN_BATCH_CELLS = 2  # a batch of one cell is skipped (as the original did)


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
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")

    def beta(self, epoch: int) -> float:
        """The KL's weight in ``epoch`` (1-based): the warm-up ramp for the ELBO, 1 for the other bounds."""
        if self.objective != "elbo":
            return 1.0
        w = self.warmup_epochs
        return self.kl_weight * ((epoch - 1) / w if w > 0 and epoch <= w else 1.0)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (1-based)."""
        if self.lr_schedule == "constant" or self.epochs <= 1:
            return self.lr
        progress = (epoch - 1) / (self.epochs - 1)
        return self.lr * (self.lr_min_factor + (1 - self.lr_min_factor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides weights and optimizer (plain values only)."""

    epoch: int = 0  # last completed epoch
    step: int = 0  # optimizer steps so far
    best_val: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    epoch_cells: int = 0  # cells of the current epoch's sequence already trained (mid-epoch checkpoints)
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics (rank 0)


def adam(params: list[torch.nn.Parameter], *, lr: float, amsgrad: bool = True, weight_decay: float = 0.0
         ) -> torch.optim.Adam:
    """Adam as every trainer here builds it: the fused kernel (one pass over the parameters
    instead of ~12 per-tensor passes; the same update up to float rounding) where the parameters
    allow it (float32 on the CPU or a GPU), else the default implementation."""
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, amsgrad=amsgrad, weight_decay=weight_decay, fused=fused or None)


def weights_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights that later steps do not change."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class TrainingPlan:
    """The rules of one run over its epochs: call :meth:`start_epoch`, :meth:`step_loss` per batch,
    :meth:`eval_loss` per validation batch, then :meth:`end_epoch`; :attr:`best` holds the weights to
    keep. ``state`` and ``best`` may come from a checkpoint (a resumed run)."""

    def __init__(self, cfg: FitConfig, state: TrainState | None = None,
                 best: dict[str, torch.Tensor] | None = None) -> None:
        self.cfg, self.state, self.best = cfg, state or TrainState(), best

    def start_epoch(self, opt: torch.optim.Optimizer, epoch: int) -> float:
        """Set ``epoch``'s learning rate on ``opt``; returns its beta."""
        for group in opt.param_groups:
            group["lr"] = self.cfg.lr_at(epoch)
        return self.cfg.beta(epoch)

    def step_loss(self, model: MMVAE, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None,
                  batch: torch.Tensor | None, beta: float) -> Objective:
        """The training objective of one batch (its loss summed over cells)."""
        return OBJECTIVES[self.cfg.objective](model, x, mask=mask, batch=batch, K=self.cfg.K, beta=beta)

    def eval_loss(self, model: MMVAE, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None,
                  batch: torch.Tensor | None, beta: float) -> torch.Tensor:
        """The validation loss of one batch, summed over cells: DReG's surrogate is not a bound, so
        it is scored by the IWAE bound it estimates the gradient of."""
        name = "iwae" if self.cfg.objective == "dreg" else self.cfg.objective
        return OBJECTIVES[name](model, x, mask=mask, batch=batch, K=self.cfg.K, beta=beta).loss

    def end_epoch(self, model: torch.nn.Module, epoch: int, val: float | None) -> bool:
        """Record ``epoch`` as done with validation loss ``val`` (None: no validation cells); keep the
        best weights; returns whether to stop early."""
        st, stop = self.state, False
        st.epoch, st.epoch_cells = epoch, 0
        if val is not None and epoch > self.cfg.warmup_epochs:
            if st.best_val is None or val < st.best_val:
                st.best_val, st.best_epoch, st.bad_epochs = val, epoch, 0
                self.best = weights_copy(model)
            else:
                st.bad_epochs += 1
                stop = st.bad_epochs >= self.cfg.patience
        if self.best is None and epoch == self.cfg.epochs:  # no validation cells, or too short for warm-up
            self.best = weights_copy(model)
        return stop
