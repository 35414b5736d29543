"""scmm-atlas: scMM, the mixture-of-experts multimodal VAE, at atlas scale.

The public API for notebooks and scripts, imported on first use (``import scmm_atlas`` stays light):

>>> import scmm_atlas
>>> store = scmm_atlas.open_store("atlas.zarr")                   # a store, local or s3://
>>> config = scmm_atlas.load_config("atlas_cite", ["train.lr=3e-4"])
>>> res = scmm_atlas.results.open("atlas.zarr")                  # published results; .to_anndata()
>>> data = scmm_atlas.StoreDataset("atlas.zarr", scmm_atlas.LoaderConfig(batch_size=256))  # a torch dataset
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {"open_store": "scmm_atlas.store", "load_config": "scmm_atlas.config", "results": "scmm_atlas.results",
            "ShardLoader": "scmm_atlas.data.loader", "LoaderConfig": "scmm_atlas.data.loader",
            "StoreDataset": "scmm_atlas.data.dataset"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scmm_atlas' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "results" else getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
