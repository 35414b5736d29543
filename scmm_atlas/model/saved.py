"""The saved-model format, in one place (scvi-tools' ``model/base/_save_load.py`` is the model).

A saved model is a folder (an MLflow model's ``artifacts``) holding ``meta.json`` (the model config,
each modality's features in the model's input order, the batch labels in code order) and, beside it,
the weights: a ``.pt`` state dict of plain tensors. Training writes it (:func:`write_meta` plus the
best weights it checkpointed); the MLflow pyfunc flavour and batch inference read it
(:func:`read_saved`). Weights are loaded with ``weights_only``: a pickled object is refused, never run.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .mmvae import MMVAE, MMVAEConfig

META_FILE = "meta.json"
WEIGHTS_SUFFIX = ".pt"


@dataclass
class SavedModel:
    """A model's config, weights (CPU tensors), features and batches, as saved."""

    config: MMVAEConfig
    state: dict[str, torch.Tensor]
    features: dict[str, list[str]]
    batches: list[str]

    def build(self) -> MMVAE:
        """The model in eval mode with these weights."""
        model = MMVAE(self.config)
        model.load_state_dict(self.state)
        return model.eval()


def write_meta(folder: Path, config: MMVAEConfig, features: Mapping[str, list[str]], batches: list[str]) -> Path:
    """Write ``meta.json`` into ``folder``; the weights go beside it."""
    path = Path(folder) / META_FILE
    path.write_text(json.dumps({"model": asdict(config), "features": {m: list(f) for m, f in features.items()},
                                "batches": list(batches)}))
    return path


def find_saved(folder: Path) -> tuple[Path, Path]:
    """The ``meta.json`` at any depth under ``folder`` and the weights beside it."""
    metas = sorted(Path(folder).rglob(META_FILE))
    if not metas:
        raise InputError(str(folder), META_FILE, "not a scmm-atlas model (no meta.json under it)")
    weights = sorted(p for p in metas[0].parent.iterdir() if p.suffix == WEIGHTS_SUFFIX)
    if not weights:
        raise InputError(str(metas[0].parent), "weights", "no .pt weights beside meta.json")
    return metas[0], weights[0]


def read_saved(meta_path: Path, weights_path: Path) -> SavedModel:
    """Read a saved model; weights that are not plain tensors are one :class:`InputError`."""
    meta = json.loads(Path(meta_path).read_text())
    try:
        state = torch.load(weights_path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise InputError(str(weights_path), "weights", f"not plain tensors, refused ({str(exc).splitlines()[0]})"
                         ) from None
    return SavedModel(config=MMVAEConfig.from_dict(meta["model"]), state=state, features=meta["features"],
                      batches=list(meta.get("batches", [])))
