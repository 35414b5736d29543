"""Checkpoint contents: everything needed to continue a run where it stopped.

Saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``: only tensors and plain
Python values, never pickled objects. The loader's position is the epoch and the cells of its
sequence already trained (plans are pure functions of the seed, epoch and that position), so a run
resumes where the checkpoint was taken, with the same or another number of workers.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ..model.training import TrainState

STATE_FILE = "state.pt"
BEST_FILE = "best_model.pt"


def save(directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
         best_model: dict[str, torch.Tensor] | None) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": asdict(state),
               "torch_rng": torch.get_rng_state()}
    torch.save(payload, directory / STATE_FILE)
    if best_model is not None:
        torch.save(best_model, directory / BEST_FILE)


def load(directory: Path) -> tuple[dict[str, Any], TrainState, dict[str, torch.Tensor] | None]:
    payload = torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
    best = directory / BEST_FILE
    best_model = torch.load(best, weights_only=True, map_location="cpu") if best.exists() else None
    known = {f.name for f in fields(TrainState)}  # a field of an older release (a step count) is dropped
    return payload, TrainState(**{k: v for k, v in payload["state"].items() if k in known}), best_model


def warm_start(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy ``weights`` into ``model`` where names and shapes agree (a model trained before new
    batches or features arrived); returns the parameters left at their initial values."""
    own = model.state_dict()
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
