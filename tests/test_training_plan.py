"""The training rules, once (model/training.py), without data or Ray: what both trainers obey."""

from __future__ import annotations

import pytest
import torch

from scmm_atlas.model import MMVAE, MMVAEConfig, moe_dreg, moe_iwae
from scmm_atlas.model.training import FitConfig, TrainingPlan, TrainState, adam


def _model() -> MMVAE:
    torch.manual_seed(0)
    return MMVAE(MMVAEConfig(modalities={"RNA": {"n_features": 6, "likelihood": "nb", "hidden": 8, "n_layers": 1},
                                         "ADT": {"n_features": 3, "likelihood": "nb", "hidden": 8, "n_layers": 1}},
                             latent_dim=2))


def _weight(model: torch.nn.Module) -> float:
    return float(next(model.parameters()).detach().sum())


def _set_weight(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        next(model.parameters()).fill_(value)


def test_early_stopping_waits_for_warm_up_then_counts_patience_and_keeps_the_best_weights():
    model, plan = _model(), TrainingPlan(FitConfig(epochs=20, warmup_epochs=2, patience=2))
    losses = {1: 1.0, 2: 0.5, 3: 9.0, 4: 8.0, 5: 9.5, 6: 9.9}  # warm-up epochs never count, however low
    stops = []
    for epoch, val in losses.items():
        _set_weight(model, epoch)
        stops.append(plan.end_epoch(model, epoch, val))
        if stops[-1]:
            break
    assert stops == [False, False, False, False, False, True]  # 4 best, then 5 and 6 worse: patience 2
    assert plan.state.best_epoch == 4 and plan.state.best_val == 8.0 and plan.state.epoch == 6
    model.load_state_dict(plan.best)
    assert _weight(model) == pytest.approx(4 * next(model.parameters()).numel())


def test_without_validation_the_last_epochs_weights_are_kept():
    model, plan = _model(), TrainingPlan(FitConfig(epochs=3, warmup_epochs=0))
    for epoch in (1, 2, 3):
        _set_weight(model, epoch)
        assert plan.end_epoch(model, epoch, None) is False
        assert (plan.best is None) == (epoch < 3)
    _set_weight(model, 0.0)
    model.load_state_dict(plan.best)
    assert _weight(model) == pytest.approx(3 * next(model.parameters()).numel())


def test_a_resumed_plan_continues_its_counters():
    state = TrainState(epoch=7, best_val=2.0, best_epoch=5, bad_epochs=1)
    plan = TrainingPlan(FitConfig(epochs=20, warmup_epochs=0, patience=2), state, best={"w": torch.zeros(1)})
    assert plan.end_epoch(_model(), 8, 3.0) is True  # the second worse epoch in a row
    assert plan.state.best_epoch == 5 and plan.best is not None and list(plan.best) == ["w"]


def test_start_epoch_sets_the_learning_rate_and_returns_beta():
    model = _model()
    opt = adam(list(model.parameters()), lr=1e-2)
    plan = TrainingPlan(FitConfig(epochs=11, lr=1e-2, lr_schedule="cosine", lr_min_factor=0.1, warmup_epochs=4,
                                  kl_weight=0.5))
    assert plan.start_epoch(opt, 3) == pytest.approx(0.25)
    assert opt.param_groups[0]["lr"] == pytest.approx(plan.cfg.lr_at(3))
    assert plan.start_epoch(opt, 11) == 0.5 and opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_importance_weighted_objectives_take_beta_one_only():
    model = _model()
    x = {"RNA": torch.poisson(torch.full((5, 6), 2.0)), "ADT": torch.poisson(torch.full((5, 3), 4.0))}
    plan = TrainingPlan(FitConfig(objective="dreg", K=2, warmup_epochs=10))
    assert plan.cfg.beta(1) == 1.0  # no KL to warm up
    assert torch.isfinite(plan.step_loss(model, x, None, None, plan.cfg.beta(1)).loss)
    assert torch.isfinite(plan.eval_loss(model, x, None, None, 1.0))  # DReG is scored by the IWAE bound
    for objective in (moe_iwae, moe_dreg):
        with pytest.raises(ValueError, match="beta must be 1"):
            objective(model, x, beta=0.5, K=2)


def test_an_unknown_objective_is_refused_by_name():
    with pytest.raises(ValueError, match=r"train\.objective must be one of"):
        FitConfig(objective="elob")
