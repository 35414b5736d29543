"""The MLflow pyfunc flavour of a trained model: ``mlflow.pyfunc.load_model(uri).predict(counts)``
returns joint embeddings.

``counts``: a dict ``{modality: array (cells x the model's features of that modality)}`` or a
DataFrame whose columns are ``MOD:feature`` (any order; features the model does not know are
ignored, those it needs but are missing read as zeros). A modality that is absent (or all-zero for
a cell) is left out of that cell's mixture, so RNA-only data embeds from RNA alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from ..model import MMVAE
from ..model.saved import read_saved

META = "meta"
WEIGHTS = "weights"


# MLflow warns, when the class is created, that predict() has no type hints (under its own "once"
# filter, so only the display can be skipped); a hint would be read as an input schema to validate
# against, which the dict / DataFrame inputs below do not fit.
_show = warnings.showwarning
warnings.showwarning = lambda message, *args, **kwargs: (
    None if "Add type hints to the `predict` method" in str(message) else _show(message, *args, **kwargs))
try:
    class ScmmEmbedder(mlflow.pyfunc.PythonModel):
        def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
            saved = read_saved(Path(context.artifacts[META]), Path(context.artifacts[WEIGHTS]))
            self.model: MMVAE = saved.build()
            self.features: dict[str, list[str]] = saved.features

        # model_input is not annotated: MLflow reads a type hint as a schema to validate inputs against
        def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input, params: dict | None = None
                    ) -> np.ndarray:
            x = self._inputs(model_input)
            mask = {m: v.sum(1) > 0 for m, v in x.items()}
            batch = torch.zeros(len(next(iter(x.values()))), dtype=torch.long) if self.model.config.n_batches else None
            with torch.no_grad():
                return self.model.embed(x, mask=mask, batch=batch).numpy()

        def _inputs(self, model_input: Any) -> dict[str, torch.Tensor]:
            features = self.features
            if isinstance(model_input, pd.DataFrame):
                out = {}
                for mod, names in features.items():
                    cols = [f"{mod}:{f}" for f in names]
                    out[mod] = model_input.reindex(columns=cols, fill_value=0).to_numpy(np.float32)
            elif isinstance(model_input, dict):
                out = {m: np.asarray(model_input[m], dtype=np.float32) if m in model_input else None for m in features}
                n = next(len(v) for v in out.values() if v is not None)
                out = {m: v if v is not None else np.zeros((n, len(features[m])), np.float32) for m, v in out.items()}
            else:
                raise TypeError("predict() takes {modality: counts} or a DataFrame with MOD:feature columns, "
                                f"not {type(model_input).__name__}")
            for mod, arr in out.items():
                if arr.shape[1] != len(features[mod]):
                    raise ValueError(f"{mod}: expected {len(features[mod])} features (the model's), got {arr.shape[1]}")
            return {m: torch.from_numpy(v) for m, v in out.items()}
finally:
    warnings.showwarning = _show
