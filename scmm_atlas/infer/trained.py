"""Which trained model inference uses: a registered version, an alias, a run's model, or a folder.

``models:/NAME@champion``, ``models:/NAME/3`` and ``runs:/ID/model`` are resolved through MLflow
(``tracking`` or ``MLFLOW_TRACKING_URI``); a local folder holding ``meta.json`` and the weights
(an MLflow model's ``artifacts``) needs no tracking server. The weights are read once, in the
driver, and handed to the inference actors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..model.saved import SavedModel, find_saved, read_saved


@dataclass
class TrainedModel(SavedModel):
    """A saved model (:mod:`~..model.saved`) and the version its results are published as."""

    version: str = ""
    uri: str = ""


def _from_folder(folder: Path, version: str, uri: str) -> TrainedModel:
    saved = read_saved(*find_saved(folder))
    return TrainedModel(**vars(saved), version=version, uri=uri)


def load_trained(model_uri: str, *, tracking: str | None = None, version: str | None = None) -> TrainedModel:
    """Load ``model_uri``; ``version`` overrides the label results are published under."""
    local = Path(model_uri).expanduser()
    if "://" not in model_uri and not model_uri.startswith(("models:", "runs:")):
        if not local.exists():
            raise InputError(model_uri, "model", "no such folder, and not a models:/ or runs:/ URI")
        return _from_folder(local, version or local.name, str(local.resolve()))
    import mlflow

    if tracking:
        mlflow.set_tracking_uri(tracking)
    label = version or _version_of(model_uri)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except mlflow.exceptions.MlflowException as exc:
        raise InputError(model_uri, "model", f"MLflow cannot resolve it ({str(exc).splitlines()[0]})") from None
    return _from_folder(folder, label, model_uri)


def _version_of(model_uri: str) -> str:
    """The registry version behind ``models:/NAME/N`` or ``models:/NAME@alias``; a run's id otherwise."""
    import mlflow

    if m := re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri):
        return m.group(2)
    if m := re.fullmatch(r"models:/([^/@]+)@([\w-]+)", model_uri):
        try:
            return str(mlflow.MlflowClient().get_model_version_by_alias(m.group(1), m.group(2)).version)
        except mlflow.exceptions.MlflowException as exc:
            raise InputError(model_uri, "model", f"no such registered model or alias ({str(exc).splitlines()[0]})"
                             ) from None
    if m := re.fullmatch(r"runs:/(\w+)/.*", model_uri):
        return f"run-{m.group(1)[:8]}"
    raise InputError(model_uri, "model", "expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
